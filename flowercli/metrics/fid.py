"""Frechet Inception Distance as three pure steps: features -> (mu, sigma) -> distance.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))   (Heusel et al. 2017).

`frechet_distance` is the reference computation of pytorch-fid (scipy.linalg.sqrtm, the eps
offset when the product is singular, tolerance on numerical imaginary parts). `frechet_distance_fast`
gives the same number from symmetric eigendecompositions: the eigenvalues of S1 S2 are those of
S1^(1/2) S2 S1^(1/2), which is symmetric positive semi-definite, so tr((S1 S2)^(1/2)) is the sum
of their square roots. It is several times faster for 2048-d features and lets the real side's
S1^(1/2) be cached; tests hold the two to 1e-6 relative.
"""

from __future__ import annotations

import numpy as np


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64; sigma is the unbiased covariance (np.cov), as every FID tool uses."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows of shape (N, D), got {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _check(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    return mu1, sigma1, mu2, sigma2


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed as pytorch-fid does."""
    import scipy.linalg

    mu1, sigma1, mu2, sigma2 = _check(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        # Product of (nearly) singular covariances, e.g. fewer samples than dimensions.
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off gives tiny imaginary parts; large ones mean the statistics are broken.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm(S1 S2)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a covariance matrix (negative round-off eigenvalues clipped to 0)."""
    import scipy.linalg

    w, v = scipy.linalg.eigh(np.asarray(sigma, np.float64), driver="evd")
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_fast(mu1, sigma1, mu2, sigma2, sqrt_sigma1: np.ndarray | None = None) -> float:
    """Same value as `frechet_distance`; pass `sqrt_sigma1 = sqrt_psd(sigma1)` to reuse it."""
    import scipy.linalg

    mu1, sigma1, mu2, sigma2 = _check(mu1, sigma1, mu2, sigma2)
    root = sqrt_psd(sigma1) if sqrt_sigma1 is None else np.asarray(sqrt_sigma1, np.float64)
    m = root @ sigma2 @ root
    m = (m + m.T) / 2  # exact symmetry, so eigvalsh sees the matrix it is promised
    eig = scipy.linalg.eigvalsh(m, driver="evd")
    tr_covmean = np.sqrt(np.clip(eig, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_from_features(a: np.ndarray, b: np.ndarray, fast: bool = True) -> float:
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    return (frechet_distance_fast if fast else frechet_distance)(mu1, s1, mu2, s2)


def disjoint_halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint index sets of size n // 2 from a fixed permutation (for the real-vs-real ceiling)."""
    perm = np.random.default_rng(seed).permutation(n)
    half = n // 2
    return np.sort(perm[:half]), np.sort(perm[half: 2 * half])
