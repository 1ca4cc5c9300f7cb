"""The model-family protocol (DESIGN.md §4) and what every family shares.

A family is a small object the stages call; the stages never branch on which
family they hold. It builds networks from named presets, gives its training
loss, samples uint8 images with per-sample seeds, and says which state-dict
keys are parameters (merged by Neon) and which are buffers (copied from θ_r).

Conventions:
- images are ``(N, C, H, W)``; in data and samples uint8 in [0, 255], inside
  ``loss`` float32 in [-1, 1];
- labels are int64 ``(N,)``; ``-1`` means unconditional. Conditional families
  keep a null label (index ``num_classes``) for classifier-free guidance.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from neon_ray.config import from_dict, option, to_dict


@dataclass
class SamplerConfig:
    """Sampler settings shared by all families; each family checks its own."""

    guidance: float = option(1.0, "classifier-free guidance scale γ (1 = none)", min=0.0)
    steps: int = option(16, "ODE/SDE steps (per cell for xar)", min=1)
    solver: str = option("euler", "integrator: euler | heun | euler_maruyama (family-dependent)")
    churn: float = option(0.0, "EDM stochastic churn S_churn (0 = deterministic)", min=0.0)
    temperature: float = option(1.0, "noise temperature (>1 diversity-seeking)", min=0.0,
                                min_exclusive=True)


class SampleRNG:
    """One generator per sample (EDM's StackedRandomGenerator idea).

    Sample ``i``'s noise comes only from ``seeds[i]``, so an image depends on
    its seed and never on batch size, batch composition or worker.
    """

    def __init__(self, seeds: torch.Tensor | list[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device="cpu").manual_seed(int(s) & ((1 << 63) - 1))
                           for s in (seeds.tolist() if torch.is_tensor(seeds) else seeds)]

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of shape ``(N, *shape)``."""
        out = torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in self.generators])
        return out.to(self.device)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float images in [-1, 1] → uint8 in [0, 255], ``(N, C, H, W)``."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] → float32 in [-1, 1]."""
    return x.float() / 127.5 - 1.0


def drop_labels(labels: torch.Tensor, num_classes: int, p: float) -> torch.Tensor:
    """Classifier-free guidance training: replace labels by the null label with prob. p.

    Unconditional labels (-1) always become the null label.
    """
    labels = torch.where(labels < 0, torch.full_like(labels, num_classes), labels)
    if p > 0:
        drop = torch.rand(labels.shape, device=labels.device) < p
        labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
    return labels


class Family(abc.ABC):
    """A model family: networks, loss, sampler and merge keys.

    Subclasses set ``name``, ``config_cls`` (a dataclass of model settings with
    ``image_size``, ``channels`` and ``num_classes`` fields) and ``presets``.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type]
    presets: ClassVar[dict[str, Callable[[], Any]]]

    # Model configs ---------------------------------------------------------
    def model_config(self, preset: str, overrides: dict[str, Any] | None = None) -> Any:
        """The config of a named preset, with optional field overrides."""
        if preset not in self.presets:
            raise ValueError(f"unknown preset {preset!r} for family {self.name!r} "
                             f"(valid: {', '.join(self.presets)})")
        data = to_dict(self.presets[preset]())
        data.update(overrides or {})
        return from_dict(self.config_cls, data, prefix="model")

    def parse_config(self, data: dict[str, Any]) -> Any:
        return from_dict(self.config_cls, data, prefix="model")

    @abc.abstractmethod
    def build(self, config: Any) -> nn.Module:
        """A freshly initialised network for a model config."""

    # Training ----------------------------------------------------------------
    @abc.abstractmethod
    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Scalar training loss. images: (N, C, H, W) float in [-1, 1]; labels: (N,)."""

    # Sampling ----------------------------------------------------------------
    def default_sampler(self, config: Any) -> SamplerConfig:
        """The family's usual (FID-optimal, mode-seeking) sampler for a config."""
        return SamplerConfig()

    def check_sampler(self, sampler: SamplerConfig) -> None:
        """Raise ValueError naming the field when the family cannot use ``sampler``."""

    @abc.abstractmethod
    def sample(self, model: nn.Module, labels: torch.Tensor, seeds: torch.Tensor,
               sampler: SamplerConfig) -> torch.Tensor:
        """uint8 images (N, C, H, W). labels: (N,) int64; seeds: (N,) int64."""

    # Merge -------------------------------------------------------------------
    def buffer_keys(self, model: nn.Module) -> set[str]:
        """State-dict keys that are buffers: copied from θ_r, never extrapolated."""
        return {name for name, _ in model.named_buffers()}

    def import_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map an official release's keys to ours (identity by default)."""
        return state_dict


_REGISTRY: dict[str, str] = {
    "flow": "neon_ray.families.flow:FlowFamily",
    "edm": "neon_ray.families.edm:EDMFamily",
    "xar": "neon_ray.families.xar:XARFamily",
}


def family_names() -> list[str]:
    return list(_REGISTRY)


def get_family(name: str) -> Family:
    """A built-in family by name, or a user's family as ``package.module:Name``."""
    target = _REGISTRY.get(name, name)
    if ":" not in target:
        raise ValueError(f"unknown family {name!r} (built in: {', '.join(_REGISTRY)}; "
                         f"or give package.module:ClassName)")
    module_name, attr = target.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"family {name!r}: cannot import {module_name} ({e})") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"family {name!r}: {module_name} has no {attr}")
    family = cls() if isinstance(cls, type) else cls
    if not isinstance(family, Family):
        raise ValueError(f"family {name!r}: {target} is not a neon_ray Family")
    return family
