"""Model families behind one protocol (see ``base.Family``)."""

from neon_ray.families.base import Family, SamplerConfig, family_names, get_family

__all__ = ["Family", "SamplerConfig", "family_names", "get_family"]
