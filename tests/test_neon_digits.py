"""Neon works: on the digits with the tiny flow model sampled with guidance, the
whole pipeline finds w* > 0, and Neon's final FID beats the base's by more than
the base FID's spread over 3 seed sets; self-training (w = −1) is worse."""

import os

import pytest
import torch

from neon_ray import checkpoints, config as C, pipeline
from neon_ray.evaluate.refstats import load_ref_stats
from neon_ray.sweep_eval import point_features, score, spec_from

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_neon_beats_base_on_digits(ray_local, tmp_path):
    cfg = C.load(pipeline.PipelineConfig, os.path.join(ROOT, "jobs", "configs", "flow-digits.yaml"),
                 [f"run_dir={tmp_path / 'run'}"])
    record = pipeline.run(cfg)
    result = record["results"]
    base, neon = result["base"], result["neon"]
    assert neon["w"] > 0

    # Spread of the base's final FID over 3 seed sets, and self-training (w = −1).
    sweep_cfg = pipeline.stage_configs(cfg)["sweep"]
    family, model_cfg, _, info = checkpoints.load_model(sweep_cfg.base)
    ref = load_ref_stats(sweep_cfg.ref_stats)
    from neon_ray.sample import resolve_sampler

    sampler = resolve_sampler(family, model_cfg, sweep_cfg.sampler)
    base_sd = checkpoints.load_state_dict(sweep_cfg.base)
    fids = [base["fid"]]
    for k in (1, 2):
        spec = spec_from(info.family, model_cfg, sampler, sweep_cfg.num_final, sweep_cfg.seed_final + k * 1_000_000,
                         sweep_cfg.batch_size, sweep_cfg.extractor)
        fids.append(score(point_features(spec, base_sd, None, 0.0, base["guidance"], 0, spec.num), ref, 3)["fid"])
    spread = max(fids) - min(fids)
    snap_sd = checkpoints.load_state_dict(os.path.join(sweep_cfg.snapshots, neon["snapshot"]))
    spec = spec_from(info.family, model_cfg, sampler, sweep_cfg.num_final, sweep_cfg.seed_final,
                     sweep_cfg.batch_size, sweep_cfg.extractor)
    # Along the chosen line (γ*, snapshot), as in the paper's FID-against-w plots.
    g = neon["guidance"]
    base_at_g = score(point_features(spec, base_sd, None, 0.0, g, 0, spec.num), ref, 3)["fid"]
    self_trained = score(point_features(spec, base_sd, snap_sd, -1.0, g, 0, spec.num), ref, 3)["fid"]
    print(f"\nbase FID {base['fid']:.3f} (γ={base['guidance']:g}; 3 seed sets {[round(f, 3) for f in fids]}, "
          f"spread {spread:.3f}), Neon FID {neon['fid']:.3f} (w={neon['w']:g}, γ={g:g}); at γ={g:g}: "
          f"base {base_at_g:.3f}, self-training w=-1 {self_trained:.3f}; {result['evaluations']} evaluations")
    assert base["fid"] - neon["fid"] > spread
    assert self_trained > base_at_g
    torch.set_num_threads(1)
