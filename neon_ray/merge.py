"""Stage 3: the Neon merge, streaming over checkpoints and in memory for the search.

Neon (Alemohammad, Wang, Baraniuk, ICLR 2026, arXiv:2510.03597) extrapolates the
base weights θ_r away from the self-trained weights θ_s:

    θ_neon = θ_r − w (θ_s − θ_r)                     (w > 0 for mode-seeking samplers)

Only the family's parameters are extrapolated; buffers (masks, position tables)
and non-float tensors are copied from θ_r. The difference is formed from the
original-dtype values upcast (never from 16-bit copies: a short fine-tune moves
weights by less than bf16 resolves). The arithmetic is fp64 for every dtype
(more than the fp32 the paper's recipe needs): then the result is within one
ulp of the exact value even where θ_r and w(θ_s − θ_r) nearly cancel, which
fp32 arithmetic misses by many ulps for fp32 weights and, on coarse bf16 grids
where exact cancellations are common, for 16-bit weights too. The streaming
merge is bound by I/O, so this costs nothing measurable there. Where θ_r itself
is not finite it is kept as is.

:func:`merge_checkpoints` streams: it reads byte ranges of one tensor at a time
from each input (one weight file open per input), computes chunk by chunk into
a small ring of buffers; a writer thread appends them to size-capped output
shards and a hasher thread hashes them. Memory stays a few tens of MB whatever the model
size. :class:`InMemoryMerger` builds θ_w for many w from resident state dicts
(Ray Tune trials, DESIGN.md §5).
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from neon_ray import checkpoints as ck
from neon_ray import storage as st
from neon_ray.config import option
from neon_ray.storage import StorageConfig
from neon_ray.tensorfile import ShardWriter, TensorMeta, TensorReader

CHUNK = 1 << 20            # elements merged per step (8 MB of fp64 work space per buffer)
RING = 8                   # output chunks (8 MB each) in flight to the writer and hasher threads


def check_w(w: float) -> float:
    """``w`` as a float; one-line ValueError unless finite."""
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise ValueError(f"w: must be a finite number, got {w!r}")
    return float(w)


def _neon_into(r: torch.Tensor, s: torch.Tensor, w: float, out: torch.Tensor,
               work_r: torch.Tensor, work_s: torch.Tensor) -> None:
    """out = θ_r − w(θ_s − θ_r) elementwise; 1-D, equal lengths, work_* fp64 scratch."""
    work_r.copy_(r)
    work_s.copy_(s)
    # torch.lerp(a, b, t) = a + t(b − a) for |t| < 0.5, else b − (b − a)(1 − t)
    # (ATen Lerp.h); with t = −w both are θ_r − w(θ_s − θ_r), each with fp64 rounding only.
    work_r.lerp_(work_s, -w)
    if not math.isfinite(float(work_r.sum())):
        bad = ~torch.isfinite(r)       # keep θ_r where it is inf/nan
        work_r[bad] = r[bad].to(work_r.dtype)
    out.copy_(work_r)


def neon_tensor(theta_r: torch.Tensor, theta_s: torch.Tensor, w: float) -> torch.Tensor:
    """θ_neon = θ_r − w(θ_s − θ_r) for one float tensor, in θ_r's dtype (see module doc)."""
    w = check_w(w)
    if theta_r.shape != theta_s.shape or theta_r.dtype != theta_s.dtype:
        raise ValueError(f"θ_r {tuple(theta_r.shape)} {theta_r.dtype} and θ_s "
                         f"{tuple(theta_s.shape)} {theta_s.dtype} differ")
    if not theta_r.is_floating_point():
        raise ValueError(f"cannot extrapolate a {theta_r.dtype} tensor")
    if w == 0.0:                       # bit-exact base (also for −0.0 and non-finite θ_s)
        return theta_r.clone()
    r, s = theta_r.reshape(-1), theta_s.reshape(-1)
    out = torch.empty_like(r)
    _neon_into(r, s, w, out, torch.empty(r.shape, dtype=torch.float64, device=r.device),
               torch.empty(r.shape, dtype=torch.float64, device=r.device))
    return out.reshape(theta_r.shape)


# Streaming merge over checkpoints ---------------------------------------------------------------

@dataclass
class MergeConfig:
    """``neon-ray merge``: write θ_neon = θ_r − w(θ_s − θ_r) as a checkpoint."""

    base: str = option(help="base checkpoint θ_r (folder URI)")
    finetuned: str = option(help="self-trained snapshot θ_s (folder URI)")
    w: float = option(help="extrapolation weight w in θ_r − w(θ_s − θ_r); w = −1 gives θ_s")
    out: str = option(help="output checkpoint folder (must not exist or be empty)")
    storage: StorageConfig = option(default_factory=StorageConfig, help="object-storage settings")
    max_shard_bytes: int = option(ck.DEFAULT_SHARD_BYTES, "largest output weight file, bytes", min=1)


@dataclass
class MergePlan:
    """Everything a merge needs, checked before anything is written."""

    base: str
    finetuned: str
    w: float
    base_info: ck.CheckpointInfo
    ft_info: ck.CheckpointInfo
    base_digest: str
    ft_digest: str
    base_meta: dict[str, TensorMeta]
    ft_meta: dict[str, TensorMeta]
    merge_keys: set[str] = field(default_factory=set)   # float parameters: extrapolated


def name_list(keys: set[str] | list[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def family_keys(info: ck.CheckpointInfo) -> tuple[set[str], set[str]]:
    """(parameter keys, buffer keys) of the family's network for ``info``, built on meta."""
    from neon_ray.families.base import get_family

    family = get_family(info.family)
    config = family.parse_config(info.model)
    with torch.device("meta"):
        model = family.build(config)
    keys = set(model.state_dict())
    buffers = family.buffer_keys(model) & keys
    return keys - buffers, buffers


def check_output_free(out: str, storage: StorageConfig | None = None) -> None:
    """FileExistsError unless ``out`` is absent or an empty folder."""
    if not st.is_s3(out) and os.path.isfile(st.filesystem(out)[1]):
        raise FileExistsError(f"{out}: exists and is a file")
    if st.listdir(out, storage):
        raise FileExistsError(f"{out}: already exists and is not empty (never overwritten)")


def plan_merge(base: str, finetuned: str, w: float, out: str,
               storage: StorageConfig | None = None) -> MergePlan:
    """Check the inputs against each other and the family (headers only, no tensor data)."""
    w = check_w(w)
    check_output_free(out, storage)
    base_info, ft_info = ck.load_info(base, storage), ck.load_info(finetuned, storage)
    if base_info.family != ft_info.family:
        raise ValueError(f"families differ: base {base} is {base_info.family!r}, "
                         f"finetuned {finetuned} is {ft_info.family!r}")
    plan = MergePlan(base, finetuned, w, base_info, ft_info, ck.checkpoint_digest(base, storage),
                     ck.checkpoint_digest(finetuned, storage), ck.tensor_index(base, storage),
                     ck.tensor_index(finetuned, storage))
    bk, fk = set(plan.base_meta), set(plan.ft_meta)
    if bk != fk:
        raise ValueError(f"{finetuned}: tensor keys differ from base {base}: missing "
                         f"[{name_list(bk - fk)}], extra [{name_list(fk - bk)}]")
    for key in sorted(bk):
        b, f = plan.base_meta[key], plan.ft_meta[key]
        if b.shape != f.shape:
            raise ValueError(f"tensor {key!r}: shape {list(b.shape)} in base, {list(f.shape)} in finetuned")
        if b.dtype != f.dtype:
            raise ValueError(f"tensor {key!r}: dtype {b.dtype} in base, {f.dtype} in finetuned")
    params, buffers = family_keys(base_info)
    net = params | buffers
    if net != bk:
        raise ValueError(f"{base}: keys differ from family {base_info.family!r}'s network: "
                         f"missing [{name_list(net - bk)}], extra [{name_list(bk - net)}]")
    if w != 0.0:      # w = 0 copies everything: the base bit for bit
        plan.merge_keys = {k for k in params if plan.base_meta[k].dtype.is_floating_point}
    return plan


def _shards(metas: list[TensorMeta], max_shard_bytes: int) -> list[list[TensorMeta]]:
    shards: list[list[TensorMeta]] = [[]]
    size = 0
    for m in metas:
        if shards[-1] and size + m.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(m)
        size += m.nbytes
    return shards


class _Stream:
    """Reads both inputs chunk by chunk, merges, and feeds the writer and hasher threads."""

    def __init__(self, plan: MergePlan, storage: StorageConfig | None):
        self.plan = plan
        self.rb = TensorReader(plan.base, storage)
        self.rs = TensorReader(plan.finetuned, storage)
        nbytes = CHUNK * 8
        self.in_r = torch.empty(nbytes, dtype=torch.uint8)    # raw input bytes of θ_r, θ_s
        self.in_s = torch.empty(nbytes, dtype=torch.uint8)
        self.work = [torch.empty(CHUNK, dtype=torch.float64) for _ in range(2)]
        self.ring = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(RING)]
        self.pending: list[tuple[Future, ...]] = [()] * RING
        self.slot = 0
        # One thread writes, one hashes (each in order): hashing overlaps a throttled disk.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="neon-merge-writer")
        self.hasher = ThreadPoolExecutor(1, thread_name_prefix="neon-merge-hasher")

    def _next(self) -> torch.Tensor:
        """A free output buffer (waits for the writer and hasher to finish with it)."""
        self.slot = (self.slot + 1) % RING
        for f in self.pending[self.slot]:
            f.result()
        return self.ring[self.slot]

    def _submit(self, writer: ShardWriter, buf: torch.Tensor) -> None:
        self.pending[self.slot] = (self.pool.submit(writer.write_only, buf),
                                   self.hasher.submit(writer.hash_only, buf))

    def finish(self, writer: ShardWriter) -> Future:
        """Close ``writer`` once all its bytes are written and hashed; the future holds its sha256."""
        hashed = self.hasher.submit(lambda: None)
        return self.pool.submit(lambda: (hashed.result(), writer.close())[1])

    def tensor(self, writer: ShardWriter, key: str) -> None:
        b = self.plan.base_meta[key]
        if key not in self.plan.merge_keys:      # buffers, non-float tensors, or w = 0
            for off in range(0, b.nbytes, len(self.ring[0])):
                buf = self._next()[:min(len(self.ring[0]), b.nbytes - off)]
                self.rb.read_into(b, off, buf)
                self._submit(writer, buf)
            return
        s, size = self.plan.ft_meta[key], b.dtype.itemsize
        numel = b.nbytes // size
        for start in range(0, numel, CHUNK):
            n = min(CHUNK, numel - start)
            r_in, s_in = self.in_r[:n * size], self.in_s[:n * size]
            self.rb.read_into(b, start * size, r_in)
            self.rs.read_into(s, start * size, s_in)
            out = self._next()[:n * size]
            _neon_into(r_in.view(b.dtype), s_in.view(b.dtype), self.plan.w, out.view(b.dtype),
                       self.work[0][:n], self.work[1][:n])
            self._submit(writer, out)

    def drain(self) -> None:
        self.hasher.submit(lambda: None).result()
        self.pool.submit(lambda: None).result()
        for futures in self.pending:
            for f in futures:
                f.result()

    def close(self) -> None:
        self.hasher.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.rb.close()
        self.rs.close()


def merge_checkpoints(base: str, finetuned: str, w: float, out: str,
                      storage: StorageConfig | None = None,
                      max_shard_bytes: int = ck.DEFAULT_SHARD_BYTES) -> dict[str, Any]:
    """Write θ_neon = θ_r − w(θ_s − θ_r) to ``out`` (streaming); returns the manifest.

    Refuses (before writing anything) mismatched keys, shapes, dtypes or
    families, a non-finite w and an existing output. On any error while
    writing, what was written under ``out`` is removed.
    """
    plan = plan_merge(base, finetuned, w, out, storage)
    metas = sorted(plan.base_meta.values(), key=lambda m: m.key)
    shards = _shards(metas, max_shard_bytes)
    names = [ck.SINGLE] if len(shards) == 1 else [ck.shard_name(i, len(shards)) for i in range(len(shards))]
    created = not st.exists(out, storage)
    written: list[str] = []
    stream = _Stream(plan, storage)
    writers: list[ShardWriter] = []
    # One intra-op thread: chunks are small and memory-bound, and the overlap that pays
    # is reading/merging here against writing and hashing in their threads. With torch's
    # default threads the same merge ran 3x slower on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Stream every shard: chunks go to the writer thread, which also closes (renames) the file.
        digests: dict[str, Future] = {}
        for name, shard in zip(names, shards):
            writer = ShardWriter(st.join(out, name), [(m.key, m.dtype, m.shape) for m in shard], storage)
            writers.append(writer)
            for key in writer.order:
                stream.tensor(writer, key)
            digests[name] = stream.finish(writer)
            written.append(name)
        stream.drain()
        files = {name: f.result() for name, f in digests.items()}
        # Index, config, then the manifest last.
        if len(shards) > 1:
            weight_map = {m.key: name for name, shard in zip(names, shards) for m in shard}
            index = json.dumps({"metadata": {"total_size": sum(m.nbytes for m in metas)},
                                "weight_map": weight_map}, indent=2, sort_keys=True).encode()
            written.append(ck.INDEX)
            st.write_bytes(st.join(out, ck.INDEX), index, storage)
            files[ck.INDEX] = st.sha256_bytes(index)
        neon = {"w": plan.w, "base_digest": plan.base_digest, "finetuned_digest": plan.ft_digest}
        b, f = plan.base_info, plan.ft_info
        info = ck.CheckpointInfo(
            family=b.family, model=b.model, preset=b.preset, weights=b.weights,
            images_seen=f.images_seen,
            base_train_images=b.base_train_images if b.base_train_images is not None else b.images_seen,
            extra={"neon": {**neon, "base": base, "finetuned": finetuned}})
        config = json.dumps(info.to_json(), indent=2, sort_keys=True).encode()
        written.append("config.json")
        st.write_bytes(st.join(out, "config.json"), config, storage)
        files["config.json"] = st.sha256_bytes(config)
        written.append(st.MANIFEST)
        return st.write_manifest(out, files, {"kind": "checkpoint", "family": b.family, "neon": neon},
                                 storage)
    except BaseException:
        stream.close()          # lets the write in flight finish, cancels the rest
        for writer in writers:
            writer.abort()
        for name in written:
            st.remove(st.join(out, name), storage)
        if created and not st.is_s3(out) and os.path.isdir(st.filesystem(out)[1]) \
                and not os.listdir(st.filesystem(out)[1]):
            os.rmdir(st.filesystem(out)[1])
        raise
    finally:
        stream.close()
        torch.set_num_threads(threads)


def run(cfg: MergeConfig) -> dict[str, Any]:
    """``neon-ray merge``."""
    return merge_checkpoints(cfg.base, cfg.finetuned, cfg.w, cfg.out, cfg.storage, cfg.max_shard_bytes)


# In-memory merge for the search ------------------------------------------------------------------

class InMemoryMerger:
    """θ_w = θ_r − w(θ_s − θ_r) for many w from state dicts resident on one device.

    θ_r and θ_s are held in fp32 (no copy when they already are), and each call
    runs one ``torch.lerp(θ_r, θ_s, −w)`` per tensor into preallocated buffers
    (or straight into a model's fp32 parameters), reused between w values. Unlike
    the streaming merge, fp32 weights are computed in fp32: the error is at most
    about 2⁻²⁴(|θ| + 3(1+|w|)|θ_s − θ_r|), a few ulps, irrelevant for a search.
    ``copy_keys`` (buffers) and non-float tensors are copied from θ_r.
    """

    def __init__(self, base: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                 copy_keys: set[str] = frozenset(), device: torch.device | str | None = None):
        if set(base) != set(finetuned):
            raise ValueError(f"state dicts differ: missing [{name_list(set(base) - set(finetuned))}], "
                             f"extra [{name_list(set(finetuned) - set(base))}]")
        for k, r in base.items():
            if r.shape != finetuned[k].shape or r.dtype != finetuned[k].dtype:
                raise ValueError(f"tensor {k!r}: {tuple(r.shape)} {r.dtype} in base, "
                                 f"{tuple(finetuned[k].shape)} {finetuned[k].dtype} in finetuned")
        self.device = torch.device(device) if device is not None else next(iter(base.values())).device
        self.base = {k: v.to(self.device) for k, v in base.items()}
        self.keys = {k for k, v in base.items() if k not in copy_keys and v.is_floating_point()}
        self._r = {k: self.base[k].float() for k in self.keys}
        self._s = {k: finetuned[k].to(self.device, torch.float32) for k in self.keys}
        # Where θ_r is not finite, θ_r is kept (as in the streaming merge).
        self._bad = {k: ~torch.isfinite(self._r[k]) for k in self.keys
                     if not bool(torch.isfinite(self._r[k]).all())}
        self._out: dict[str, torch.Tensor] | None = None      # allocated by the first merged()
        self._scratch = torch.empty(0, dtype=torch.float32, device=self.device)

    def _scratch_for(self, n: int) -> torch.Tensor:
        """fp32 work space for targets that are not fp32 tensors on this device."""
        if self._scratch.numel() < n:
            self._scratch = torch.empty(max(self._r[k].numel() for k in self.keys),
                                        dtype=torch.float32, device=self.device)
        return self._scratch[:n]

    def _into(self, key: str, w: float, target: torch.Tensor) -> None:
        if key not in self.keys or w == 0.0:        # copied, or w = 0: θ_r bit for bit
            target.copy_(self.base[key])
            return
        r, s = self._r[key], self._s[key]
        fp32 = target.dtype == torch.float32 and target.device == r.device and target.is_contiguous()
        out = target if fp32 else self._scratch_for(r.numel()).view(r.shape)
        torch.lerp(r, s, -w, out=out)               # = θ_r − w(θ_s − θ_r)
        if key in self._bad:
            out[self._bad[key]] = r[self._bad[key]]
        if not fp32:
            target.copy_(out)

    @torch.no_grad()
    def merged(self, w: float) -> dict[str, torch.Tensor]:
        """θ_w as a state dict of preallocated tensors, overwritten by the next call."""
        w = check_w(w)
        if self._out is None:
            self._out = {k: torch.empty_like(v) for k, v in self.base.items()}
        for k, out in self._out.items():
            self._into(k, w, out)
        return self._out

    @torch.no_grad()
    def load_into(self, model: nn.Module, w: float) -> None:
        """Write θ_w into ``model``'s parameters and buffers in place (keys must match)."""
        w = check_w(w)
        state = model.state_dict()
        if set(state) != set(self.base):
            raise ValueError(f"model keys differ: missing [{name_list(set(self.base) - set(state))}], "
                             f"extra [{name_list(set(state) - set(self.base))}]")
        for k, target in state.items():
            if target.shape != self.base[k].shape:
                raise ValueError(f"tensor {k!r}: model has {tuple(target.shape)}, "
                                 f"checkpoint {tuple(self.base[k].shape)}")
            self._into(k, w, target)
