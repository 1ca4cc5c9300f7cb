"""Precision and recall with k-NN manifolds, plus density and coverage.

Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
Generative Models", eq. 1–2: a set Φ's manifold is the union of balls around
each φ ∈ Φ with radius the distance to φ's k-th nearest neighbour in Φ
(itself excluded). Then

    precision = (1/|Φ_g|) Σ_{φ_g} f(φ_g, Φ_r)     (fakes inside the real manifold)
    recall    = (1/|Φ_r|) Σ_{φ_r} f(φ_r, Φ_g)     (reals inside the fake manifold)

with f(φ, Φ) = 1 when ||φ − φ'|| ≤ NND_k(φ') for some φ' ∈ Φ. Density and
coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for
Generative Models", eq. 3–4) reuse the real balls and cost nothing extra:

    density  = (1/(k |Φ_g|)) Σ_{φ_g} Σ_{φ_r} 1[||φ_g − φ_r|| ≤ NND_k(φ_r)]
    coverage = (1/|Φ_r|) Σ_{φ_r} 1[∃ φ_g: ||φ_g − φ_r|| ≤ NND_k(φ_r)]

Distances are computed in float64 in row blocks, so memory stays at
``block × |Φ|`` and ties (duplicated points) count as inside, as in ≤ above.
The numbers mean something only in a named feature space; callers report the
extractor id next to them.
"""

from __future__ import annotations

import numpy as np
import torch


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (A, B) between rows of a (A, d) and b (B, d)."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return d2.clamp_(min=0.0)


def _as_tensor(x: np.ndarray | torch.Tensor, name: str, device: str) -> torch.Tensor:
    # np.array copies: features from Ray's object store are read-only buffers.
    t = x if torch.is_tensor(x) else torch.from_numpy(np.array(x, dtype=np.float64))
    if t.ndim != 2:
        raise ValueError(f"{name}: expected features of shape (N, d), got {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float64)


def knn_radii(features: torch.Tensor, k: int, block: int = 1024) -> torch.Tensor:
    """Squared distance (N,) from each row to its k-th nearest other row."""
    n = features.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k: must be in [1, {n - 1}] for {n} points, got {k}")
    out = torch.empty(n, dtype=features.dtype, device=features.device)
    for i in range(0, n, block):
        d2 = _sq_dists(features[i:i + block], features)  # (b, N)
        # The k+1 smallest include the point itself at distance 0.
        out[i:i + block] = d2.topk(k + 1, dim=1, largest=False).values[:, k]
    return out


def _inside(query: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, block: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query row: how many balls hold it (Q,), and per center whether any query hit it (C,)."""
    counts = torch.zeros(query.shape[0], dtype=torch.int64, device=query.device)
    hit = torch.zeros(centers.shape[0], dtype=torch.bool, device=query.device)
    for i in range(0, query.shape[0], block):
        within = _sq_dists(query[i:i + block], centers) <= radii[None, :]  # (b, C)
        counts[i:i + block] = within.sum(1)
        hit |= within.any(0)
    return counts, hit


def prdc(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = 3,
         device: str = "cpu", block: int = 1024) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` (M, d) against ``real`` (N, d)."""
    r = _as_tensor(real, "real", device)
    f = _as_tensor(fake, "fake", device)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"fake: feature dimension {f.shape[1]} differs from real's {r.shape[1]}")
    real_r2 = knn_radii(r, k, block)  # (N,)
    fake_r2 = knn_radii(f, k, block)  # (M,)
    fake_in_real, real_covered = _inside(f, r, real_r2, block)
    real_in_fake, _ = _inside(r, f, fake_r2, block)
    return {
        "precision": float((fake_in_real > 0).double().mean()),
        "recall": float((real_in_fake > 0).double().mean()),
        "density": float(fake_in_real.double().sum() / (k * f.shape[0])),
        "coverage": float(real_covered.double().mean()),
    }
