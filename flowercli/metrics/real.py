"""The real-data side of `flowercli eval` (docs/EVALUATION.md), each step a pure function of its
inputs whose result is cached atomically under <data>/cache/eval/ (cache.py):

features of every real image (in chunks, keyed by the network, the size and the files' bytes)
-> the evaluated split's statistics and its real-vs-real FID ceiling
-> the real-image classifier (a probe on held-out real images measures its ceiling).

Nothing here knows about a generator; evaluate.py feeds these results to the generated side.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from flowercli.config import DataLayout, EvalConfig
from flowercli.errors import DataError
from flowercli.metrics import cache
from flowercli.metrics.accuracy import LinearClassifier, accuracy_report, stratified_holdout, train_classifier
from flowercli.metrics.fid import disjoint_halves, feature_stats, frechet_distance_fast, sqrt_psd
from flowercli.report import Reporter

CLASSIFIER_WEIGHT_DECAY = 1e-3


def file_digest(layout: DataLayout, image_ids: np.ndarray) -> str:
    """SHA-256 over the listed JPEG files' bytes: re-downloading identical data keeps the caches."""
    h = hashlib.sha256()
    for image_id in image_ids:
        path = layout.jpg / f"image_{int(image_id):05d}.jpg"
        try:
            h.update(path.read_bytes())
        except FileNotFoundError:
            raise DataError(f"image {path} is missing; run `flowercli download` again") from None
    return h.hexdigest()


def load_real_images(layout: DataLayout, image_ids, size: int) -> np.ndarray:
    """The listed real images at `size`, NHWC uint8 as generators return them."""
    from flowercli.images import load_images

    return load_images(layout.jpg, image_ids, size).transpose(0, 2, 3, 1)  # NCHW -> NHWC


REAL_CHUNK = 512


def real_features(extractor, layout: DataLayout, image_ids: np.ndarray, size: int, batch_size: int,
                  reporter: Reporter) -> tuple[np.ndarray, str]:
    """(features of the real images in `image_ids` order at the generator's size, data fingerprint).

    Cached in chunks of REAL_CHUNK images, each keyed by the network, the size and the chunk's
    file contents: the first call on a CPU takes minutes, and an interrupted one resumes.
    """
    image_ids = np.asarray(image_ids, np.int64)
    starts = range(0, len(image_ids), REAL_CHUNK)
    plan = []
    for start in starts:
        ids = image_ids[start: start + REAL_CHUNK]
        key = {"what": "real-features", "extractor": extractor.key, "size": size, "resize": "tf1-bilinear-299",
               "ids": hashlib.sha256(ids.tobytes()).hexdigest()[:16], "data": file_digest(layout, ids)[:16]}
        plan.append((ids, key, cache.cache_file(layout.cache_dir, "real-features", f"{size}px-{start:05d}", key)))
    fingerprint = hashlib.sha256("".join(k["data"] for _, k, _ in plan).encode()).hexdigest()
    found = [cache.load(path, key, reporter) for _, key, path in plan]
    missing = sum(len(ids) for (ids, _, _), hit in zip(plan, found) if hit is None)
    if missing:
        reporter.info(f"Computing Inception features of {missing} real images once (cached in "
                      f"{layout.cache_dir / 'eval'}; an interrupted run resumes)")
    feats = []
    with reporter.task("real images", total=missing or None) as task:
        for (ids, key, path), hit in zip(plan, found):
            if hit is None:
                f = extractor.extract(load_real_images(layout, ids, size), batch_size, task)
                hit = {"features": f.astype(np.float32)}
                cache.save(path, key, hit)
            feats.append(hit["features"].astype(np.float64))
    return np.concatenate(feats), fingerprint


def real_cache_key(extractor, size: int, fingerprint: str, image_ids: np.ndarray) -> dict:
    """What every cached real-side result depends on: the network, the size, the image files and ids."""
    return {"extractor": extractor.key, "size": size, "data": fingerprint[:16],
            "ids": hashlib.sha256(image_ids.tobytes()).hexdigest()[:16]}


def real_split_stats(features: np.ndarray, key_base: dict, name: str, cache_dir: Path, seed: int,
                     reporter: Reporter) -> dict[str, Any]:
    """mu, sigma, sigma^(1/2) of the split's real features and the FID between two disjoint halves."""
    n = len(features)
    if n < 4:
        raise DataError(f"the {name} split has only {n} real images; FID needs more")
    key = {**key_base, "what": "real-stats", "split": name, "n": n, "halves_seed": seed}
    path = cache.cache_file(cache_dir, "real-stats", f"{name}-n{n}", key)
    hit = cache.load(path, key, reporter)
    if hit is None:
        reporter.info(f"Computing real-image statistics of the {name} split (N={n}) once")
        mu, sigma = feature_stats(features)
        a, b = disjoint_halves(n, seed)
        mu_a, s_a = feature_stats(features[a])
        mu_b, s_b = feature_stats(features[b])
        ceiling = frechet_distance_fast(mu_a, s_a, mu_b, s_b)
        hit = {"mu": mu, "sigma": sigma, "sqrt_sigma": sqrt_psd(sigma),
               "ceiling": np.array(ceiling), "n_half": np.array(len(a))}
        cache.save(path, key, hit)
    return {"mu": hit["mu"], "sigma": hit["sigma"], "sqrt_sigma": hit["sqrt_sigma"], "n": n,
            "ceiling": float(hit["ceiling"]), "n_half": int(hit["n_half"])}


def real_classifier(features: np.ndarray, labels: np.ndarray, key_base: dict, cfg: EvalConfig,
                    cache_dir: Path, reporter: Reporter) -> tuple[LinearClassifier, np.ndarray]:
    """The probe trained on the non-held-out real images of every class, and the held-out rows."""
    train_idx, held_idx = stratified_holdout(labels, cfg.classifier_holdout, cfg.classifier_seed)
    key = {**key_base, "what": "classifier", "n": len(labels), "holdout": cfg.classifier_holdout,
           "seed": cfg.classifier_seed, "weight_decay": CLASSIFIER_WEIGHT_DECAY,
           "labels": hashlib.sha256(np.asarray(labels, np.int64).tobytes()).hexdigest()[:16]}
    path = cache.cache_file(cache_dir, "classifier", f"n{len(labels)}", key)
    hit = cache.load(path, key, reporter)
    if hit is not None:
        return LinearClassifier.from_arrays(hit), held_idx
    reporter.info(f"Training the real-image classifier once ({len(train_idx)} images, "
                  f"{len(np.unique(labels))} classes)")
    clf = train_classifier(features[train_idx], labels[train_idx], weight_decay=CLASSIFIER_WEIGHT_DECAY,
                           seed=cfg.classifier_seed)
    cache.save(path, key, clf.to_arrays())
    return clf, held_idx


class RealSide(NamedTuple):
    features: np.ndarray  # one row per image of the embeddings file
    labels: np.ndarray
    key_base: dict  # what every cached real-side result is filed under
    classifier: LinearClassifier
    held_idx: np.ndarray  # rows the classifier never saw (its ceiling is measured on them)


def real_side(extractor, layout: DataLayout, emb, size: int, cfg: EvalConfig, reporter: Reporter) -> RealSide:
    """Features of every real image, their cache key and the real-image classifier, each cached."""
    image_ids = np.asarray(emb.image_ids, np.int64)
    labels = np.asarray(emb.labels, np.int64)
    features, fingerprint = real_features(extractor, layout, image_ids, size, cfg.batch_size, reporter)
    key_base = real_cache_key(extractor, size, fingerprint, image_ids)
    clf, held_idx = real_classifier(features, labels, key_base, cfg, layout.cache_dir, reporter)
    return RealSide(features, labels, key_base, clf, held_idx)


def class_ceiling(clf: LinearClassifier, real: np.ndarray, labels: np.ndarray, held_mask: np.ndarray,
                  classes: np.ndarray) -> dict[str, float | int]:
    """The probe on the held-out real images of `classes`: the best a generator can score there."""
    rows = held_mask & np.isin(labels, classes)
    return accuracy_report(clf, real[rows], labels[rows])
