"""Feature extractors: the space FID and precision/recall are measured in.

An :class:`Extractor` maps uint8 images (N, C, H, W) to float32 features
(N, dim) and carries an ``id`` naming its weights, so statistics made with one
extractor are never compared with another's (see ``refstats.check_compatible``).

Kinds (:class:`ExtractorConfig` ``kind``):

- ``digits``: :class:`~neon_ray.evaluate.digits_net.DigitsNet` trained on the
  bundled digits with a fixed seed on first use, then cached in ``cache_dir`` as
  ``digits-cnn-v1.safetensors`` plus ``digits-cnn-v1.json`` holding its sha256.
  id ``digits-cnn-v1:<sha256[:12]>``. Training is bitwise deterministic on one
  machine; a CPU with other vector units may round differently and get
  another id, so copy the cached file along with reference statistics.
- ``inception``: clean-fid's Inception-v3 (Parmar et al. 2022, "On Aliased
  Resizing and Surprising Subtleties in GAN Evaluation"), read from the local
  TorchScript file ``inception_path`` (clean-fid's ``inception-2015-12-05.pt``;
  never downloaded here). Loading uses ``torch.jit.load``: TorchScript is a
  serialized graph plus tensors run by the TorchScript interpreter, not a
  pickle that imports and calls arbitrary Python, but it is still code from the
  file's publisher — use the NVIDIA file clean-fid names. Images are resized as
  clean-fid's "clean" mode does (PIL bicubic on float32 channels to 299×299)
  and grayscale repeats to 3 channels. id ``inception-v3-clean-fid``.
- ``user``: ``package.module:fn``; ``fn(cfg: ExtractorConfig)`` returns an object
  with ``id``, ``dim`` and ``__call__(images) -> (N, dim)`` features.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from neon_ray import storage as st
from neon_ray.config import option

DIGITS_NAME = "digits-cnn-v1"
DIGITS_SEED = 0
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 + INCEPTION_FILE)
INCEPTION_ID = "inception-v3-clean-fid"


@dataclass
class ExtractorConfig:
    """Which feature extractor to use and where its weights live."""

    kind: Literal["digits", "inception", "user"] = option("digits", "digits | inception | user")
    inception_path: str | None = option(None, f"local clean-fid {INCEPTION_FILE} "
                                        f"(default: <cache_dir>/{INCEPTION_FILE})")
    user: str | None = option(None, "package.module:fn returning an extractor (kind=user)")
    cache_dir: str | None = option(None, "cache folder (default: $NEON_RAY_CACHE or ~/.cache/neon_ray)")
    device: str = option("cpu", "torch device the extractor runs on")
    batch_size: int = option(64, "images per forward pass", min=1)

    def validate(self) -> None:
        if self.kind == "user" and not (self.user and ":" in self.user):
            raise ValueError(f"user: kind=user needs package.module:fn, got {self.user!r}")

    def resolved_cache_dir(self) -> str:
        return self.cache_dir or os.environ.get("NEON_RAY_CACHE") or os.path.expanduser("~/.cache/neon_ray")

    def resolved_inception_path(self) -> str:
        return self.inception_path or os.path.join(self.resolved_cache_dir(), INCEPTION_FILE)


class Extractor:
    """uint8 images (N, C, H, W) → float32 features (N, dim), in batches, without gradients."""

    id: str
    dim: int

    def __init__(self, id: str, dim: int, device: str = "cpu", batch_size: int = 64):
        self.id, self.dim = id, dim
        self.device = torch.device(device)
        self.batch_size = batch_size

    def check_images(self, images: torch.Tensor) -> None:
        """Raise ValueError when ``images`` is not what :meth:`forward` takes."""
        if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images: expected a uint8 tensor (N, C, H, W), got "
                             f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """One batch: uint8 (B, C, H, W) on ``self.device`` → float (B, dim)."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        self.check_images(images)
        out = np.empty((images.shape[0], self.dim), np.float32)  # (N, dim)
        for i in range(0, images.shape[0], self.batch_size):
            batch = images[i:i + self.batch_size].to(self.device)
            out[i:i + batch.shape[0]] = self.forward(batch).float().cpu().numpy()
        return out


# Digits CNN ---------------------------------------------------------------------

class DigitsExtractor(Extractor):
    """Penultimate layer (64 dims) of :class:`DigitsNet`, for (N, 1, 8, 8) images."""

    def __init__(self, net, digest: str, device: str = "cpu", batch_size: int = 256):
        super().__init__(f"{DIGITS_NAME}:{digest[:12]}", net.fc.out_features, device, batch_size)
        self.net = net.to(self.device).eval()
        self.digest = digest

    def check_images(self, images: torch.Tensor) -> None:
        super().check_images(images)
        if tuple(images.shape[1:]) != (1, 8, 8):
            raise ValueError(f"images: the digits extractor takes (N, 1, 8, 8), got {tuple(images.shape)}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images.float() / 127.5 - 1.0)


def digits_weights(cache_dir: str) -> tuple[str, str]:
    """Path of the cached digits-net weights and their sha256; trains and caches on first use."""
    from safetensors.torch import save as st_save

    from neon_ray.data.digits import load_digits
    from neon_ray.evaluate.digits_net import train_digits_net

    weights = os.path.join(cache_dir, f"{DIGITS_NAME}.safetensors")
    meta = os.path.join(cache_dir, f"{DIGITS_NAME}.json")
    if os.path.exists(weights) and os.path.exists(meta):
        digest = json.loads(Path(meta).read_text())["sha256"]
        if st.sha256_uri(weights) != digest:
            raise ValueError(f"{weights}: sha256 differs from {meta}; delete both to retrain")
        return weights, digest
    # Train once, deterministically; both files are written whole (temp + rename).
    images, labels = load_digits()
    net = train_digits_net(images, labels, seed=DIGITS_SEED)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    # No safetensors metadata: it is a hash map whose key order (so the file's sha256)
    # changes from process to process. The json next to the weights carries it instead.
    data = st_save(state)
    digest = st.sha256_bytes(data)
    st.write_bytes(weights, data)
    st.write_json(meta, {"name": DIGITS_NAME, "sha256": digest, "seed": DIGITS_SEED,
                         "feature_dim": net.fc.out_features})
    return weights, digest


def digits_extractor(cfg: ExtractorConfig) -> DigitsExtractor:
    from safetensors.torch import load as st_load

    from neon_ray.evaluate.digits_net import DigitsNet

    path, digest = digits_weights(cfg.resolved_cache_dir())
    net = DigitsNet()
    net.load_state_dict(st_load(Path(path).read_bytes()), strict=True)
    return DigitsExtractor(net, digest, cfg.device, cfg.batch_size)


# Inception (clean-fid) --------------------------------------------------------------

class InceptionExtractor(Extractor):
    """clean-fid's Inception-v3 pool features (2048) with its "clean" resize."""

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 64):
        super().__init__(INCEPTION_ID, 2048, device, batch_size)
        from cleanfid.resize import build_resizer

        self.resize = build_resizer("clean")  # HWC [0, 255] → (299, 299, 3) float32
        self.net = torch.jit.load(path, map_location=self.device).eval()

    def check_images(self, images: torch.Tensor) -> None:
        super().check_images(images)
        if images.shape[1] not in (1, 3):
            raise ValueError(f"images: expected 1 or 3 channels, got {tuple(images.shape)}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)  # grayscale → RGB, as PIL's convert("RGB")
        hwc = images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3) uint8
        x = np.stack([self.resize(im) for im in hwc])   # (B, 299, 299, 3) float32 in [0, 255]
        x = torch.from_numpy(x).permute(0, 3, 1, 2).to(self.device)  # (B, 3, 299, 299)
        # clean-fid's InceptionV3W.forward: scale to [-1, 1], run the pool-3 layers.
        return self.net.layers.forward((x - 128) / 128).reshape(x.shape[0], 2048)


def inception_extractor(cfg: ExtractorConfig) -> InceptionExtractor:
    path = cfg.resolved_inception_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights not found at {path}: download {INCEPTION_URL} "
                                f"(the file clean-fid uses) and place it there, or set extractor.inception_path")
    return InceptionExtractor(path, cfg.device, cfg.batch_size)


# User extractors -------------------------------------------------------------------

def user_extractor(cfg: ExtractorConfig):
    module_name, attr = (cfg.user or "").split(":", 1)
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"extractor.user: cannot load {cfg.user!r} ({e})") from None
    ext = fn(cfg)
    if not (isinstance(getattr(ext, "id", None), str) and isinstance(getattr(ext, "dim", None), int)
            and callable(ext)):
        raise ValueError(f"extractor.user: {cfg.user} returned {type(ext).__name__}, "
                         f"not an extractor with id (str), dim (int) and __call__(images)")
    return ext


_KINDS = {"digits": digits_extractor, "inception": inception_extractor, "user": user_extractor}


def build_extractor(cfg: ExtractorConfig) -> Extractor:
    """The extractor ``cfg`` names (training or loading its weights as needed)."""
    return _KINDS[cfg.kind](cfg)


def extract(extractor, images: torch.Tensor) -> np.ndarray:
    """``extractor(images)`` as float32 (N, dim) numpy, checked (user extractors may return tensors)."""
    out = extractor(images)
    out = out.detach().float().cpu().numpy() if torch.is_tensor(out) else np.asarray(out, np.float32)
    if out.shape != (images.shape[0], extractor.dim):
        raise ValueError(f"extractor {extractor.id}: returned features of shape {out.shape}, "
                         f"expected {(images.shape[0], extractor.dim)}")
    return out.astype(np.float32, copy=False)
