"""Reports: sample grids, FID-vs-w plots and result tables."""

from __future__ import annotations

import io

import numpy as np
import torch

from neon_ray import storage as st
from neon_ray.storage import StorageConfig


def grid_image(images: torch.Tensor, rows: int, scale: int = 4, pad: int = 1) -> np.ndarray:
    """uint8 images (N, C, H, W) → one uint8 (H', W', C) grid, nearest-upscaled by ``scale``."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    arr = images.cpu().numpy().transpose(0, 2, 3, 1)
    for i in range(n):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        canvas[y:y + h, x:x + w] = arr[i]
    return canvas.repeat(scale, 0).repeat(scale, 1)


def save_grid(images: torch.Tensor, uri: str, rows: int, scale: int = 4,
              storage: StorageConfig | None = None) -> None:
    """Write a PNG grid of uint8 images (N, C, H, W) to ``uri``."""
    from PIL import Image

    canvas = grid_image(images, rows, scale)
    img = Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    st.write_bytes(uri, buf.getvalue(), storage)
