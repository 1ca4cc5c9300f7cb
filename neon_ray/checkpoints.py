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
Tensor-by-tensor streaming of the weight files lives in ``tensorfile.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from neon_ray import storage as st
from neon_ray.storage import StorageConfig
from neon_ray.tensorfile import TensorMeta, read_header

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


def tensor_index(uri: str, storage: StorageConfig | None = None) -> dict[str, TensorMeta]:
    """Every tensor of a checkpoint (sharded or not), reading headers only."""
    out: dict[str, TensorMeta] = {}
    for name in weight_files(uri, storage):
        out.update(read_header(st.join(uri, name), storage))
    return out
