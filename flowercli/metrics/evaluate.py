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
Step 2 lives in real.py, steps 3 and 4's prompt sections in generated.py, step 5's files in
output.py; this module picks the rows, the seeds and the settings, and assembles the report.
The generator is passed in (anything with `images_from_vectors`, `images_from_prompts`,
`image_size` and `meta`), so Python callers and tests can evaluate any model.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from flowercli.config import DataLayout, EvalConfig, default_data_dir
from flowercli.errors import DataError, InputError
from flowercli.metrics.accuracy import accuracy_report
from flowercli.metrics.diversity_eval import check as check_diversity
from flowercli.metrics.diversity_eval import diversity_report
from flowercli.metrics.fid import feature_stats, frechet_distance_fast
from flowercli.metrics.generated import caption_plan as caption_plan  # re-exported: evaluate.caption_plan
from flowercli.metrics.generated import colour_report, generated_side, species_names_report
from flowercli.metrics.output import json_ready, write_report, write_sheet
from flowercli.metrics.real import CLASSIFIER_WEIGHT_DECAY, class_ceiling, load_real_images, real_side, real_split_stats
from flowercli.report import Reporter

REPORT_SCHEMA = 1
MAX_N = 50_000
# Noise seeds of each group start here (+ seed + i), so groups never share a noise vector.
SEED_OFFSETS = {"main": 0, "other": 1_000_000, "colour": 2_000_000, "diversity": 3_000_000, "names": 5_000_000}


def load_embeddings(path: Path):
    """Indirection so tests can hand in embeddings without an HDF5 file."""
    from flowercli.embeddings import open_embeddings

    return open_embeddings(path)


# ---------------------------------------------------------------------------------------------
# Which images and captions.


def split_masks(emb, mode: str | None) -> tuple[str, np.ndarray, np.ndarray]:
    """(mode, training rows, held-out rows): the run's own split, by training's rule itself."""
    from flowercli.embeddings import select_split

    mode, train, held = select_split(emb, mode or "auto")
    if mode == "all":
        held = train  # nothing was held out: the "test" side is the training images (warned)
    return mode, train, held


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
                                 cfg.seed + SEED_OFFSETS["diversity"], lambda ids: load_real_images(layout, ids, size),
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
    probe: dict[str, Any] = accuracy_report(clf, real[held_idx], labels[held_idx])
    probe.update({"n_train": int(len(labels) - len(held_idx)), "classes": int(len(clf.classes)),
                  "model": "logistic regression on standardised Inception features (L-BFGS)",
                  "weight_decay": CLASSIFIER_WEIGHT_DECAY})

    # Colour agreement: generated from colour prompts, and the same rule on the real images of the
    # evaluated split against their own captions (the ceiling).
    t = time.perf_counter()
    colours = colour_report(generator, cfg, layout, emb, main_rows, size, cfg.seed + SEED_OFFSETS["colour"], reporter)
    timings["colour_s"] = time.perf_counter() - t

    # Species names in a few sentences, for every class, read against the same classifier's ceilings.
    t = time.perf_counter()
    names_report = species_names_report(generator, extractor, cfg, layout, clf, real, labels, held_mask, train_mask,
                                        test_mask, cfg.seed + SEED_OFFSETS["names"], reporter)
    timings["names_s"] = time.perf_counter() - t

    report = {
        "schema": REPORT_SCHEMA,
        "run": {"checkpoint": str(getattr(generator, "checkpoint", "") or ""), "step": meta.get("step"),
                "split_mode": mode, "image_size": size, "encoder": meta.get("encoder"),
                "embeddings": str(emb_path or getattr(emb, "path", None) or ""), "data_dir": str(layout.root)},
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
        "colour": colours,
        "species_names": names_report,
        "caption_set": caption_set,
    }
    report = json_ready(report)
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
