"""The ``edm`` family: diffusion with EDM preconditioning (Karras et al. 2022, "Elucidating
the Design Space of Diffusion-Based Generative Models", arXiv:2206.00364).

Denoiser (EDM Eq. 7 and Table 1, "Ours" column):
    D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x; c_noise(σ))
    c_skip = σ_data² / (σ² + σ_data²),   c_out = σ·σ_data / √(σ² + σ_data²),
    c_in   = 1 / √(σ² + σ_data²),        c_noise = ln(σ) / 4,   σ_data = 0.5.
Training (Eq. 2, weighted as in Eq. 8 and Table 1): ln σ ~ N(P_mean, P_std²) with
P_mean = −1.2, P_std = 1.2; loss λ(σ)·‖D(y + n; σ) − y‖², n ~ N(0, σ²I),
λ(σ) = (σ² + σ_data²) / (σ·σ_data)².
Sampling: Algorithm 2 (Heun 2nd order with churn; churn 0 gives Algorithm 1) on
the time steps of Eq. 5,
    t_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ,  t_N = 0,  with
σ_min = 0.002, σ_max = 80, ρ = 7. Classifier-free guidance mixes the denoisers,
D = D_null + γ (D_cond − D_null). Initial and churn noise come from
per-sample generators.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from neon_ray.config import option
from neon_ray.families.base import Family, SampleRNG, SamplerConfig, drop_labels, to_uint8
from neon_ray.families.nets import (Denoiser, NetConfig, check_ode_sampler, check_sample_inputs,
                                    guided, net_config)

SOLVERS = ("euler", "heun")


@dataclass
class EDMConfig(NetConfig):
    """EDM model: the U-Net settings plus preconditioning, training and sampler constants."""

    sigma_data: float = option(0.5, "σ_data, the data standard deviation assumed by Table 1",
                               min=0.0, min_exclusive=True)
    p_mean: float = option(-1.2, "P_mean of the log-normal training σ")
    p_std: float = option(1.2, "P_std of the log-normal training σ", min=0.0, min_exclusive=True)
    sigma_min: float = option(0.002, "σ_min, the last nonzero sampling noise level",
                              min=0.0, min_exclusive=True)
    sigma_max: float = option(80.0, "σ_max, the first sampling noise level", min=0.0, min_exclusive=True)
    rho: float = option(7.0, "ρ of the time discretization (Eq. 5)", min=0.0, min_exclusive=True)
    s_min: float = option(0.0, "S_tmin: churn only where t_i >= S_tmin (Algorithm 2)", min=0.0)
    s_max: float = option(1000.0, "S_tmax: churn only where t_i <= S_tmax (≥ σ_max = everywhere)",
                          min=0.0)
    s_noise: float = option(1.0, "S_noise: std multiplier of the churn noise", min=0.0)

    def validate(self) -> None:
        super().validate()
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min: must be < sigma_max ({self.sigma_max}), got {self.sigma_min}")


def tiny() -> EDMConfig:
    """8×8×1 digits on CPU (~0.18M params)."""
    return EDMConfig(image_size=8, channels=1, num_classes=10, width=16, channel_mult=[1, 2],
                     blocks=1, attn_resolutions=[], dropout=0.0, label_drop=0.1, sample_chunk=64)


def cifar10() -> EDMConfig:
    """32×32×3, DDPM++-sized as in EDM's CIFAR-10 setup (128 channels, ×2,2,2, 4 blocks,
    attention at 16², dropout 0.13); ~57M params."""
    return EDMConfig(image_size=32, channels=3, num_classes=10, width=128, channel_mult=[2, 2, 2],
                     blocks=4, attn_resolutions=[16], dropout=0.13, label_drop=0.1,
                     sample_chunk=256)


def denoise(model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor,
            guidance: float | None = None) -> torch.Tensor:
    """D(x; σ) of EDM Eq. 7 with Table 1 preconditioning. x: (N, C, H, W); sigma: (N,).

    ``guidance=None`` calls the network once on the given labels (training);
    a float γ applies classifier-free guidance through fixed-size chunks (sampling).
    """
    s_data = net_config(model).sigma_data
    s = sigma.to(torch.float32)[:, None, None, None]  # (N, 1, 1, 1)
    c_skip = s_data ** 2 / (s ** 2 + s_data ** 2)
    c_out = s * s_data / (s ** 2 + s_data ** 2).sqrt()
    c_in = 1 / (s ** 2 + s_data ** 2).sqrt()
    c_noise = sigma.to(torch.float32).log() / 4  # (N,)
    if guidance is None:
        f = model(c_in * x, c_noise, labels)
    else:
        f = guided(model, c_in * x, c_noise, labels, guidance)
    return c_skip * x + c_out * f


def time_steps(cfg: EDMConfig, steps: int) -> list[float]:
    """t_0 > … > t_{N−1} of EDM Eq. 5, then t_N = 0 (N + 1 values, computed in float64)."""
    inv = 1.0 / cfg.rho
    if steps == 1:
        return [cfg.sigma_max, 0.0]
    ts = [(cfg.sigma_max ** inv + i / (steps - 1) * (cfg.sigma_min ** inv - cfg.sigma_max ** inv))
          ** cfg.rho for i in range(steps)]
    return ts + [0.0]


class EDMFamily(Family):
    """EDM-preconditioned diffusion with a class-conditional U-Net; Heun sampler (Algorithm 2)."""

    name = "edm"
    config_cls = EDMConfig
    presets = {"tiny": tiny, "cifar10": cifar10}

    def build(self, config: EDMConfig) -> nn.Module:
        if not isinstance(config, EDMConfig):
            raise ValueError(f"model config: expected EDMConfig, got {type(config).__name__}")
        return Denoiser(config)

    # Training ----------------------------------------------------------------
    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """EDM loss λ(σ)·‖D(y + n; σ) − y‖² (Eq. 2, λ from Table 1).

        images: (N, C, H, W) in [-1, 1]; labels: (N,) int64.
        """
        cfg: EDMConfig = net_config(model)
        labels = drop_labels(labels, cfg.num_classes, cfg.label_drop)
        n = images.shape[0]
        sigma = (cfg.p_mean + cfg.p_std * torch.randn(n, device=images.device)).exp()  # (N,)
        weight = (sigma ** 2 + cfg.sigma_data ** 2) / (sigma * cfg.sigma_data) ** 2  # λ(σ), (N,)
        noisy = images + sigma[:, None, None, None] * torch.randn_like(images)  # y + n
        err = (denoise(model, noisy, sigma, labels) - images).square()  # (N, C, H, W)
        return (weight[:, None, None, None] * err).mean()

    # Sampling ----------------------------------------------------------------
    def default_sampler(self, config: EDMConfig) -> SamplerConfig:
        return SamplerConfig(guidance=1.5, steps=18, solver="heun", churn=0.0, temperature=1.0)

    def check_sampler(self, sampler: SamplerConfig) -> None:
        check_ode_sampler(sampler, SOLVERS, self.name)

    @torch.no_grad()
    def sample(self, model: nn.Module, labels: torch.Tensor, seeds: torch.Tensor,
               sampler: SamplerConfig) -> torch.Tensor:
        """uint8 images (N, C, H, W) by EDM Algorithm 2. labels: (N,) int64 (-1 = unconditional);
        seeds: (N,) int64."""
        self.check_sampler(sampler)
        check_sample_inputs(model, labels, seeds)
        cfg: EDMConfig = net_config(model)
        if labels.numel() == 0:
            return torch.zeros((0, cfg.channels, cfg.image_size, cfg.image_size), dtype=torch.uint8)
        device = next(model.parameters()).device
        labels = labels.to(device)
        was_training = model.training
        model.eval()
        rng = SampleRNG(seeds, device)
        shape = (cfg.channels, cfg.image_size, cfg.image_size)
        t = time_steps(cfg, sampler.steps)
        ones = torch.ones(labels.shape[0], device=device)
        gamma_max = min(sampler.churn / sampler.steps, math.sqrt(2) - 1)

        def slope(x: torch.Tensor, t_cur: float) -> torch.Tensor:
            """d = (x − D(x; t)) / t, the probability-flow ODE's dx/dt for σ(t) = t."""
            return (x - denoise(model, x, t_cur * ones, labels, sampler.guidance)) / t_cur

        # Sample x_0 ~ N(0, t_0² I) (temperature scales it).
        x = sampler.temperature * t[0] * rng.randn(*shape)  # (N, C, H, W)
        for i in range(sampler.steps):
            t_cur, t_next = t[i], t[i + 1]
            # Churn: raise the noise level to t̂ = t_i + γ_i t_i by adding fresh noise.
            gamma = gamma_max if cfg.s_min <= t_cur <= cfg.s_max else 0.0
            t_hat = t_cur + gamma * t_cur
            if gamma > 0:
                x = x + math.sqrt(t_hat ** 2 - t_cur ** 2) * cfg.s_noise * rng.randn(*shape)
            # Euler step from t̂ to t_{i+1}.
            d = slope(x, t_hat)
            x_next = x + (t_next - t_hat) * d
            # Heun's 2nd-order correction, except on the last step to t_N = 0.
            if sampler.solver == "heun" and t_next != 0:
                x_next = x + (t_next - t_hat) * 0.5 * (d + slope(x_next, t_next))
            x = x_next

        model.train(was_training)
        return to_uint8(x)
