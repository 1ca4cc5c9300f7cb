"""The bundled digits set: 1,797 8×8 grayscale handwritten digits, 10 classes.

It ships inside scikit-learn (no download), so tests and the demo train real
models on real data offline. Pixel values 0–16 are scaled to 0–255.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images[:, None, :, :], bunch.target.astype(np.int64)


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (1797, 1, 8, 8) in [0, 255] and int64 labels (1797,)."""
    images, labels = _load()
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())
