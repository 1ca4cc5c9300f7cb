"""The ``evaluate`` and ``ref-stats`` commands, and the pure pieces other stages reuse.

``evaluate``: load a checkpoint, draw ``num_samples`` images with the family's
default sampler plus the ``sampler`` overrides (as the sample stage does), per-sample
seeds ``seed + i`` and class-balanced labels ``i % num_classes`` (−1 for
unconditional models), extract features, and report FID against reference
statistics plus precision/recall/density/coverage against the reference
features stored with them (k-NN manifolds, ``k``). Every number is measured in
the extractor's feature space, whose id goes into the result.

``ref-stats``: features of a real dataset → reference npz (see ``refstats``).

Reused by the sweep: :func:`sample_images`, :func:`evaluate_images`,
:func:`evaluate_features`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from neon_ray import storage as st
from neon_ray.config import from_dict, option, to_dict
from neon_ray.evaluate.features import INCEPTION_ID, ExtractorConfig, build_extractor, extract
from neon_ray.evaluate.moments import Moments, frechet_distance
from neon_ray.evaluate.prdc import prdc
from neon_ray.evaluate.refstats import (DEFAULT_MAX_FEATURES, RefStats, check_compatible,
                                        load_ref_stats, ref_stats_from_features, save_ref_stats)
from neon_ray.families.base import SamplerConfig
from neon_ray.storage import StorageConfig


# Pure pieces ----------------------------------------------------------------------

def fid_from_moments(moments: Moments, ref: RefStats) -> float:
    """FID of generated-feature moments against reference statistics (same feature space)."""
    if moments.dim != ref.dim:
        raise ValueError(f"features have dimension {moments.dim}, reference statistics {ref.dim}")
    return frechet_distance(moments.mean(), moments.cov(), ref.mu, ref.sigma)


def evaluate_features(features: np.ndarray, ref: RefStats, k: int = 3, device: str = "cpu") -> dict[str, Any]:
    """FID, and precision/recall/density/coverage when ``ref`` holds features. features: (N, d)."""
    out: dict[str, Any] = {"fid": fid_from_moments(Moments.of(features), ref),
                           "num_samples": int(features.shape[0]), "feature_space": ref.extractor_id, "k": k}
    if ref.features is not None:
        out.update(prdc(ref.features, features, k=k, device=device))
        out["num_ref_features"] = int(ref.features.shape[0])
    else:  # mu/sigma-only reference (e.g. ADM's npz): no points to build a manifold from
        out.update(precision=None, recall=None, density=None, coverage=None)
    return out


def evaluate_images(images: torch.Tensor, ref: RefStats, extractor, k: int = 3) -> dict[str, Any]:
    """Metrics of uint8 images (N, C, H, W) against ``ref``, in ``extractor``'s feature space."""
    check_compatible(ref, extractor)
    return evaluate_features(extract(extractor, images), ref, k)


@torch.no_grad()
def sample_images(family, model, labels: torch.Tensor, seeds: torch.Tensor, sampler: SamplerConfig,
                  batch_size: int) -> torch.Tensor:
    """uint8 images (N, C, H, W) for labels (N,) and seeds (N,), ``batch_size`` at a time.

    A sample depends only on its label and seed (per-sample generators), never
    on ``batch_size``.
    """
    if labels.shape != seeds.shape or labels.ndim != 1:
        raise ValueError(f"labels {tuple(labels.shape)} and seeds {tuple(seeds.shape)}: expected equal (N,)")
    parts = [family.sample(model, labels[i:i + batch_size], seeds[i:i + batch_size], sampler)
             for i in range(0, labels.shape[0], batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def balanced_labels(n: int, num_classes: int | None) -> torch.Tensor:
    """Labels (n,) ``i % num_classes``; all −1 (unconditional) when there are no classes."""
    if not num_classes:
        return torch.full((n,), -1, dtype=torch.int64)
    return torch.arange(n, dtype=torch.int64) % num_classes


# evaluate -------------------------------------------------------------------------

@dataclass
class EvaluateConfig:
    """Sample a checkpoint and measure FID / precision / recall against reference statistics."""

    checkpoint: str = option(help="checkpoint folder URI")
    ref_stats: str = option(help="reference statistics npz URI (from ref-stats, or mu/sigma only)")
    num_samples: int = option(10_000, "images to sample", min=2)
    seed: int = option(0, "sample i uses seed + i", min=0)
    batch_size: int = option(64, "images per sampling batch", min=1)
    device: str = option("cpu", "torch device for the model")
    k: int = option(3, "k of the k-NN manifolds for precision/recall", min=1)
    out: str | None = option(None, "optional JSON URI for the results")
    assume_extractor_id: str = option(INCEPTION_ID, "extractor id of a mu/sigma-only reference npz")
    sampler: dict[str, Any] = option(default_factory=dict,
                                     help="sampler overrides of the family default (guidance, steps, ...)")
    extractor: ExtractorConfig = option(default_factory=ExtractorConfig, help="feature extractor")
    storage: StorageConfig = option(default_factory=StorageConfig, help="object storage")

    def validate(self) -> None:
        from_dict(SamplerConfig, self.sampler, prefix="sampler")  # names and types, before any work


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Sample, extract, compare; print one JSON line and return the results."""
    from neon_ray import checkpoints
    from neon_ray.sample import resolve_sampler

    # Check everything cheap before sampling.
    ref = load_ref_stats(cfg.ref_stats, cfg.storage, cfg.assume_extractor_id)
    extractor = build_extractor(cfg.extractor)
    check_compatible(ref, extractor)
    if cfg.num_samples <= extractor.dim:
        raise ValueError(f"num_samples: FID in {extractor.id}'s {extractor.dim}-dim space needs more than "
                         f"{extractor.dim} samples, got {cfg.num_samples}")
    if ref.features is not None and not cfg.k < min(cfg.num_samples, ref.features.shape[0]):
        raise ValueError(f"k: must be below both sample and reference-feature counts, got {cfg.k}")
    family, model_cfg, model, _ = checkpoints.load_model(cfg.checkpoint, storage=cfg.storage, device=cfg.device)
    sampler = resolve_sampler(family, model_cfg, cfg.sampler)  # as the sample stage resolves it

    # Sample and extract, batch by batch (images are not all held at once).
    labels = balanced_labels(cfg.num_samples, getattr(model_cfg, "num_classes", None))
    seeds = cfg.seed + torch.arange(cfg.num_samples, dtype=torch.int64)
    feats = np.empty((cfg.num_samples, extractor.dim), np.float32)  # (N, d)
    for i in range(0, cfg.num_samples, cfg.batch_size):
        images = sample_images(family, model, labels[i:i + cfg.batch_size], seeds[i:i + cfg.batch_size],
                               sampler, cfg.batch_size)
        feats[i:i + images.shape[0]] = extract(extractor, images)

    # Compare with the reference.
    results = evaluate_features(feats, ref, cfg.k, cfg.extractor.device)
    results.update(checkpoint=cfg.checkpoint, checkpoint_digest=checkpoints.checkpoint_digest(
        cfg.checkpoint, cfg.storage), ref_stats=cfg.ref_stats, seed=cfg.seed, sampler=to_dict(sampler))
    print(json.dumps(results, sort_keys=True))
    if cfg.out:
        st.write_json(cfg.out, results, cfg.storage)
    return results


# ref-stats ------------------------------------------------------------------------

@dataclass
class RefStatsConfig:
    """Reference feature statistics of a real dataset."""

    out: str = option(help="output npz URI")
    data: str = option("digits", "dataset: 'digits', an image folder or a Parquet URI")
    limit: int | None = option(None, "use only the first N images", min=1)
    max_features: int = option(DEFAULT_MAX_FEATURES, "reference features kept for precision/recall", min=1)
    extractor: ExtractorConfig = option(default_factory=ExtractorConfig, help="feature extractor")
    storage: StorageConfig = option(default_factory=StorageConfig, help="object storage")


def load_real_images(data: str, limit: int | None = None, storage: StorageConfig | None = None) -> torch.Tensor:
    """uint8 images (N, C, H, W) of a real dataset ('digits', an image folder or Parquet)."""
    from neon_ray.data.images import load_dataset

    images, _ = load_dataset(data, storage, limit)
    return images


def run_ref_stats(cfg: RefStatsConfig) -> dict[str, Any]:
    """Extract features of the dataset, write the npz, print and return a summary."""
    extractor = build_extractor(cfg.extractor)
    images = load_real_images(cfg.data, cfg.limit, cfg.storage)
    if images.shape[0] <= extractor.dim:
        raise ValueError(f"data: {images.shape[0]} images, but {extractor.id}'s {extractor.dim}-dim "
                         f"covariance needs more than {extractor.dim}")
    stats = ref_stats_from_features(extract(extractor, images), extractor.id, source=cfg.data,
                                    max_features=cfg.max_features)
    save_ref_stats(cfg.out, stats, cfg.storage)
    summary = {"out": cfg.out, "n": stats.n, "extractor_id": stats.extractor_id, "dim": stats.dim,
               "num_features": int(stats.features.shape[0]), "source": cfg.data}
    print(json.dumps(summary, sort_keys=True))
    return summary
