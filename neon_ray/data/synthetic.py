"""The synthetic set S: schema, shard files, manifest and readers.

S lives in one folder (any storage URI)::

    shard-000000.parquet ... shard-000041.parquet   rows: image (PNG bytes), label
                                                    (int32, -1 unconditional), seed
                                                    (int64), index (int64), [latent]
    manifest.json                                   written last by the sampling stage

Readers open S as a Ray Dataset (for Ray Train / Ray Data) or as a torch
``IterableDataset`` (plain loops), decoding PNG to uint8 tensors.
"""

from __future__ import annotations

import io
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from neon_ray import storage as st
from neon_ray.data.images import decode_image
from neon_ray.storage import StorageConfig

SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int32()), ("seed", pa.int64()),
                    ("index", pa.int64())])


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.parquet"


def shard_table(png: list[bytes], labels: list[int], seeds: list[int], indices: list[int],
                latents: np.ndarray | None = None) -> pa.Table:
    """One shard as an Arrow table in the synthetic-set schema."""
    cols = {"image": pa.array(png, pa.binary()), "label": pa.array(labels, pa.int32()),
            "seed": pa.array(seeds, pa.int64()), "index": pa.array(indices, pa.int64())}
    if latents is not None:
        flat = latents.reshape(len(latents), -1).astype(np.float32)
        cols["latent"] = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])
    return pa.table(cols)


def table_bytes(table: pa.Table) -> bytes:
    """A table serialised as one Parquet file (written whole by ``storage.write_bytes``)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def load_manifest(uri: str, storage: StorageConfig | None = None, verify: bool = True) -> dict[str, Any]:
    """S's manifest; a clear error when it is missing, not a synthetic set, or does not verify."""
    manifest = st.read_manifest(uri, storage)
    if manifest is None:
        raise ValueError(f"synthetic set {uri}: no manifest.json (run or finish `neon-ray sample` first)")
    if manifest.get("kind") != "synthetic":
        raise ValueError(f"synthetic set {uri}: manifest.json is of kind {manifest.get('kind')!r}")
    if verify and st.verify_manifest(uri, storage) is None:
        raise ValueError(f"synthetic set {uri}: a shard is missing or does not match manifest.json")
    return manifest


def shard_uris(uri: str, manifest: dict[str, Any]) -> list[str]:
    return [st.join(uri, s["name"]) for s in manifest["shards"]]


def decode_images(blobs: list[bytes]) -> torch.Tensor:
    """PNG bytes → uint8 images (N, C, H, W)."""
    return torch.from_numpy(np.stack([decode_image(b) for b in blobs]))


def ray_dataset(uri: str, storage: StorageConfig | None = None, verify: bool = True):
    """S as a Ray Dataset with columns image (bytes), label, seed, index."""
    import ray.data

    manifest = load_manifest(uri, storage, verify)
    fs, _ = st.pyarrow_filesystem(uri, storage)
    paths = [st.pyarrow_filesystem(u, storage)[1] for u in shard_uris(uri, manifest)]
    return ray.data.read_parquet(paths, filesystem=fs)


def read_table(uri: str, storage: StorageConfig | None = None, verify: bool = True) -> pa.Table:
    """All of S as one Arrow table, sorted by index."""
    manifest = load_manifest(uri, storage, verify)
    tables = [pq.read_table(io.BytesIO(st.read_bytes(u, storage))) for u in shard_uris(uri, manifest)]
    return pa.concat_tables(tables).sort_by("index")


class SyntheticImages(torch.utils.data.IterableDataset):
    """S as a torch iterable of ``(uint8 image (C, H, W), label)``.

    Shards are split over ``rank``/``world_size`` and DataLoader workers, and
    visited in an order shuffled by ``seed`` + ``epoch``.
    """

    def __init__(self, uri: str, storage: StorageConfig | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, verify: bool = True):
        self.uri, self.storage, self.seed = uri, storage, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self.shards = shard_uris(uri, load_manifest(uri, storage, verify))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.shards))
        mine = [self.shards[i] for i in order[self.rank::self.world_size]]
        info = torch.utils.data.get_worker_info()
        if info is not None:
            mine = mine[info.id::info.num_workers]
        rng = np.random.default_rng((self.seed, self.epoch, self.rank))
        for shard in mine:
            table = pq.read_table(io.BytesIO(st.read_bytes(shard, self.storage)), columns=["image", "label"])
            blobs, labels = table.column("image").to_pylist(), table.column("label").to_pylist()
            for j in rng.permutation(len(blobs)):
                yield torch.from_numpy(decode_image(blobs[j])), int(labels[j])
