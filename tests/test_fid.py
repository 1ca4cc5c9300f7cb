"""FID math, mergeable moments and k-NN precision/recall (pure numpy, no models)."""

import numpy as np
import pytest
import torch
from scipy import linalg

from neon_ray.evaluate.moments import Moments, frechet_distance, frechet_distance_moments
from neon_ray.evaluate.prdc import knn_radii, prdc


def _sqrtm_fid(mu1, s1, mu2, s2):
    """The textbook route: scipy's (non-symmetric) sqrtm of Σ₁Σ₂."""
    covmean = linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def test_fid_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-9)


def test_fid_of_rotated_gaussian_is_closed_form():
    # N(0, diag(4, 1)) against itself rotated by 90° (diag(1, 4)):
    # (Σ₁Σ₂)^{1/2} = diag(2, 2), so d² = 5 + 5 − 2·4 = 2.
    s1 = np.diag([4.0, 1.0])
    s2 = np.diag([1.0, 4.0])
    assert frechet_distance(np.zeros(2), s1, np.zeros(2), s2) == pytest.approx(2.0, rel=1e-12)
    # Rotated by 45° (non-commuting with Σ₁): compare with scipy's sqrtm route.
    r = np.array([[1.0, -1.0], [1.0, 1.0]]) / np.sqrt(2)
    s3 = r @ s1 @ r.T
    assert frechet_distance(np.ones(2), s1, np.zeros(2), s3) == pytest.approx(
        _sqrtm_fid(np.ones(2), s1, np.zeros(2), s3), rel=1e-9)


def test_fid_matches_scipy_sqrtm_on_random_features():
    rng = np.random.default_rng(1)
    d = 24
    x = rng.normal(size=(400, d)) @ rng.normal(size=(d, d))
    y = rng.normal(size=(500, d)) @ rng.normal(size=(d, d)) + 0.3
    mx, my = Moments.of(x), Moments.of(y)
    expected = _sqrtm_fid(mx.mean(), mx.cov(), my.mean(), my.cov())
    assert frechet_distance_moments(mx, my) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance_moments(mx, my) == pytest.approx(
        frechet_distance(my.mean(), my.cov(), mx.mean(), mx.cov()), rel=1e-9)  # symmetric


def test_fid_of_identical_statistics_is_zero_and_singular_covariance_is_fine():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 8))
    x[:, 3] = 0.0  # a dead feature: Σ singular
    m = Moments.of(x)
    assert frechet_distance(m.mean(), m.cov(), m.mean(), m.cov()) == pytest.approx(0.0, abs=1e-9)
    assert np.isfinite(frechet_distance(m.mean(), m.cov(), m.mean() + 1, np.eye(8)))


def test_moments_merged_from_chunks_equal_moments_of_the_whole():
    rng = np.random.default_rng(3)
    x = rng.normal(loc=2.0, size=(1000, 16)).astype(np.float32)
    whole = Moments.of(x)
    parts = [Moments.of(c) for c in np.split(x, [7, 300, 301, 650])]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    assert merged.n == whole.n == 1000
    np.testing.assert_allclose(merged.sum, whole.sum, rtol=1e-12)
    np.testing.assert_allclose(merged.outer, whole.outer, rtol=1e-12)
    np.testing.assert_allclose(merged.mean(), x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.cov(), np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
    # Updating in place batch by batch gives the same as merging.
    streamed = Moments.zeros(16)
    for c in np.array_split(x, 9):
        streamed.update(c)
    np.testing.assert_allclose(streamed.outer, whole.outer, rtol=1e-12)


def test_covariance_needs_more_samples_than_dimensions():
    m = Moments.of(np.random.default_rng(4).normal(size=(16, 16)))
    with pytest.raises(ValueError, match="at least 17"):
        m.cov()
    with pytest.raises(ValueError, match="dimension"):
        m.merge(Moments.zeros(8))
    with pytest.raises(ValueError, match=r"features: expected shape \(N, 16\)"):
        m.update(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))


def test_knn_radii_and_precision_recall_by_hand():
    real = np.array([[0.0], [1.0], [3.0], [7.0]])
    # k=1: nearest-other distances 1, 1, 2, 4 → squared radii 1, 1, 4, 16.
    np.testing.assert_allclose(knn_radii(torch.tensor(real), 1).numpy(), [1, 1, 4, 16])
    fake = np.array([[5.6], [10.0], [12.0], [13.0]])  # 5.6 and 10 lie in 7's ball; 12, 13 outside
    out = prdc(real, fake, k=1)
    assert out["precision"] == pytest.approx(0.5)
    # Fake radii (k=1): 5.6→10: 4.4, 10→12: 2, 12→13: 1, 13→12: 1; reals within: 3 (2.6), 7 (1.4).
    assert out["recall"] == pytest.approx(0.5)
    assert out["coverage"] == pytest.approx(0.25)  # only 7's ball holds a fake
    assert out["density"] == pytest.approx(2 / 4)  # two fakes, each in one real ball, / (k·M)


def test_precision_recall_identical_disjoint_and_mode_dropping():
    rng = np.random.default_rng(5)
    real = rng.normal(size=(400, 4))
    same = prdc(real, real.copy(), k=3)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    far = prdc(real, real + 100.0, k=3)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    # Mode-seeking fakes (only one half of the reals): precision stays 1, recall falls.
    half = prdc(real, real[real[:, 0] < 0], k=3)
    assert half["precision"] == 1.0
    assert 0.3 < half["recall"] < 0.75
    with pytest.raises(ValueError, match="k: must be in"):
        prdc(real[:3], real, k=3)
