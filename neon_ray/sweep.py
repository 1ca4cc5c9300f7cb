"""Stage 4: search (snapshot, w, γ) by FID with Ray Tune (DESIGN.md §1, §5, §6).

One Tune trial per point, run in parallel (one GPU each on a cluster). A
custom Tune ``Searcher`` asks a pure planner (``search.py``: the paper's grid,
or the adaptive parabolic search) for the next points. θ_r and every θ_s are
put in the object store once; each trial builds θ_w in memory. Points are
selected on ``num_select`` samples with one seed set; the chosen point and the
base model (w = 0 at its own best γ) are then measured on ``num_final``
samples with disjoint seeds, the same for both, and the winner is written with
the streaming merge as ``<out>/final/``.

Resuming: ``results.parquet`` is rewritten whole after every trial; a re-run
skips points already evaluated. A failing trial (exception, out of memory) is
recorded as failed and the search goes on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from neon_ray import checkpoints, storage as st
from neon_ray.config import option, to_dict
from neon_ray.evaluate.features import ExtractorConfig
from neon_ray.search import BASE, AdaptivePlanner, GridPlanner, Point, linspace, parse_range
from neon_ray.storage import StorageConfig


@dataclass
class SweepConfig:
    """Settings of ``neon-ray sweep``."""

    base: str = option("", "base checkpoint URI (θ_r)")
    snapshots: str = option("", "fine-tune output (snap-* folders) or one snapshot checkpoint (θ_s)")
    ref_stats: str = option("", "reference statistics npz URI")
    out: str = option("", "output folder URI")
    w: str = option("0:3", "range of the extrapolation weight w, LO:HI")
    cfg: str | None = option(None, "range of the guidance scale γ, LO:HI (default: the base sampler's γ)")
    cfg_points: int = option(4, "γ values in the range", min=1)
    search: Literal["grid", "adaptive"] = option("grid", "grid (the paper's protocol) or adaptive")
    w_points: int = option(13, "coarse grid points along w", min=2)
    margin: float = option(0.05, "grid: stop a line once FID exceeds its best by this fraction", min=0.0)
    num_select: int = option(2000, "samples per point during the search (N1)", min=2)
    num_final: int = option(5000, "samples for the final comparison (N2)", min=2)
    seed_select: int = option(20_000_000, "first sample seed of the search", min=0)
    seed_final: int = option(30_000_000, "first sample seed of the final comparison", min=0)
    max_concurrent: int = option(2, "trials at once", min=1)
    evaluators: int = option(1, "evaluator tasks per trial (their moments merge)", min=1)
    cpus_per_trial: float = option(1.0, "CPUs per trial", min=0.0)
    gpus_per_trial: float = option(0.0, "GPUs per trial", min=0.0)
    batch_size: int = option(250, "images per sampling batch", min=1)
    k: int = option(3, "k of the k-NN manifolds for precision/recall", min=1)
    sampler: dict[str, Any] = option(default_factory=dict, help="sampler overrides (steps, solver, ...)")
    extractor: ExtractorConfig = field(default_factory=ExtractorConfig)
    assume_extractor_id: str | None = option(None, "extractor id of a mu/sigma-only reference npz")
    write_final: bool = option(True, "write the winning merged checkpoint to <out>/final")
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self) -> None:
        for name in ("base", "snapshots", "ref_stats", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name}: a URI is required")
        parse_range(self.w, "w")
        if self.cfg is not None:
            parse_range(self.cfg, "cfg")
        if self.seed_select <= self.seed_final < self.seed_select + self.num_select or \
                self.seed_final <= self.seed_select < self.seed_final + self.num_final:
            raise ValueError("seed_final: the final seed set overlaps the search's")


@dataclass
class Prepared:
    family: Any
    model_cfg: Any
    sampler: Any
    snapshots: dict[str, str]            # name -> URI
    gammas: list[float]
    ref: Any
    extractor_id: str
    base_info: Any


def list_snapshots(uri: str, storage: StorageConfig | None) -> dict[str, str]:
    """``{name: uri}`` of the snapshots under a fine-tune output, or the one checkpoint at ``uri``."""
    if st.exists(st.join(uri, "config.json"), storage):
        return {uri.rstrip("/").rsplit("/", 1)[-1]: uri}
    snaps = {n: st.join(uri, n) for n in st.listdir(uri, storage) if n.startswith("snap-")}
    snaps = {n: u for n, u in snaps.items() if st.verify_manifest(u, storage) is not None}
    if not snaps:
        raise FileNotFoundError(f"snapshots: no finished snapshot checkpoints under {uri}")
    return dict(sorted(snaps.items()))


def prepare(cfg: SweepConfig) -> Prepared:
    """Every check that can fail before a trial starts."""
    from neon_ray.evaluate.features import build_extractor
    from neon_ray.evaluate.refstats import check_compatible, load_ref_stats
    from neon_ray.families import get_family
    from neon_ray.sample import resolve_sampler

    info = checkpoints.load_info(cfg.base, cfg.storage)
    family = get_family(info.family)
    model_cfg = family.parse_config(info.model)
    sampler = resolve_sampler(family, model_cfg, cfg.sampler)
    base_digest = checkpoints.checkpoint_digest(cfg.base, cfg.storage)
    snapshots = list_snapshots(cfg.snapshots, cfg.storage)
    for name, uri in snapshots.items():
        snap = checkpoints.load_info(uri, cfg.storage)
        if snap.family != info.family or snap.model != info.model:
            raise ValueError(f"snapshot {name}: family/model {snap.family!r} differ from the base's")
        recorded = (st.read_manifest(uri, cfg.storage) or {}).get("base_digest") or \
            snap.extra.get("base_digest")
        if recorded is not None and recorded != base_digest:
            raise ValueError(f"snapshot {name}: fine-tuned from another base (digest {recorded[:12]}, "
                             f"base {base_digest[:12]})")
    ref = load_ref_stats(cfg.ref_stats, cfg.storage, cfg.assume_extractor_id) \
        if cfg.assume_extractor_id else load_ref_stats(cfg.ref_stats, cfg.storage)
    extractor = build_extractor(cfg.extractor)     # trains/caches the digits extractor once, here
    check_compatible(ref, extractor)
    for name in ("num_select", "num_final"):
        if getattr(cfg, name) <= extractor.dim:
            raise ValueError(f"{name}: a full-rank covariance in {extractor.id}'s {extractor.dim}-dim "
                             f"feature space needs more than {extractor.dim} samples, got {getattr(cfg, name)}")
    gammas = [sampler.guidance] if cfg.cfg is None else linspace(*parse_range(cfg.cfg, "cfg"), cfg.cfg_points)
    for g in gammas:
        if g < 0:
            raise ValueError(f"cfg: guidance must be >= 0, got {g}")
    st.check_writable(cfg.out, cfg.storage)
    return Prepared(family, model_cfg, sampler, snapshots, gammas, ref, extractor.id, info)


def make_planner(cfg: SweepConfig, prep: Prepared):
    w_lo, w_hi = parse_range(cfg.w, "w")
    common = dict(snapshots=list(prep.snapshots), gammas=prep.gammas, w_lo=w_lo, w_hi=w_hi)
    if cfg.search == "grid":
        return GridPlanner(**common, w_points=cfg.w_points, margin=cfg.margin, batch=cfg.max_concurrent)
    return AdaptivePlanner(**common)


# Results file ---------------------------------------------------------------------------------

COLUMNS = ("snapshot", "w", "guidance", "fid", "precision", "recall", "status", "error", "seconds", "phase")


def load_results(out: str, storage: StorageConfig | None) -> list[dict[str, Any]]:
    import io

    import pyarrow.parquet as pq

    uri = st.join(out, "results.parquet")
    if not st.exists(uri, storage):
        return []
    return pq.read_table(io.BytesIO(st.read_bytes(uri, storage))).to_pylist()


def save_results(out: str, rows: list[dict[str, Any]], storage: StorageConfig | None) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: [r.get(c) for r in rows] for c in COLUMNS})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    st.write_bytes(st.join(out, "results.parquet"), buf.getvalue(), storage)


def run(cfg: SweepConfig) -> dict[str, Any]:
    """Search, compare on fresh seeds, write the winner and the report."""
    # Local paths absolute: Ray workers run in other folders.
    cfg = dataclasses.replace(
        cfg, base=st.absolute(cfg.base),
        snapshots=st.absolute(cfg.snapshots),
        ref_stats=st.absolute(cfg.ref_stats),
        out=st.absolute(cfg.out))
    from neon_ray.sweep_tune import evaluate_final, run_search

    prep = prepare(cfg)
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("max_concurrent", "evaluators", "storage",
                                                                   "cpus_per_trial", "gpus_per_trial")}
    settings_uri = st.join(cfg.out, "sweep.json")
    if st.exists(settings_uri, cfg.storage) and st.read_json(settings_uri, cfg.storage) != settings:
        raise FileExistsError(f"{cfg.out}: holds a sweep with other settings (sweep.json); choose another --out")
    st.write_json(settings_uri, settings, cfg.storage)

    # Search on the selection seeds.
    rows = run_search(cfg, prep, make_planner(cfg, prep))
    ok = [r for r in rows if r["status"] == "ok" and r["phase"] == "select"]
    if not ok:
        raise RuntimeError("sweep: every trial failed; see results.parquet")
    best = min(ok, key=lambda r: r["fid"])
    base_rows = [r for r in ok if r["w"] == 0.0]
    base_best = min(base_rows, key=lambda r: r["fid"]) if base_rows else \
        {"snapshot": BASE, "w": 0.0, "guidance": prep.sampler.guidance}

    # Final comparison on disjoint seeds, the same for both.
    final = evaluate_final(cfg, prep, [Point.make(best["snapshot"], best["w"], best["guidance"]),
                                       Point.make(BASE, 0.0, base_best["guidance"])], rows)
    neon, base = final
    result = {"neon": neon, "base": base, "w": neon["w"], "guidance": neon["guidance"],
              "snapshot": neon["snapshot"], "evaluations": sum(1 for r in rows if r["phase"] == "select"),
              "feature_space": prep.extractor_id, "search": cfg.search,
              "extra_compute": extra_compute(cfg, prep, neon["snapshot"]),
              "warnings": edge_warnings(cfg, prep, best, base_best)}
    for text in result["warnings"]:
        print(f"sweep: warning: {text}")

    # Write the winner with the streaming merge.
    if cfg.write_final:
        result["final_uri"] = write_final(cfg, prep, neon)
    st.write_json(st.join(cfg.out, "result.json"), result, cfg.storage)
    from neon_ray.report import write_sweep_report

    write_sweep_report(cfg, prep, rows, result)
    print(f"sweep: base FID {base['fid']:.3f} (γ={base['guidance']:g}) -> Neon FID {neon['fid']:.3f} "
          f"(w={neon['w']:g}, γ={neon['guidance']:g}, {neon['snapshot']}) on {cfg.num_final} samples")
    return result


def edge_warnings(cfg: SweepConfig, prep: Prepared, best: dict[str, Any], base_best: dict[str, Any]) -> list[str]:
    """Chosen points on an end of a searched range: the optimum may lie outside it."""
    out = []
    w_hi = parse_range(cfg.w, "w")[1]
    if best["snapshot"] != BASE and best["w"] >= w_hi:
        out.append(f"the best w ({best['w']:g}) is the top of the searched range {cfg.w}; widen w")
    if len(prep.gammas) > 1:
        ends = (min(prep.gammas), max(prep.gammas))
        for who, row in (("Neon", best), ("the base", base_best)):
            if row["guidance"] in ends:
                out.append(f"{who}'s best guidance ({row['guidance']:g}) is an end of the searched range "
                           f"{cfg.cfg}; widen cfg")
    return out


def extra_compute(cfg: SweepConfig, prep: Prepared, snapshot: str) -> dict[str, Any]:
    """Fine-tune images seen for the chosen snapshot, as a fraction of base training."""
    if snapshot == BASE:
        return {"finetune_images": 0, "fraction_of_base": 0.0}
    info = checkpoints.load_info(prep.snapshots[snapshot], cfg.storage)
    base_images = prep.base_info.base_train_images or prep.base_info.images_seen
    # The fine-tune records its own count; a snapshot from elsewhere counts as the difference.
    ft = (info.extra.get("finetune") or {}).get("images_seen",
                                                 max(0, info.images_seen - prep.base_info.images_seen))
    return {"finetune_images": int(ft), "base_train_images": base_images,
            "fraction_of_base": (ft / base_images) if base_images else None}


def write_final(cfg: SweepConfig, prep: Prepared, neon: dict[str, Any]) -> str:
    from neon_ray.merge import merge_checkpoints

    out = st.join(cfg.out, "final")
    if st.verify_manifest(out, cfg.storage) is not None:
        return out
    st.remove(out, cfg.storage)  # our own folder without a verifying manifest: a killed earlier write
    if neon["snapshot"] == BASE:
        snap_uri = next(iter(prep.snapshots.values()))
    else:
        snap_uri = prep.snapshots[neon["snapshot"]]
    merge_checkpoints(cfg.base, snap_uri, neon["w"], out, storage=cfg.storage)
    return out
