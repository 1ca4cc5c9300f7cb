"""The ``flow`` family: conditional flow matching / rectified flow.

Training (Lipman et al. 2023; Liu et al. 2023, rectified flow): the linear path
x_t = (1 − t)·x + t·ε between data x (t = 0) and noise ε ~ N(0, I) (t = 1),
with velocity target dx_t/dt = ε − x (the xAR convention, ../shared/xar), t
drawn from a logit-normal (Esser et al. 2024, SD3 §3.1) or uniformly, and a
mean squared error. Labels are replaced by the null label with probability
``label_drop`` for classifier-free guidance.

Sampling integrates dx/dt = v(x, t) from t = 1 to 0 on a uniform grid of
``steps`` steps with Euler or Heun (explicit trapezoid) steps; guidance mixes
the velocities, v = v_null + γ (v_cond − v_null); ``temperature`` scales the
initial noise. The initial noise comes from per-sample generators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from neon_ray.config import option
from neon_ray.families.base import Family, SampleRNG, SamplerConfig, drop_labels, to_uint8
from neon_ray.families.nets import (Denoiser, NetConfig, check_ode_sampler, check_sample_inputs,
                                    guided, net_config)

SOLVERS = ("euler", "heun")


@dataclass
class FlowConfig(NetConfig):
    """Flow-matching model: the U-Net settings plus the training-time distribution."""

    t_dist: Literal["logit_normal", "uniform"] = option("logit_normal",
                                                       "training time distribution")
    t_mean: float = option(0.0, "logit-normal mean m (t = sigmoid(m + s·n))")
    t_std: float = option(1.0, "logit-normal std s", min=0.0, min_exclusive=True)


def tiny() -> FlowConfig:
    """8×8×1 digits on CPU (~0.18M params)."""
    return FlowConfig(image_size=8, channels=1, num_classes=10, width=16, channel_mult=[1, 2],
                      blocks=1, attn_resolutions=[], dropout=0.0, label_drop=0.1,
                      sample_chunk=64)


def cifar10() -> FlowConfig:
    """32×32×3, DDPM++-sized as in EDM's CIFAR-10 setup (128 channels, ×2,2,2, 4 blocks,
    attention at 16², dropout 0.13); ~57M params."""
    return FlowConfig(image_size=32, channels=3, num_classes=10, width=128, channel_mult=[2, 2, 2],
                      blocks=4, attn_resolutions=[16], dropout=0.13, label_drop=0.1,
                      sample_chunk=256)


class FlowFamily(Family):
    """Flow matching with a class-conditional U-Net; Euler/Heun ODE sampling."""

    name = "flow"
    config_cls = FlowConfig
    presets = {"tiny": tiny, "cifar10": cifar10}

    def build(self, config: FlowConfig) -> nn.Module:
        if not isinstance(config, FlowConfig):
            raise ValueError(f"model config: expected FlowConfig, got {type(config).__name__}")
        return Denoiser(config)

    # Training ----------------------------------------------------------------
    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Flow-matching MSE. images: (N, C, H, W) in [-1, 1]; labels: (N,) int64."""
        cfg: FlowConfig = net_config(model)
        n = images.shape[0]
        labels = drop_labels(labels, cfg.num_classes, cfg.label_drop)
        if cfg.t_dist == "logit_normal":
            t = torch.sigmoid(cfg.t_mean + cfg.t_std * torch.randn(n, device=images.device))  # (N,)
        else:
            t = torch.rand(n, device=images.device)  # (N,)
        eps = torch.randn_like(images)  # (N, C, H, W)
        tb = t[:, None, None, None]
        x_t = (1 - tb) * images + tb * eps
        target = eps - images  # velocity of the linear path
        return (model(x_t, t, labels) - target).square().mean()

    # Sampling ----------------------------------------------------------------
    def default_sampler(self, config: FlowConfig) -> SamplerConfig:
        return SamplerConfig(guidance=1.5, steps=16, solver="heun", churn=0.0, temperature=1.0)

    def check_sampler(self, sampler: SamplerConfig) -> None:
        check_ode_sampler(sampler, SOLVERS, self.name)
        if sampler.churn != 0:
            raise ValueError(f"sampler.churn: flow sampling is a deterministic ODE; churn must be 0, "
                             f"got {sampler.churn!r}")

    @torch.no_grad()
    def sample(self, model: nn.Module, labels: torch.Tensor, seeds: torch.Tensor,
               sampler: SamplerConfig) -> torch.Tensor:
        """uint8 images (N, C, H, W). labels: (N,) int64 (-1 = unconditional); seeds: (N,) int64."""
        self.check_sampler(sampler)
        check_sample_inputs(model, labels, seeds)
        cfg: FlowConfig = net_config(model)
        if labels.numel() == 0:
            return torch.zeros((0, cfg.channels, cfg.image_size, cfg.image_size), dtype=torch.uint8)
        device = next(model.parameters()).device
        labels = labels.to(device)
        was_training = model.training
        model.eval()

        # Initial noise at t = 1, one generator per sample.
        x = sampler.temperature * SampleRNG(seeds, device).randn(
            cfg.channels, cfg.image_size, cfg.image_size)  # (N, C, H, W)
        t_grid = torch.linspace(1.0, 0.0, sampler.steps + 1, dtype=torch.float64).tolist()
        ones = torch.ones(x.shape[0], device=device)

        # Integrate dx/dt = v from t = 1 to 0.
        for t, t_next in zip(t_grid[:-1], t_grid[1:]):
            dt = t_next - t
            v = guided(model, x, t * ones, labels, sampler.guidance)
            if sampler.solver == "euler":
                x = x + dt * v
            else:  # Heun: average the slopes at both ends of the step
                v_next = guided(model, x + dt * v, t_next * ones, labels, sampler.guidance)
                x = x + dt * 0.5 * (v + v_next)

        model.train(was_training)
        return to_uint8(x)
