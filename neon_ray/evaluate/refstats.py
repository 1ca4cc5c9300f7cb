"""Reference statistics: the real data's feature moments, saved as an npz.

Our npz (``format`` = ``neon_ray.refstats/1``) holds

    mu (d,) float64, sigma (d, d) float64    the Gaussian fit FID compares with
    n, extractor_id, source                  how many images, which feature space, what data
    moments_sum (d,), moments_outer (d, d)   raw float64 sums, so statistics merge exactly
    features (M, d) float32                  up to ``max_features`` reference features
                                             (a seeded random subset when there are more),
                                             kept for precision/recall, which need points,
                                             not moments

An npz with only ``mu`` and ``sigma`` (the ADM / guided-diffusion reference
batches, clean-fid's statistics) is accepted too: it has no extractor id, so
the caller says which one made it (``assume_extractor_id``, by default
clean-fid's Inception id). Note that ADM's statistics came from the TensorFlow
Inception with TensorFlow's resize, so against clean-fid's "clean" resize they
carry a small systematic offset; such a file has no features, so FID only.
Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np

from neon_ray import storage as st
from neon_ray.evaluate.features import INCEPTION_ID
from neon_ray.evaluate.moments import Moments
from neon_ray.storage import StorageConfig

FORMAT = "neon_ray.refstats/1"
DEFAULT_MAX_FEATURES = 10_000


@dataclass
class RefStats:
    """A reference set's Gaussian fit, and (when we made it) its raw moments and features."""

    extractor_id: str
    mu: np.ndarray                     # (d,) float64
    sigma: np.ndarray                  # (d, d) float64
    n: int | None = None               # images behind mu/sigma (unknown for foreign files)
    moments: Moments | None = None     # raw sums, for exact merging
    features: np.ndarray | None = None  # (M, d) float32 subset for precision/recall
    source: str = ""

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])


def _subset(features: np.ndarray, max_features: int, seed: int) -> np.ndarray:
    if features.shape[0] <= max_features:
        return np.asarray(features, np.float32)
    keep = np.sort(np.random.default_rng(seed).choice(features.shape[0], max_features, replace=False))
    return np.asarray(features[keep], np.float32)


def ref_stats_from_features(features: np.ndarray, extractor_id: str, source: str = "",
                            max_features: int = DEFAULT_MAX_FEATURES, seed: int = 0) -> RefStats:
    """Statistics of reference features (N, d); N must exceed d."""
    m = Moments.of(features)
    return RefStats(extractor_id, m.mean(), m.cov(), m.n, m, _subset(features, max_features, seed), source)


def merge_ref_stats(a: RefStats, b: RefStats, max_features: int = DEFAULT_MAX_FEATURES,
                    seed: int = 0) -> RefStats:
    """Statistics of the union of two reference sets made by the same extractor."""
    if a.extractor_id != b.extractor_id:
        raise ValueError(f"cannot merge reference statistics of extractors {a.extractor_id} and {b.extractor_id}")
    if a.moments is None or b.moments is None:
        raise ValueError("cannot merge reference statistics without raw moments (mu/sigma-only files)")
    m = a.moments.merge(b.moments)
    feats = None
    if a.features is not None and b.features is not None:
        feats = _subset(np.concatenate([a.features, b.features]), max_features, seed)
    return RefStats(a.extractor_id, m.mean(), m.cov(), m.n, m, feats, "+".join(filter(None, (a.source, b.source))))


def save_ref_stats(uri: str, stats: RefStats, storage: StorageConfig | None = None) -> None:
    """Write ``stats`` as one npz object (whole-file write)."""
    arrays = {"format": np.array(FORMAT), "extractor_id": np.array(stats.extractor_id),
              "source": np.array(stats.source), "mu": stats.mu, "sigma": stats.sigma}
    if stats.n is not None:
        arrays["n"] = np.array(stats.n, np.int64)
    if stats.moments is not None:
        arrays["moments_sum"] = stats.moments.sum
        arrays["moments_outer"] = stats.moments.outer
    if stats.features is not None:
        arrays["features"] = np.asarray(stats.features, np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    st.write_bytes(uri, buf.getvalue(), storage)


def load_ref_stats(uri: str, storage: StorageConfig | None = None,
                   assume_extractor_id: str = INCEPTION_ID) -> RefStats:
    """Read our npz, or a foreign one holding only ``mu``/``sigma`` (id then ``assume_extractor_id``)."""
    path, is_temp = st.local_copy(uri, storage)
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            missing = [k for k in ("mu", "sigma") if k not in keys]
            if missing:
                raise ValueError(f"{uri}: not reference statistics (no {', '.join(missing)}; "
                                 f"keys: {', '.join(sorted(keys))})")
            mu = np.asarray(z["mu"], np.float64)
            sigma = np.asarray(z["sigma"], np.float64)
            d = mu.shape[0] if mu.ndim == 1 else -1
            if mu.ndim != 1 or sigma.shape != (d, d):
                raise ValueError(f"{uri}: mu {mu.shape} and sigma {sigma.shape} are not (d,) and (d, d)")
            ours = "format" in keys and str(z["format"]) == FORMAT
            extractor_id = str(z["extractor_id"]) if "extractor_id" in keys else assume_extractor_id
            n = int(z["n"]) if "n" in keys else None
            moments = None
            if ours and "moments_sum" in keys and n is not None:
                moments = Moments(n, np.asarray(z["moments_sum"], np.float64),
                                  np.asarray(z["moments_outer"], np.float64))
            features = np.asarray(z["features"], np.float32) if "features" in keys else None
            if features is not None and (features.ndim != 2 or features.shape[1] != d):
                raise ValueError(f"{uri}: features {features.shape} do not match mu's dimension {d}")
            source = str(z["source"]) if "source" in keys else os.path.basename(str(uri))
    finally:
        if is_temp:
            os.unlink(path)
    return RefStats(extractor_id, mu, sigma, n, moments, features, source)


def check_compatible(stats: RefStats, extractor) -> None:
    """Refuse statistics made in another feature space (one line naming both ids)."""
    if stats.extractor_id != extractor.id:
        raise ValueError(f"reference statistics were made with extractor {stats.extractor_id}, "
                         f"but features come from {extractor.id}; recompute them with ref-stats")
    if stats.dim != extractor.dim:
        raise ValueError(f"reference statistics have dimension {stats.dim}, extractor {extractor.id} "
                         f"gives {extractor.dim}")
