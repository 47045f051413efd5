"""`flowercli eval`: the protocol of docs/EVALUATION.md, from a loaded generator to a report.

evaluate(cfg, generator) does, in order:
1. pick the evaluated images: the run's held-out side (`split="test"`: the unseen classes of a
   "classes" run) or its training side, with the same rule training used;
2. real-image features of every image of the embeddings file (cached), then from them the split's
   statistics with the real-vs-real ceiling (cached) and the real-image classifier (cached);
3. generate `n` images cycling the split's captions in a fixed shuffled order, seeds seed + i;
   `n_other` more from the other side's captions (class accuracy only);
4. FID, class accuracy, colour agreement, each with its real-data ceiling; diversity
   (diversity_eval.py: k-NN precision/recall/density/coverage, within-prompt spread); species-name
   prompts of every class (names.py), classified like class accuracy; the caption sets compared;
5. report.json and samples.png under cfg.out_dir, atomically.
The generator is passed in (anything with `images_from_vectors`, `images_from_prompts`,
`image_size` and `meta`), so Python callers and tests can evaluate any model.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from flowercli.config import DataLayout, EvalConfig, default_data_dir
from flowercli.errors import DataError, FlowerError, InputError
from flowercli.metrics import cache, colour, names
from flowercli.metrics.accuracy import (LinearClassifier, accuracy_report, stratified_holdout,
                                        train_classifier)
from flowercli.metrics.diversity_eval import check as check_diversity, diversity_report
from flowercli.metrics.fid import disjoint_halves, feature_stats, frechet_distance_fast, sqrt_psd
from flowercli.report import Reporter

REPORT_SCHEMA = 1
MAX_N = 50_000
# Noise seeds of each group start here (+ seed + i), so groups never share a noise vector.
SEED_OFFSETS = {"main": 0, "other": 1_000_000, "colour": 2_000_000, "diversity": 3_000_000, "names": 5_000_000}
CLASSIFIER_WEIGHT_DECAY = 1e-3


def load_embeddings(path: Path):
    """Indirection so tests can hand in embeddings without an HDF5 file."""
    from flowercli.data import open_embeddings

    return open_embeddings(path)


# ---------------------------------------------------------------------------------------------
# Which images and captions.


def split_masks(emb, mode: str | None) -> tuple[str, np.ndarray, np.ndarray]:
    """(mode, training rows, held-out rows): the run's own split, by training's rule itself."""
    from flowercli.data import select_split

    mode, train, held = select_split(emb, mode or "auto")
    if mode == "all":
        held = train  # nothing was held out: the "test" side is the training images (warned)
    return mode, train, held


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


# ---------------------------------------------------------------------------------------------
# Real side (cached).


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


def _load_real_images(layout: DataLayout, image_ids, size: int) -> np.ndarray:
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
                f = extractor.extract(_load_real_images(layout, ids, size), batch_size, task)
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


# ---------------------------------------------------------------------------------------------
# Generated side.


def generated_side(generator, extractor, emb, rows: np.ndarray, n: int, order_seed: int, first_seed: int,
                   batch_size: int, what: str, reporter: Reporter, timings: dict[str, float]):
    """Generate n images from `rows`' captions (caption_plan order, noise seeds first_seed + i);
    return (images, features, planned rows, planned caption indices)."""
    plan_rows, plan_caps = caption_plan(emb, rows, n, order_seed)
    vectors = np.asarray(emb.vectors[plan_rows, plan_caps], dtype=np.float32)
    seeds = [first_seed + i for i in range(n)]
    t = time.perf_counter()
    chunk = max(batch_size, 256)
    images = []
    with reporter.task(f"generating {what}", total=n) as task:
        for start in range(0, n, chunk):
            images.append(generator.images_from_vectors(vectors[start: start + chunk], seeds[start: start + chunk],
                                                         batch_size=batch_size))
            task.advance(len(images[-1]))
    images = np.concatenate(images)
    timings["generate_s"] = timings.get("generate_s", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    with reporter.task(f"Inception: {what}", total=n) as task:
        features = extractor.extract(images, batch_size, task)
    timings["inception_s"] = timings.get("inception_s", 0.0) + time.perf_counter() - t
    return images, features, plan_rows, plan_caps


# ---------------------------------------------------------------------------------------------
# Output.


def write_sheet(images: np.ndarray, captions: list[str], path: Path, ncol: int = 8, scale: int = 2) -> Path:
    """A PNG contact sheet: each image enlarged `scale` times with its caption wrapped beneath it."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    from flowercli.fsutil import atomic_write

    n, h, w, _ = images.shape
    cell_w, img_h = w * scale, h * scale
    font = ImageFont.load_default()
    chars = max(8, cell_w // 6)
    wrapped = [textwrap.wrap(c, chars)[:6] for c in captions]
    line_h = 11
    text_h = line_h * max((len(lines) for lines in wrapped), default=1) + 4
    nrow = -(-n // ncol)
    pad = 4
    sheet = Image.new("RGB", (ncol * (cell_w + pad) + pad, nrow * (img_h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        r, c = divmod(i, ncol)
        x, y = pad + c * (cell_w + pad), pad + r * (img_h + text_h + pad)
        sheet.paste(Image.fromarray(images[i]).resize((cell_w, img_h), Image.NEAREST), (x, y))
        for k, line in enumerate(wrapped[i]):
            draw.text((x, y + img_h + 2 + k * line_h), line, fill=(0, 0, 0), font=font)
    atomic_write(Path(path), lambda f: sheet.save(f, format="PNG"))
    return Path(path)


def write_report(report: dict[str, Any], path: Path) -> Path:
    from flowercli.fsutil import atomic_write

    text = json.dumps(report, indent=2, sort_keys=True, default=_json_default) + "\n"
    atomic_write(Path(path), lambda f: f.write(text.encode()))
    return Path(path)


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x).__name__)


def _clean(x):
    """NaN is not JSON: report missing numbers as null."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


# ---------------------------------------------------------------------------------------------
# The protocol.


def check_config(cfg: EvalConfig) -> None:
    if cfg.split not in ("test", "train"):
        raise InputError(f"--split must be test or train, got {cfg.split!r}")
    if not 2 <= cfg.n <= MAX_N:
        raise InputError(f"--n must be between 2 and {MAX_N}, got {cfg.n}")
    if not 0 <= cfg.n_other <= MAX_N:
        raise InputError(f"n_other must be between 0 and {MAX_N}, got {cfg.n_other}")
    if cfg.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {cfg.batch_size}")
    if not 0 < cfg.classifier_holdout < 1:
        raise InputError(f"classifier_holdout must be in (0, 1), got {cfg.classifier_holdout}")
    if cfg.colour_seeds < 0 or cfg.sheet < 0:
        raise InputError("colour_seeds and sheet must not be negative")
    check_diversity(cfg, MAX_N)
    if cfg.name_seeds < 0:
        raise InputError(f"name_seeds must not be negative (0 skips the species names), got {cfg.name_seeds}")


def resolve_embeddings(meta: dict[str, Any], layout: DataLayout) -> Path:
    """The HDF5 the run trained on: same file name under the chosen data directory first (the data
    may have moved), then the recorded path, then the encoder's default name."""
    recorded = Path(meta["embeddings"]) if meta.get("embeddings") else None
    candidates = []
    if recorded is not None:
        candidates += [layout.embeddings_dir / recorded.name, recorded]
    if meta.get("encoder"):
        candidates.append(layout.embeddings_file(str(meta["encoder"])))
    for path in candidates:
        if path.is_file():
            return path
    shown = candidates[0] if candidates else layout.embeddings_dir
    raise DataError(f"the embeddings the run trained on are not at {shown}; pass --data-dir with the "
                    "data directory used for training, or run `flowercli embed` with the same encoder")


def resolve_data_dir(cfg: EvalConfig, meta: dict[str, Any]) -> Path:
    if cfg.data_dir is not None:
        return Path(cfg.data_dir)
    if meta.get("data_dir"):
        return Path(meta["data_dir"])
    return default_data_dir()


def evaluate(cfg: EvalConfig, generator, reporter: Reporter = Reporter(), extractor=None,
             embeddings=None) -> dict[str, Any]:
    """Run the protocol; return the report (also written to cfg.out_dir when set)."""
    from flowercli.metrics.features import load_extractor

    check_config(cfg)
    t_start = time.perf_counter()
    meta = dict(getattr(generator, "meta", {}) or {})
    layout = DataLayout(resolve_data_dir(cfg, meta))
    from flowercli.data import check_data_dir

    check_data_dir(layout.root)
    emb_path = None
    if embeddings is None:
        emb_path = resolve_embeddings(meta, layout)
        reporter.debug(f"embeddings {emb_path}")
        embeddings = load_embeddings(emb_path)
    emb = embeddings
    size = int(generator.image_size)
    mode, train_mask, test_mask = split_masks(emb, meta.get("split"))
    if mode == "all":
        reporter.warn("the run trained on every image (--split all): nothing is held out, so the "
                      "'test' numbers are measured on training images and captions")
    caption_set = caption_sets(meta, emb, layout, reporter)
    groups = {"test": test_mask, "train": train_mask}
    main_name = cfg.split
    other_name = "train" if main_name == "test" else "test"
    main_rows = np.flatnonzero(groups[main_name])
    other_rows = np.flatnonzero(groups[other_name]) if mode != "all" else np.zeros(0, np.int64)
    if len(main_rows) < 4:
        raise DataError(f"the run's {main_name} split has {len(main_rows)} images; nothing to evaluate against")

    if extractor is None:
        from flowercli.device import resolve_device

        device = str(resolve_device(cfg.device))
        extractor = load_extractor(cfg.inception, layout.cache_dir, device=device, precision=cfg.precision,
                                   allow_download=cfg.allow_download, reporter=reporter)
    timings: dict[str, float] = {}

    # Real side: features of every image once, then statistics and the classifier from them.
    t = time.perf_counter()
    real, labels, key_base, clf, held_idx = real_side(extractor, layout, emb, size, cfg, reporter)
    stats = real_split_stats(real[main_rows], {**key_base, "mode": mode}, f"{mode}-{main_name}",
                             layout.cache_dir, cfg.seed, reporter)
    timings["real_side_s"] = time.perf_counter() - t

    # Generated side.
    images, gen_feats, rows, caps = generated_side(generator, extractor, emb, main_rows, cfg.n, cfg.seed,
                                                   cfg.seed + SEED_OFFSETS["main"], cfg.batch_size,
                                                   f"{cfg.n} {main_name}-caption images", reporter, timings)

    t = time.perf_counter()
    mu_g, sigma_g = feature_stats(gen_feats)
    fid = frechet_distance_fast(stats["mu"], stats["sigma"], mu_g, sigma_g, sqrt_sigma1=stats["sqrt_sigma"])
    timings["fid_s"] = time.perf_counter() - t

    # Diversity: k-NN precision/recall/density/coverage on the same features, and within-prompt spread.
    diversity = diversity_report(cfg, generator, extractor, emb, main_rows, real, labels, gen_feats,
                                 cfg.seed + SEED_OFFSETS["diversity"], lambda ids: _load_real_images(layout, ids, size),
                                 reporter, timings)

    # Class accuracy for captions of both sides, each next to the probe's accuracy on held-out
    # real images of the same classes.
    held_mask = np.zeros(len(labels), dtype=bool)
    held_mask[held_idx] = True
    accuracy: dict[str, Any] = {}
    group_data = {main_name: (gen_feats, labels[rows])}
    if len(other_rows) and cfg.n_other > 0:
        _, o_feats, o_rows, _ = generated_side(generator, extractor, emb, other_rows, cfg.n_other, cfg.seed + 1,
                                               cfg.seed + SEED_OFFSETS["other"], cfg.batch_size,
                                               f"{cfg.n_other} {other_name}-caption images", reporter, timings)
        group_data[other_name] = (o_feats, labels[o_rows])
    for name, (feats, truth) in group_data.items():
        group_classes = np.unique(labels[groups[name]])
        accuracy[name] = {**accuracy_report(clf, feats, truth),
                          "classes": int(len(group_classes)),
                          "unseen_classes": bool(mode == "classes" and name == "test"),
                          "ceiling": class_ceiling(clf, real, labels, held_mask, group_classes)}
    probe = accuracy_report(clf, real[held_idx], labels[held_idx])
    probe.update({"n_train": int(len(labels) - len(held_idx)), "classes": int(len(clf.classes)),
                  "model": "logistic regression on standardised Inception features (L-BFGS)",
                  "weight_decay": CLASSIFIER_WEIGHT_DECAY})

    # Colour agreement: generated from colour prompts, and the same rule on the real images of the
    # evaluated split against their own captions (the ceiling).
    t = time.perf_counter()
    colour_report = _colour(generator, cfg, layout, emb, main_rows, size, reporter)
    timings["colour_s"] = time.perf_counter() - t

    # Species names in a few sentences, for every class, read against the same classifier's ceilings.
    t = time.perf_counter()
    names_report = _species_names(generator, extractor, cfg, layout, clf, real, labels, held_mask,
                                  train_mask, test_mask, reporter)
    timings["names_s"] = time.perf_counter() - t

    report = {
        "schema": REPORT_SCHEMA,
        "run": {"checkpoint": str(getattr(generator, "checkpoint", "") or ""), "step": meta.get("step"),
                "split_mode": mode, "image_size": size, "encoder": meta.get("encoder"),
                "embeddings": str(emb_path or getattr(emb, "path", "") or ""), "data_dir": str(layout.root)},
        "protocol": {"split": main_name, "n": cfg.n, "n_other": cfg.n_other if other_name in group_data else 0,
                     "seed": cfg.seed,
                     # The caption's mean condition, or one sampled from each image's seed (CA generators).
                     "condition": "sampled" if getattr(generator, "sample_condition", False) else "mean",
                     # Every noise vector scaled by this (the truncation trick; 1 = off, as `flowercli eval` runs).
                     "truncation": float(getattr(generator, "truncation", 1.0)),
                     "captions": int(np.asarray(emb.n_captions)[main_rows].sum()),
                     "real_images": int(len(main_rows))},
        "inception": extractor.describe(),
        "fid": {"value": fid, "n_generated": cfg.n, "n_real": stats["n"],
                "ceiling": {"value": stats["ceiling"], "n_a": stats["n_half"], "n_b": stats["n_half"],
                            "what": "FID between two disjoint random halves of the real images of the split"}},
        "diversity": diversity,
        "class_accuracy": {**accuracy, "classifier": probe},
        "colour": colour_report,
        "species_names": names_report,
        "caption_set": caption_set,
    }
    report = _clean(report)
    timings["total_s"] = time.perf_counter() - t_start
    reporter.debug("timings: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))

    if cfg.out_dir is not None:
        out = Path(cfg.out_dir)
        k = min(cfg.sheet, len(images))
        if k:
            captions = [emb.captions[r][c] for r, c in zip(rows[:k], caps[:k])]
            write_sheet(images[:k], captions, out / "samples.png")
        write_report(report, out / "report.json")
        reporter.debug(f"wrote {out / 'report.json'} and {out / 'samples.png'}")
    return report


def _colour(generator, cfg: EvalConfig, layout: DataLayout, emb, rows: np.ndarray, size: int,
            reporter: Reporter) -> dict[str, Any]:
    prompts = colour.colour_prompts()
    # Ceiling: every caption of the split's real images that names a colour.
    real_imgs = _load_real_images(layout, np.asarray(emb.image_ids)[rows], size)
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
    seeds = [cfg.seed + SEED_OFFSETS["colour"] + j for _ in prompts for j in range(cfg.colour_seeds)]
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


def _species_names(generator, extractor, cfg: EvalConfig, layout: DataLayout, clf: LinearClassifier,
                   real: np.ndarray, labels: np.ndarray, held_mask: np.ndarray, train_mask: np.ndarray,
                   test_mask: np.ndarray, reporter: Reporter) -> dict[str, Any]:
    """Every class's name in every template (names.TEMPLATES), `name_seeds` images each, classified
    by the real-image classifier: accuracy on the training species and on the unseen ones, each
    beside the classifier's accuracy on held-out real images of the same classes."""
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
        seeds = [cfg.seed + SEED_OFFSETS["names"] + i for i in range(len(plan.prompts))]
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


def caption_sets(meta: dict[str, Any], emb, layout: DataLayout, reporter: Reporter = Reporter()) -> dict[str, Any]:
    """Which captions the generator was trained on (the embeddings attrs its checkpoint copied) and
    which the evaluated data holds (its embeddings file, else manifest.json); "unknown" where nothing
    says (files written before the caption set was recorded). Warns when the two differ: the numbers
    are then measured on captions the generator never saw, which is allowed but easy to misread."""
    from flowercli.data import read_caption_set

    def named(attrs: dict[str, Any]) -> dict[str, str]:
        return {"archive": str(attrs.get("captions_archive") or "unknown"),
                "sha256": str(attrs.get("captions_sha256") or "unknown")}

    attrs = dict(getattr(emb, "attrs", None) or {})
    trained = named(meta.get("encoder_info") or {})
    data = named(attrs if attrs.get("captions_sha256") else read_caption_set(layout))
    known = "unknown" not in (trained["sha256"], data["sha256"])
    same = trained["sha256"] == data["sha256"] if known else None
    if same is False:
        reporter.warn(f"the generator was trained on captions {trained['archive']} (sha256 {trained['sha256'][:12]}) "
                      f"but {layout.root} holds {data['archive']} (sha256 {data['sha256'][:12]}); its numbers are "
                      "not comparable with ones measured on the captions it was trained on")
    return {"generator": trained, "data": data, "same": same}
