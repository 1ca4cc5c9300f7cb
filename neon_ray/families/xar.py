"""The xAR family: next-cell autoregression trained by flow matching (Ren et al. 2025).

Training ("noisy context learning" in the xAR paper): the token grid is cut into cells;
each cell k of each image gets its own time t_k ~ logit-normal, and
x_t = (1 − t)·x + t·ε per cell (rectified-flow path); all cells pass through
the block-causal network at once and the loss is the mean squared error of
the predicted velocity against ε − x.

Sampling: cell by cell. Cell k starts from noise at t = 1 and is integrated to
t = 0 on a linear grid 1 → 0.04 (``steps`` points) plus a final step to 0, with
Euler–Maruyama on the SDE that shares the flow's marginals (the SiT sampler,
Ma et al. 2024: drift v − ½·g·s, diffusion g = 2t, score s from the velocity) or
with plain Euler on the ODE. The previous cell enters once, clean (t = 0), at
the first step and its keys/values stay in the KV cache. Classifier-free
guidance grows with the cell index: γ_k = (γ − 1)·k/(K − 1) + 1.

Presets: ``tiny`` (8×8 digits, pixels as tokens, CPU), ``B``/``L``/``H``
(ImageNet-256 on KL-16 latents; tensor names and shapes of the official
release, see ``shared/xar``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from safetensors.torch import load as st_load
from torch import nn

from neon_ray import storage as st
from neon_ray.config import option
from neon_ray.families.base import Family, SampleRNG, SamplerConfig, drop_labels, to_uint8
from neon_ray.families.tokenizers import IdentityTokenizer, Tokenizer, VAETokenizer
from neon_ray.families.vae import VAEConfig
from neon_ray.families.xar_net import KVCache, XARNet, grid_to_seq, seq_to_grid

SOLVERS = ("euler_maruyama", "euler")
T_LAST = 0.04  # the SDE grid ends here; one deterministic step then reaches t = 0


@dataclass
class XARConfig:
    """An xAR network, its tokenizer and its training noise."""

    image_size: int = option(256, "image side in pixels", min=1)
    channels: int = option(3, "image channels", min=1)
    num_classes: int = option(1000, "number of classes; label num_classes is the null label", min=1)
    tokenizer: str = option("vae", "identity (pixels are tokens) | vae (KL-16 latents)")
    cells: int = option(2, "cells per side of the token grid (xAR: 2, i.e. 4 cells)", min=1)
    width: int = option(768, "transformer width", min=4)
    encoder_depth: int = option(8, "encoder blocks", min=0)
    decoder_depth: int = option(8, "decoder blocks", min=0)
    heads: int = option(12, "attention heads", min=1)
    mlp_ratio: float = option(4.0, "MLP hidden size = ⌊2/3·mlp_ratio·width⌋ (gated)", min=0.0,
                              min_exclusive=True)
    rope_theta: float = option(10000.0, "rotary embedding base", min=1.0)
    label_drop: float = option(0.1, "probability of the null label in training (for CFG)",
                               min=0.0, max=1.0)
    time_mean: float = option(0.0, "training times: logit-normal location")
    time_std: float = option(1.0, "training times: logit-normal scale", min=0.0)
    vae_weights: str = option("", "KL-16 VAE weights, .safetensors URI or official .ckpt path "
                                  "(tokenizer vae only)")
    vae_ch_mult: tuple[int, ...] = option((1, 1, 2, 2, 4), "VAE width multipliers per level")
    latent_scale: float = option(0.2325, "tokens = latent_scale · VAE latent", min=0.0,
                                 min_exclusive=True)
    default_guidance: float = option(2.7, "the usual sampler's guidance γ", min=0.0)
    default_steps: int = option(40, "the usual sampler's steps per cell", min=1)

    @property
    def stride(self) -> int:
        return 1 if self.tokenizer == "identity" else 2 ** (len(self.vae_ch_mult) - 1)

    @property
    def token_grid(self) -> int:
        return self.image_size // self.stride

    @property
    def token_channels(self) -> int:
        return self.channels if self.tokenizer == "identity" else VAEConfig.embed_dim

    def validate(self) -> None:
        if self.tokenizer not in ("identity", "vae"):
            raise ValueError(f"tokenizer must be 'identity' or 'vae', got {self.tokenizer!r}")
        if self.tokenizer == "vae" and self.channels != 3:
            raise ValueError(f"channels must be 3 for the vae tokenizer, got {self.channels}")
        if self.image_size % self.stride or self.token_grid % self.cells:
            raise ValueError(f"image_size {self.image_size} must split into {self.cells}×{self.cells} "
                             f"cells of tokens of stride {self.stride}")
        if self.width % self.heads or (self.width // self.heads) % 4:
            raise ValueError(f"width/heads must be a multiple of 4, got {self.width}/{self.heads}")


def _imagenet(width: int, depth: int, heads: int, guidance: float, steps: int) -> XARConfig:
    # Guidance/steps: the official README's evaluation settings for each size.
    return XARConfig(width=width, encoder_depth=depth, decoder_depth=depth, heads=heads,
                     default_guidance=guidance, default_steps=steps)


PRESETS: dict[str, Callable[[], XARConfig]] = {
    "tiny": lambda: XARConfig(image_size=8, channels=1, num_classes=10, tokenizer="identity",
                              cells=2, width=64, encoder_depth=2, decoder_depth=2, heads=4,
                              default_guidance=2.0, default_steps=12),
    "B": lambda: _imagenet(768, 8, 12, 2.7, 40),
    "L": lambda: _imagenet(1024, 16, 16, 2.3, 50),
    "H": lambda: _imagenet(1280, 20, 16, 2.2, 50),
}


# Training ---------------------------------------------------------------------
def logit_normal(shape: tuple[int, ...], mean: float, std: float,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """t = sigmoid(mean + std·n), n ~ N(0, 1): logit-normal times (Esser et al. 2024)."""
    return torch.sigmoid(mean + std * torch.randn(shape, device=device))


def noisy_context(x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell rectified-flow interpolation: x_t = (1 − t_k)·x + t_k·ε, target ε − x.

    x, noise: (N, L, C) in cell order; t: (N, K), one time per cell.
    """
    per_token = t.repeat_interleave(x.shape[1] // t.shape[1], dim=1)[..., None]  # (N, L, 1)
    return (1 - per_token) * x + per_token * noise, noise - x


def flow_matching_loss(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
    """Mean squared velocity error with explicit times t (N, K) and noise ε (N, L, C)."""
    x_t, target = noisy_context(x, t, noise)
    return (model(x_t, t, labels) - target).pow(2).mean()


# Sampling ---------------------------------------------------------------------
def time_grid(steps: int) -> list[float]:
    """``steps`` times linear from 1 to 0.04, then 0 (float64 values)."""
    grid = torch.linspace(1.0, T_LAST, steps, dtype=torch.float64).tolist() if steps > 1 else [1.0]
    return grid + [0.0]


def _cell_velocity(net: XARNet, x: torch.Tensor, t: float, y: torch.Tensor, cell: int,
                   cache: KVCache, context: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """Guided velocity (N, Lc, C) of cell ``cell`` at time t; ``context`` is the clean
    previous cell, entered (and cached) on the cell's first step only."""
    guided = y.shape[0] != x.shape[0]
    xin = torch.cat([x, x]) if guided else x                                   # (N', Lc, C)
    n = xin.shape[0]
    if context is not None:
        ctx = torch.cat([context, context]) if guided else context
        times = torch.tensor([[0.0, t]], device=x.device).expand(n, 2)
        v = net(torch.cat([ctx, xin], 1), times, y, start_cell=cell - 1, cache=cache,
                commit_cells=1)[:, ctx.shape[1]:]
    else:
        v = net(xin, torch.full((n, 1), t, device=x.device), y, start_cell=cell, cache=cache)
    if guided:
        v_cond, v_null = v.chunk(2)
        # Guidance on the drift equals guidance on v: the drift is affine in v.
        v = v_null + gamma * (v_cond - v_null)
    return v


@torch.no_grad()
def sample_tokens(net: XARNet, labels: torch.Tensor, noise: Callable[[int, int], torch.Tensor],
                  sampler: SamplerConfig) -> torch.Tensor:
    """Generate token sequences (N, L, C), cell by cell.

    labels: (N,) in [0, num_classes] (num_classes = null); ``noise(cell, i)``
    returns (N, Lc, C) standard normal draws: i = 0 the starting noise, i ≥ 1 the
    Euler–Maruyama increment of step i − 1. ``sampler.temperature`` scales both.
    """
    num_cells = net.num_cells
    guided = sampler.guidance != 1.0
    y = torch.cat([labels, torch.full_like(labels, net.num_classes)]) if guided else labels
    ts = time_grid(sampler.steps)
    cache, cells = KVCache(), []
    for k in range(num_cells):
        gamma = (sampler.guidance - 1.0) * k / max(num_cells - 1, 1) + 1.0  # γ_k ramp
        x = noise(k, 0) * sampler.temperature                                   # (N, Lc, C)
        for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
            context = cells[-1] if (cells and i == 0) else None
            v = _cell_velocity(net, x, t_cur, y, k, cache, context, gamma)
            dt = t_next - t_cur
            if sampler.solver == "euler":
                x = x + v * dt
                continue
            # Linear path: x_t = (1 − t)x + tε, v = ε − x ⇒ score = −(x_t + (1 − t)v)/t.
            g = 2.0 * t_cur
            score = -(x + (1.0 - t_cur) * v) / t_cur
            x = x + (v - 0.5 * g * score) * dt
            if i < len(ts) - 2:  # the last step returns the mean
                x = x + (g * abs(dt)) ** 0.5 * sampler.temperature * noise(k, i + 1)
        cells.append(x)
    return torch.cat(cells, dim=1)


# The family -------------------------------------------------------------------
def unwrap(model: nn.Module) -> XARNet:
    """The XARNet inside DDP/DeepSpeed (``.module``) or torch.compile (``._orig_mod``) wrappers."""
    m = model
    while not isinstance(m, XARNet):
        inner = getattr(m, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(m, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            raise ValueError(f"expected an xAR network, got {type(model).__name__}")
        m = inner
    return m


def _load_vae_state_dict(uri: str) -> dict[str, torch.Tensor]:
    if uri.endswith(".safetensors"):
        return st_load(st.read_bytes(uri))
    from neon_ray.checkpoints import load_official_state_dict
    return load_official_state_dict(uri, which="raw")


class XARFamily(Family):
    name = "xar"
    config_cls = XARConfig
    presets = PRESETS

    def __init__(self) -> None:
        self._vae_tokenizers: dict[tuple[str, tuple[int, ...], float], VAETokenizer] = {}

    def build(self, config: XARConfig) -> XARNet:
        grid, cells = config.token_grid, config.cells
        net = XARNet((grid, grid), (cells, cells), config.token_channels, config.width,
                     config.encoder_depth, config.decoder_depth, config.heads, config.mlp_ratio,
                     config.num_classes, config.rope_theta)
        net.xar_config = config  # plain attribute: not in the state dict
        return net

    def tokenizer(self, config: XARConfig, device: torch.device | str = "cpu") -> Tokenizer:
        """The config's frozen tokenizer on ``device`` (VAE weights loaded once per family)."""
        if config.tokenizer == "identity":
            return IdentityTokenizer(config.channels)
        if not config.vae_weights:
            raise ValueError("model.vae_weights: required for tokenizer 'vae' (KL-16 weights)")
        key = (config.vae_weights, tuple(config.vae_ch_mult), config.latent_scale)
        if key not in self._vae_tokenizers:
            self._vae_tokenizers[key] = VAETokenizer.from_state_dict(
                _load_vae_state_dict(config.vae_weights), VAEConfig(ch_mult=tuple(config.vae_ch_mult)),
                scale=config.latent_scale)
        return self._vae_tokenizers[key].to(device)

    def _check_images(self, config: XARConfig, images: torch.Tensor) -> None:
        expect = (config.channels, config.image_size, config.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expect:
            raise ValueError(f"images: expected (N, {', '.join(map(str, expect))}), "
                             f"got {tuple(images.shape)}")

    def encode(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """images (N, C, H, W) in [−1, 1] → token sequence (N, L, c) in cell order."""
        config = unwrap(model).xar_config
        self._check_images(config, images)
        grid = self.tokenizer(config, images.device).encode(images)           # (N, c, h, w)
        return grid_to_seq(grid, config.cells, config.cells)

    def loss(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Noisy context learning: one logit-normal time per cell and image."""
        net = unwrap(model)
        config = net.xar_config
        x = self.encode(model, images)                                         # (N, L, c)
        labels = drop_labels(labels.to(x.device), config.num_classes, config.label_drop)
        t = logit_normal((x.shape[0], net.num_cells), config.time_mean, config.time_std, x.device)
        return flow_matching_loss(model, x, labels, t, torch.randn_like(x))

    def default_sampler(self, config: XARConfig) -> SamplerConfig:
        return SamplerConfig(guidance=config.default_guidance, steps=config.default_steps,
                             solver="euler_maruyama")

    def check_sampler(self, sampler: SamplerConfig) -> None:
        if sampler.solver not in SOLVERS:
            raise ValueError(f"sampler.solver: xar supports {', '.join(SOLVERS)}, got {sampler.solver!r}")
        if sampler.churn != 0:
            raise ValueError(f"sampler.churn: not used by xar, must be 0, got {sampler.churn}")

    def sample(self, model: nn.Module, labels: torch.Tensor, seeds: torch.Tensor,
               sampler: SamplerConfig) -> torch.Tensor:
        """uint8 images (N, C, H, W); image i depends only on (labels[i], seeds[i])."""
        self.check_sampler(sampler)
        net = unwrap(model)
        config = net.xar_config
        if labels.shape != seeds.shape or labels.dim() != 1:
            raise ValueError(f"labels {tuple(labels.shape)} and seeds {tuple(seeds.shape)} "
                             f"must both be (N,)")
        if (labels >= config.num_classes).any():
            raise ValueError(f"labels must be < num_classes={config.num_classes} (or -1)")
        device = next(net.parameters()).device
        tokenizer = self.tokenizer(config, device)  # fails fast without VAE weights
        labels = torch.where(labels < 0, config.num_classes, labels).to(device)
        rng = SampleRNG(seeds, device)
        tokens = sample_tokens(net, labels, lambda cell, i: rng.randn(net.cell_len, net.token_dim),
                               sampler)                                       # (N, L, c)
        grid = seq_to_grid(tokens, *net.grid, *net.cells)                     # (N, c, h, w)
        return to_uint8(tokenizer.decode(grid))

    def buffer_keys(self, model: nn.Module) -> set[str]:
        """The block-causal ``mask`` and every block's rope tables."""
        keys = {name for name, _ in model.named_buffers()}
        unknown = [k for k in keys if not (k.endswith("mask") or ".rope.freqs" in k)]
        if unknown:
            raise ValueError(f"unexpected buffer {unknown[0]!r} in an xAR network")
        return keys

    def import_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Official checkpoints use our names already."""
        return state_dict
