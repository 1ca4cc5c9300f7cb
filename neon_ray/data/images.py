"""Real image datasets from any storage URI, as uint8 tensors.

Sources (``load_dataset``):
- ``digits``: the bundled 8×8 digits (see ``digits.py``);
- a Parquet table (a ``.parquet`` file, or a folder of them) with an ``image``
  column of encoded bytes (PNG/JPEG) and an optional integer ``label`` column —
  the format of our synthetic sets, and an easy export of CIFAR-10, FFHQ or
  ImageNet;
- an image folder: ``<root>/<class name>/*.png|jpg`` (classes sorted by name),
  or a flat folder of images (unconditional, label −1).
"""

from __future__ import annotations

import io

import numpy as np
import torch

from neon_ray import storage as st
from neon_ray.storage import StorageConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes → uint8 array (C, H, W); grayscale stays 1 channel."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def encode_png(image: np.ndarray) -> bytes:
    """uint8 array (C, H, W) with C in {1, 3} → PNG bytes (deterministic)."""
    from PIL import Image

    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _stack(images: list[np.ndarray], labels: list[int], where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not images:
        raise ValueError(f"{where}: no images found")
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"{where}: images have different shapes {sorted(shapes)[:3]}")
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def load_parquet_images(uri: str, storage: StorageConfig | None = None,
                        limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels from a Parquet file or folder (``image`` bytes, ``label``)."""
    import pyarrow.parquet as pq

    fs, path = st.pyarrow_filesystem(uri, storage)
    table = pq.read_table(path, filesystem=fs, columns=None)
    if "image" not in table.column_names:
        raise ValueError(f"{uri}: Parquet table has no 'image' column (has {table.column_names})")
    if limit is not None:
        table = table.slice(0, limit)
    if "index" in table.column_names:
        table = table.sort_by("index")
    blobs = table.column("image").to_pylist()
    labels = table.column("label").to_pylist() if "label" in table.column_names else [-1] * len(blobs)
    return _stack([decode_image(b) for b in blobs], labels, uri)


def load_image_folder(uri: str, storage: StorageConfig | None = None,
                      limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images from ``<root>/<class>/*.png`` (labels by sorted class name) or a flat folder."""
    fs, path = st.filesystem(uri, storage)
    if not fs.isdir(path):
        raise FileNotFoundError(f"{uri}: not a folder")
    entries = sorted(fs.ls(path, detail=True), key=lambda e: e["name"])
    classes = [e["name"] for e in entries if e["type"] == "directory"]
    groups = [(i, c) for i, c in enumerate(classes)] or [(-1, path)]
    images, labels = [], []
    for label, folder in groups:
        for f in sorted(fs.ls(folder, detail=False)):
            if f.lower().endswith(IMAGE_SUFFIXES):
                images.append(decode_image(fs.cat_file(f)))
                labels.append(label)
                if limit is not None and len(images) >= limit:
                    return _stack(images, labels, uri)
    return _stack(images, labels, uri)


def load_dataset(source: str, storage: StorageConfig | None = None,
                 limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, C, H, W) and int64 labels (N,) from a named source or URI."""
    if source == "digits":
        from neon_ray.data.digits import load_digits

        images, labels = load_digits()
        return (images[:limit], labels[:limit]) if limit else (images, labels)
    if source.endswith(".parquet"):
        return load_parquet_images(source, storage, limit)
    fs, path = st.filesystem(source, storage)
    if not fs.exists(path):
        raise FileNotFoundError(f"dataset not found: {source}")
    names = [n for n in fs.ls(path, detail=False)] if fs.isdir(path) else []
    if any(n.endswith(".parquet") for n in names):
        return load_parquet_images(source, storage, limit)
    return load_image_folder(source, storage, limit)
