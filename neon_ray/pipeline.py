"""The whole Neon run against one run directory, each stage skipped when done.

Stages, in order (DESIGN.md §3)::

    <run>/base/            base checkpoint θ_r: the given one, or pretrained here on first use
    <run>/ref_stats.npz    reference feature statistics of the real data (or a given npz)
    <run>/synthetic/       stage 1: S as Parquet shards + manifest.json
    <run>/finetune/        stage 2: snap-<images>/ checkpoints + manifest.json
    <run>/sweep/           stage 4: results.parquet, report.md, plots, grids, final/ (stage 3's merge)
    <run>/run.json         resolved config, versions, stage status, results

A stage whose output verifies is skipped, so a crashed or resubmitted job
resumes; every stage also resumes inside itself. The stage sections of the
config are the stages' own configs without their URIs, which the pipeline
fills in; they are checked when the config is loaded (``--dry-run`` included).
"""

from __future__ import annotations

import dataclasses
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from neon_ray import __version__, checkpoints, storage as st
from neon_ray.config import from_dict, option, to_dict
from neon_ray.evaluate.features import ExtractorConfig
from neon_ray.storage import StorageConfig


@dataclass
class ReferenceSection:
    """Real data and the feature space FID is measured in."""

    data: str = option("digits", "real dataset for reference statistics")
    stats_uri: str | None = option(None, "existing reference npz (e.g. ADM's); skips computing it")
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)


@dataclass
class PipelineConfig:
    """``neon-ray run`` / ``jobs/*.py``: the whole method against one run directory."""

    run_dir: str = option("runs/demo", "run directory URI; every stage writes under it")
    base_checkpoint: str | None = option(None, "existing base checkpoint; None = pretrain one into <run>/base")
    pretrain: dict[str, Any] = option(default_factory=dict, help="PretrainConfig fields (used without a base)")
    reference: ReferenceSection = field(default_factory=ReferenceSection)
    synthetic: dict[str, Any] = option(default_factory=dict, help="SampleConfig fields (stage 1)")
    finetune: dict[str, Any] = option(default_factory=dict, help="FinetuneConfig fields (stage 2)")
    sweep: dict[str, Any] = option(default_factory=dict, help="SweepConfig fields (stages 3-4)")
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> None:
        stage_configs(self)  # every section is checked now, naming its field


def _uri(cfg: PipelineConfig, *parts: str) -> str:
    return st.join(cfg.run_dir, *parts)


def base_uri(cfg: PipelineConfig) -> str:
    return cfg.base_checkpoint or _uri(cfg, "base")


def ref_stats_uri(cfg: PipelineConfig) -> str:
    return cfg.reference.stats_uri or _uri(cfg, "ref_stats.npz")


def stage_configs(cfg: PipelineConfig) -> dict[str, Any]:
    """Each stage's typed config, URIs filled in from the run directory."""
    from neon_ray.evaluate.run import RefStatsConfig
    from neon_ray.finetune import FinetuneConfig
    from neon_ray.pretrain import PretrainConfig
    from neon_ray.sample import SampleConfig
    from neon_ray.sweep import SweepConfig

    cfg = dataclasses.replace(cfg, run_dir=st.absolute(cfg.run_dir),
                              base_checkpoint=st.absolute(cfg.base_checkpoint))
    s = to_dict(cfg.storage)
    ext = to_dict(cfg.reference.extractor)
    base = base_uri(cfg)
    return {
        "pretrain": from_dict(PretrainConfig, {**cfg.pretrain, "out": base, "storage": s}, prefix="pretrain"),
        "reference": from_dict(RefStatsConfig, {"out": ref_stats_uri(cfg), "data": cfg.reference.data,
                                                "extractor": ext, "storage": s}, prefix="reference"),
        "synthetic": from_dict(SampleConfig, {**cfg.synthetic, "checkpoint": base,
                                              "out": _uri(cfg, "synthetic"), "storage": s}, prefix="synthetic"),
        "finetune": from_dict(FinetuneConfig, {**cfg.finetune, "checkpoint": base, "data": _uri(cfg, "synthetic"),
                                               "out": _uri(cfg, "finetune"), "storage": s}, prefix="finetune"),
        "sweep": from_dict(SweepConfig, {**cfg.sweep, "base": base, "snapshots": _uri(cfg, "finetune"),
                                         "ref_stats": ref_stats_uri(cfg), "out": _uri(cfg, "sweep"),
                                         "extractor": ext, "storage": s}, prefix="sweep"),
    }


@dataclass
class Stage:
    name: str
    output: str
    done: Callable[[], bool]
    run: Callable[[], Any]


def stages(cfg: PipelineConfig) -> list[Stage]:
    from neon_ray import finetune, pretrain, sample, sweep
    from neon_ray.evaluate.run import run_ref_stats

    c, s = stage_configs(cfg), cfg.storage
    verified = lambda uri: (lambda: st.verify_manifest(uri, s) is not None)  # noqa: E731
    out = []
    if not cfg.base_checkpoint:
        out.append(Stage("base", base_uri(cfg), verified(base_uri(cfg)), lambda: pretrain.run(c["pretrain"])))
    if not cfg.reference.stats_uri:
        out.append(Stage("reference", ref_stats_uri(cfg), lambda: st.exists(ref_stats_uri(cfg), s),
                         lambda: run_ref_stats(c["reference"])))
    sweep_out = c["sweep"].out
    out += [
        Stage("synthetic", c["synthetic"].out, verified(c["synthetic"].out), lambda: sample.run(c["synthetic"])),
        Stage("finetune", c["finetune"].out, verified(c["finetune"].out), lambda: finetune.run(c["finetune"])),
        Stage("sweep", sweep_out, lambda: st.exists(st.join(sweep_out, "result.json"), s) and (
            not c["sweep"].write_final or st.verify_manifest(st.join(sweep_out, "final"), s) is not None),
            lambda: sweep.run(c["sweep"])),
    ]
    return out


def _versions() -> dict[str, str]:
    import ray
    import torch

    return {"neon_ray": __version__, "torch": torch.__version__, "ray": ray.__version__,
            "python": platform.python_version()}


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every stage not yet done; returns the run record (also ``<run>/run.json``)."""
    if cfg.base_checkpoint:
        checkpoints.load_info(cfg.base_checkpoint, cfg.storage)  # fail now if it is missing
    st.check_writable(cfg.run_dir, cfg.storage)
    record: dict[str, Any] = {"config": to_dict(cfg), "versions": _versions(), "stages": {}}
    for stage in stages(cfg):
        if stage.done():
            record["stages"][stage.name] = {"status": "skipped", "output": stage.output}
            print(f"[{stage.name}] done already: {stage.output}", flush=True)
            continue
        print(f"[{stage.name}] running -> {stage.output}", flush=True)
        t0 = time.time()
        record["stages"][stage.name] = {"status": "running", "output": stage.output}
        st.write_json(_uri(cfg, "run.json"), record, cfg.storage)
        stage.run()
        record["stages"][stage.name] = {"status": "ran", "output": stage.output,
                                        "seconds": round(time.time() - t0, 2)}
    record["results"] = st.read_json(_uri(cfg, "sweep", "result.json"), cfg.storage)
    st.write_json(_uri(cfg, "run.json"), record, cfg.storage)
    return record


def run_cli(cfg: PipelineConfig) -> dict[str, Any]:
    """``neon-ray run``: start or join Ray, run, print the final table."""
    from neon_ray.raycluster import init_ray

    init_ray()
    record = run(cfg)
    print(summary_table(record))
    return record


def summary_table(record: dict[str, Any]) -> str:
    """The run's final table as Markdown: base FID, Neon FID, w*, γ*, extra compute."""
    r = record["results"]
    base, neon = r["base"], r["neon"]
    frac = r["extra_compute"].get("fraction_of_base")
    rows = [("model", "FID", "precision", "recall", "w", "γ", "snapshot", "extra compute"),
            ("base", f"{base['fid']:.3f}", f"{base['precision']:.3f}", f"{base['recall']:.3f}", "0",
             f"{base['guidance']:g}", "-", "-"),
            ("Neon", f"{neon['fid']:.3f}", f"{neon['precision']:.3f}", f"{neon['recall']:.3f}", f"{neon['w']:g}",
             f"{neon['guidance']:g}", neon["snapshot"], "n/a" if frac is None else f"{100 * frac:.2f} %")]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines) + f"\n\nFID in feature space {r.get('feature_space', '?')}, {r.get('evaluations')} search evaluations"
