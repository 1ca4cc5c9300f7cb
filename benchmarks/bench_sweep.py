"""Sweep search: adaptive (parabolic along w) vs grid (the paper's protocol) on the digits demo.

Runs the flow digits pipeline up to the fine-tune (reusing --run-dir when its
stages are done), then both searches with the same seeds, ranges
(``RANGES``: w ∈ [0, 6] on 13 grid points, γ ∈ [1, 3] on 5) and final
comparison. Prints one JSON line: evaluations, chosen point and final FIDs
(base and Neon, precision/recall as base P, base R, Neon P, Neon R) of each, the
evaluation ratio (target ≤ 0.5) and the FID ratio adaptive/grid (target ≤ 1.02).

usage: python benchmarks/bench_sweep.py [--run-dir DIR]
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from neon_ray import config as C, pipeline, sweep  # noqa: E402
from neon_ray.config import from_dict, to_dict  # noqa: E402
from neon_ray.raycluster import init_ray  # noqa: E402


# The searched ranges, fixed here so the figures in the README stay comparable when the job config changes.
RANGES = {"w": "0:6", "w_points": 13, "cfg": "1:3", "cfg_points": 5}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", default=os.path.join(ROOT, "runs", "bench-sweep"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = C.load(pipeline.PipelineConfig, os.path.join(ROOT, "jobs", "configs", "flow-digits.yaml"),
                 [f"run_dir={args.run_dir}"])
    init_ray()
    for stage in pipeline.stages(cfg):
        if stage.name != "sweep" and not stage.done():
            stage.run()
    base_sweep = to_dict(pipeline.stage_configs(cfg)["sweep"])
    out = {}
    for search in ("grid", "adaptive"):
        sweep_cfg = from_dict(sweep.SweepConfig, {**base_sweep, **RANGES, "search": search,
                                                  "write_final": False,
                                                  "out": os.path.join(args.run_dir, f"sweep-{search}")})
        t0 = time.perf_counter()
        result = sweep.run(sweep_cfg)
        neon, base = result["neon"], result["base"]
        out[search] = {"evaluations": result["evaluations"], "final_fid": round(neon["fid"], 3),
                       "base_final_fid": round(base["fid"], 3), "base_guidance": base["guidance"],
                       "w": round(result["w"], 3), "guidance": result["guidance"], "snapshot": result["snapshot"],
                       "precision_recall": [round(x, 3) for x in (base["precision"], base["recall"],
                                                                   neon["precision"], neon["recall"])],
                       "extra_compute": result["extra_compute"]["fraction_of_base"],
                       "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps({"bench": "sweep", **out,
                      "evaluation_ratio": round(out["adaptive"]["evaluations"] / out["grid"]["evaluations"], 3),
                      "fid_ratio": round(out["adaptive"]["final_fid"] / out["grid"]["final_fid"], 4),
                      "targets": {"evaluation_ratio": 0.5, "fid_ratio": 1.02}}))


if __name__ == "__main__":
    main()
