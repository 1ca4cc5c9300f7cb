"""Stage 2's Ray Train + DeepSpeed shell around the plain step in ``finetune``.

The driver (:func:`fit`) reads S once with Ray Data into the object store and
starts a ``ray.train.torch.TorchTrainer``; each worker (:func:`train_loop`)
takes S as its (unsplit) Ray Data dataset shard, builds θ from the base
sampling weights, calls ``deepspeed.initialize`` on the process group Ray
created (gloo on CPU, nccl on GPU) with a torch AdamW (no fused-op build), and
trains by the :class:`~neon_ray.finetune.Plan`. Every worker holds all of S,
encoded: a global batch is a fixed set of rows and any worker may be handed
any of them, whatever the worker count. With ``window_shards`` set, the plan
shuffles within windows of shards and each worker reads shards from storage
as it needs them instead, holding two windows at most (for S too large to
hold per worker).

At each snapshot step the workers gather the full fp32 weights (under ZeRO-3
too), rank 0 writes the sampling weights (EMA by default) as a checkpoint
under ``<out>/snap-<images>/``, and all workers report a Ray Train checkpoint
(DeepSpeed's model/optimizer state, the EMA and the step) so that a failed
worker group resumes from it (``FailureConfig``). Snapshots already written
are not rewritten. The EMA lives on rank 0 as a full fp32 copy; under ZeRO-3
updating it gathers the parameters in chunks each step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import tempfile
import time
from functools import partial
from typing import Any, Iterator

import numpy as np
import torch

from neon_ray import checkpoints, storage as st
from neon_ray.config import from_dict, to_dict
from neon_ray.finetune import (FinetuneConfig, Plan, Prepared, RowStore, micro_loss, row_source,
                               snapshot_name, step_batches)
from neon_ray.training import make_ema, make_optimizer, set_lr, update_ema

CHUNK_ELEMENTS = 1 << 26     # parameters gathered at once under ZeRO-3 (256 MiB of fp32)
DS_TAG = "deepspeed"


def run_name(cfg: FinetuneConfig) -> str:
    """Ray Train run name: DeepSpeed state only reloads on the same layout."""
    return f"train-w{cfg.workers}-z{cfg.zero_stage}"


def deepspeed_config(cfg: FinetuneConfig, world: int, grad_clip: float) -> dict[str, Any]:
    """The DeepSpeed config: batch split, ZeRO stage, clipping, bf16 autocast, user extras."""
    out: dict[str, Any] = {
        "train_batch_size": cfg.batch, "train_micro_batch_size_per_gpu": cfg.micro,
        "gradient_accumulation_steps": cfg.batch // (cfg.micro * world),
        "gradient_clipping": grad_clip, "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True, "steps_per_print": 2 ** 31 - 1,
        "wall_clock_breakdown": False}
    if cfg.bf16:
        # Autocast keeps fp32 weights (so EMA and snapshots are fp32) and runs matmuls in bf16.
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return _merge(out, cfg.deepspeed)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# Full fp32 weights from a DeepSpeed engine ----------------------------------------

def _chunks(module: torch.nn.Module) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
    chunk, size = [], 0
    for name, p in module.named_parameters():
        n = getattr(p, "ds_numel", p.numel())
        if chunk and size + n > CHUNK_ELEMENTS:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, p))
        size += n
    if chunk:
        yield chunk


def full_params(module: torch.nn.Module, zero3: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full fp32 parameter) for every parameter; collective under ZeRO-3.

    Every rank must consume the whole iterator. Below ZeRO-3 the module's
    parameters are already whole and fp32 (bf16 runs by autocast).
    """
    import deepspeed

    for chunk in _chunks(module):
        if not zero3:
            yield from ((name, p.data) for name, p in chunk)
            continue
        with deepspeed.zero.GatheredParameters([p for _, p in chunk], modifier_rank=None):
            yield from ((name, p.data) for name, p in chunk)


@torch.no_grad()
def update_ema_zero(ema: torch.nn.Module | None, module: torch.nn.Module, zero3: bool,
                    decay: float) -> None:
    """θ_ema ← decay·θ_ema + (1 − decay)·θ on rank 0 (the one holding ``ema``)."""
    if not zero3:
        if ema is not None:
            update_ema(ema, module, decay)
        return
    target = dict(ema.named_parameters()) if ema is not None else None
    for name, full in full_params(module, zero3):
        if target is not None:
            target[name].lerp_(full.to(target[name].dtype), 1.0 - decay)
    if ema is not None:
        for be, b in zip(ema.buffers(), module.buffers()):
            be.copy_(b)


def sampling_state(ema: torch.nn.Module | None, module: torch.nn.Module, zero3: bool,
                   which: str) -> dict[str, torch.Tensor] | None:
    """The snapshot's weights on rank 0 (None elsewhere); collective for raw weights under ZeRO-3."""
    if which == "ema":
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu()
                for k, v in ema.state_dict().items()} if ema is not None else None
    params = {name: t.detach().float().cpu().clone() for name, t in full_params(module, zero3)}
    if ema is None:
        return None
    buffers = {name: b.detach().cpu() for name, b in module.named_buffers()}
    return {k: params[k] if k in params else buffers[k] for k in ema.state_dict()}


# The worker ----------------------------------------------------------------------------

def train_loop(job: dict[str, Any]) -> None:
    """One Ray Train worker: read S, build the engine, resume, train, snapshot."""
    import deepspeed
    import ray.train
    import torch.distributed as dist

    cfg = from_dict(FinetuneConfig, job["config"])
    plan = Plan(**job["plan"])
    info = checkpoints.CheckpointInfo(**job["info"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads)
    device = ray.train.torch.get_device()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    zero3 = cfg.zero_stage == 3

    # Read S: all rows from the Ray Dataset, kept encoded (any worker may need any row),
    # or with a windowed plan shard by shard from storage, two windows at most.
    if plan.window:
        rows = row_source(plan, cfg.data, job["data_manifest"], cfg.storage)
    else:
        shard = ray.train.get_dataset_shard("train")
        rows = RowStore.from_tables(shard.iter_batches(batch_size=4096, batch_format="pyarrow"))
    if len(rows) != plan.num_rows:
        raise ValueError(f"data: read {len(rows)} rows of S, its manifest says {plan.num_rows}")

    # θ and its EMA start from the base sampling weights.
    family, _, model, _ = checkpoints.load_model(cfg.checkpoint, storage=cfg.storage, device=str(device))
    model.train()
    ema = make_ema(model) if rank == 0 else None
    rec = job["recipe"]
    optimizer = partial(make_optimizer, lr=plan.lr_at(0), weight_decay=rec["weight_decay"],
                        betas=tuple(rec["betas"]))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, world, rec["grad_clip"]))

    # Resume from the last Ray Train checkpoint, if any.
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            with open(os.path.join(d, "progress.json")) as f:
                progress = json.load(f)
            if (progress["world"], progress["zero_stage"]) != (world, cfg.zero_stage):
                raise ValueError(f"checkpoint {d}: saved by {progress['world']} workers at ZeRO-"
                                 f"{progress['zero_stage']}, not {world} at ZeRO-{cfg.zero_stage}")
            engine.load_checkpoint(d, tag=DS_TAG, load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
            if ema is not None:
                from safetensors.torch import load_file
                ema.load_state_dict(load_file(os.path.join(d, "ema.safetensors")), strict=True)
            start = progress["step"]

    # Train.
    snap_steps = plan.snapshot_steps()
    micros = plan.micros_of(rank, world)
    marker = st.join(cfg.out, ".fault-injected")
    loss_sum, loss_n, loop_s, loop_steps, snap_s = 0.0, 0, 0.0, 0, 0.0
    ahead = plan.window_steps()
    for step in range(start, plan.steps):
        t0 = time.perf_counter()
        if ahead and step + ahead < plan.steps:   # read the next window's shards while this one trains
            rows.prefetch(np.concatenate([plan.rows(step + ahead, m) for m in micros]))
        set_lr(engine.optimizer, plan.lr_at(step))
        total = torch.zeros((), device=device)
        for images, labels, seed in step_batches(plan, rows, step, micros):
            loss = micro_loss(family, engine, images, labels, seed, device)
            engine.backward(loss)
            engine.step()   # steps the optimizer at the accumulation boundary
            total += loss.detach()
        update_ema_zero(ema, engine.module, zero3, cfg.ema_decay)
        loss_sum += total.item() / len(micros)
        loss_n += 1
        if step > start:     # the first step of a process pays one-off costs
            loop_s += time.perf_counter() - t0
            loop_steps += 1
        done = step + 1

        # Testing: the last worker dies once, mid-run (FailureConfig must recover).
        if (cfg.fail_at_images and rank == world - 1 and done * plan.batch >= cfg.fail_at_images
                and not st.exists(marker, cfg.storage)):
            st.write_bytes(marker, str(done * plan.batch).encode(), cfg.storage)
            os.kill(os.getpid(), signal.SIGKILL)

        if done not in snap_steps:
            continue
        t1 = time.perf_counter()
        stats = torch.tensor([loss_sum, loss_n], dtype=torch.float64, device=device)
        dist.all_reduce(stats)
        metrics = {"images_seen": done * plan.batch, "step": done, "target": snap_steps[done],
                   "lr": plan.lr_at(step), "loss": (stats[0] / stats[1]).item(),
                   "loop_seconds": loop_s, "loop_images": loop_steps * plan.batch, "start_step": start}
        state = sampling_state(ema, engine.module, zero3, cfg.weights)
        if rank == 0:
            write_snapshot(cfg, job, info, state, metrics, world)
        report_checkpoint(engine, ema, rank, world, cfg.zero_stage, done, metrics, snap_s)
        loss_sum, loss_n = 0.0, 0
        snap_s += time.perf_counter() - t1
    rows.close()


def write_snapshot(cfg: FinetuneConfig, job: dict, info: checkpoints.CheckpointInfo,
                   state: dict[str, torch.Tensor], metrics: dict[str, Any], world: int) -> None:
    """Write ``<out>/snap-<target>/`` unless a verifying one is there already."""
    uri = st.join(cfg.out, snapshot_name(metrics["target"]))
    if st.verify_manifest(uri, cfg.storage) is not None:
        return
    if st.read_manifest(uri, cfg.storage) is not None:   # a corrupt leftover: not a snapshot
        st.remove(uri, cfg.storage)
    seen = metrics["images_seen"]
    base_train = info.base_train_images
    extra = {"stage": "finetune", "target_images": metrics["target"], "images_seen": seen,
             "step": metrics["step"], "lr": metrics["lr"], "loss": metrics["loss"],
             "weights": cfg.weights, "base_checkpoint": cfg.checkpoint,
             "base_digest": job["base_digest"], "data": cfg.data, "data_digest": job["data_digest"],
             "base_train_images": base_train,
             "compute_fraction": seen / base_train if base_train else None,
             "settings": job["settings"], "workers": world, "zero_stage": cfg.zero_stage}
    snap_info = dataclasses.replace(info, weights=cfg.weights, images_seen=info.images_seen + seen,
                                    extra={"finetune": extra})
    checkpoints.save_checkpoint(uri, state, snap_info, cfg.storage, manifest_extra=extra)


def report_checkpoint(engine, ema: torch.nn.Module | None, rank: int, world: int, zero_stage: int,
                      step: int, metrics: dict[str, Any], snap_s: float) -> None:
    """Every worker saves its DeepSpeed state; rank 0 adds the EMA and the step; Ray Train merges them."""
    import ray.train
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="neon-ft-", ignore_cleanup_errors=True) as d:
        engine.save_checkpoint(d, tag=DS_TAG, save_latest=False)
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()},
                      os.path.join(d, "ema.safetensors"))
            with open(os.path.join(d, "progress.json"), "w") as f:
                json.dump({"step": step, "world": world, "zero_stage": zero_stage,
                           "images_seen": metrics["images_seen"]}, f)
        ray.train.report({**metrics, "snapshot_seconds": snap_s},
                         checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint-{metrics['images_seen']:010d}")


# The driver --------------------------------------------------------------------------

def fit(cfg: FinetuneConfig, prep: Prepared) -> dict[str, Any] | None:
    """Run the TorchTrainer; returns the last reported metrics."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from neon_ray.data import synthetic
    from neon_ray.raycluster import init_ray

    init_ray()
    # Read S once, before the workers hold CPUs: they then only fetch blocks from the
    # object store (a lazy read would need CPUs the workers may have taken). A windowed
    # plan reads shards in the workers instead.
    datasets = {}
    if not prep.plan.window:
        dataset = synthetic.ray_dataset(cfg.data, cfg.storage, verify=False).select_columns(
            ["image", "label", "index"])
        dataset.context.enable_progress_bars = False
        datasets["train"] = dataset.materialize()
    fs, path = st.pyarrow_filesystem(st.join(cfg.out, "ray"), cfg.storage)
    st.ensure_local_dir(st.join(cfg.out, "ray"))
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    job = {"config": to_dict(cfg), "plan": dataclasses.asdict(prep.plan),
           "info": dataclasses.asdict(prep.info), "recipe": prep.recipe, "settings": prep.settings,
           "base_digest": prep.base_digest, "data_digest": prep.data_digest,
           "data_manifest": prep.data_manifest}
    trainer = TorchTrainer(
        train_loop, train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=run_name(cfg), storage_path=path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets, dataset_config=DataConfig(datasets_to_split=[]))
    result = trainer.fit()
    return result.metrics
