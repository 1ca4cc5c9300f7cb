"""The Ray shell of the sweep: Tune trials driven by a planner, and the final comparison.

Kept apart from ``sweep.py`` (config, checks, results) so the search logic
stays testable without Ray and this file only moves data and asks for
resources.
"""

from __future__ import annotations

import functools
import math
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from neon_ray import checkpoints
from neon_ray.evaluate.moments import Moments
from neon_ray.search import BASE, Point
from neon_ray.sweep_eval import chunks, point_features, point_moments, score, spec_from


def _features(spec, base_sd, snap_sd, w, guidance, evaluators: int, resources: dict):
    """(float64 moments, features) of a point: in this process, or from evaluator tasks whose moments merge."""
    import ray

    if evaluators <= 1:
        return point_moments(spec, base_sd, snap_sd, w, guidance, 0, spec.num)
    task = ray.remote(point_moments).options(num_cpus=resources.get("cpu", 1), num_gpus=resources.get("gpu", 0))
    base_ref, snap_ref = ray.put(base_sd), ray.put(snap_sd)    # once, not once per task
    parts = ray.get([task.remote(spec, base_ref, snap_ref, w, guidance, a, b)
                     for a, b in chunks(spec.num, evaluators)])
    return functools.reduce(Moments.merge, [m for m, _ in parts]), np.concatenate([f for _, f in parts])


def _trial(config: dict[str, Any], spec, base, snaps, ref, k: int, evaluators: int, resources: dict) -> None:
    """One Tune trial: θ_w in memory, N1 samples on the common seeds, FID and P/R."""
    import torch
    from ray import tune

    t0 = time.time()
    snap_sd = None if config["snapshot"] == BASE else snaps[config["snapshot"]]
    try:
        moments, feats = _features(spec, base, snap_sd, config["w"], config["guidance"], evaluators, resources)
    except torch.OutOfMemoryError as e:  # recorded as a failed point; the search goes on
        tune.report({"status": "failed", "error": f"out of memory: {e}"[:300], "fid": math.nan,
                     "seconds": time.time() - t0})
        return
    metrics = score(feats, ref, k, moments)
    tune.report({**metrics, "status": "ok", "error": None, "seconds": time.time() - t0})


def _make_searcher(planner, cached: dict[Point, dict], record):
    from ray.tune.search import Searcher

    class PlannerSearcher(Searcher):
        """Asks the planner for points; answers evaluated points from ``cached``."""

        def __init__(self):
            super().__init__(metric="fid", mode="min")
            self.queue: list[Point] = []
            self.trials: dict[str, Point] = {}

        def suggest(self, trial_id: str):
            while not self.queue:
                points = planner.propose()
                if points is None:
                    return Searcher.FINISHED
                if not points:
                    return None
                for p in points:
                    if p in cached:
                        planner.observe(p, cached[p]["fid"])
                    else:
                        self.queue.append(p)
            p = self.queue.pop(0)
            self.trials[trial_id] = p
            return {"snapshot": p.snapshot, "w": p.w, "guidance": p.guidance}

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            p = self.trials.pop(trial_id)
            ok = not error and result is not None and result.get("status") == "ok"
            planner.observe(p, result["fid"] if ok else None)
            record(p, result if not error else None, error)

    return PlannerSearcher()


def run_search(cfg, prep, planner) -> list[dict[str, Any]]:
    """Run the planner's points as Tune trials; returns every row (resumed ones too)."""
    from ray import tune

    from neon_ray.raycluster import init_ray
    from neon_ray.sweep import load_results, save_results

    rows = [r for r in load_results(cfg.out, cfg.storage)]
    cached = {Point.make(r["snapshot"], r["w"], r["guidance"]): r for r in rows
              if r["status"] == "ok" and r["phase"] == "select"}
    rows = [r for r in rows if r["status"] == "ok"]   # failed points are tried again

    def record(p: Point, result: dict | None, error: bool) -> None:
        result = result or {}
        rows.append({"snapshot": p.snapshot, "w": p.w, "guidance": p.guidance, "phase": "select",
                     "fid": result.get("fid", math.nan), "precision": result.get("precision", math.nan),
                     "recall": result.get("recall", math.nan),
                     "status": "failed" if error or result.get("status") != "ok" else "ok",
                     "error": result.get("error") or ("trial raised an exception" if error else None),
                     "seconds": result.get("seconds")})
        save_results(cfg.out, rows, cfg.storage)

    init_ray()
    spec = spec_from(prep.base_info.family, prep.model_cfg, prep.sampler, cfg.num_select, cfg.seed_select,
                     cfg.batch_size, cfg.extractor, "cuda" if cfg.gpus_per_trial > 0 else "cpu",
                     int(cfg.cpus_per_trial))
    base = checkpoints.load_state_dict(cfg.base, cfg.storage)
    snaps = {n: checkpoints.load_state_dict(u, cfg.storage) for n, u in prep.snapshots.items()}
    resources = {"cpu": cfg.cpus_per_trial, "gpu": cfg.gpus_per_trial}
    trial_resources = resources if cfg.evaluators <= 1 else {"cpu": 0}
    trainable = tune.with_resources(
        tune.with_parameters(_trial, spec=spec, base=base, snaps=snaps, ref=prep.ref, k=cfg.k,
                             evaluators=cfg.evaluators, resources=resources), trial_resources)
    searcher = _make_searcher(planner, cached, record)
    # Tune's own experiment state is scratch: results.parquet is the record and the resume point.
    scratch = tempfile.mkdtemp(prefix="neon-tune-")
    try:
        tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(
            search_alg=searcher, num_samples=-1, max_concurrent_trials=cfg.max_concurrent),
            run_config=tune.RunConfig(name=f"sweep-{int(time.time())}", verbose=0, storage_path=scratch,
                                      failure_config=tune.FailureConfig(max_failures=0)))
        grid = tuner.fit()
        # Put Tune's error text on failed rows.
        errors = {Point.make(r.config["snapshot"], r.config["w"], r.config["guidance"]): r.error
                  for r in grid if r.error is not None}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for row in rows:
        p = Point.make(row["snapshot"], row["w"], row["guidance"])
        if row["status"] == "failed" and p in errors:
            row["error"] = str(errors[p]).strip().splitlines()[-1][:300]
    save_results(cfg.out, rows, cfg.storage)
    return rows


def evaluate_final(cfg, prep, points: list[Point], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measure ``points`` on the final seeds (the same for all), in parallel tasks."""
    import ray

    from neon_ray.sweep import save_results

    done = {Point.make(r["snapshot"], r["w"], r["guidance"]): r for r in rows
            if r["phase"] == "final" and r["status"] == "ok"}
    spec = spec_from(prep.base_info.family, prep.model_cfg, prep.sampler, cfg.num_final, cfg.seed_final,
                     cfg.batch_size, cfg.extractor, "cuda" if cfg.gpus_per_trial > 0 else "cpu",
                     int(cfg.cpus_per_trial))
    todo = [p for p in points if p not in done]
    if todo:
        base = ray.put(checkpoints.load_state_dict(cfg.base, cfg.storage))
        task = ray.remote(point_features).options(num_cpus=cfg.cpus_per_trial, num_gpus=cfg.gpus_per_trial)
        refs = {}
        for p in todo:
            snap = None if p.snapshot == BASE else ray.put(checkpoints.load_state_dict(
                prep.snapshots[p.snapshot], cfg.storage))
            refs[p] = task.remote(spec, base, snap, p.w, p.guidance, 0, cfg.num_final)
        for p, ref in refs.items():
            t0 = time.time()
            metrics = score(ray.get(ref), prep.ref, cfg.k)
            row = {"snapshot": p.snapshot, "w": p.w, "guidance": p.guidance, "phase": "final", "status": "ok",
                   "error": None, "seconds": time.time() - t0, **metrics}
            rows.append(row)
            done[p] = row
        save_results(cfg.out, rows, cfg.storage)
    return [done[p] for p in points]
