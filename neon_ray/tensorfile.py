"""Streaming safetensors I/O: header parsing, ranged reads, in-order shard writing.

safetensors' ``safe_open`` maps the whole file; every page it touches counts as
resident memory until the file closes, so reading a 2 GB shard tensor by tensor
still peaks at 2 GB. These helpers read and write the same format
(https://github.com/huggingface/safetensors#format: u64 header length, JSON
header, data) with plain reads and writes, so memory is what the caller holds.
The streaming merge is built on them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from neon_ray import storage as st
from neon_ray.storage import StorageConfig

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
              "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lies in a checkpoint: weight file, dtype, shape, byte range."""

    key: str
    file: str                 # weight file name inside the checkpoint folder
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int                # absolute offset of the tensor's bytes in the file
    nbytes: int


def read_header(file_uri: str, storage: StorageConfig | None = None) -> dict[str, TensorMeta]:
    """The tensors of one safetensors file, from its header only."""
    fs, path = st.filesystem(file_uri, storage)
    try:
        with fs.open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n < (100 << 20):
                raise ValueError(f"{file_uri}: not a safetensors file")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise FileNotFoundError(f"{file_uri}: not found") from None
    name = file_uri.rstrip("/").rsplit("/", 1)[-1]
    out = {}
    for key, e in header.items():
        if key == "__metadata__":
            continue
        if e["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{file_uri}: tensor {key!r} has unsupported dtype {e['dtype']}")
        begin, end = e["data_offsets"]
        out[key] = TensorMeta(key, name, _ST_DTYPES[e["dtype"]], tuple(e["shape"]), 8 + n + begin,
                              end - begin)
    return out


class TensorReader:
    """Reads tensors, or byte ranges of them, with plain reads; one weight file open at a time."""

    def __init__(self, uri: str, storage: StorageConfig | None = None):
        self.uri, self.storage = uri, storage
        self._name: str | None = None
        self._f: Any = None

    def _file(self, name: str) -> Any:
        if name != self._name:
            self.close()
            fs, path = st.filesystem(st.join(self.uri, name), self.storage)
            self._f = fs.open(path, "rb", block_size=16 << 20) if st.is_s3(self.uri) \
                else open(path, "rb", buffering=0)
            self._name = name
        return self._f

    def read_into(self, meta: TensorMeta, offset: int, out: torch.Tensor) -> None:
        """Fill ``out`` (contiguous uint8, CPU) with bytes ``offset:offset+len`` of a tensor."""
        n = out.numel()
        if offset + n > meta.nbytes:
            raise ValueError(f"{meta.key}: read past the tensor's end")
        f = self._file(meta.file)
        f.seek(meta.start + offset)
        view, got = memoryview(out.numpy()), 0
        while got < n:
            k = f.readinto(view[got:])
            if not k:
                raise ValueError(f"{st.join(self.uri, meta.file)}: truncated at tensor {meta.key!r}")
            got += k

    def get(self, meta: TensorMeta) -> torch.Tensor:
        """One whole tensor."""
        t = torch.empty(meta.shape, dtype=meta.dtype)
        if meta.nbytes:
            self.read_into(meta, 0, t.reshape(-1).view(torch.uint8))
        return t

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        self._f, self._name = None, None

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ShardWriter:
    """Writes one safetensors file in order: the header (from shapes), then tensor bytes.

    ``order`` is the order the tensors' bytes must arrive in (by element size,
    then name, which keeps every tensor aligned, as safetensors itself does).
    Locally the file is written under a temporary name beside its final one and
    renamed on :meth:`close`; for S3 it is staged in a local temporary file and
    uploaded whole. The sha256 is computed as the bytes pass: :meth:`write` does
    both, or a caller may call :meth:`write_only` and :meth:`hash_only` on the same
    bytes from two threads (each in order), so hashing overlaps a throttled disk.
    """

    def __init__(self, uri: str, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 storage: StorageConfig | None = None):
        self.uri, self.storage = uri, storage
        tensors = sorted(tensors, key=lambda t: (-t[1].itemsize, t[0]))
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for key, dtype, shape in tensors:
            n = dtype.itemsize * int(torch.Size(shape).numel())
            header[key] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                           "data_offsets": [offset, offset + n]}
            offset += n
        self.order = [key for key, _, _ in tensors]
        self._left = self._unhashed = offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        if st.is_s3(uri):
            fd, self._tmp = tempfile.mkstemp(prefix="neon-ray-", suffix=".safetensors")
        else:
            folder = os.path.dirname(st.filesystem(uri)[1])
            os.makedirs(folder, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".safetensors")
        self._f = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        head = memoryview(len(blob).to_bytes(8, "little") + blob)
        self._f.write(head)
        self._hash.update(head)

    @staticmethod
    def _bytes(data: torch.Tensor) -> memoryview:
        return memoryview(data.reshape(-1).view(torch.uint8).numpy())

    def write(self, data: torch.Tensor) -> None:
        """Append tensor bytes (a contiguous CPU tensor of any dtype) and hash them."""
        self.write_only(data)
        self.hash_only(data)

    def write_only(self, data: torch.Tensor) -> None:
        view = self._bytes(data)
        self._left -= len(view)
        if self._left < 0:
            raise ValueError(f"{self.uri}: more bytes written than the header declares")
        self._f.write(view)

    def hash_only(self, data: torch.Tensor) -> None:
        view = self._bytes(data)
        self._unhashed -= len(view)
        self._hash.update(view)

    def close(self) -> str:
        """Finish the file under its final name; returns its sha256."""
        if self._left or self._unhashed:
            raise ValueError(f"{self.uri}: {self._left} bytes of tensor data missing")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if st.is_s3(self.uri):
            try:
                st.upload_file(self._tmp, self.uri, self.storage)
            finally:
                os.unlink(self._tmp)
        else:
            os.replace(self._tmp, st.filesystem(self.uri)[1])
        return self._hash.hexdigest()

    def abort(self) -> None:
        """Drop the partial file."""
        self._f.close()
        if os.path.exists(self._tmp):
            os.unlink(self._tmp)
