"""The whole run against one run directory, each stage skipped when done.

Stages, in order (DESIGN.md §3)::

    <run>/base/          base checkpoint: the given one, or pretrained here on first use
    <run>/ref_stats.npz  reference feature statistics of the real data
    <run>/eval/base.json the base model's FID at its sampler settings
    <run>/report/        sample grid(s)

Every stage writes whole files and its output verifies (manifest or file), so
a crashed or resubmitted job resumes where it stopped. ``run.json`` records the
resolved config, software versions and stage status.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from neon_ray import __version__, checkpoints, storage as st
from neon_ray.config import option, to_dict
from neon_ray.evaluate.features import ExtractorConfig
from neon_ray.pretrain import PretrainConfig
from neon_ray.storage import StorageConfig


@dataclass
class ReferenceSection:
    """Real data and the feature space FID is measured in."""

    data: str = option("digits", "real dataset for reference statistics (or use stats_uri)")
    stats_uri: str | None = option(None, "existing reference npz (e.g. ADM's); skips computing it")
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)


@dataclass
class EvalSection:
    """How the base model is measured."""

    num_samples: int = option(2000, "images per FID evaluation", min=2)
    seed: int = option(10_000_000, "first sample seed (disjoint from the synthetic set's)", min=0)
    batch_size: int = option(250, "images per sampling batch", min=1)
    k: int = option(3, "k of the k-NN manifolds for precision/recall", min=1)
    sampler: dict[str, Any] = option(default_factory=dict, help="overrides of the family's sampler")


@dataclass
class PipelineConfig:
    """``neon-ray run`` / ``jobs/*.py``: the whole method against one run directory."""

    run_dir: str = option("runs/demo", "run directory URI; every stage writes under it")
    base_checkpoint: str | None = option(None, "existing base checkpoint; None = pretrain one")
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    reference: ReferenceSection = field(default_factory=ReferenceSection)
    evaluation: EvalSection = field(default_factory=EvalSection)
    grid_rows: int = option(10, "rows of the sample grid (one per class for digits)", min=1)
    grid_cols: int = option(10, "columns of the sample grid", min=1)
    storage: StorageConfig = field(default_factory=StorageConfig)


@dataclass
class Stage:
    name: str
    output: str                      # URI whose presence/verification means "done"
    run: Callable[[], Any]
    done: Callable[[], bool]


def _uri(cfg: PipelineConfig, *parts: str) -> str:
    return st.join(cfg.run_dir, *parts)


def base_uri(cfg: PipelineConfig) -> str:
    return cfg.base_checkpoint or _uri(cfg, "base")


def _stage_base(cfg: PipelineConfig) -> None:
    from neon_ray import pretrain
    from neon_ray.config import from_dict

    data = to_dict(cfg.pretrain)
    data.update(out=base_uri(cfg), storage=to_dict(cfg.storage))
    pretrain.run(from_dict(PretrainConfig, data, prefix="pretrain"))


def _stage_reference(cfg: PipelineConfig) -> None:
    from neon_ray.evaluate.run import RefStatsConfig, run_ref_stats

    run_ref_stats(RefStatsConfig(out=_uri(cfg, "ref_stats.npz"), data=cfg.reference.data,
                                 extractor=cfg.reference.extractor, storage=cfg.storage))


def _stage_eval_base(cfg: PipelineConfig) -> None:
    from neon_ray.evaluate.run import EvaluateConfig, run as evaluate
    from neon_ray.families.base import SamplerConfig
    from neon_ray.sample import resolve_sampler

    info = checkpoints.load_info(base_uri(cfg), cfg.storage)
    from neon_ray.families import get_family

    family = get_family(info.family)
    sampler = resolve_sampler(family, family.parse_config(info.model), cfg.evaluation.sampler)
    ev = cfg.evaluation
    evaluate(EvaluateConfig(checkpoint=base_uri(cfg), ref_stats=ref_stats_uri(cfg), num_samples=ev.num_samples,
                            seed=ev.seed, batch_size=ev.batch_size, k=ev.k, out=_uri(cfg, "eval", "base.json"),
                            sampler=SamplerConfig(**to_dict(sampler)), extractor=cfg.reference.extractor,
                            storage=cfg.storage))


def _stage_grid(cfg: PipelineConfig) -> None:
    from neon_ray.evaluate.run import balanced_labels, sample_images
    from neon_ray.report import save_grid
    from neon_ray.sample import resolve_sampler

    family, model_cfg, model, _ = checkpoints.load_model(base_uri(cfg), storage=cfg.storage)
    sampler = resolve_sampler(family, model_cfg, cfg.evaluation.sampler)
    n = cfg.grid_rows * cfg.grid_cols
    # Column-major labels: each row of the grid is one class for 10-class data.
    labels = balanced_labels(n, getattr(model_cfg, "num_classes", None)).view(cfg.grid_cols, cfg.grid_rows).T
    seeds = cfg.evaluation.seed + torch.arange(n, dtype=torch.int64)
    images = sample_images(family, model, labels.reshape(-1), seeds, sampler, n)
    save_grid(images, _uri(cfg, "report", "samples.png"), rows=cfg.grid_rows, storage=cfg.storage)


def ref_stats_uri(cfg: PipelineConfig) -> str:
    return cfg.reference.stats_uri or _uri(cfg, "ref_stats.npz")


def stages(cfg: PipelineConfig) -> list[Stage]:
    s = cfg.storage
    exists = lambda uri: (lambda: st.exists(uri, s))  # noqa: E731
    return [
        Stage("base", base_uri(cfg), lambda: _stage_base(cfg),
              lambda: st.verify_manifest(base_uri(cfg), s) is not None),
        Stage("reference", ref_stats_uri(cfg), lambda: _stage_reference(cfg), exists(ref_stats_uri(cfg))),
        Stage("eval_base", _uri(cfg, "eval", "base.json"), lambda: _stage_eval_base(cfg),
              exists(_uri(cfg, "eval", "base.json"))),
        Stage("grid", _uri(cfg, "report", "samples.png"), lambda: _stage_grid(cfg),
              exists(_uri(cfg, "report", "samples.png"))),
    ]


def _versions() -> dict[str, str]:
    import ray

    return {"neon_ray": __version__, "torch": torch.__version__, "ray": ray.__version__,
            "python": platform.python_version()}


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every stage not yet done; returns the run record (also ``<run>/run.json``)."""
    if cfg.base_checkpoint:
        checkpoints.load_info(cfg.base_checkpoint, cfg.storage)  # fail now if it is missing
    st.check_writable(cfg.run_dir, cfg.storage)
    record = {"config": to_dict(cfg), "versions": _versions(), "stages": {}}
    for stage in stages(cfg):
        if stage.done():
            record["stages"][stage.name] = {"status": "skipped", "output": stage.output}
            print(f"[{stage.name}] done already: {stage.output}")
            continue
        print(f"[{stage.name}] running -> {stage.output}")
        t0 = time.time()
        stage.run()
        record["stages"][stage.name] = {"status": "ran", "output": stage.output,
                                        "seconds": round(time.time() - t0, 2)}
        st.write_json(_uri(cfg, "run.json"), record, cfg.storage)
    record["results"] = {"base": st.read_json(_uri(cfg, "eval", "base.json"), cfg.storage)}
    st.write_json(_uri(cfg, "run.json"), record, cfg.storage)
    return record


def summary_table(record: dict[str, Any]) -> str:
    """The run's final table as Markdown."""
    base = record["results"]["base"]
    rows = [("model", "FID", "precision", "recall", "feature space"),
            ("base", f"{base['fid']:.3f}", f"{base.get('precision') or float('nan'):.3f}",
             f"{base.get('recall') or float('nan'):.3f}", base.get("feature_space", "?"))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)
