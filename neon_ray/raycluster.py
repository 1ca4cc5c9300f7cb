"""Joining or starting Ray, the same way for every stage.

``ray.init()`` joins the cluster when ``RAY_ADDRESS`` is set (as it is for a
job started by ``ray job submit``) or an address is given; otherwise an
embedded local Ray starts, sized by ``num_cpus``.
"""

from __future__ import annotations

import os


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def torch_device(num_gpus: float) -> str:
    """The torch device an actor with ``num_gpus`` should use."""
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"
