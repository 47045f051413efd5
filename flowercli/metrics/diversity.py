"""Within-prompt diversity as pure numpy functions: how different the images of one caption are
from each other, measured against how different real images of that caption's class are.

For one caption with K generated images g_1..g_K and the real images r_1..r_m of its class:

    ratio = mean_{i<j} ||g_i - g_j||  /  mean_{i<j} ||r_i - r_j||

in any feature space (Inception pool features, or raw pixels). 1 means the generator varies as
much as nature does for that species; 0 means every seed gives the same image (mode collapse
inside a prompt, which FID and class accuracy cannot see when the one image is a good one).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean Euclidean distance over all pairs of rows of x (n >= 2), from exact differences so that
    identical rows give exactly 0."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    n = len(x)
    if n < 2:
        raise ValueError(f"a pairwise distance needs at least 2 rows, got {n}")
    i, j = np.triu_indices(n, 1)
    return float(np.sqrt(((x[i] - x[j]) ** 2).sum(axis=1)).mean())


def within_prompt_ratios(generated: np.ndarray, classes: np.ndarray, real: Mapping[int, np.ndarray]) -> np.ndarray:
    """One ratio per caption: generated (P, K, ...) images or features of P captions, their classes
    (P,), and per class the real rows (m >= 2, ...) it is compared with. NaN where a class has no
    usable real set (fewer than 2 rows, or every real row identical)."""
    generated = np.asarray(generated)
    classes = np.asarray(classes)
    if generated.ndim < 3 or len(generated) != len(classes):
        raise ValueError(f"need (P, K, ...) generated rows and P classes, got {generated.shape} and {classes.shape}")
    denominators = {}
    for c in np.unique(classes):
        rows = real.get(int(c))
        d = mean_pairwise_distance(rows) if rows is not None and len(rows) >= 2 else 0.0
        denominators[int(c)] = d if d > 0 else np.nan
    return np.array([mean_pairwise_distance(g) / denominators[int(c)] for g, c in zip(generated, classes)])


def spread(values: np.ndarray | Sequence[float]) -> dict[str, float]:
    """mean, 10th and 90th percentile of the finite values, and how many there were."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"mean": float("nan"), "p10": float("nan"), "p90": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90)),
            "n": int(len(v))}


def pixels(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) images -> (N, H*W*C) float64 in [0, 1], the pixel-space feature."""
    images = np.asarray(images)
    return images.reshape(len(images), -1).astype(np.float64) / 255.0
