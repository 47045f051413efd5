"""Reading the dataset written by `download`: labels, image and class splits, captions, class names.

The embeddings HDF5 file written by `embed` is read and written by `embeddings.py`.
numpy / scipy only (scipy imported inside the functions), so that every stage can read the
data without paying for torch. Every problem a user can fix is a one-line `DataError` that names
the file and says what to do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flowercli.config import CAPTION_FILE_MAX_BYTES, DataLayout, missing_split_files
from flowercli.errors import DataError

CAPTIONS_PER_IMAGE = 10
SPLIT_NAMES = ("train", "val", "test")
_SETID_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}

_RUN_DOWNLOAD = "run `flowercli download` first"
# For a dataset that is there but damaged: extract it again from the kept archives.
_REINSTALL = "reinstall the dataset with `flowercli download --force`"


# ---------------------------------------------------------------------------------------------
# The dataset folder.


def check_data_dir(root: Path) -> None:
    """Fail with one line when the data folder (or a folder above it) is a regular file."""
    from flowercli.fsutil import nearest_existing

    base = nearest_existing(Path(root))
    if base.exists() and not base.is_dir():
        where = f"data folder {root}" if base == Path(os.path.abspath(root)) else f"{base}, above data folder {root},"
        raise DataError(f"{where} is a file, not a folder; pass --data-dir with the folder `flowercli download` "
                        "fills")


def require_dataset(layout: DataLayout) -> None:
    """Fail with one line when the dataset `download` writes is not there."""
    check_data_dir(layout.root)
    for path in (layout.labels_mat, layout.setid_mat, layout.text_c10):
        if not path.exists():
            raise DataError(f"no dataset at {layout.dataset} ({path.name} is missing): "
                            f"{_RUN_DOWNLOAD} (flowercli download --data-dir {layout.root})")


def _loadmat(path: Path, key: str) -> np.ndarray:
    import scipy.io

    if not path.is_file():
        raise DataError(f"{path} not found: {_RUN_DOWNLOAD}")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises a zoo of types for corrupt files
        raise DataError(f"{path} is not a readable .mat file ({type(e).__name__}): {_REINSTALL}") from None
    if key not in mat:
        raise DataError(f"{path} has no '{key}' variable: {_REINSTALL}")
    return np.asarray(mat[key]).ravel().astype(np.int64)


def read_labels(layout: DataLayout) -> np.ndarray:
    """Class of every image, (N,) int64 in 1..102: `labels[i]` is the class of image id `i + 1`."""
    labels = _loadmat(layout.labels_mat, "labels")
    if labels.size == 0 or labels.min() < 1:
        raise DataError(f"{layout.labels_mat} holds invalid labels (expected classes 1..102): {_REINSTALL}")
    return labels


def read_setid(layout: DataLayout) -> dict[str, np.ndarray]:
    """The official image split: {"train", "val", "test"} -> 1-based image ids (int64)."""
    return {name: _loadmat(layout.setid_mat, key) for name, key in _SETID_KEYS.items()}


def _class_numbers(path: Path) -> list[int]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(int(line.rsplit("_", 1)[-1]))
        except ValueError:
            raise DataError(f"{path}: unexpected line {line!r} (expected e.g. class_00001)") from None
    return out


def read_class_splits(layout: DataLayout) -> dict[str, list[int]] | None:
    """The zero-shot class split of Reed et al. (or its substitute), or None when the files are absent.

    Keys "trainval", "test", "all", and "train"/"val" only where both files exist. testclasses.txt
    plus trainvalclasses.txt (or train + val) are required; trainval and all are derived when missing.
    """
    present = {name: layout.split_file(name) for name in ("train", "val", "test", "trainval", "all")}
    have = {name for name, path in present.items() if path.is_file()}
    if not have:
        return None
    missing = missing_split_files(have)
    if missing:
        raise DataError(f"class split files incomplete in {layout.dataset} (missing {' and '.join(missing)}): "
                        f"{_REINSTALL}")
    splits = {name: _class_numbers(present[name]) for name in have}
    if not {"train", "val"} <= have:
        splits.pop("train", None)
        splits.pop("val", None)
    splits.setdefault("trainval", sorted(splits.get("train", []) + splits.get("val", [])))
    splits.setdefault("all", sorted(splits["trainval"] + splits["test"]))
    return splits


def read_caption_set(layout: DataLayout) -> dict[str, str]:
    """{"captions_archive", "captions_sha256"} of the installed captions, from manifest.json ({} if unknown).

    Stored in the embeddings file, and from there in every checkpoint and eval report, so no figure
    can be mistaken for one on another caption set.
    """
    import json

    from flowercli.download.manifest import manifest_caption_set

    try:
        rec = manifest_caption_set(json.loads(layout.manifest.read_text(encoding="utf-8")))
        if not rec.get("archive") or not rec.get("sha256"):
            return {}
        return {"captions_archive": str(rec["archive"]), "captions_sha256": str(rec["sha256"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def read_class_names(layout: DataLayout) -> list[str] | None:
    """Class names in label order (index 0 = class 1), or None when classnames.txt is absent."""
    path = layout.dataset / "classnames.txt"
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# Training captions that name the species (TrainConfig.name_mix): the human captions rarely do, yet
# people type "a sunflower". `{a}` is "a" or "an" for the name that follows. None of these is a
# template `flowercli eval` scores name prompts with, so that score measures generalisation to
# unseen phrasings rather than recall of the training strings.
NAME_TEMPLATES = (
    "{name}",
    "{a} {name}",
    "the {name}",
    "{a} {name} flower",
    "this is {a} {name}",
    "a picture of {a} {name}",
    "a close-up of {a} {name}",
    "a flower called {name}",
)


def article(name: str) -> str:
    """"an" before a vowel letter, else "a" (right for all 102 Oxford names, e.g. "an english marigold")."""
    return "an" if name[:1].lower() in ("a", "e", "i", "o", "u") else "a"


def name_caption(template: str, name: str) -> str:
    """`template` filled with `name`, with "an" before a vowel: "an orange dahlia"."""
    name = " ".join(name.split())
    return template.format(a=article(name), name=name)


def name_captions(names: Sequence[str], templates: Sequence[str] = NAME_TEMPLATES) -> list[list[str]]:
    """classes x templates name captions, class by class in label order (row 0 = class 1)."""
    return [[name_caption(t, n) for t in templates] for n in names]


def caption_file(layout: DataLayout, image_id: int, label: int) -> Path:
    return layout.text_c10 / f"class_{int(label):05d}" / f"image_{int(image_id):05d}.txt"


def read_captions(layout: DataLayout, image_ids: Sequence[int] | np.ndarray,
                  labels: Sequence[int] | np.ndarray) -> list[list[str]]:
    """The captions of each image as written (usually 10, a few images have fewer).

    `labels` runs parallel to `image_ids` (the class of each listed image: it names the folder).
    """
    if len(image_ids) != len(labels):
        raise ValueError("image_ids and labels must have the same length")
    out = []
    for image_id, label in zip(image_ids, labels):
        path = caption_file(layout, image_id, label)
        try:
            with open(path, "rb") as f:
                raw = f.read(CAPTION_FILE_MAX_BYTES + 1)  # a caption file is < 2 KB: never read a huge one whole
        except FileNotFoundError:
            raise DataError(f"caption file {path} is missing: {_REINSTALL}") from None
        if len(raw) > CAPTION_FILE_MAX_BYTES:
            raise DataError(f"caption file {path} is larger than {CAPTION_FILE_MAX_BYTES:,} bytes, which no caption "
                            f"file is: {_REINSTALL}, or pass a captions archive in Reed et al.'s layout "
                            "with --captions")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"caption file {path} is not UTF-8 text: pass a UTF-8 captions archive to "
                            "`flowercli download --captions`, or convert the file to UTF-8") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise DataError(f"caption file {path} is empty: write its captions into it, or pass a complete "
                            "captions archive to `flowercli download --captions`")
        out.append(lines)
    return out


def pad_captions(captions: Sequence[str], n: int = CAPTIONS_PER_IMAGE) -> tuple[list[str], int]:
    """Exactly `n` captions, repeating the real ones in order when there are fewer; and how many were real.

    Cycling (rather than blanks) keeps every slot a valid caption, so samplers can draw any slot;
    `n_captions` lets a reader that cares use only the real ones.
    """
    if not captions:
        raise ValueError("an image needs at least one caption")
    real = min(len(captions), n)
    return [captions[i % real] for i in range(n)], real


def image_splits(layout: DataLayout, n_images: int) -> np.ndarray:
    """(N,) str: "train" / "val" / "test" for each image id 1..N, from setid.mat."""
    split = np.full(n_images, "", dtype=object)
    for name, ids in read_setid(layout).items():
        if ids.size and (ids.min() < 1 or ids.max() > n_images):
            raise DataError(f"{layout.setid_mat} lists image ids outside 1..{n_images}: {_REINSTALL}")
        split[ids - 1] = name
    if (split == "").any():
        missing = int((split == "").sum())
        raise DataError(f"{layout.setid_mat} leaves {missing} images in no split: {_REINSTALL}")
    return split.astype(str)


def class_split_of(labels: np.ndarray, splits: dict[str, list[int]] | None) -> np.ndarray:
    """(N,) str: the class split ("train"/"val"/"test") of each image's class; "" without split files.

    Without separate train/val files every training class is "train".
    """
    out = np.full(len(labels), "", dtype=object)
    if splits is not None:
        out[np.isin(labels, splits["trainval"])] = "train"
        for name in SPLIT_NAMES:
            if name in splits:
                out[np.isin(labels, splits[name])] = name
    return out.astype(str)


# The embeddings file has a module of its own, `flowercli.embeddings`. Two of its readers can still
# be imported from here; they are looked up on first use because `embeddings` imports this module
# (for CAPTIONS_PER_IMAGE), so importing them at the top would be circular.
def __getattr__(name: str) -> Any:
    if name in ("open_embeddings", "read_embeddings_attrs"):
        from flowercli import embeddings

        return getattr(embeddings, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
