"""Reading the dataset written by `download`, and the embeddings HDF5 file written by `embed`.

numpy / scipy / h5py only (imported inside the functions), so that every stage can read the
data without paying for torch. Every problem a user can fix is a one-line `DataError` that names
the file and says what to do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flowercli.config import CAPTION_FILE_MAX_BYTES, DataLayout, missing_split_files
from flowercli.errors import DataError, InputError
from flowercli.fsutil import fsync_dir

CAPTIONS_PER_IMAGE = 10
# Bump when the HDF5 layout changes in a way old readers cannot follow.
SCHEMA_VERSION = 1
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


def read_captions(layout: DataLayout, image_ids: Sequence[int], labels: Sequence[int]) -> list[list[str]]:
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


# ---------------------------------------------------------------------------------------------
# The embeddings file.


@dataclass
class Embeddings:
    """Caption vectors of every image and what is needed to use them; one HDF5 file per encoder.

    `vectors` keeps the stored dtype (float16 by default): cast where precision matters.
    """

    path: Path | None
    captions: list[list[str]]  # N x 10, padded by cycling (see n_captions)
    vectors: np.ndarray  # (N, 10, D)
    n_captions: np.ndarray  # (N,) how many of the 10 are real captions
    labels: np.ndarray  # (N,) class 1..102
    image_ids: np.ndarray  # (N,) 1-based
    split: np.ndarray  # (N,) str: image split from setid.mat
    class_split: np.ndarray  # (N,) str: class split from the *classes.txt files, "" when absent
    attrs: dict[str, Any] = field(default_factory=dict)
    # Species-name captions (NAME_TEMPLATES x classnames.txt) and their vectors, embedded like the
    # captions; None in files written without classnames.txt or before they existed.
    name_captions: list[list[str]] | None = None  # C x T, row c = class c + 1
    name_vectors: np.ndarray | None = None  # (C, T, D), the dtype of `vectors`

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[-1])

    @property
    def encoder(self) -> str:
        return str(self.attrs.get("encoder", ""))

    def __len__(self) -> int:
        return len(self.image_ids)


_DATASETS = ("captions", "vectors", "labels", "image_ids", "split", "class_split", "n_captions")


def _check_shapes(emb: Embeddings) -> None:
    n = len(emb.image_ids)
    if emb.vectors.ndim != 3 or emb.vectors.shape[:2] != (n, CAPTIONS_PER_IMAGE):
        raise ValueError(f"vectors must be (N, {CAPTIONS_PER_IMAGE}, D), got {emb.vectors.shape} for N={n}")
    for name in ("labels", "split", "class_split", "n_captions"):
        if len(getattr(emb, name)) != n:
            raise ValueError(f"{name} has {len(getattr(emb, name))} entries, expected {n}")
    if len(emb.captions) != n or any(len(c) != CAPTIONS_PER_IMAGE for c in emb.captions):
        raise ValueError(f"captions must be N x {CAPTIONS_PER_IMAGE}")
    if (emb.name_vectors is None) != (emb.name_captions is None):
        raise ValueError("name_captions and name_vectors come together")
    if emb.name_vectors is not None:
        shape = emb.name_vectors.shape
        if len(shape) != 3 or shape[2] != emb.dim or emb.name_vectors.dtype != emb.vectors.dtype:
            raise ValueError(f"name_vectors must be (C, T, {emb.dim}) {emb.vectors.dtype}, got {shape} "
                             f"{emb.name_vectors.dtype}")
        if len(emb.name_captions) != shape[0] or any(len(c) != shape[1] for c in emb.name_captions):
            raise ValueError(f"name_captions must be {shape[0]} x {shape[1]} like name_vectors")


def write_embeddings(path: Path, emb: Embeddings) -> Path:
    """Write `emb` to `path` atomically: a temporary name in the same folder, fsync, rename.

    An interrupted or failed write leaves no file under the final name (and removes its temp file).
    """
    import h5py

    from flowercli.fsutil import remove_stale_temporaries, temp_name

    _check_shapes(emb)
    path = Path(path)
    tmp = path.with_name(temp_name(path))
    text = h5py.string_dtype("utf-8")
    made = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(tmp, "w") as f:
            f.create_dataset("captions", data=np.array(emb.captions, dtype=object), dtype=text)
            f.create_dataset("vectors", data=emb.vectors)
            f.create_dataset("labels", data=np.asarray(emb.labels, dtype=np.int64))
            f.create_dataset("image_ids", data=np.asarray(emb.image_ids, dtype=np.int64))
            f.create_dataset("split", data=np.asarray(emb.split, dtype=object), dtype=text)
            f.create_dataset("class_split", data=np.asarray(emb.class_split, dtype=object), dtype=text)
            f.create_dataset("n_captions", data=np.asarray(emb.n_captions, dtype=np.int64))
            if emb.name_vectors is not None:
                f.create_dataset("name_captions", data=np.array(emb.name_captions, dtype=object), dtype=text)
                f.create_dataset("name_vectors", data=emb.name_vectors)
            # dim and schema_version describe this file, whatever the attrs carried over say.
            attrs = {**emb.attrs, "dim": emb.dim, "schema_version": SCHEMA_VERSION}
            for key, value in attrs.items():
                f.attrs[key] = value if value is not None else ""
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        for folder in made:  # a failed write leaves no empty folder either
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(e, OSError):  # disk full, read-only folder, a file in the way: the user's to fix
            from flowercli.errors import FlowerError
            from flowercli.fsutil import os_error_text

            kept = "the previous file is intact" if path.is_file() else "nothing was written"
            raise FlowerError(f"cannot write embeddings file {path}: {os_error_text(e)}; {kept}") from None
        raise
    fsync_dir(path.parent)
    remove_stale_temporaries(path.parent)  # left by writers that were killed
    return path


def _plain(value: Any) -> Any:
    """h5py attribute values as plain Python (numpy scalars and bytes do not survive json.dumps)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _open_h5(path: Path):
    import h5py

    path = Path(path)
    if not path.is_file():
        raise DataError(f"embeddings file {path} not found: run `flowercli embed` first")
    try:
        return h5py.File(path, "r")
    except OSError:
        raise DataError(f"embeddings file {path} is corrupt or truncated (not a readable HDF5 file): "
                        "delete it and run `flowercli embed` again") from None


def _check_schema(path: Path, attrs: dict[str, Any]) -> None:
    version = attrs.get("schema_version")
    if version is None:
        raise DataError(f"embeddings file {path} has no schema_version (not written by flowercli embed): "
                        "run `flowercli embed` again")
    if int(version) != SCHEMA_VERSION:
        raise DataError(f"embeddings file {path} has schema_version {version}, this flowercli reads "
                        f"{SCHEMA_VERSION}: run `flowercli embed` again")


def read_embeddings_attrs(path: Path) -> dict[str, Any]:
    """Only the attributes (encoder, pooling, dim, ...): cheap, reads no vectors."""
    with _open_h5(path) as f:
        attrs = {k: _plain(v) for k, v in f.attrs.items()}
    _check_schema(Path(path), attrs)
    return attrs


def open_embeddings(path: Path) -> Embeddings:
    """Load a whole embeddings file into memory, checking schema and shapes."""
    path = Path(path)
    f = _open_h5(path)
    try:
        with f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            _check_schema(path, attrs)
            missing = [name for name in _DATASETS if name not in f]
            if missing:
                raise DataError(f"embeddings file {path} lacks dataset(s) {', '.join(missing)}: "
                                "run `flowercli embed` again")
            emb = Embeddings(
                path=path,
                captions=[list(row) for row in f["captions"].asstr()[()]],
                vectors=f["vectors"][()],
                n_captions=f["n_captions"][()],
                labels=f["labels"][()],
                image_ids=f["image_ids"][()],
                split=np.asarray(f["split"].asstr()[()], dtype=str),
                class_split=np.asarray(f["class_split"].asstr()[()], dtype=str),
                attrs=attrs,
            )
            if "name_vectors" in f and "name_captions" in f:  # optional: see Embeddings
                emb.name_captions = [list(row) for row in f["name_captions"].asstr()[()]]
                emb.name_vectors = f["name_vectors"][()]
    except (OSError, RuntimeError, KeyError):
        # h5py reports data cut off after the header only when the data is read.
        raise DataError(f"embeddings file {path} is corrupt or truncated (reading its data failed): "
                        "delete it and run `flowercli embed` again") from None
    try:
        _check_shapes(emb)
    except ValueError as e:
        raise DataError(f"embeddings file {path} is inconsistent ({e}): run `flowercli embed` again") from None
    return emb


def select_split(emb, split: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(resolved split name, training mask, held-out mask) over the images of the embeddings file."""
    has_classes = any(s for s in emb.class_split)
    if split == "auto":
        split = "classes" if has_classes else "images"
    if split == "classes":
        if not has_classes:
            raise DataError("--split classes needs the class split files (trainvalclasses.txt, testclasses.txt); "
                            "re-run `flowercli download` with captions that include them, or use --split images")
        train = np.isin(emb.class_split, ["train", "val"])
        held = emb.class_split == "test"
    elif split == "images":
        train = np.isin(emb.split, ["train", "val"])
        held = emb.split == "test"
    elif split == "all":
        train = np.ones(len(emb.labels), dtype=bool)
        held = np.zeros(len(emb.labels), dtype=bool)
    else:
        raise InputError(f"unknown split {split!r}; choose auto, classes, images or all")
    if not train.any():
        raise DataError(f"split {split!r} leaves no training images")
    return split, train, held
