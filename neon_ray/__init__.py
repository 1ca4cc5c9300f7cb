"""neon_ray: Neon post-hoc improvement of image generators, on Ray.

Stages (one module each): ``sample`` → ``finetune`` → ``merge`` → ``sweep``,
glued by ``pipeline``; model families live in ``neon_ray.families``.
"""

__version__ = "0.1.0"
