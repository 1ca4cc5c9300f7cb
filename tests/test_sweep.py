"""The sweep stage end to end on a tiny model: injected trial failures, resuming, refusals."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from neon_ray import checkpoints
from neon_ray.config import from_dict
from neon_ray.evaluate.refstats import RefStats, load_ref_stats, save_ref_stats
from neon_ray.evaluate.run import RefStatsConfig, run_ref_stats
from neon_ray.sweep import SweepConfig, edge_warnings, load_results, run as sweep

FAULTY = "faulty_family:FaultyFlow"


def copy_as(base: str, out: str, family: str | None = None, noise: float = 0.0, base_digest: str | None = None,
            images: int = 0) -> str:
    """Save ``base``'s weights (optionally perturbed, as a stand-in θ_s) under another family name."""
    info = checkpoints.load_info(base)
    sd = checkpoints.load_state_dict(base)
    if noise:
        g = torch.Generator().manual_seed(0)
        sd = {k: v + noise * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
              for k, v in sd.items()}
    info.family = family or info.family
    info.images_seen += images
    extra = {"base_digest": base_digest, "images_seen": images} if base_digest else None
    checkpoints.save_checkpoint(out, sd, info, manifest_extra=extra)
    return out


@pytest.fixture(scope="module")
def inputs(tiny_flow_base, tmp_path_factory):
    """A faulty-family base, one snapshot of it, and digits reference statistics."""
    root = tmp_path_factory.mktemp("sweep-inputs")
    base = copy_as(tiny_flow_base, str(root / "base"), FAULTY)
    digest = checkpoints.checkpoint_digest(base)
    copy_as(base, str(root / "ft" / "snap-00000640"), noise=1e-3, base_digest=digest, images=640)
    ref = str(root / "ref.npz")
    run_ref_stats(RefStatsConfig(out=ref, max_features=500))
    return {"base": base, "snapshots": str(root / "ft"), "ref_stats": ref, "root": root}


def config(inputs, out, **over) -> SweepConfig:
    data = {"base": inputs["base"], "snapshots": inputs["snapshots"], "ref_stats": inputs["ref_stats"],
            "out": out, "w": "0:2", "w_points": 3, "cfg": "1:2", "cfg_points": 3, "search": "grid",
            "num_select": 80, "num_final": 80, "batch_size": 80, "max_concurrent": 2,
            "sampler": {"steps": 4}, **over}
    return from_dict(SweepConfig, data)


def test_failed_trials_are_recorded_and_the_sweep_completes(inputs, ray_local, tmp_path):
    out = str(tmp_path / "sweep")
    result = sweep(config(inputs, out))
    rows = load_results(out, None)
    select = [r for r in rows if r["phase"] == "select"]
    by_gamma = {g: [r for r in select if r["guidance"] == g] for g in (1.0, 1.5, 2.0)}
    assert by_gamma[1.5] and all(r["status"] == "failed" and "injected failure" in r["error"]
                                 for r in by_gamma[1.5])
    assert by_gamma[2.0] and all(r["status"] == "failed" and "out of memory" in r["error"]
                                 for r in by_gamma[2.0])
    assert {r["w"] for r in by_gamma[1.0]} >= {0.0, 1.0, 2.0}
    ok = [r for r in select if r["status"] == "ok"]        # γ = 1 and the refinement around the best
    assert all(r["guidance"] < 1.5 and r["fid"] > 0 for r in ok) and len(ok) >= 3
    assert result["guidance"] < 1.5 and result["base"]["guidance"] < 1.5
    assert result["evaluations"] == len(select)
    assert os.path.exists(os.path.join(out, "final", "manifest.json"))
    assert json.load(open(os.path.join(out, "result.json")))["w"] == result["w"]
    report = open(os.path.join(out, "report.md")).read()
    failed = sum(r["status"] == "failed" for r in rows)
    assert f"{failed} failed point(s)" in report and "injected failure at guidance 1.5" in report

    # A re-run keeps the evaluated points (same timings: not re-evaluated) and tries the failed ones again.
    again = sweep(config(inputs, out))
    rows2 = load_results(out, None)
    ok2 = {(r["snapshot"], r["w"], r["guidance"], r["phase"]): r["seconds"] for r in rows2 if r["status"] == "ok"}
    ok1 = {(r["snapshot"], r["w"], r["guidance"], r["phase"]): r["seconds"] for r in rows if r["status"] == "ok"}
    assert ok2 == ok1
    assert again["neon"]["fid"] == result["neon"]["fid"]
    assert sum(r["status"] == "failed" for r in rows2) == sum(r["status"] == "failed" for r in rows)


def refused(inputs, tmp_path, message, **over):
    out = str(tmp_path / "refused")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        sweep(config(inputs, out, **over))
    assert not os.path.exists(os.path.join(out, "sweep.json"))
    assert not os.path.exists(os.path.join(out, "results.parquet"))


@pytest.mark.parametrize("over, message", [
    ({"w": "2:1"}, "w: .*inverted"),
    ({"w": "1:1"}, "w: .*empty"),
    ({"cfg": "3:2"}, "cfg: .*inverted"),
    ({"num_select": 64}, "num_select: a full-rank covariance .*64-dim .*more than 64"),
    ({"num_final": 10}, "num_final: a full-rank covariance"),
])
def test_bad_settings_are_refused_before_any_trial(inputs, tmp_path, over, message):
    refused(inputs, tmp_path, message, **over)


def test_reference_statistics_of_another_extractor_are_refused(inputs, tmp_path):
    ours = load_ref_stats(inputs["ref_stats"])
    other = str(tmp_path / "other.npz")
    save_ref_stats(other, RefStats("other-net:1", ours.mu, ours.sigma))
    refused(inputs, tmp_path, "made with extractor other-net:1, but features come from digits-cnn", ref_stats=other)


def test_snapshots_of_another_base_are_refused(inputs, tmp_path):
    snaps = tmp_path / "ft-other"
    copy_as(inputs["base"], str(snaps / "snap-00000640"), noise=1e-3, base_digest="0" * 64, images=640)
    refused(inputs, tmp_path, "snapshot snap-00000640: fine-tuned from another base", snapshots=str(snaps))
    flow = tmp_path / "ft-flow"
    copy_as(inputs["base"], str(flow / "snap-00000640"), family="flow")
    refused(inputs, tmp_path, "snapshot snap-00000640: family/model 'flow' differ", snapshots=str(flow))


def test_edge_warnings_name_the_range_to_widen():
    cfg = SweepConfig(base="b", snapshots="s", ref_stats="r", out="o", w="0:3", cfg="1:3")
    prep = SimpleNamespace(gammas=[1.0, 2.0, 3.0])
    got = edge_warnings(cfg, prep, {"snapshot": "snap-1", "w": 3.0, "guidance": 2.0},
                        {"snapshot": "base", "w": 0.0, "guidance": 1.0})
    assert len(got) == 2 and "best w (3) is the top of the searched range 0:3" in got[0]
    assert "the base's best guidance (1) is an end of the searched range 1:3" in got[1]
    assert edge_warnings(cfg, prep, {"snapshot": "snap-1", "w": 2.2, "guidance": 2.0},
                         {"snapshot": "base", "w": 0.0, "guidance": 2.0}) == []


def test_evaluator_tasks_give_the_same_features_as_one_process(inputs, ray_local):
    import numpy as np

    from neon_ray.evaluate.moments import Moments
    from neon_ray.sample import resolve_sampler
    from neon_ray.sweep_eval import point_features, spec_from
    from neon_ray.sweep_tune import _features

    family, model_cfg, _, info = checkpoints.load_model(inputs["base"])
    base_sd = checkpoints.load_state_dict(inputs["base"])
    snap_sd = checkpoints.load_state_dict(os.path.join(inputs["snapshots"], "snap-00000640"))
    spec = spec_from(info.family, model_cfg, resolve_sampler(family, model_cfg, {"steps": 4}), 90, 7, 32,
                     config(inputs, "unused").extractor)
    one = point_features(spec, base_sd, snap_sd, 1.5, 1.0, 0, spec.num)
    moments, split = _features(spec, base_sd, snap_sd, 1.5, 1.0, 3, {"cpu": 1, "gpu": 0})  # 3 evaluator tasks
    assert split.shape == one.shape == (90, 64) and np.array_equal(split, one)
    # Their float64 moments merge to those of all the features (up to summation order).
    whole = Moments.of(one)
    assert moments.n == 90 and np.allclose(moments.sum, whole.sum, rtol=1e-12, atol=1e-9)
    assert np.allclose(moments.outer, whole.outer, rtol=1e-12, atol=1e-9)
