"""The diversity part of `flowercli eval` (docs/EVALUATION.md, "Diversity"), kept out of
evaluate.py, which calls `check` and `diversity_report`.

1. precision, recall, density, coverage (k-NN balls, `prdc.py`) of the protocol's generated
   images against the real images of the evaluated split, on the Inception features FID uses
   (the real ones come from eval's cache); ceiling: the same between two disjoint halves of those
   real images, the halves of the FID ceiling;
2. within-prompt diversity (`diversity.py`): K images from each of the first P captions of the
   protocol's caption order, against K real images of each caption's class, in Inception features
   and in pixels.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from flowercli.config import EvalConfig
from flowercli.errors import InputError
from flowercli.metrics.diversity import mean_pairwise_distance, pixels, spread, within_prompt_ratios
from flowercli.metrics.fid import disjoint_halves
from flowercli.metrics.generated import caption_plan
from flowercli.metrics.prdc import prdc
from flowercli.report import Reporter

PRDC_KEYS = ("precision", "recall", "density", "coverage")


def check(cfg: EvalConfig, max_n: int) -> None:
    """Bad diversity settings, as one-line errors (called from evaluate.check_config)."""
    if cfg.prdc_k < 1:
        raise InputError(f"prdc_k must be at least 1, got {cfg.prdc_k}")
    if cfg.diversity_prompts < 0:
        raise InputError(f"diversity_prompts must not be negative, got {cfg.diversity_prompts}")
    if cfg.diversity_prompts and cfg.diversity_seeds < 2:
        raise InputError(f"diversity_seeds must be at least 2 (a spread needs pairs), got {cfg.diversity_seeds}")
    if cfg.diversity_prompts * cfg.diversity_seeds > max_n:
        raise InputError(f"diversity_prompts x diversity_seeds must be at most {max_n}, got "
                         f"{cfg.diversity_prompts} x {cfg.diversity_seeds}")


def _prdc_or_nan(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    # A k-th neighbour needs k + 1 points per set; tiny splits (or -n 3) get nulls, not an error.
    if min(len(real), len(fake)) < k + 1:
        return dict.fromkeys(PRDC_KEYS, float("nan"))
    return prdc(real, fake, k)


def prdc_section(real: np.ndarray, generated: np.ndarray, k: int, seed: int) -> dict[str, Any]:
    """The four k-NN metrics of `generated` against `real`, and the same between the real halves."""
    a, b = disjoint_halves(len(real), seed)
    return {"k": k, **_prdc_or_nan(real, generated, k), "n_generated": len(generated), "n_real": len(real),
            "ceiling": {**_prdc_or_nan(real[a], real[b], k), "n_a": len(a), "n_b": len(b),
                        "what": "the same metrics between two disjoint random halves of the real images of the "
                                "split (the halves of the FID ceiling)"}}


def real_draws(labels: np.ndarray, rows: np.ndarray, classes, k: int, seed: int) -> dict[int, np.ndarray]:
    """Per class, up to k of `rows` with that label, drawn with default_rng([seed, class]) so one
    class's draw does not depend on which other classes are asked for; classes with < 2 are left out."""
    out = {}
    for c in np.unique(classes):
        pool = rows[labels[rows] == c]
        if len(pool) >= 2:
            out[int(c)] = np.sort(np.random.default_rng([seed, int(c)]).choice(pool, min(k, len(pool)), replace=False))
    return out


def within_prompt_section(cfg: EvalConfig, generator, extractor, emb, rows: np.ndarray, real: np.ndarray,
                          labels: np.ndarray, first_seed: int, load_real: Callable[[np.ndarray], np.ndarray],
                          reporter: Reporter, timings: dict[str, float]) -> dict[str, Any]:
    """K generated images for each of P captions vs K real images of its class, in features and pixels."""
    K = cfg.diversity_seeds
    n_captions = int(np.asarray(emb.n_captions)[rows].sum())
    P = min(cfg.diversity_prompts, n_captions)  # distinct captions only: a repeated one adds no information
    out: dict[str, Any] = {"prompts": P, "seeds": K, "ceiling": 1.0,
                           "what": "mean pairwise distance among the K images of a caption over that among up "
                                   "to K real images of its class (1 = as varied as real images)"}
    if P == 0:
        return {**out, "features": spread([]), "pixels": spread([]), "classes": 0}
    # The first P captions of the protocol's order (seed), each K times; noise seeds of their own group.
    plan_rows, plan_caps = caption_plan(emb, rows, P, cfg.seed)
    vectors = np.repeat(np.asarray(emb.vectors[plan_rows, plan_caps], np.float32), K, axis=0)
    seeds = [first_seed + i for i in range(P * K)]
    t = time.perf_counter()
    batches = []
    chunk = max(cfg.batch_size, 256)  # progress steps, as for the protocol's images
    with reporter.task(f"generating {P} x {K} diversity images", total=P * K) as task:
        for start in range(0, P * K, chunk):
            batches.append(generator.images_from_vectors(vectors[start: start + chunk], seeds[start: start + chunk],
                                                          batch_size=cfg.batch_size))
            task.advance(len(batches[-1]))
    images = np.concatenate(batches)
    timings["generate_s"] = timings.get("generate_s", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    with reporter.task("Inception: diversity images", total=P * K) as task:
        feats = extractor.extract(images, cfg.batch_size, task)
    timings["inception_s"] = timings.get("inception_s", 0.0) + time.perf_counter() - t

    classes = labels[plan_rows]
    draws = real_draws(labels, rows, classes, K, cfg.seed)
    image_ids = np.asarray(emb.image_ids)
    gen_f, gen_p = feats.reshape(P, K, -1), pixels(images).reshape(P, K, -1)
    ratios_f = within_prompt_ratios(gen_f, classes, {c: real[r] for c, r in draws.items()})
    ratios_p = within_prompt_ratios(gen_p, classes, {c: pixels(load_real(image_ids[r])) for c, r in draws.items()})
    sizes = [len(r) for r in draws.values()]
    return {**out, "features": spread(ratios_f), "pixels": spread(ratios_p), "classes": len(draws),
            "real_per_class": {"min": min(sizes, default=0), "max": max(sizes, default=0)},
            # The numerators' absolute scale, to compare runs whose real draws differ (another split or K).
            "generated_mean_distance": {"features": float(np.mean([mean_pairwise_distance(g) for g in gen_f])),
                                        "pixels": float(np.mean([mean_pairwise_distance(g) for g in gen_p]))}}


def diversity_report(cfg: EvalConfig, generator, extractor, emb, rows: np.ndarray, real: np.ndarray,
                     labels: np.ndarray, gen_feats: np.ndarray, first_seed: int,
                     load_real: Callable[[np.ndarray], np.ndarray], reporter: Reporter,
                     timings: dict[str, float]) -> dict[str, Any]:
    """report.json's "diversity": `rows` are the evaluated split's rows, `real` every real image's
    cached features, `gen_feats` those of the protocol's generated images."""
    t = time.perf_counter()
    section = prdc_section(real[rows], gen_feats, cfg.prdc_k, cfg.seed)
    timings["prdc_s"] = time.perf_counter() - t
    section["within_prompt"] = within_prompt_section(cfg, generator, extractor, emb, rows, real, labels, first_seed,
                                                     load_real, reporter, timings)
    return section
