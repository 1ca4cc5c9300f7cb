"""Fine-tuning throughput: the Ray Train + DeepSpeed loop vs a plain one-process loop.

Same tiny flow base, same S, same plan (data order, micro-batches, loss noise),
same step (family loss, AdamW, clipping, EMA), 1 torch thread each. The stage
runs 1 Ray Train worker at ZeRO-0; its loop time is measured inside the worker
from its second step on, excluding snapshot and checkpoint I/O, and compared
with the plain loop's steps timed the same way (run once before and once after
the stage; their mean is used). Start-up (Ray Train, reading S through Ray
Data, ``deepspeed.initialize``, the one snapshot) is printed separately.
Then the stage again with ``window_shards=1`` (S read shard by shard, the next
shard read ahead) against the in-memory stage. Prints one JSON line; target
Ray/plain ≥ 0.8.

usage: python benchmarks/bench_finetune.py [--steps N] [--batch GB]
"""

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".cache", "torch_extensions"))

import torch  # noqa: E402

from neon_ray import checkpoints, storage as st  # noqa: E402
from neon_ray.config import from_dict  # noqa: E402
from neon_ray.data import synthetic  # noqa: E402
from neon_ray.finetune import (FinetuneConfig, RowStore, make_plan, plain_step, recipe,  # noqa: E402
                               run as finetune, step_batches)
from neon_ray.pretrain import PretrainConfig, run as pretrain  # noqa: E402
from neon_ray.sample import SampleConfig, run as sample  # noqa: E402
from neon_ray.training import make_ema, make_optimizer  # noqa: E402


def plain_loop(cfg: FinetuneConfig, rows: RowStore) -> tuple[float, int]:
    """Seconds and images of the plan's steps after the first, in this process."""
    torch.set_num_threads(cfg.threads)
    family, _, model, info = checkpoints.load_model(cfg.checkpoint)
    model.train()
    plan, rec = make_plan(cfg, len(rows)), recipe(cfg, info)
    ema = make_ema(model)
    opt = make_optimizer(model, plan.lr_at(0), rec["weight_decay"], tuple(rec["betas"]))
    seconds = 0.0
    for step in range(plan.steps):
        t0 = time.perf_counter()
        batches = step_batches(plan, rows, step, range(plan.micros_per_step))
        plain_step(family, model, opt, ema, batches, plan.lr_at(step), rec["grad_clip"], cfg.ema_decay)
        if step > 0:
            seconds += time.perf_counter() - t0
    return seconds, (plan.steps - 1) * plan.batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    import ray

    # Set up (not timed): a tiny base and S of 512 images.
    tmp = tempfile.mkdtemp(prefix="bench-finetune-")
    base, data = os.path.join(tmp, "base"), os.path.join(tmp, "S")
    pretrain(from_dict(PretrainConfig, {"out": base, "family": "flow", "preset": "tiny", "steps": 30,
                                        "progress": False}))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    sample(from_dict(SampleConfig, {"checkpoint": base, "out": data, "num": 512, "shard_size": 128,
                                    "progress": False, "sampler": {"steps": 2}}))
    images = args.steps * args.batch
    cfg = from_dict(FinetuneConfig, {"checkpoint": base, "data": data, "out": os.path.join(tmp, "ft"),
                                     "images": images, "snapshot_every": images, "batch": args.batch,
                                     "lr": 1e-4, "warmup_images": 10 * args.batch, "workers": 1,
                                     "zero_stage": 0, "threads": 1, "cpus_per_worker": 1.0})
    rows = RowStore.from_tables([synthetic.read_table(data)])

    # Plain loop, the stage, plain loop again.
    plain_a = plain_loop(cfg, rows)
    t0 = time.perf_counter()
    result = finetune(cfg)
    stage_s = time.perf_counter() - t0
    plain_b = plain_loop(cfg, rows)
    # The same stage reading S shard by shard (windows of 1 shard, read ahead) instead of all in memory.
    windowed = finetune(dataclasses.replace(cfg, out=os.path.join(tmp, "ft-windowed"), window_shards=1))
    ray.shutdown()
    st.remove(tmp)

    m = result["metrics"]
    ray_ips = m["loop_images"] / m["loop_seconds"]
    plain_ips = (plain_a[1] + plain_b[1]) / (plain_a[0] + plain_b[0])
    win_ips = windowed["metrics"]["loop_images"] / windowed["metrics"]["loop_seconds"]
    print(json.dumps({
        "bench": "finetune", "steps": args.steps, "batch": args.batch, "threads": 1, "device": "cpu",
        "images_per_s": {"ray_deepspeed_1w": round(ray_ips, 1), "plain": round(plain_ips, 1),
                         "plain_before": round(plain_a[1] / plain_a[0], 1),
                         "plain_after": round(plain_b[1] / plain_b[0], 1)},
        "ray_over_plain": round(ray_ips / plain_ips, 3), "target": 0.8,
        "windowed_1w": round(win_ips, 1), "windowed_over_in_memory": round(win_ips / ray_ips, 3),
        "stage_wall_s": round(stage_s, 2), "startup_s": round(stage_s - m["loop_seconds"], 2)}))


if __name__ == "__main__":
    main()
