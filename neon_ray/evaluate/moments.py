"""Mergeable feature moments and the Fréchet distance between Gaussian fits.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule ...",
eq. 6) is the Fréchet (2-Wasserstein) distance between two Gaussians fitted to
feature sets::

    d² = ||μ₁ − μ₂||² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^{1/2})

:class:`Moments` keeps the sufficient statistics (n, Σx, Σxxᵀ) in float64, so
evaluators on several actors each update their own and the results merge
exactly (sums add). The covariance is formed once at the end as
(Σxxᵀ − n μμᵀ) / (n − 1). Feature means are of the order of their spread for
the extractors we use (Inception pool features, our digits net), so float64
keeps about 15 significant digits through that subtraction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Moments:
    """Sufficient statistics of a feature set: count, Σx (d,), Σxxᵀ (d, d), float64."""

    n: int
    sum: np.ndarray    # (d,) float64
    outer: np.ndarray  # (d, d) float64

    @classmethod
    def zeros(cls, dim: int) -> "Moments":
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    @classmethod
    def of(cls, features: np.ndarray) -> "Moments":
        """Moments of one feature array (N, d)."""
        m = cls.zeros(np.asarray(features).shape[-1])
        m.update(features)
        return m

    @property
    def dim(self) -> int:
        return int(self.sum.shape[0])

    def update(self, features: np.ndarray) -> "Moments":
        """Add a batch of features (N, d) in place; returns self."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features: expected shape (N, {self.dim}), got {tuple(x.shape)}")
        if not np.isfinite(x).all():
            raise ValueError("features: contain NaN or infinity")
        self.n += int(x.shape[0])
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x  # (d, d)
        return self

    def merge(self, other: "Moments") -> "Moments":
        """The moments of the union of both feature sets (a new object)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge moments of dimension {self.dim} and {other.dim}")
        return Moments(self.n + other.n, self.sum + other.sum, self.outer + other.outer)

    def _check_n(self) -> None:
        if self.n <= self.dim:
            raise ValueError(f"need more than {self.dim} samples for a full-rank {self.dim}×{self.dim} "
                             f"feature covariance (at least {self.dim + 1}), got {self.n}")

    def mean(self) -> np.ndarray:
        """μ (d,) float64."""
        if self.n == 0:
            raise ValueError("no samples: the mean of an empty feature set is undefined")
        return self.sum / self.n

    def cov(self) -> np.ndarray:
        """Unbiased covariance Σ (d, d) float64 (divides by n − 1); needs n > d."""
        self._check_n()
        mu = self.mean()
        sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)
        return (sigma + sigma.T) / 2  # exact symmetry against rounding


def _sqrt_psd(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix, negative eigenvalues clamped to 0."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((Σ₁ Σ₂)^{1/2}) for symmetric PSD Σ₁, Σ₂, without a non-symmetric sqrtm.

    Σ₁Σ₂ = A(A Σ₂ A)A⁻¹ with A = Σ₁^{1/2} (and, generally, XY and YX share their
    eigenvalues), so Σ₁Σ₂ has the eigenvalues of the symmetric PSD matrix
    M = A Σ₂ A. The trace of the principal square root is then Σᵢ √λᵢ(M),
    computed with symmetric eigendecompositions (``eigh``) only; eigenvalues
    that rounding makes slightly negative are clamped to 0. Unlike
    ``scipy.linalg.sqrtm(Σ₁ @ Σ₂)`` this needs no ε added to the diagonal and
    never returns a complex result.
    """
    a = _sqrt_psd(np.asarray(sigma1, np.float64))
    m = a @ np.asarray(sigma2, np.float64) @ a
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(lam, 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂) (FID when fed Inception moments).

    d² = ||μ₁ − μ₂||² + tr Σ₁ + tr Σ₂ − 2 tr((Σ₁Σ₂)^{1/2}); the last term by
    :func:`trace_sqrt_product`. The result is clamped at 0 (rounding can make
    the distance of identical Gaussians −1e-13).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    for name, arr, shape in (("mu2", mu2, (d,)), ("sigma1", sigma1, (d, d)), ("sigma2", sigma2, (d, d))):
        if arr.shape != shape:
            raise ValueError(f"{name}: expected shape {shape} to match mu1, got {arr.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(max(value, 0.0))


def frechet_distance_moments(a: Moments, b: Moments) -> float:
    """Fréchet distance between the Gaussian fits of two moment sets."""
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())
