"""Check an extracted dataset against its own .mat files: every labelled image present and a JPEG,
every image with a captions file, the class split files consistent.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from flowercli.config import CAPTION_FILE_MAX_BYTES, SPLIT_FILES, DataLayout, missing_split_files
from flowercli.download.sources import OFFICIAL_CLASSES, OFFICIAL_IMAGES
from flowercli.errors import DataError
from flowercli.report import Reporter

_IMAGE_RE = re.compile(r"image_(\d{5})\.jpg")
_CAPTION_RE = re.compile(r"image_(\d{5})\.txt")
_CLASS_RE = re.compile(r"class_(\d{5})")


def _caption_lines(data: bytes) -> int:
    return sum(1 for line in data.splitlines() if line.strip())


def validate(layout: DataLayout, report: Reporter = Reporter()) -> dict:
    """Check a dataset folder against its own .mat files; return its counts or raise DataError."""
    import numpy as np

    found = [s for s in SPLIT_FILES if layout.split_file(s).is_file()]
    missing = missing_split_files(found)
    if missing:
        raise DataError(f"{layout.dataset} has no {' or '.join(missing)}; run `flowercli download` "
                        "(with --force to re-extract)")
    for path in (layout.jpg, layout.text_c10, layout.labels_mat, layout.setid_mat):
        if not path.exists():
            raise DataError(f"{path} is missing; run `flowercli download` (with --force to re-extract)")
    labels = _load_mat(layout.labels_mat, ("labels",))["labels"]
    if labels.size == 0 or not np.all(np.equal(np.mod(labels, 1), 0)):
        raise DataError(f"{layout.labels_mat.name}: labels must be whole numbers")
    labels = labels.astype(np.int64)
    n, n_classes = len(labels), int(labels.max())
    if labels.min() < 1 or len(set(labels.tolist())) != n_classes:
        raise DataError(f"{layout.labels_mat.name}: labels must cover 1..{n_classes} without gaps "
                        f"(found {len(set(labels.tolist()))} distinct values, min {labels.min()})")

    names = {e.name for e in os.scandir(layout.jpg) if e.is_file()}
    expected = {f"image_{i:05d}.jpg" for i in range(1, n + 1)}
    missing = sorted(expected - names)
    if missing:
        raise DataError(f"the images archive lacks {len(missing)} of the {n:,} images that "
                        f"{layout.labels_mat.name} labels (first: {missing[0]}); it is incomplete")
    extra = sorted(n_ for n_ in names - expected if _IMAGE_RE.fullmatch(n_))
    if extra:
        raise DataError(f"the images archive has {len(extra)} images that {layout.labels_mat.name} does not "
                        f"label (first: {extra[0]}); the archive and the labels do not belong together")
    for name in sorted(expected):
        with open(layout.jpg / name, "rb") as f:
            if f.read(2) != b"\xff\xd8":
                raise DataError(f"{name} is not a JPEG file; the images archive is damaged")

    setid = _load_mat(layout.setid_mat, ("trnid", "valid", "tstid"))
    seen = np.concatenate([setid[k] for k in ("trnid", "valid", "tstid")]).astype(np.int64)
    if len(seen) != len(set(seen.tolist())) or set(seen.tolist()) != set(range(1, n + 1)):
        raise DataError(f"{layout.setid_mat.name}: trnid/valid/tstid must list each image id 1..{n:,} once "
                        f"(they list {len(seen):,} ids, {len(set(seen.tolist()) & set(range(1, n + 1))):,} valid "
                        "and distinct)")

    without, fewer, total_lines = [], 0, 0
    for i, label in enumerate(labels.tolist(), 1):
        path = layout.text_c10 / f"class_{label:05d}" / f"image_{i:05d}.txt"
        try:
            with open(path, "rb") as f:
                raw = f.read(CAPTION_FILE_MAX_BYTES + 1)
        except FileNotFoundError:
            without.append(path)
            continue
        if len(raw) > CAPTION_FILE_MAX_BYTES:
            raise DataError(f"caption file text_c10/{path.parent.name}/{path.name} is larger than "
                            f"{CAPTION_FILE_MAX_BYTES:,} bytes: not a caption file; pass the Reed et al. captions "
                            "archive (or one in its layout) with --captions")
        lines = _caption_lines(raw)
        total_lines += lines
        fewer += lines < 10
    if without:
        p = without[0]
        raise DataError(f"{len(without):,} images have no captions file (first: text_c10/{p.parent.name}/{p.name}); "
                        "the captions archive does not match imagelabels.mat")
    if fewer:
        report.info(f"{fewer:,} images have fewer than 10 captions")

    class_splits, members = {}, {}
    for split in found:
        path = layout.split_file(split)
        classes = []
        for k, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            m = _CLASS_RE.fullmatch(line.strip())
            if not m or not 1 <= int(m.group(1)) <= n_classes:
                raise DataError(f"{path.name} line {k}: expected class_NNNNN with NNNNN in 1..{n_classes}, "
                                f"got {line.strip()[:60]!r}")
            classes.append(int(m.group(1)))
        class_splits[split] = len(set(classes))
        members[split] = set(classes)
    seen_classes = members.get("trainval", members.get("train", set()) | members.get("val", set()))
    overlap = sorted(seen_classes & members["test"])
    if overlap:
        raise DataError(f"class {overlap[0]} is in testclasses.txt and in the training classes: the class split "
                        "files contradict each other")

    if n != OFFICIAL_IMAGES or n_classes != OFFICIAL_CLASSES:
        report.warn(f"this dataset has {n:,} images in {n_classes} classes, not the official "
                    f"{OFFICIAL_IMAGES:,} in {OFFICIAL_CLASSES}: is it the full Oxford 102 set?")
    return {
        "images": n,
        "classes": n_classes,
        "caption_files": n,
        "captions": total_lines,
        "images_with_fewer_than_10_captions": fewer,
        "setid": {"train": len(setid["trnid"]), "val": len(setid["valid"]), "test": len(setid["tstid"])},
        "split_classes": class_splits,
    }


def _load_mat(path: Path, keys: tuple[str, ...]) -> dict:
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises many types for a bad file; all mean the same to the user
        raise DataError(f"{path.name} is not a readable MATLAB file ({type(e).__name__}: {e})") from None
    missing = [k for k in keys if k not in mat]
    if missing:
        raise DataError(f"{path.name} has no {', '.join(missing)} variable; is it the official file?")
    return {k: mat[k].ravel() for k in keys}
