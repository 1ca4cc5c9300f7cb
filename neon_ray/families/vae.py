"""The KL-16 autoencoder that xAR (after MAR, Li et al. 2024) uses as its tokenizer.

A convolutional VAE in the layout of the latent-diffusion autoencoder (Rombach
et al. 2022): ResNet blocks with GroupNorm(32) and swish, single-head spatial
self-attention, stride-2 down-sampling and nearest up-sampling, and 1×1
``quant_conv``/``post_quant_conv`` around a diagonal Gaussian posterior. The
state-dict names match the official release (``kl16.ckpt``): with the default
config it has 66.5 M parameters and maps a 256×256 RGB image in [−1, 1] to a
16×16×16 latent (stride 16).

Only the encoder's resolution-16 level has attention; the decoder has none
outside its middle block (as in the released weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of the KL autoencoder (defaults: the released KL-16 tokenizer)."""

    embed_dim: int = 16                       # latent channels
    ch: int = 128                             # base width
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # width multiplier per resolution level
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)  # encoder levels (by resolution) with attention
    resolution: int = 256                     # nominal input size (decides attention levels)
    in_channels: int = 3

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, 1×1 conv projections."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q, self.k, self.v = (nn.Conv2d(ch, ch, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(n, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)                      # (N, 1, H·W, C)
        return x + self.proj_out(out.transpose(-1, -2).reshape(n, c, h, w))


def _mid(ch: int) -> nn.Module:
    """The middle stage: ResNet block, attention, ResNet block."""
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)
    return mid


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as in the LDM autoencoder


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    """(N, 3, H, W) → (N, 2·embed_dim, H/s, W/s): mean and log-variance channels."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mults = (1, *cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        res = cfg.resolution
        for level in range(len(cfg.ch_mult)):
            stage = nn.Module()
            ch_in, ch_out = cfg.ch * mults[level], cfg.ch * mults[level + 1]
            stage.block = nn.ModuleList(
                ResnetBlock(ch_in if i == 0 else ch_out, ch_out) for i in range(cfg.num_res_blocks))
            if res in cfg.attn_resolutions:
                stage.attn = nn.ModuleList(AttnBlock(ch_out) for _ in range(cfg.num_res_blocks))
            if level != len(cfg.ch_mult) - 1:
                stage.downsample = Downsample(ch_out)
                res //= 2
            self.down.append(stage)
        ch = cfg.ch * cfg.ch_mult[-1]
        self.mid = _mid(ch)
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.embed_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if hasattr(stage, "attn"):
                    h = stage.attn[i](h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(N, embed_dim, h, w) → (N, 3, h·s, w·s)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.embed_dim, ch, 3, padding=1)
        self.mid = _mid(ch)
        up = []
        for level in reversed(range(len(cfg.ch_mult))):
            stage = nn.Module()
            ch_out = cfg.ch * cfg.ch_mult[level]
            stage.block = nn.ModuleList(
                ResnetBlock(ch if i == 0 else ch_out, ch_out) for i in range(cfg.num_res_blocks + 1))
            ch = ch_out
            if level != 0:
                stage.upsample = Upsample(ch)
            up.insert(0, stage)
        self.up = nn.ModuleList(up)  # up[0] is the full-resolution level
        self.norm_out = _norm(ch)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """KL autoencoder: ``encode`` gives the posterior's mean and log-variance."""

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.embed_dim, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, 3, H, W) in [−1, 1] → mean, logvar (N, embed_dim, H/s, W/s)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (N, embed_dim, h, w) → image (N, 3, h·s, w·s), nominally in [−1, 1]."""
        return self.decoder(self.post_quant_conv(z))
