"""Tokenizers: images ↔ grids of continuous tokens for token-space generators.

A tokenizer maps float images (N, C, H, W) in [−1, 1] to a token grid
(N, c, H/s, W/s) — c channels per token, stride s — and back:

- :class:`IdentityTokenizer`: every pixel is a token (stride 1, c = C), for the
  pixel-space tiny models;
- :class:`VAETokenizer`: the KL-16 autoencoder (:mod:`neon_ray.families.vae`);
  tokens are posterior samples times a fixed scale (MAR/xAR use 0.2325 so that
  latents have about unit variance).

Tokenizers are frozen: they never train and are not part of the generator's
state dict, so a Neon merge never touches them.
"""

from __future__ import annotations

import abc

import torch

from neon_ray.families.vae import AutoencoderKL, VAEConfig


class Tokenizer(abc.ABC):
    """Frozen images ↔ token-grid map."""

    channels: int   # channels per token
    stride: int     # pixels per token along each side

    @abc.abstractmethod
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images (N, C, H, W) float in [−1, 1] → tokens (N, c, H/s, W/s)."""

    @abc.abstractmethod
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N, c, h, w) → images (N, C, h·s, w·s) float, nominally in [−1, 1]."""

    def to(self, device: torch.device | str) -> "Tokenizer":
        return self


class IdentityTokenizer(Tokenizer):
    """Pixels as tokens: one token per pixel, its channels as the token's channels."""

    stride = 1

    def __init__(self, channels: int):
        self.channels = channels

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.shape[1] != self.channels:
            raise ValueError(f"images have {images.shape[1]} channels, tokenizer expects {self.channels}")
        return images

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


class VAETokenizer(Tokenizer):
    """KL autoencoder tokens: ``scale · z`` with z ~ N(mean, exp(logvar)) from the encoder."""

    def __init__(self, vae: AutoencoderKL, scale: float = 0.2325, sample: bool = True):
        self.vae = vae.eval().requires_grad_(False)
        self.scale = scale
        self.sample_posterior = sample
        self.channels = vae.cfg.embed_dim
        self.stride = vae.cfg.stride

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], cfg: VAEConfig = VAEConfig(),
                        scale: float = 0.2325, sample: bool = True) -> "VAETokenizer":
        """A tokenizer from VAE weights (official names); extra keys (e.g. a training
        loss's) are ignored, missing or mis-shaped ones raise ValueError."""
        vae = AutoencoderKL(cfg)
        own = vae.state_dict()
        missing = [k for k in own if k not in state_dict]
        if missing:
            raise ValueError(f"VAE weights lack {len(missing)} tensors, e.g. {missing[0]!r}")
        bad = [k for k in own if tuple(state_dict[k].shape) != tuple(own[k].shape)]
        if bad:
            raise ValueError(f"VAE tensor {bad[0]!r} has shape {tuple(state_dict[bad[0]].shape)}, "
                             f"expected {tuple(own[bad[0]].shape)}")
        vae.load_state_dict({k: state_dict[k] for k in own}, strict=True)
        return cls(vae, scale, sample)

    def to(self, device: torch.device | str) -> "VAETokenizer":
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, logvar = self.vae.encode(images.float())                 # (N, c, H/s, W/s) each
        z = mean
        if self.sample_posterior:
            eps = torch.randn(mean.shape, generator=generator).to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * eps
        return z * self.scale

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(tokens.float() / self.scale)

