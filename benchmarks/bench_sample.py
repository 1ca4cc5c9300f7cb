"""Sampling stage throughput: Ray actor pool vs a plain in-process loop.

Same tiny flow checkpoint, same sampler, batch size and Parquet output. The
plain loop calls ``family.sample`` in-process and writes the same shards; the
stage runs 1 and then 2 sampler actors (1 torch thread each) on a local Ray.
Prints one JSON line: images/s of each, stage/plain (target ≥ 0.85) and
2 workers / 1 worker (target ≥ 1.6 on 2 cores).

usage: python benchmarks/bench_sample.py [--num N]
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from neon_ray import checkpoints, storage as st  # noqa: E402
from neon_ray.config import from_dict  # noqa: E402
from neon_ray.pretrain import PretrainConfig, run as pretrain  # noqa: E402
from neon_ray.sample import SampleConfig, render_shard, resolve_sampler, run as sample, shard_plan  # noqa: E402


def plain_loop(ckpt: str, out: str, cfg: SampleConfig) -> float:
    torch.set_num_threads(1)
    family, model_cfg, model, _ = checkpoints.load_model(ckpt)
    sampler = resolve_sampler(family, model_cfg, cfg.sampler)
    t0 = time.perf_counter()
    for spec in shard_plan(cfg.num, cfg.shard_size):
        data = render_shard(family, model, spec, cfg.seed, model_cfg.num_classes, cfg.per_class, sampler,
                            cfg.batch_size)
        st.write_bytes(st.join(out, spec.name), data)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num", type=int, default=3072)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    import ray

    tmp = tempfile.mkdtemp(prefix="bench-sample-")
    ckpt = os.path.join(tmp, "base")
    pretrain(from_dict(PretrainConfig, {"out": ckpt, "family": "flow", "preset": "tiny", "steps": 20,
                                        "progress": False}))
    common = {"checkpoint": ckpt, "num": args.num, "shard_size": 128, "batch_size": 64, "progress": False,
              "sampler": {"steps": args.steps}, "threads_per_worker": 1}
    plain_s = plain_loop(ckpt, os.path.join(tmp, "plain"), from_dict(SampleConfig, {**common, "out": "x"}))

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    times = {}
    for workers in (1, 2):
        cfg = from_dict(SampleConfig, {**common, "out": os.path.join(tmp, f"stage{workers}"), "workers": workers})
        t0 = time.perf_counter()
        sample(cfg)
        times[workers] = time.perf_counter() - t0
    ray.shutdown()
    st.remove(tmp)
    ips = {"plain": args.num / plain_s, "stage_1w": args.num / times[1], "stage_2w": args.num / times[2]}
    print(json.dumps({"bench": "sample", "num": args.num, "steps": args.steps, "plain_s": round(plain_s, 2),
                      "stage_1w_s": round(times[1], 2), "stage_2w_s": round(times[2], 2),
                      "images_per_s": {k: round(v, 1) for k, v in ips.items()},
                      "stage_over_plain": round(ips["stage_1w"] / ips["plain"], 3),
                      "two_over_one": round(ips["stage_2w"] / ips["stage_1w"], 3),
                      "targets": {"stage_over_plain": 0.85, "two_over_one": 1.6}}))


if __name__ == "__main__":
    main()
