"""Checkpoints: safetensors weights + a JSON config, never pickle.

A checkpoint is a folder (any storage URI)::

    config.json                        CheckpointInfo: family, preset, model config,
                                       which weights (ema|raw), images seen
    model.safetensors                  weights, or above the shard threshold:
    model-00001-of-00003.safetensors   size-capped shards and
    model.safetensors.index.json       {"weight_map": {key: shard file}}
    manifest.json                      sha256 of every file, written last

Official releases (``.pth``/``.pt``) are read only with
``torch.load(weights_only=True)``; see :func:`load_official_state_dict`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from neon_ray import storage as st
from neon_ray.storage import StorageConfig

FORMAT = "neon_ray.checkpoint/1"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 << 30


@dataclass
class CheckpointInfo:
    """What a checkpoint holds (its ``config.json``)."""

    family: str
    model: dict[str, Any]
    preset: str | None = None
    weights: str = "ema"          # "ema" or "raw": which weights these are
    images_seen: int = 0          # images seen in training, base + fine-tune
    base_train_images: int | None = None  # images seen by the base model's training
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> "CheckpointInfo":
        if data.get("format") != FORMAT:
            raise ValueError(f"{where}: not a neon_ray checkpoint config (format {data.get('format')!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def shard_plan(state_dict: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Keys grouped into shards of at most ``max_shard_bytes`` (one tensor may exceed it)."""
    shards: list[list[str]] = [[]]
    size = 0
    for key, t in state_dict.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def save_checkpoint(uri: str, state_dict: dict[str, torch.Tensor], info: CheckpointInfo,
                    storage: StorageConfig | None = None,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                    manifest_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a checkpoint folder; refuses a folder that already holds one.

    ``manifest_extra`` adds fields to ``manifest.json`` (e.g. a fine-tune
    snapshot's images seen and source digests).
    """
    if st.read_manifest(uri, storage) is not None:
        raise FileExistsError(f"{uri}: a checkpoint already exists here (never overwritten)")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    plan = shard_plan(tensors, max_shard_bytes)
    digests: dict[str, str] = {}
    if len(plan) == 1:
        blob = st_save(tensors, metadata={"format": "pt"})
        st.write_bytes(st.join(uri, SINGLE), blob, storage)
        digests[SINGLE] = st.sha256_bytes(blob)
    else:
        weight_map = {}
        for i, keys in enumerate(plan):
            name = shard_name(i, len(plan))
            blob = st_save({k: tensors[k] for k in keys}, metadata={"format": "pt"})
            st.write_bytes(st.join(uri, name), blob, storage)
            digests[name] = st.sha256_bytes(blob)
            weight_map.update({k: name for k in keys})
            del blob
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                           indent=2, sort_keys=True).encode()
        st.write_bytes(st.join(uri, INDEX), index, storage)
        digests[INDEX] = st.sha256_bytes(index)
    config = json.dumps(info.to_json(), indent=2, sort_keys=True).encode()
    st.write_bytes(st.join(uri, "config.json"), config, storage)
    digests["config.json"] = st.sha256_bytes(config)
    return st.write_manifest(uri, digests, {**(manifest_extra or {}), "kind": "checkpoint",
                                            "family": info.family}, storage)


def load_info(uri: str, storage: StorageConfig | None = None) -> CheckpointInfo:
    """A checkpoint's config; a clear error when there is no checkpoint at ``uri``."""
    where = st.join(uri, "config.json")
    try:
        data = st.read_json(where, storage)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {uri} (no config.json)") from None
    return CheckpointInfo.from_json(data, where)


def weight_files(uri: str, storage: StorageConfig | None = None) -> dict[str, list[str]]:
    """``{file name: [keys]}`` for a checkpoint's weight files, in order."""
    index_uri = st.join(uri, INDEX)
    if st.exists(index_uri, storage):
        weight_map = st.read_json(index_uri, storage)["weight_map"]
        files: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            files.setdefault(name, []).append(key)
        return dict(sorted(files.items()))
    return {SINGLE: []}  # keys unknown until opened


def iter_tensors(uri: str, storage: StorageConfig | None = None,
                 device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` one shard at a time (only one shard resident)."""
    for name in weight_files(uri, storage):
        file_uri = st.join(uri, name)
        path, temp = st.local_copy(file_uri, storage)
        try:
            with safe_open(path, framework="pt", device=device) as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        finally:
            if temp:
                os.unlink(path)


def load_state_dict(uri: str, storage: StorageConfig | None = None,
                    device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint (sharded or not)."""
    if not st.exists(st.join(uri, "config.json"), storage):
        raise FileNotFoundError(f"checkpoint not found: {uri} (no config.json)")
    if not st.is_s3(uri):
        return dict(iter_tensors(uri, storage, device))
    out: dict[str, torch.Tensor] = {}
    for name in weight_files(uri, storage):
        out.update(st_load(st.read_bytes(st.join(uri, name), storage)))
    return {k: v.to(device) for k, v in out.items()}


def checkpoint_digest(uri: str, storage: StorageConfig | None = None) -> str:
    """Content digest of a checkpoint (from its manifest)."""
    manifest = st.read_manifest(uri, storage)
    if manifest is None:
        raise FileNotFoundError(f"checkpoint not found or incomplete: {uri} (no manifest.json)")
    return st.manifest_digest(manifest)


def load_model(uri: str, expect_family: str | None = None, storage: StorageConfig | None = None,
               device: str = "cpu"):
    """Build the checkpoint's network and load its weights strictly.

    Returns ``(family, model_config, model, info)``; the model is in eval mode.
    """
    from neon_ray.families.base import get_family

    info = load_info(uri, storage)
    if expect_family is not None and info.family != expect_family:
        raise ValueError(f"checkpoint {uri} is of family {info.family!r}, expected {expect_family!r}")
    family = get_family(info.family)
    config = family.parse_config(info.model)
    model = family.build(config)
    model.load_state_dict(load_state_dict(uri, storage, device), strict=True)
    return family, config, model.to(device).eval(), info


def load_official_state_dict(path: str, which: str = "ema", trust: bool = False) -> dict[str, torch.Tensor]:
    """Read an official ``.pth``/``.pt`` release without unpickling code.

    ``torch.load(weights_only=True)`` only; a file that needs full unpickling is
    refused unless ``trust`` is set. ``which`` picks the EMA or raw weights from
    the usual nestings (``model_ema``/``ema`` vs ``model``/``state_dict``).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError or RuntimeError here
        if not trust:
            raise ValueError(f"{path}: needs full unpickling, which can run arbitrary code "
                             f"({str(e).splitlines()[0][:120]}); re-run with --trust-pickle "
                             f"only if you trust its source") from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
    order = ("model_ema", "ema", "model", "state_dict", "module", "net") if which == "ema" \
        else ("model", "state_dict", "module", "net")
    while isinstance(obj, dict) and not all(torch.is_tensor(v) for v in obj.values()):
        for key in order:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        else:
            raise ValueError(f"{path}: no {which} weights found (top-level keys: "
                             f"{', '.join(map(str, list(obj)[:10]))})")
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


# Streaming, per-tensor I/O ----------------------------------------------------
# safetensors' ``safe_open`` maps the whole file; every page it touches counts as
# resident memory until the file closes, so reading a 2 GB shard tensor by tensor
# still peaks at 2 GB. These helpers read and write the same format
# (https://github.com/huggingface/safetensors#format: u64 header length, JSON
# header, data) with plain reads and writes, so memory is what the caller holds.

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


def tensor_index(uri: str, storage: StorageConfig | None = None) -> dict[str, TensorMeta]:
    """Every tensor of a checkpoint (sharded or not), reading headers only."""
    out: dict[str, TensorMeta] = {}
    for name in weight_files(uri, storage):
        out.update(read_header(st.join(uri, name), storage))
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
