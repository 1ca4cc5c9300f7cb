"""Stage 2: fine-tune a copy of the base model θ_r on its own samples S (DESIGN.md §1, §5).

Neon (Alemohammad, Wang, Baraniuk, ICLR 2026, §3) fine-tunes θ_r on S with the
model's own training recipe, changing only the learning-rate policy: a small
target LR reached by a linear warm-up, for a budget B counted in images seen,
with a snapshot θ_s every K images (the best (snapshot, w) pair is chosen
later). This module is the pure core and the driver:

- :class:`FinetuneConfig`, the settings of ``neon-ray finetune``;
- :class:`Plan`, the data order and schedule as pure functions: global batch t
  is a fixed list of S rows, a function of (seed, t) only (rows shuffled over
  all of S, or within windows of shards with ``window_shards``), cut into micro-batches
  of a fixed size; worker r of W takes micro-batches [r·a, (r+1)·a) with
  a = GB / (micro·W). The loss noise of a micro-batch is seeded by (seed, t,
  micro-batch), so 1 worker and 2 workers at the same global batch compute the
  same gradients, and a resumed run repeats an uninterrupted one;
- :func:`micro_loss` / :func:`plain_step`, one training step with no Ray and no
  DeepSpeed (the family loss, AdamW, gradient clipping, the EMA update);
- :func:`run`, which checks everything it can before any worker starts and
  then hands over to the Ray Train + DeepSpeed shell in ``finetune_worker``.

Output (any storage URI)::

    <out>/plan.json                       settings, written first (a re-run with others is refused)
    <out>/snap-00250000/                  sampling weights as a checkpoint + manifest
    <out>/ray/train-w2-z3/checkpoint-*/   Ray Train checkpoints (DeepSpeed state + EMA)
    <out>/manifest.json                   lists the snapshots; written last
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import numpy as np
import torch

from neon_ray import checkpoints, storage as st
from neon_ray.config import option, to_dict
from neon_ray.data.rows import RowStore, ShardRows
from neon_ray.families.base import to_float
from neon_ray.storage import StorageConfig
from neon_ray.training import set_lr, update_ema, warmup_lr


@dataclass
class FinetuneConfig:
    """Settings of ``neon-ray finetune``."""

    checkpoint: str = option("", "base checkpoint URI (θ_r)")
    data: str = option("", "synthetic set S (folder URI with manifest.json)")
    out: str = option("", "output folder URI for snapshots and Ray Train checkpoints")
    images: int = option(1_000_000, "budget B: images seen in fine-tuning", min=1)
    snapshot_every: int = option(250_000, "snapshot every K images and at B (taken after the first "
                                 "step reaching each; its manifest gives the exact count)", min=1)
    lr: float = option(1e-4, "target learning rate after warm-up", min=0.0, min_exclusive=True)
    warmup_images: int = option(0, "linear LR warm-up length in images", min=0)
    batch: int = option(256, "global batch (images per optimizer step, all workers)", min=1)
    micro_batch: int = option(0, "images per forward pass per worker (0 = batch/workers); fix it "
                              "to make runs with different worker counts compute the same", min=0)
    workers: int = option(1, "Ray Train workers", min=1)
    zero_stage: int = option(0, "DeepSpeed ZeRO stage (0-3)", min=0, max=3)
    ema_decay: float = option(0.999, "EMA decay per optimizer step", min=0.0, max=1.0)
    weights: Literal["ema", "raw"] = option("ema", "weights a snapshot holds: ema | raw")
    bf16: bool = option(False, "bf16 autocast (weights, EMA and optimizer stay fp32)")
    seed: int = option(0, "seed of the data order and the loss noise", min=0)
    weight_decay: float | None = option(None, "AdamW weight decay (default: the base's recipe, else 0)",
                                        min=0.0)
    grad_clip: float | None = option(None, "max gradient norm, 0 = off (default: the base's recipe, "
                                     "else 1)", min=0.0)
    beta1: float = option(0.9, "AdamW β1", min=0.0, max=1.0)
    beta2: float = option(0.999, "AdamW β2", min=0.0, max=1.0)
    use_gpu: bool = option(False, "one GPU per worker (nccl); else CPU (gloo)")
    cpus_per_worker: float = option(1.0, "CPUs each worker reserves", min=0.0)
    threads: int = option(1, "torch threads per worker", min=1)
    max_failures: int = option(3, "worker-group failures to recover from (FailureConfig)", min=-1)
    require_same_base: bool = option(True, "refuse S sampled from a checkpoint other than --checkpoint")
    deepspeed: dict[str, Any] = option(default_factory=dict,
                                       help="extra DeepSpeed config, merged over the generated one")
    window_shards: int = option(0, "shuffle S within windows of this many shards, each worker reading "
                                "them as needed (the next window ahead) and holding three windows at "
                                "most; 0 = shuffle all of S, held in memory by every worker", min=0)
    fail_at_images: int = option(0, "testing: the last worker kills itself once when images seen "
                                 "first reaches this (0 = off)", min=0)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> None:
        for name in ("checkpoint", "data", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name}: a URI is required")
        if self.snapshot_every > self.images:
            raise ValueError(f"snapshot_every: {self.snapshot_every} is larger than the budget "
                             f"images={self.images}")
        if self.snapshot_every < self.batch:
            raise ValueError(f"snapshot_every: {self.snapshot_every} is less than one global batch "
                             f"({self.batch})")
        micro = self.micro_batch or self.batch // self.workers
        if micro < 1 or self.batch % (micro * self.workers):
            raise ValueError(f"batch: {self.batch} is not a multiple of workers × micro_batch "
                             f"({self.workers} × {micro})")

    @property
    def micro(self) -> int:
        return self.micro_batch or self.batch // self.workers


# Plan: data order, schedule, seeds (pure) ---------------------------------------------

@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, num: int, shard_rows: tuple[int, ...] = (), window: int = 0) -> np.ndarray:
    """The order S's rows are visited in during one epoch, seeded by (seed, epoch).

    ``window = 0`` (or at least the shard count): a permutation of all rows.
    Otherwise shards are taken in a seeded order, ``window`` at a time, and the
    rows of each window are permuted among themselves, so a reader needs at
    most two windows of shards at once (``shard_rows``: rows per shard, in
    index order).
    """
    rng = np.random.default_rng([seed, epoch])
    if not window or window >= len(shard_rows):
        return rng.permutation(num)
    starts = np.concatenate([[0], np.cumsum(shard_rows)])
    order = rng.permutation(len(shard_rows))
    windows = [np.concatenate([np.arange(starts[s], starts[s + 1]) for s in order[g:g + window]])
               for g in range(0, len(order), window)]
    return np.concatenate([rng.permutation(rows) for rows in windows])


@dataclass(frozen=True)
class Plan:
    """What every worker does at every step, independent of the worker count."""

    num_rows: int          # N, rows of S
    batch: int             # global batch GB
    micro: int             # rows per micro-batch
    images: int            # budget B
    every: int             # snapshot interval K
    lr: float
    warmup_images: int
    seed: int
    shard_rows: tuple[int, ...] = ()   # rows per shard of S (for the windowed order)
    window: int = 0                    # shards per shuffle window; 0 = shuffle all of S

    @property
    def steps(self) -> int:
        """Optimizer steps: ceil(B / GB)."""
        return math.ceil(self.images / self.batch)

    @property
    def micros_per_step(self) -> int:
        return self.batch // self.micro

    def targets(self) -> list[int]:
        """Snapshot targets in images: K, 2K, ... and B."""
        out = list(range(self.every, self.images + 1, self.every))
        return out if out and out[-1] == self.images else out + [self.images]

    def snapshot_steps(self) -> dict[int, int]:
        """{steps done: target}: a target is taken after the first step reaching it."""
        return {math.ceil(t / self.batch): t for t in self.targets()}

    def lr_at(self, step: int) -> float:
        """Linear warm-up to ``lr`` over ``warmup_images`` (in whole steps), then constant."""
        return warmup_lr(step, self.lr, math.ceil(self.warmup_images / self.batch))

    def rows(self, step: int, micro: int) -> np.ndarray:
        """S row numbers of micro-batch ``micro`` of step ``step``: (micro,) int64."""
        pos = step * self.batch + micro * self.micro + np.arange(self.micro)  # global stream position
        epochs, offset = np.divmod(pos, self.num_rows)
        out = np.empty(self.micro, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = epoch_order(self.seed, int(e), self.num_rows, tuple(self.shard_rows),
                                   self.window)[offset[sel]]
        return out

    def window_steps(self) -> int:
        """Steps a window of shards lasts at least (how far ahead to read); 0 without windows."""
        if not self.window or not self.shard_rows:
            return 0
        full = self.shard_rows[:-1] or self.shard_rows    # the last shard may be a short remainder
        return max(1, self.window * min(full) // self.batch)

    def micro_seed(self, step: int, micro: int) -> int:
        """Seed of a micro-batch's loss noise (t, ε, label drop)."""
        return int(np.random.SeedSequence([self.seed, step, micro]).generate_state(1, np.uint64)[0]
                   & ((1 << 63) - 1))

    def micros_of(self, rank: int, world: int) -> range:
        """Micro-batches of each step that worker ``rank`` of ``world`` computes."""
        a = self.micros_per_step // world
        return range(rank * a, (rank + 1) * a)


def make_plan(cfg: FinetuneConfig, num_rows: int, shard_rows: tuple[int, ...] = ()) -> Plan:
    return Plan(num_rows=num_rows, batch=cfg.batch, micro=cfg.micro, images=cfg.images,
                every=cfg.snapshot_every, lr=cfg.lr, warmup_images=cfg.warmup_images, seed=cfg.seed,
                shard_rows=tuple(shard_rows), window=cfg.window_shards)


def row_source(plan: Plan, data: str, manifest: dict[str, Any], storage: StorageConfig | None) -> ShardRows:
    """S read shard by shard, holding two windows at most (for a windowed plan)."""
    from neon_ray.data import synthetic

    return ShardRows(synthetic.shard_uris(data, manifest), list(plan.shard_rows), 2 * plan.window, storage)


def snapshot_name(target: int) -> str:
    return f"snap-{target:08d}"


# The train step (no Ray, no DeepSpeed) ----------------------------------------------

def micro_loss(family, model, images: torch.Tensor, labels: torch.Tensor, seed: int,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """The family loss on one micro-batch with its noise drawn from ``seed``.

    Families draw t, ε and label drops from torch's global generator; seeding it
    per micro-batch makes them a function of (seed, step, micro-batch) alone.
    images: (n, C, H, W) uint8; labels: (n,) int64.
    """
    torch.manual_seed(seed)
    return family.loss(model, to_float(images).to(device), labels.to(device))


def plain_step(family, model, optimizer, ema, batches: list[tuple[torch.Tensor, torch.Tensor, int]],
               lr: float, grad_clip: float, ema_decay: float, device: torch.device | str = "cpu") -> float:
    """One optimizer step on the mean loss of ``batches`` [(images, labels, seed)]; returns it."""
    set_lr(optimizer, lr)
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for images, labels, seed in batches:
        loss = micro_loss(family, model, images, labels, seed, device)
        (loss / len(batches)).backward()
        total += loss.detach()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    update_ema(ema, model, ema_decay)
    return total.item() / len(batches)


def step_batches(plan: Plan, rows: RowStore, step: int, micros: Iterable[int]):
    """The (images, labels, seed) micro-batches a worker computes at ``step``."""
    return [(*rows.batch(plan.rows(step, m)), plan.micro_seed(step, m)) for m in micros]


def plain_finetune(family, model: torch.nn.Module, plan: Plan, rows: RowStore, rec: dict[str, Any],
                   ema_decay: float, device: torch.device | str = "cpu",
                   on_snapshot=None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The whole plan in one process, no Ray, no DeepSpeed (the reference the shell must match).

    Calls ``on_snapshot(target, step, model, ema)`` at each snapshot; returns (model, ema).
    """
    from neon_ray.training import make_ema, make_optimizer

    model.train()
    ema = make_ema(model)
    opt = make_optimizer(model, plan.lr_at(0), rec["weight_decay"], tuple(rec["betas"]))
    snaps = plan.snapshot_steps()
    for step in range(plan.steps):
        batches = step_batches(plan, rows, step, range(plan.micros_per_step))
        plain_step(family, model, opt, ema, batches, plan.lr_at(step), rec["grad_clip"], ema_decay, device)
        if on_snapshot is not None and step + 1 in snaps:
            on_snapshot(snaps[step + 1], step + 1, model, ema)
    return model, ema


def recipe(cfg: FinetuneConfig, info: checkpoints.CheckpointInfo) -> dict[str, Any]:
    """The optimizer recipe: explicit settings, else the base's pre-training recipe, else defaults."""
    base = info.extra.get("pretrain", {}) if isinstance(info.extra, dict) else {}
    wd = cfg.weight_decay if cfg.weight_decay is not None else float(base.get("weight_decay", 0.0))
    clip = cfg.grad_clip if cfg.grad_clip is not None else float(base.get("grad_clip", 1.0))
    return {"weight_decay": wd, "grad_clip": clip, "betas": [cfg.beta1, cfg.beta2]}


# Driver -------------------------------------------------------------------------------

def settings(cfg: FinetuneConfig, base_digest: str, data_digest: str, rec: dict) -> dict[str, Any]:
    """What fixes the snapshots' values (the layout — workers, ZeRO stage — only rounds them)."""
    keys = ("images", "snapshot_every", "lr", "warmup_images", "batch", "ema_decay", "weights", "bf16",
            "seed")
    window = {"window_shards": cfg.window_shards} if cfg.window_shards else {}
    return {**{k: getattr(cfg, k) for k in keys}, "micro_batch": cfg.micro, "recipe": rec, **window,
            "base_digest": base_digest, "data_digest": data_digest}


@dataclass
class Prepared:
    """Everything :func:`run` checked, for the workers."""

    info: checkpoints.CheckpointInfo
    plan: Plan
    settings: dict[str, Any]
    recipe: dict[str, Any]
    base_digest: str
    data_digest: str
    data_manifest: dict[str, Any] = field(default_factory=dict)


def prepare(cfg: FinetuneConfig) -> Prepared:
    """Every check that can fail before a worker starts."""
    import pyarrow.parquet as pq

    from neon_ray.data import synthetic
    from neon_ray.data.images import decode_image
    from neon_ray.families import get_family

    # Base checkpoint and S.
    info = checkpoints.load_info(cfg.checkpoint, cfg.storage)
    base_digest = checkpoints.checkpoint_digest(cfg.checkpoint, cfg.storage)
    model_cfg = get_family(info.family).parse_config(info.model)
    manifest = synthetic.load_manifest(cfg.data, cfg.storage, verify=True)
    num = int(manifest["num"])
    if num < cfg.batch:
        raise ValueError(f"batch: global batch {cfg.batch} is larger than S ({num} images in {cfg.data})")
    if manifest.get("family") != info.family:
        raise ValueError(f"data: S holds {manifest.get('family')!r} samples, the base is {info.family!r}")
    if cfg.require_same_base and manifest.get("base_digest") != base_digest:
        raise ValueError(f"data: S was sampled from another checkpoint ({manifest.get('base_checkpoint')}),"
                         f" not {cfg.checkpoint} (set require_same_base=false to allow)")
    first = synthetic.shard_uris(cfg.data, manifest)[0]
    head = pq.read_table(io.BytesIO(st.read_bytes(first, cfg.storage)), columns=["image"]).slice(0, 1)
    shape = decode_image(head.column("image")[0].as_py()).shape
    if shape != (model_cfg.channels, model_cfg.image_size, model_cfg.image_size):
        raise ValueError(f"data: S images are {shape}, the model takes "
                         f"{(model_cfg.channels, model_cfg.image_size, model_cfg.image_size)}")

    # Output: writable, and not holding a fine-tune with other settings.
    data_digest = st.manifest_digest(manifest)
    rec = recipe(cfg, info)
    sett = settings(cfg, base_digest, data_digest, rec)
    st.check_writable(cfg.out, cfg.storage)
    plan_uri = st.join(cfg.out, "plan.json")
    existing = [("plan.json", st.read_json(plan_uri, cfg.storage) if st.exists(plan_uri, cfg.storage)
                 else None), ("manifest.json", st.read_manifest(cfg.out, cfg.storage))]
    for name, old in existing:
        if old is not None and old.get("settings") != sett:
            raise FileExistsError(f"{cfg.out}: holds a fine-tune with other settings ({name}); "
                                  f"refusing to overwrite it — choose another --out")
    shard_rows = tuple(int(x["rows"]) for x in manifest["shards"])
    return Prepared(info, make_plan(cfg, num, shard_rows), sett, rec, base_digest, data_digest, manifest)


def finished(cfg: FinetuneConfig, prep: Prepared) -> dict[str, Any] | None:
    """The stage manifest when the stage is complete and every snapshot verifies."""
    manifest = st.verify_manifest(cfg.out, cfg.storage)
    if manifest is None or manifest.get("settings") != prep.settings:
        return None
    for target in prep.plan.targets():
        if st.verify_manifest(st.join(cfg.out, snapshot_name(target)), cfg.storage) is None:
            return None
    return manifest


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Run (or resume) the stage; returns the snapshot URIs and whether training ran."""
    # Local paths absolute: Ray workers run in other folders.
    cfg = dataclasses.replace(
        cfg, checkpoint=st.absolute(cfg.checkpoint),
        data=st.absolute(cfg.data),
        out=st.absolute(cfg.out))
    from neon_ray import finetune_worker

    prep = prepare(cfg)
    done = finished(cfg, prep)
    if done is not None:
        print(f"finetune: {cfg.out} is complete ({len(done['snapshots'])} snapshots); nothing to do")
        return {"trained": False, "snapshots": [st.join(cfg.out, s["name"]) for s in done["snapshots"]],
                "manifest": done, "metrics": None}
    st.write_json(st.join(cfg.out, "plan.json"), {"settings": prep.settings}, cfg.storage)

    # Train on Ray Train workers (resuming from the run's last Ray Train checkpoint, if any).
    metrics = finetune_worker.fit(cfg, prep)

    # Every snapshot must be there; then write the stage manifest last.
    snaps, digests = [], {}
    for target in prep.plan.targets():
        uri = st.join(cfg.out, snapshot_name(target))
        snap = st.verify_manifest(uri, cfg.storage)
        if snap is None:
            raise RuntimeError(f"finetune: snapshot {uri} is missing after training")
        name = f"{snapshot_name(target)}/{st.MANIFEST}"
        digests[name] = st.sha256_uri(st.join(cfg.out, name), cfg.storage)
        snaps.append({"name": snapshot_name(target), "target_images": target,
                      "images_seen": snap["images_seen"], "step": snap["step"], "loss": snap["loss"]})
    manifest = st.write_manifest(cfg.out, digests, {
        "kind": "finetune", "settings": prep.settings, "snapshots": snaps,
        "base_checkpoint": cfg.checkpoint, "data": cfg.data,
        "config": {k: v for k, v in to_dict(cfg).items() if k != "storage"}}, cfg.storage)
    print(f"finetune: wrote {len(snaps)} snapshots to {cfg.out}")
    return {"trained": True, "snapshots": [st.join(cfg.out, s["name"]) for s in snaps],
            "manifest": manifest, "metrics": metrics}
