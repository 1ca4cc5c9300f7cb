"""Class-conditional denoiser networks shared by the ``flow`` and ``edm`` families.

A U-Net in the spirit of DDPM++ (Song et al. 2021, as configured for
CIFAR-10 in EDM, Karras et al. 2022): residual blocks whose group norms are
modulated by an embedding of the noise level and the class label (adaptive
group norm, "scale and shift" as in Dhariwal & Nichol 2021, §3), self-attention
at chosen resolutions, skip connections from encoder to decoder.

The label table has ``num_classes + 1`` rows: the last row is the null label
used for classifier-free guidance (Ho & Salimans 2022); label ``-1`` maps to it.

Batch invariance: every layer treats samples independently, but CPU/GPU
kernels pick their algorithm (and so their rounding) by tensor shape: on CPU a
linear layer or a 1×1 convolution gives different last bits for 1–15 rows than
for 16, and a 3×3 convolution differs for 1 row. :func:`call_chunked` therefore
evaluates the network at sampling time on chunks of one fixed row count
(``sample_chunk``), padding the last chunk, so a sample's arithmetic never
depends on the batch it came in (measured: a row's result does not depend on
its position within a fixed-shape chunk either).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from neon_ray.config import option
from neon_ray.families.base import SamplerConfig


@dataclass
class NetConfig:
    """Network settings; each family's model config extends this."""

    image_size: int = option(8, "image height = width in pixels", min=4)
    channels: int = option(1, "image channels", min=1)
    num_classes: int = option(10, "number of classes (0 = unconditional)", min=0)
    width: int = option(16, "base channel count of the U-Net", min=8)
    channel_mult: list[int] = option(default_factory=lambda: [1, 2],
                                     help="channel multiplier per resolution level")
    blocks: int = option(1, "residual blocks per level (encoder; decoder has one more)", min=1)
    attn_resolutions: list[int] = option(default_factory=list,
                                         help="resolutions (pixels) with self-attention")
    dropout: float = option(0.0, "dropout probability inside residual blocks", min=0.0, max=1.0)
    label_drop: float = option(0.1, "probability of the null label in training (for CFG)",
                               min=0.0, max=1.0)
    sample_chunk: int = option(64, "rows per network call when sampling (fixed, so an image "
                               "never depends on batch size)", min=1)

    def validate(self) -> None:
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult: must be a non-empty list of ints >= 1, "
                             f"got {self.channel_mult}")
        if self.width % 8:
            raise ValueError(f"width: must be a multiple of 8, got {self.width}")
        down = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % down:
            raise ValueError(f"image_size: {self.image_size} is not divisible by "
                             f"2^(levels-1) = {down}")
        levels = [self.image_size // 2 ** i for i in range(len(self.channel_mult))]
        for r in self.attn_resolutions:
            if r not in levels:
                raise ValueError(f"attn_resolutions: {r} is not a level resolution {levels}")


def _groups(ch: int) -> int:
    """Group-norm groups: the most groups (≤ 32) that leave ≥ 4 channels each."""
    return max(g for g in range(1, 33) if ch % g == 0 and ch // g >= 4) if ch >= 4 else 1


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise a layer (residual branches start as identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def call_chunked(fn: Callable[..., torch.Tensor], chunk: int, *rows: torch.Tensor) -> torch.Tensor:
    """``fn(*rows)`` evaluated on chunks of exactly ``chunk`` rows, the last one zero-padded.

    Every call sees the same shapes, so kernels choose the same algorithms and a
    row's result depends only on that row (see the module docstring).
    """
    n = rows[0].shape[0]
    outs = []
    for start in range(0, n, chunk):
        part = [r[start:start + chunk] for r in rows]
        pad = chunk - part[0].shape[0]
        if pad:
            part = [torch.cat([p, p.new_zeros((pad, *p.shape[1:]))]) for p in part]
        outs.append(fn(*part)[:chunk - pad])
    return torch.cat(outs)


def noise_embedding(c_noise: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of a scalar noise condition: (N,) → (N, dim).

    Frequencies are geometric from 1 to 100 rad per unit: the families pass
    conditions of order one (flow: t ∈ [0, 1]; edm: ln(σ)/4, EDM Table 1).
    """
    half = dim // 2
    freqs = torch.logspace(0, 2, half, device=c_noise.device, dtype=torch.float32)  # (half,)
    angles = c_noise.float()[:, None] * freqs[None, :]  # (N, half)
    return torch.cat([angles.cos(), angles.sin()], dim=1)  # (N, dim)


class ResBlock(nn.Module):
    """GN → SiLU → conv → adaptive GN (scale, shift from emb) → SiLU → dropout → conv, + skip."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout, affine=False)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (N, cout, H, W)
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)  # (N, cout, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over pixels, residual; heads of 64 channels (at least one)."""

    def __init__(self, ch: int):
        super().__init__()
        self.heads = max(1, ch // 64)
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # (N, heads, HW, c/heads) each
        out = F.scaled_dot_product_attention(q, k, v)  # (N, heads, HW, c/heads)
        return x + self.proj(out.transpose(-1, -2).reshape(n, c, h, w))


class Denoiser(nn.Module):
    """U-Net ``F(x, c_noise, label) -> (N, C, H, W)``.

    The family decides what the output means (flow: a velocity; edm: the
    network F inside the preconditioned denoiser D).
    """

    def __init__(self, cfg: NetConfig):
        super().__init__()
        self.config = cfg
        self.num_classes = cfg.num_classes
        w, emb_dim = cfg.width, 4 * cfg.width
        self.emb_dim = emb_dim

        # Embedding of noise level and label (label table has a null row).
        self.map_noise = nn.Sequential(nn.Linear(w, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.map_label = nn.Embedding(cfg.num_classes + 1, emb_dim)
        nn.init.normal_(self.map_label.weight, std=1.0 / math.sqrt(emb_dim) * 4)

        # Encoder: per level `blocks` ResBlocks (+ attention), then a strided conv down.
        self.stem = nn.Conv2d(cfg.channels, w, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs, ch, res = [w], w, cfg.image_size
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.blocks):
                self.down.append(self._stage(ch, w * mult, res in cfg.attn_resolutions, emb_dim, cfg))
                ch = w * mult
                skip_chs.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_chs.append(ch)
                res //= 2

        # Middle: ResBlock, attention, ResBlock at the lowest resolution.
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, cfg.dropout), Attention(ch),
                                  ResBlock(ch, ch, emb_dim, cfg.dropout)])

        # Decoder: per level `blocks + 1` ResBlocks on [h, skip], then nearest-up + conv.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.blocks + 1):
                self.up.append(self._stage(ch + skip_chs.pop(), w * mult,
                                           res in cfg.attn_resolutions, emb_dim, cfg))
                ch = w * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(ch, ch, 3, padding=1)))
                res *= 2
        self.out = nn.Sequential(nn.GroupNorm(_groups(ch), ch), nn.SiLU(),
                                 _zero(nn.Conv2d(ch, cfg.channels, 3, padding=1)))

    @staticmethod
    def _stage(cin: int, cout: int, attn: bool, emb_dim: int, cfg: NetConfig) -> nn.ModuleList:
        layers = [ResBlock(cin, cout, emb_dim, cfg.dropout)]
        if attn:
            layers.append(Attention(cout))
        return nn.ModuleList(layers)

    def _run(self, stage: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if isinstance(stage, nn.ModuleList):
            for layer in stage:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
            return h
        return stage(h)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W); c_noise: (N,) float; labels: (N,) int64, -1 or num_classes = null."""
        labels = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)
        emb = self.map_noise(noise_embedding(c_noise, self.map_noise[0].in_features))  # (N, E)
        emb = F.silu(emb + self.map_label(labels))  # (N, E)

        h = self.stem(x)  # (N, w, H, W)
        skips = [h]
        for stage in self.down:
            h = self._run(stage, h, emb)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
        for stage in self.up:
            if isinstance(stage, nn.ModuleList):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(stage, h, emb)
        return self.out(h)  # (N, C, H, W)


# Shared sampling helpers ----------------------------------------------------------

def net_config(model: nn.Module) -> NetConfig:
    """The config of a Denoiser, also through wrappers that keep it as ``.module`` (DDP,
    DeepSpeed)."""
    while not isinstance(model, Denoiser):
        if not isinstance(getattr(model, "module", None), nn.Module):
            raise ValueError(f"model: expected a Denoiser (or a wrapper of one), "
                             f"got {type(model).__name__}")
        model = model.module
    return model.config


def guided(net: Denoiser, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor,
           guidance: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): F_null + γ (F_cond − F_null).

    x: (N, C, H, W); c_noise: (N,); labels: (N,) with -1 = null. γ = 1 runs the
    conditional pass only; otherwise both passes share one chunked call. The
    preconditioners of both families are affine in F, so mixing F mixes D or v.
    """
    cfg = net_config(net)
    chunk = cfg.sample_chunk
    if guidance == 1.0:
        return call_chunked(net, chunk, x, c_noise, labels)
    null = torch.full_like(labels, cfg.num_classes)
    out = call_chunked(net, chunk, torch.cat([x, x]), torch.cat([c_noise, c_noise]),
                       torch.cat([labels, null]))  # (2N, C, H, W)
    cond, uncond = out.chunk(2)
    return uncond + guidance * (cond - uncond)


def check_sample_inputs(net: Denoiser, labels: torch.Tensor, seeds: torch.Tensor) -> None:
    """ValueError naming the tensor when labels/seeds do not fit the network."""
    num_classes = net_config(net).num_classes
    if labels.dim() != 1 or seeds.dim() != 1 or labels.shape != seeds.shape:
        raise ValueError(f"labels and seeds must both be (N,), got {tuple(labels.shape)} "
                         f"and {tuple(seeds.shape)}")
    if labels.dtype.is_floating_point or seeds.dtype.is_floating_point:
        raise ValueError("labels and seeds must be integer tensors")
    if labels.numel() and (labels.min() < -1 or labels.max() > num_classes):
        raise ValueError(f"labels: values must be in [-1, {num_classes}] ({num_classes} = null), "
                         f"got {int(labels.min())}..{int(labels.max())}")


def check_ode_sampler(sampler: SamplerConfig, solvers: tuple[str, ...], family: str) -> None:
    """Checks shared by the flow and edm samplers; ValueError naming the field."""
    if sampler.solver not in solvers:
        raise ValueError(f"sampler.solver: {family} supports {' | '.join(solvers)}, "
                         f"got {sampler.solver!r}")
    if not sampler.guidance >= 0:
        raise ValueError(f"sampler.guidance: must be >= 0, got {sampler.guidance!r}")
    if isinstance(sampler.steps, bool) or not isinstance(sampler.steps, int) or sampler.steps < 1:
        raise ValueError(f"sampler.steps: must be an int >= 1, got {sampler.steps!r}")
    if not sampler.temperature > 0:
        raise ValueError(f"sampler.temperature: must be > 0, got {sampler.temperature!r}")
    if not sampler.churn >= 0:
        raise ValueError(f"sampler.churn: must be >= 0, got {sampler.churn!r}")
