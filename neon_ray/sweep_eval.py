"""Evaluating one (snapshot, w, γ) point: θ_w in memory, samples, features, FID.

The pure core of a sweep trial. θ_r and θ_s arrive as state dicts (from the
Ray object store in a trial: read once per node, never re-read from storage
per trial); θ_w is built in memory with :class:`~neon_ray.merge.InMemoryMerger`.
Every point uses the same sample seeds and labels (common random numbers), so
differences between points are not noise from different draws. Sampling and
feature extraction can be split over evaluator tasks whose float64 moments
merge exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from neon_ray.config import from_dict, to_dict
from neon_ray.evaluate.moments import Moments, frechet_distance
from neon_ray.evaluate.prdc import prdc
from neon_ray.families.base import SamplerConfig


@dataclass(frozen=True)
class EvalSpec:
    """Everything a point's evaluation needs, as plain data (travels to workers)."""

    family: str
    model: dict[str, Any]          # model config
    sampler: dict[str, Any]        # sampler settings except guidance
    num: int                       # samples
    seed: int                      # sample i uses seed + i
    batch_size: int
    extractor: dict[str, Any]      # ExtractorConfig data
    device: str = "cpu"
    threads: int = 1               # torch CPU threads


def build_model(spec: EvalSpec):
    from neon_ray.families import get_family

    family = get_family(spec.family)
    model = family.build(family.parse_config(spec.model)).to(spec.device).eval()
    return family, model


def point_features(spec: EvalSpec, base_sd: dict, snap_sd: dict | None, w: float, guidance: float,
                   start: int, stop: int) -> np.ndarray:
    """Features (n, d) of samples ``start..stop`` of θ_w at guidance γ."""
    from neon_ray.evaluate.features import ExtractorConfig, build_extractor, extract
    from neon_ray.evaluate.run import balanced_labels
    from neon_ray.merge import InMemoryMerger

    torch.set_num_threads(spec.threads)
    family, model = build_model(spec)
    if snap_sd is None or w == 0.0:
        model.load_state_dict(base_sd, strict=True)
    else:
        merger = InMemoryMerger(base_sd, snap_sd, copy_keys=family.buffer_keys(model), device=spec.device)
        merger.load_into(model, w)
    sampler = from_dict(SamplerConfig, {**spec.sampler, "guidance": guidance}, prefix="sampler")
    family.check_sampler(sampler)
    extractor = build_extractor(from_dict(ExtractorConfig, spec.extractor, prefix="extractor"))
    labels = balanced_labels(spec.num, spec.model.get("num_classes"))[start:stop]
    seeds = spec.seed + torch.arange(start, stop, dtype=torch.int64)
    feats = []
    with torch.no_grad():
        for i in range(0, stop - start, spec.batch_size):
            images = family.sample(model, labels[i:i + spec.batch_size].to(spec.device),
                                   seeds[i:i + spec.batch_size], sampler)
            feats.append(extract(extractor, images))
    return np.concatenate(feats)


def point_moments(spec: EvalSpec, base_sd: dict, snap_sd: dict | None, w: float, guidance: float,
                  start: int, stop: int) -> tuple[Moments, np.ndarray]:
    """One evaluator's share: float64 moments of its features (they merge exactly), and the features."""
    feats = point_features(spec, base_sd, snap_sd, w, guidance, start, stop)
    return Moments.of(feats), feats


def score(features: np.ndarray, ref, k: int, moments: Moments | None = None) -> dict[str, float]:
    """FID (float64 moments: given, merged from evaluators, or of ``features``) and precision/recall."""
    moments = moments if moments is not None else Moments.of(features)
    out = {"fid": float(frechet_distance(moments.mean(), moments.cov(), ref.mu, ref.sigma))}
    if ref.features is not None:
        pr = prdc(ref.features, features, k=k)
        out.update(precision=float(pr["precision"]), recall=float(pr["recall"]))
    else:
        out.update(precision=math.nan, recall=math.nan)
    return out


def chunks(num: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(num)`` into ``parts`` contiguous chunks."""
    edges = np.linspace(0, num, max(1, parts) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def spec_from(family: str, model_cfg: Any, sampler: SamplerConfig, num: int, seed: int, batch_size: int,
              extractor: Any, device: str = "cpu", threads: int = 1) -> EvalSpec:
    data = to_dict(sampler)
    data.pop("guidance")
    return EvalSpec(family, to_dict(model_cfg), data, num, seed, batch_size, to_dict(extractor), device,
                    max(1, threads))
