"""Improved precision and recall (Kynkäänniemi et al. 2019) and density and coverage (Naeem et
al. 2020) from two feature sets, as pure numpy functions.

Each point's neighbourhood is the closed ball reaching its k-th nearest neighbour in its own set
(itself excluded; a duplicate counts as a neighbour at distance 0). With real points r_j and
radii rho_j, generated points g_i and radii sigma_i:
- precision = share of g_i inside at least one real ball ||g_i - r_j|| <= rho_j (fidelity);
- recall    = share of r_j inside at least one generated ball ||r_j - g_i|| <= sigma_i (variety);
- density   = (1 / (k M)) sum_i #{j : ||g_i - r_j|| <= rho_j}: like precision, but counts how many
  real balls hold each generated point, so it exceeds 1 where samples pile up in dense real regions;
- coverage  = share of r_j whose own ball holds at least one g_i: like recall, but built on the
  real balls only, so a few generated outliers cannot inflate it.

Distances come from |a|^2 + |b|^2 - 2 a.b in float64, a block of rows at a time, so 2,048 x 1,155
points of 2,048-d need a few tens of MB and seconds on a CPU. No scikit-learn.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

CHUNK = 512  # rows per distance block: 512 x 2,048 float64 = 8 MB


def distance_blocks(a: np.ndarray, b: np.ndarray, chunk: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, Euclidean distances of a[first row: + chunk] to every row of b), block by block."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two (N, D) feature arrays of the same D, got {a.shape} and {b.shape}")
    bb = np.einsum("ij,ij->i", b, b)
    for start in range(0, len(a), chunk):
        x = a[start: start + chunk]
        d2 = np.einsum("ij,ij->i", x, x)[:, None] + bb[None, :] - 2.0 * (x @ b.T)
        yield start, np.sqrt(np.maximum(d2, 0.0))  # round-off can dip just below 0


def knn_radii(x: np.ndarray, k: int, chunk: int = CHUNK) -> np.ndarray:
    """Distance from each row of x to its k-th nearest other row of x."""
    x = np.asarray(x, np.float64)
    if k < 1 or len(x) < k + 1:
        raise ValueError(f"the k-th neighbour (k={k}) needs at least {k + 1} points, got {len(x)}")
    radii = np.empty(len(x))
    for start, d in distance_blocks(x, x, chunk):
        rows = np.arange(len(d))
        d[rows, start + rows] = -1.0  # the point itself: sorts first, so index k is the k-th other point
        radii[start: start + len(d)] = np.partition(d, k, axis=1)[:, k]
    return radii


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = CHUNK) -> dict[str, float]:
    """precision, recall, density, coverage of `fake` against `real` (see the module docstring)."""
    real = np.asarray(real, np.float64)
    fake = np.asarray(fake, np.float64)
    real_r = knn_radii(real, k, chunk)
    fake_r = knn_radii(fake, k, chunk)
    in_real_balls = np.zeros(len(fake), np.int64)  # per generated point: how many real balls hold it
    real_hit = np.zeros(len(real), bool)  # per real point: inside some generated ball (recall)
    real_covered = np.zeros(len(real), bool)  # per real point: its own ball holds a generated point
    for start, d in distance_blocks(real, fake, chunk):  # d[j, i] = ||real_j - fake_i||
        rows = slice(start, start + len(d))
        inside_real = d <= real_r[rows, None]
        in_real_balls += inside_real.sum(axis=0)
        real_covered[rows] = inside_real.any(axis=1)
        real_hit[rows] = (d <= fake_r[None, :]).any(axis=1)
    return {"precision": float((in_real_balls > 0).mean()), "recall": float(real_hit.mean()),
            "density": float(in_real_balls.sum() / (k * len(fake))), "coverage": float(real_covered.mean())}
