"""Rows of S by index, for the fine-tune: all in memory, or shard by shard on demand.

A fine-tune step asks for a fixed list of row indices (``finetune.Plan.rows``).
:class:`RowStore` holds every row, PNG-encoded: any order works, memory is
the encoded size of S per worker. :class:`ShardRows` reads a shard from
storage the first time one of its rows is asked for and keeps the most
recently used ``capacity`` shards: with the plan's windowed order (rows
shuffled within windows of shards) a worker holds at most two windows, and
:meth:`ShardRows.prefetch` reads the next window's shards in a background
thread while the current one trains.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable

import numpy as np
import torch

from neon_ray import storage as st
from neon_ray.storage import StorageConfig


def _batch(blobs: list[bytes], labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    from neon_ray.data.synthetic import decode_images

    return decode_images(blobs), torch.from_numpy(np.asarray(labels, np.int64))


class RowStore:
    """S's rows in index order, images kept PNG-encoded and decoded per batch.

    Every worker holds all of S (a global batch may draw any row, and the
    order must not depend on the worker count): memory is the encoded size
    of S per worker, e.g. ~0.1 GB for 50k 32×32 PNGs. For larger S use
    :class:`ShardRows` with a windowed plan.
    """

    def __init__(self, blobs: list[bytes], labels: np.ndarray):
        self.blobs, self.labels = blobs, labels.astype(np.int64)

    @classmethod
    def from_tables(cls, tables: Iterable[Any]) -> "RowStore":
        """From Arrow tables with columns image, label, index (any order, any split)."""
        import pyarrow as pa

        table = pa.concat_tables([t.select(["image", "label", "index"]) for t in tables]).sort_by("index")
        index = table.column("index").to_numpy()
        if not np.array_equal(index, np.arange(len(index))):
            raise ValueError(f"synthetic set: row indices are not 0..{len(index) - 1} exactly once")
        return cls(table.column("image").to_pylist(), table.column("label").to_numpy())

    def __len__(self) -> int:
        return len(self.blobs)

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (n, C, H, W) and int64 labels (n,) of the given rows."""
        return _batch([self.blobs[i] for i in rows], self.labels[rows])

    def close(self) -> None:
        """Nothing to release (the same interface as :class:`ShardRows`)."""


class ShardRows:
    """S's rows read shard by shard from storage, the ``capacity`` most recent shards kept.

    ``uris[i]`` must hold rows ``starts[i] .. starts[i] + counts[i] - 1`` in
    index order (as ``neon-ray sample`` writes them); a shard that does not is
    refused by name when it is first read.
    """

    def __init__(self, uris: list[str], counts: list[int], capacity: int,
                 storage: StorageConfig | None = None):
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        self.uris, self.storage, self.capacity = list(uris), storage, capacity
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.cache: OrderedDict[int, tuple[list[bytes], np.ndarray]] = OrderedDict()
        self.pending: dict[int, Future] = {}   # shards being read ahead (at most ``capacity // 2``)
        self._pool: ThreadPoolExecutor | None = None
        self.loads = 0            # shard reads so far (a re-read after eviction counts again)
        self.read_ahead = 0       # of them, read ahead by prefetch
        self.peak = 0             # most shards held at once

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _read(self, i: int) -> tuple[list[bytes], np.ndarray]:
        """Shard ``i``'s images and labels, checked to hold its index range (any thread)."""
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(st.read_bytes(self.uris[i], self.storage)),
                              columns=["image", "label", "index"])
        expect = np.arange(self.starts[i], self.starts[i + 1])
        if not np.array_equal(table.column("index").to_numpy(), expect):
            raise ValueError(f"{self.uris[i]}: rows are not indices {expect[0]}..{expect[-1]} in order")
        return table.column("image").to_pylist(), table.column("label").to_numpy().astype(np.int64)

    def _shard(self, i: int) -> tuple[list[bytes], np.ndarray]:
        if i in self.cache:
            self.cache.move_to_end(i)
            return self.cache[i]
        ahead = self.pending.pop(i, None)
        self.cache[i] = ahead.result() if ahead is not None else self._read(i)
        self.loads += 1
        self.read_ahead += ahead is not None
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        self.peak = max(self.peak, len(self.cache))
        return self.cache[i]

    def prefetch(self, rows: np.ndarray) -> None:
        """Start reading, in a background thread, the shards of ``rows`` not held yet."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="neon-shard-reader")
        for s in dict.fromkeys(self._shards_of(rows).tolist()):
            if s in self.cache or s in self.pending or len(self.pending) >= max(1, self.capacity // 2):
                continue
            self.pending[s] = self._pool.submit(self._read, s)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (n, C, H, W) and int64 labels (n,) of the given rows."""
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows outside S's {len(self)} rows")
        shard = self._shards_of(rows)
        held = {s: self._shard(s) for s in dict.fromkeys(shard.tolist())}   # each shard looked up once
        offset = rows - self.starts[shard]
        blobs = [held[s][0][o] for s, o in zip(shard.tolist(), offset.tolist())]
        labels = np.array([held[s][1][o] for s, o in zip(shard.tolist(), offset.tolist())], np.int64)
        return _batch(blobs, labels)

    def _shards_of(self, rows: np.ndarray) -> np.ndarray:
        """The shard holding each row."""
        return np.searchsorted(self.starts, rows, side="right") - 1
