"""Reports: sample grids, FID-vs-w plots and result tables."""

from __future__ import annotations

import io

import numpy as np
import torch

from neon_ray import storage as st
from neon_ray.storage import StorageConfig


def grid_image(images: torch.Tensor, rows: int, scale: int = 4, pad: int = 1) -> np.ndarray:
    """uint8 images (N, C, H, W) → one uint8 (H', W', C) grid, nearest-upscaled by ``scale``."""
    n, c, h, w = images.shape
    cols = -(-n // rows)
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    arr = images.cpu().numpy().transpose(0, 2, 3, 1)
    for i in range(n):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        canvas[y:y + h, x:x + w] = arr[i]
    return canvas.repeat(scale, 0).repeat(scale, 1)


def save_grid(images: torch.Tensor, uri: str, rows: int, scale: int = 4,
              storage: StorageConfig | None = None) -> None:
    """Write a PNG grid of uint8 images (N, C, H, W) to ``uri``."""
    from PIL import Image

    canvas = grid_image(images, rows, scale)
    img = Image.fromarray(canvas[..., 0] if canvas.shape[-1] == 1 else canvas)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    st.write_bytes(uri, buf.getvalue(), storage)


def _plot(rows: list[dict], y: list[str], uri: str, title: str, storage: StorageConfig | None) -> None:
    """Metric(s) against w, one line per (snapshot, γ); base (w = 0) points join every line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["phase"] == "select" and r["status"] == "ok"]
    lines = sorted({(r["snapshot"], r["guidance"]) for r in sel if r["snapshot"] != "base"}) or \
        sorted({("base", r["guidance"]) for r in sel})
    fig, axes = plt.subplots(1, len(y), figsize=(5.5 * len(y), 4), squeeze=False)
    for ax, metric in zip(axes[0], y):
        for snap, g in lines:
            pts = sorted((r["w"], r[metric]) for r in sel if r["guidance"] == g and r["snapshot"] in (snap, "base"))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=f"{snap} γ={g:g}")
        ax.axvline(0, color="gray", lw=0.5)
        ax.set_xlabel("w  (θ_neon = θ_r − w(θ_s − θ_r))")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    st.write_bytes(uri, buf.getvalue(), storage)


def _table(rows: list[dict]) -> str:
    head = "| phase | snapshot | w | γ | FID | precision | recall | status |\n|---|---|---|---|---|---|---|---|"
    body = [f"| {r['phase']} | {r['snapshot']} | {r['w']:g} | {r['guidance']:g} | {r['fid']:.4f} | "
            f"{r['precision']:.3f} | {r['recall']:.3f} | {r['status']} |"
            for r in sorted(rows, key=lambda r: (r["phase"] != "final", r["snapshot"], r["guidance"], r["w"]))]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        body += ["", f"{len(failed)} failed point(s), left out of the search (a re-run tries them again):", ""]
        body += [f"- {r['snapshot']}, w={r['w']:g}, γ={r['guidance']:g}: {r.get('error') or 'no error text'}"
                 for r in failed]
    return "\n".join([head, *body])


def write_sweep_report(cfg, prep, rows: list[dict], result: dict) -> None:
    """``<out>/report.md`` with the table, FID/P/R-vs-w plots and base vs Neon grids."""
    from neon_ray import checkpoints
    from neon_ray.config import from_dict, to_dict
    from neon_ray.evaluate.run import balanced_labels, sample_images
    from neon_ray.families.base import SamplerConfig
    from neon_ray.merge import InMemoryMerger

    out, s = cfg.out, cfg.storage
    _plot(rows, ["fid"], st.join(out, "fid_vs_w.png"), f"FID ({prep.extractor_id}) against w", s)
    _plot(rows, ["precision", "recall"], st.join(out, "pr_vs_w.png"), "precision / recall against w", s)

    # Base and Neon on the same seeds and labels.
    family, model_cfg, model, _ = checkpoints.load_model(cfg.base, storage=s)
    n = 100
    labels = balanced_labels(n, getattr(model_cfg, "num_classes", None)).view(10, 10).T.reshape(-1)
    seeds = cfg.seed_final + torch.arange(n, dtype=torch.int64)
    base, neon = result["base"], result["neon"]
    sampler = to_dict(prep.sampler)
    save_grid(sample_images(family, model, labels, seeds, from_dict(SamplerConfig, {
        **sampler, "guidance": base["guidance"]}), n), st.join(out, "samples_base.png"), rows=10, storage=s)
    if neon["snapshot"] != "base":
        merger = InMemoryMerger(checkpoints.load_state_dict(cfg.base, s),
                                checkpoints.load_state_dict(prep.snapshots[neon["snapshot"]], s),
                                copy_keys=family.buffer_keys(model))
        merger.load_into(model, neon["w"])
    save_grid(sample_images(family, model, labels, seeds, from_dict(SamplerConfig, {
        **sampler, "guidance": neon["guidance"]}), n), st.join(out, "samples_neon.png"), rows=10, storage=s)

    extra = result["extra_compute"]
    frac = extra.get("fraction_of_base")
    verdict = "No point with w ≠ 0 beat the base on the search seeds: the base is kept." \
        if neon["snapshot"] == "base" or neon["w"] == 0 else \
        f"On the final seeds Neon changes FID by {neon['fid'] - base['fid']:+.4f} " \
        f"({100 * (neon['fid'] / base['fid'] - 1):+.1f} %)."
    warnings = "".join(f"\n**Warning:** {w}\n" for w in result.get("warnings", []))
    text = f"""# Neon sweep

Feature space: `{prep.extractor_id}`. Search: `{cfg.search}`, {result['evaluations']} evaluations on
{cfg.num_select} samples (seeds from {cfg.seed_select}); final comparison on {cfg.num_final} samples
(seeds from {cfg.seed_final}), the same seeds and labels for base and Neon.

| model | snapshot | w | γ | FID | precision | recall |
|---|---|---|---|---|---|---|
| base | – | 0 | {base['guidance']:g} | {base['fid']:.4f} | {base['precision']:.3f} | {base['recall']:.3f} |
| Neon | {neon['snapshot']} | {neon['w']:g} | {neon['guidance']:g} | {neon['fid']:.4f} | {neon['precision']:.3f} | {neon['recall']:.3f} |

{verdict}
{warnings}

Extra training compute: {extra.get('finetune_images', 0)} fine-tune images
({'n/a' if frac is None else f'{100 * frac:.2f} %'} of the base model's training images).

![FID against w](fid_vs_w.png)
![precision and recall against w](pr_vs_w.png)

Base samples | Neon samples
---|---
![base](samples_base.png) | ![neon](samples_neon.png)

## Every evaluated point

{_table(rows)}
"""
    st.write_bytes(st.join(out, "report.md"), text.encode(), s)
