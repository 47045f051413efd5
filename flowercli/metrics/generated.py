"""The generated side of `flowercli eval` (docs/EVALUATION.md): images from the evaluated split's
captions in a fixed order and their Inception features, and the two prompt-driven sections, colour
agreement and species names. Each takes its first noise seed from the caller (evaluate.SEED_OFFSETS),
so no two groups share a noise vector and every number repeats exactly.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from flowercli.config import DataLayout, EvalConfig
from flowercli.errors import DataError, FlowerError
from flowercli.metrics import colour, names
from flowercli.metrics.accuracy import LinearClassifier
from flowercli.metrics.real import class_ceiling, load_real_images
from flowercli.report import Reporter


def caption_plan(emb, rows: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, caption index) for n images: every real caption of `rows` in a fixed shuffled order,
    cycled when n is larger than the number of captions."""
    n_caps = np.asarray(emb.n_captions)[rows]
    pairs_row = np.repeat(rows, n_caps)
    pairs_cap = np.concatenate([np.arange(k) for k in n_caps]) if len(rows) else np.zeros(0, np.int64)
    if len(pairs_row) == 0:
        raise DataError("the evaluated split has no captions")
    order = np.random.default_rng(seed).permutation(len(pairs_row))
    take = order[np.arange(n) % len(order)]
    return pairs_row[take], pairs_cap[take]


def generated_side(generator, extractor, emb, rows: np.ndarray, n: int, order_seed: int, first_seed: int,
                   batch_size: int, what: str, reporter: Reporter, timings: dict[str, float]):
    """Generate n images from `rows`' captions (caption_plan order, noise seeds first_seed + i);
    return (images, features, planned rows, planned caption indices)."""
    plan_rows, plan_caps = caption_plan(emb, rows, n, order_seed)
    vectors = np.asarray(emb.vectors[plan_rows, plan_caps], dtype=np.float32)
    seeds = [first_seed + i for i in range(n)]
    t = time.perf_counter()
    chunk = max(batch_size, 256)
    batches = []
    with reporter.task(f"generating {what}", total=n) as task:
        for start in range(0, n, chunk):
            batches.append(generator.images_from_vectors(vectors[start: start + chunk], seeds[start: start + chunk],
                                                          batch_size=batch_size))
            task.advance(len(batches[-1]))
    images = np.concatenate(batches)
    timings["generate_s"] = timings.get("generate_s", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    with reporter.task(f"Inception: {what}", total=n) as task:
        features = extractor.extract(images, batch_size, task)
    timings["inception_s"] = timings.get("inception_s", 0.0) + time.perf_counter() - t
    return images, features, plan_rows, plan_caps


def colour_report(generator, cfg: EvalConfig, layout: DataLayout, emb, rows: np.ndarray, size: int,
                  first_seed: int, reporter: Reporter) -> dict[str, Any]:
    """report.json's "colour": images of every (colour, phrasing) prompt, `colour_seeds` each (noise
    seeds first_seed + j), scored by their dominant colour; the ceiling is the same rule on the real
    images of `rows` against those of their own captions that name a colour."""
    prompts = colour.colour_prompts()
    # Ceiling: every caption of the split's real images that names a colour.
    real_imgs = load_real_images(layout, np.asarray(emb.image_ids)[rows], size)
    measured = colour.dominant_colours(real_imgs)
    pred, expect = [], []
    for k, r in enumerate(rows):
        for caption in emb.captions[r][: int(emb.n_captions[r])]:
            named = colour.caption_colour(caption)
            if named is not None:
                pred.append(measured[k])
                expect.append(named)
    ceiling = {"agreement": colour.agreement(pred, expect), "n_captions": len(expect), "n_images": int(len(rows))}
    if cfg.colour_seeds == 0:
        return {"agreement": float("nan"), "n": 0, "ceiling": ceiling}
    texts = [p for p, _, _ in prompts for _ in range(cfg.colour_seeds)]
    wanted = [c for _, c, _ in prompts for _ in range(cfg.colour_seeds)]
    phrasing = [colour.PHRASINGS[k] for _, _, k in prompts for _ in range(cfg.colour_seeds)]
    seeds = [first_seed + j for _ in prompts for j in range(cfg.colour_seeds)]
    try:
        images = generator.images_from_prompts(texts, seeds)
    except FlowerError as e:
        reporter.warn(f"colour agreement skipped: {e}")
        return {"agreement": float("nan"), "n": 0, "skipped": str(e), "ceiling": ceiling}
    got = colour.dominant_colours(images)
    return {"agreement": colour.agreement(got, wanted), "n": len(wanted),
            "by_colour": colour.agreement_by(got, wanted, wanted),
            "by_phrasing": colour.agreement_by(got, wanted, phrasing),
            "ceiling": ceiling}


def species_names_report(generator, extractor, cfg: EvalConfig, layout: DataLayout, clf: LinearClassifier,
                         real: np.ndarray, labels: np.ndarray, held_mask: np.ndarray, train_mask: np.ndarray,
                         test_mask: np.ndarray, first_seed: int, reporter: Reporter) -> dict[str, Any]:
    """report.json's "species_names": every class's name in every template (names.TEMPLATES),
    `name_seeds` images each (noise seeds first_seed + i), classified by the real-image classifier:
    accuracy on the training species and on the unseen ones, each beside the classifier's accuracy
    on held-out real images of the same classes."""
    from flowercli.data import read_class_names

    train_classes = np.unique(labels[train_mask])
    unseen_classes = np.setdiff1d(np.unique(labels[test_mask]), train_classes)
    out: dict[str, Any] = {"templates": list(names.TEMPLATES), "seeds_per_template": cfg.name_seeds, "n": 0}
    if cfg.name_seeds == 0:
        return {**out, "skipped": "name_seeds is 0"}
    try:
        class_names = read_class_names(layout)
        if class_names is None:
            raise DataError(f"{layout.dataset / 'classnames.txt'} is absent (the captions archive had none)")
        plan = names.name_plan(class_names, np.concatenate([train_classes, unseen_classes]), cfg.name_seeds)
        seeds = [first_seed + i for i in range(len(plan.prompts))]
        n, chunk, images = len(seeds), max(cfg.batch_size, 256), []
        with reporter.task(f"generating {n} species-name images", total=n) as task:
            for start in range(0, n, chunk):
                images.append(generator.images_from_prompts(plan.prompts[start: start + chunk],
                                                            seeds[start: start + chunk]))
                task.advance(len(images[-1]))
    except FlowerError as e:  # no names, or the prompt encoder is not available here
        reporter.warn(f"species-name accuracy skipped: {e}")
        return {**out, "skipped": str(e)}
    with reporter.task(f"Inception: {n} species-name images", total=n) as task:
        features = extractor.extract(np.concatenate(images), cfg.batch_size, task)
    predicted = clf.top_k(features, min(5, len(clf.classes)))
    acc = names.species_accuracy(predicted, plan.classes, train_classes, unseen_classes, plan.templates)
    for group, classes in (("train", train_classes), ("unseen", unseen_classes)):
        acc[group]["ceiling"] = class_ceiling(clf, real, labels, held_mask, classes)
    return {**out, "n": n, **acc}
