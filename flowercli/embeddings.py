"""The embeddings HDF5 file that `embed` writes: `Embeddings`, writing it atomically, reading it back
with its schema and shapes checked, and choosing the training and held-out images from it.

A file format of its own, as checkpoints are in `checkpoint.py`, apart from `data.py` (the dataset
folder `download` installs) that `embed` reads to make it. numpy / h5py only (h5py imported inside
the functions). Every problem a user can fix is a one-line `DataError` that names the file and
says what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flowercli.data import CAPTIONS_PER_IMAGE
from flowercli.errors import DataError, InputError
from flowercli.fsutil import fsync_dir

# Bump when the HDF5 layout changes in a way old readers cannot follow.
SCHEMA_VERSION = 1


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
    if emb.name_vectors is not None and emb.name_captions is not None:  # both or neither, checked above
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
