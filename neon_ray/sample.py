"""Stage 1: draw the synthetic set S from the base model (DESIGN.md §3, §5).

The pure core is the shard plan: from (N, K, seed, classes) it fixes, for
every global index, the shard, the per-sample seed and the label. A sample's
pixels depend only on (checkpoint, sampler, seed, index), so any worker count
or batch size writes the same bytes. The Ray shell is a pool of actors that
each load the model once and write whole Parquet shards under their final
names; the driver hands out shards, replaces dead actors and writes
``manifest.json`` last.

Resume by re-running: ``plan.json`` (written first) pins the settings; shards
that exist and read back with exactly their rows are kept; missing, truncated
or corrupt ones are sampled again.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from neon_ray import __version__, checkpoints, storage as st
from neon_ray.config import from_dict, option, to_dict
from neon_ray.data import synthetic
from neon_ray.families.base import SamplerConfig
from neon_ray.storage import StorageConfig


@dataclass
class SampleConfig:
    """Settings of ``neon-ray sample``."""

    checkpoint: str = option("", "base checkpoint URI")
    out: str = option("", "output folder URI for the Parquet shards")
    num: int = option(1000, "number of images N", min=1)
    per_class: bool = option(True, "class-balanced labels (index mod classes) instead of random")
    shard_size: int = option(256, "rows per shard K", min=1)
    seed: int = option(0, "base seed; sample i uses seed·2^32 + i", min=0)
    workers: int = option(1, "sampler actors", min=1)
    gpus_per_worker: float = option(0.0, "GPUs per actor (fractions allowed)", min=0.0)
    cpus_per_worker: float = option(1.0, "CPUs per actor", min=0.0)
    threads_per_worker: int = option(1, "torch threads per actor", min=1)
    batch_size: int = option(64, "images per forward batch", min=1)
    max_retries: int = option(3, "times a shard is retried after its actor dies", min=0)
    sampler: dict[str, Any] = option(default_factory=dict,
                                     help="sampler overrides of the family default (guidance, steps, ...)")
    progress: bool = option(True, "show a progress bar")
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> None:
        if not self.checkpoint:
            raise ValueError("checkpoint: a base checkpoint URI is required")
        if not self.out:
            raise ValueError("out: an output URI is required")


# Shard plan (pure) -------------------------------------------------------------

@dataclass(frozen=True)
class ShardSpec:
    shard: int
    start: int   # first global index
    stop: int    # one past the last

    @property
    def name(self) -> str:
        return synthetic.shard_name(self.shard)


def shard_plan(num: int, shard_size: int) -> list[ShardSpec]:
    return [ShardSpec(i, s, min(num, s + shard_size)) for i, s in enumerate(range(0, num, shard_size))]


def sample_seeds(seed: int, indices: np.ndarray) -> np.ndarray:
    """Per-sample seeds: seed·2^32 + index (int64)."""
    return (np.int64(seed) << np.int64(32)) + indices.astype(np.int64)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fixed hash of uint64 values."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_labels(seed: int, indices: np.ndarray, num_classes: int, per_class: bool) -> np.ndarray:
    """Labels for global indices: index mod classes (balanced) or a seeded hash; −1 if unconditional."""
    if num_classes <= 0:
        return np.full(len(indices), -1, dtype=np.int64)
    if per_class:
        return indices.astype(np.int64) % num_classes
    return (_mix(sample_seeds(seed, indices).astype(np.uint64)) % np.uint64(num_classes)).astype(np.int64)


def resolve_sampler(family, model_cfg, overrides: dict[str, Any]) -> SamplerConfig:
    """The family's default sampler with the user's overrides, checked."""
    data = {**to_dict(family.default_sampler(model_cfg)), **overrides}
    sampler = from_dict(SamplerConfig, data, prefix="sampler")
    family.check_sampler(sampler)
    return sampler


def check_shard(data: bytes, spec: ShardSpec) -> bool:
    """Whether shard bytes are a readable table holding exactly the spec's indices."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data), columns=["index", "image"])
    except Exception:  # any parse failure means a corrupt or truncated shard
        return False
    idx = table.column("index").to_numpy()
    return len(idx) == spec.stop - spec.start and np.array_equal(np.sort(idx), np.arange(spec.start, spec.stop))


# Core: sample one shard ------------------------------------------------------------

def render_shard(family, model, spec: ShardSpec, seed: int, num_classes: int, per_class: bool,
                 sampler: SamplerConfig, batch_size: int, device: str = "cpu") -> bytes:
    """Sample one shard's images and return its Parquet bytes."""
    import torch

    from neon_ray.data.images import encode_png

    indices = np.arange(spec.start, spec.stop)
    seeds = sample_seeds(seed, indices)
    labels = sample_labels(seed, indices, num_classes, per_class)
    png: list[bytes] = []
    for b in range(0, len(indices), batch_size):
        lab = torch.from_numpy(labels[b:b + batch_size]).to(device)
        sd = torch.from_numpy(seeds[b:b + batch_size])
        with torch.no_grad():
            images = family.sample(model, lab, sd, sampler)   # uint8 (B, C, H, W)
        png.extend(encode_png(im) for im in images.cpu().numpy())
    table = synthetic.shard_table(png, labels.tolist(), seeds.tolist(), indices.tolist())
    return synthetic.table_bytes(table)


class SamplerWorker:
    """Ray actor body: loads the model once, then writes whole shards."""

    def __init__(self, checkpoint: str, sampler: dict, storage: StorageConfig, threads: int, num_gpus: float):
        import torch

        from neon_ray.raycluster import torch_device

        torch.set_num_threads(threads)
        self.device = torch_device(num_gpus)
        self.family, self.model_cfg, self.model, _ = checkpoints.load_model(checkpoint, storage=storage,
                                                                            device=self.device)
        self.sampler = from_dict(SamplerConfig, sampler)
        self.storage = storage

    def run(self, spec: ShardSpec, out: str, seed: int, per_class: bool, batch_size: int) -> dict:
        data = render_shard(self.family, self.model, spec, seed, self.model_cfg.num_classes, per_class,
                            self.sampler, batch_size, self.device)
        st.write_bytes(st.join(out, spec.name), data, self.storage)
        return {"name": spec.name, "rows": spec.stop - spec.start, "sha256": st.sha256_bytes(data)}


# Shell: the stage -------------------------------------------------------------------

def _settings(cfg: SampleConfig, sampler: SamplerConfig, base_digest: str, family: str) -> dict[str, Any]:
    return {"num": cfg.num, "shard_size": cfg.shard_size, "seed": cfg.seed, "per_class": cfg.per_class,
            "sampler": to_dict(sampler), "base_digest": base_digest, "family": family}


def _recorded(out: str, storage: StorageConfig | None) -> dict[str, dict | None]:
    """What an earlier run left at ``out``: its manifest (finished) and plan (started), or None."""
    plan_uri = st.join(out, "plan.json")
    return {"manifest.json": st.read_manifest(out, storage),
            "plan.json": st.read_json(plan_uri, storage) if st.exists(plan_uri, storage) else None}


def _verified_shards(cfg: SampleConfig, plan: list[ShardSpec]) -> dict[int, dict]:
    """The shards of ``plan`` already under ``out``, whole and right: {shard: manifest entry}."""
    present = set(st.listdir(cfg.out, cfg.storage))
    results: dict[int, dict] = {}
    for spec in plan:
        if spec.name in present:
            data = st.read_bytes(st.join(cfg.out, spec.name), cfg.storage)
            if check_shard(data, spec):
                results[spec.shard] = {"name": spec.name, "rows": spec.stop - spec.start,
                                       "sha256": st.sha256_bytes(data)}
    return results


def prepare(cfg: SampleConfig) -> tuple[Any, SamplerConfig, dict[str, Any]]:
    """Every check that can fail before an actor starts; returns (info, sampler, settings)."""
    from neon_ray.families import get_family

    info = checkpoints.load_info(cfg.checkpoint, cfg.storage)
    family = get_family(info.family)
    model_cfg = family.parse_config(info.model)
    sampler = resolve_sampler(family, model_cfg, cfg.sampler)
    base_digest = checkpoints.checkpoint_digest(cfg.checkpoint, cfg.storage)
    settings = _settings(cfg, sampler, base_digest, info.family)
    st.check_writable(cfg.out, cfg.storage)
    for name, existing in _recorded(cfg.out, cfg.storage).items():
        if existing is not None and existing.get("settings") != settings:
            raise FileExistsError(f"{cfg.out}: holds a synthetic set with other settings ({name}); "
                                  f"refusing to overwrite it — choose another --out")
    return info, sampler, settings


def run(cfg: SampleConfig) -> dict[str, Any]:
    """Run (or resume) the stage; returns counts of shards sampled and kept."""
    # Local paths absolute: Ray workers run in other folders.
    cfg = dataclasses.replace(
        cfg, checkpoint=st.absolute(cfg.checkpoint),
        out=st.absolute(cfg.out))
    import ray
    from tqdm import tqdm

    from neon_ray.raycluster import init_ray

    info, sampler, settings = prepare(cfg)
    done = st.verify_manifest(cfg.out, cfg.storage)
    if done is not None:
        print(f"sample: {cfg.out} is complete ({done['num']} images); nothing to do")
        return {"sampled": 0, "kept": len(done["shards"]), "manifest": done}
    st.write_json(st.join(cfg.out, "plan.json"), {"settings": settings}, cfg.storage)

    # Keep the shards already written whole and right.
    plan = shard_plan(cfg.num, cfg.shard_size)
    results = _verified_shards(cfg, plan)
    todo = [s for s in plan if s.shard not in results]
    kept = len(results)

    # Sample the rest on a pool of actors, replacing any that die.
    if todo:
        init_ray()
        actor_cls = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker,
                               max_restarts=0, scheduling_strategy="SPREAD")(SamplerWorker)
        args = (cfg.checkpoint, to_dict(sampler), cfg.storage, cfg.threads_per_worker, cfg.gpus_per_worker)
        run_id = uuid.uuid4().hex[:8]
        names = (f"neon-sampler-{run_id}-{i}" for i in itertools.count())
        actors = [actor_cls.options(name=next(names)).remote(*args) for _ in range(min(cfg.workers, len(todo)))]
        queue, retries, running = list(todo), Counter(), {}
        bar = tqdm(total=cfg.num, initial=sum(r["rows"] for r in results.values()), unit="img",
                   desc="sample", disable=not cfg.progress, smoothing=0.1)

        def submit(actor):
            spec = queue.pop(0)
            running[actor.run.remote(spec, cfg.out, cfg.seed, cfg.per_class, cfg.batch_size)] = (spec, actor)

        for actor in actors:
            if queue:
                submit(actor)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            spec, actor = running.pop(ready[0])
            try:
                results[spec.shard] = ray.get(ready[0])
                bar.update(spec.stop - spec.start)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                    ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError) as e:
                retries[spec.shard] += 1
                if retries[spec.shard] > cfg.max_retries:
                    raise RuntimeError(f"shard {spec.name} failed {retries[spec.shard]} times: {e}") from e
                queue.insert(0, spec)
                ray.kill(actor, no_restart=True)
                actor = actor_cls.options(name=next(names)).remote(*args)
            if queue:
                submit(actor)
        bar.close()
        del actors

    # Write the manifest last.
    shards = [results[s.shard] for s in plan]
    labels = sample_labels(cfg.seed, np.arange(cfg.num), info.model.get("num_classes", 0), cfg.per_class)
    counts = {str(k): int(v) for k, v in sorted(Counter(labels.tolist()).items())}
    manifest = st.write_manifest(cfg.out, {s["name"]: s["sha256"] for s in shards}, {
        "kind": "synthetic", "settings": settings, "num": cfg.num, "seed": cfg.seed,
        "per_class": cfg.per_class, "sampler": to_dict(sampler), "family": info.family,
        "base_checkpoint": cfg.checkpoint, "base_digest": settings["base_digest"],
        "software": {"neon_ray": __version__}, "label_counts": counts,
        "shards": [{"name": s["name"], "rows": s["rows"]} for s in shards],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, cfg.storage)
    print(f"sample: wrote {cfg.num} images in {len(shards)} shards to {cfg.out} "
          f"({len(todo)} sampled, {kept} kept)")
    return {"sampled": len(todo), "kept": kept, "manifest": manifest}
