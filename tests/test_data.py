"""flowercli.data and flowercli.embeddings: reading the dataset folder, and the embeddings HDF5 schema."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from flowercli import data, embeddings
from flowercli.config import DataLayout
from flowercli.errors import DataError

from conftest import N_CLASSES, N_IMAGES, SPLITS, captions_for, image_label


@pytest.fixture
def layout(dataset_dir, tmp_path) -> DataLayout:
    """A private copy of the miniature dataset, free to damage."""
    shutil.copytree(dataset_dir / "oxford102", tmp_path / "oxford102")
    return DataLayout(tmp_path)


def test_labels_setid_and_class_splits(layout):
    labels = data.read_labels(layout)
    assert labels.dtype == np.int64 and labels.shape == (N_IMAGES,)
    assert [int(x) for x in labels[:5]] == [image_label(i) for i in range(1, 6)]

    setid = data.read_setid(layout)
    assert set(setid) == {"train", "val", "test"}
    assert sorted(np.concatenate(list(setid.values())).tolist()) == list(range(1, N_IMAGES + 1))
    assert setid["train"].tolist() == list(range(1, N_IMAGES + 1, 3))  # 1-based, as in setid.mat
    split = data.image_splits(layout, N_IMAGES)
    assert split[0] == "train" and split[1] == "val" and split[2] == "test"

    splits = data.read_class_splits(layout)
    assert splits == SPLITS
    class_split = data.class_split_of(labels, splits)
    assert class_split[labels == 3].tolist() == ["val"] * (labels == 3).sum()
    assert set(class_split) == {"train", "val", "test"}

    assert data.read_class_names(layout) == ["red flower", "yellow flower", "blue flower", "white flower"]


def test_class_split_files_optional_derived_or_incomplete(layout):
    for name in ("trainval", "all"):
        layout.split_file(name).unlink()
    splits = data.read_class_splits(layout)
    assert splits["trainval"] == [1, 2, 3] and splits["all"] == [1, 2, 3, 4]
    layout.split_file("val").unlink()
    with pytest.raises(DataError, match="valclasses.txt"):
        data.read_class_splits(layout)
    for name in ("train", "test"):
        layout.split_file(name).unlink()
    assert data.read_class_splits(layout) is None
    assert set(data.class_split_of(np.array([1, 2]), None)) == {""}
    (layout.dataset / "classnames.txt").unlink()
    assert data.read_class_names(layout) is None


def test_captions_read_in_order_and_missing_file_named(layout):
    labels = data.read_labels(layout)
    ids = [5, 2]
    caps = data.read_captions(layout, ids, [labels[i - 1] for i in ids])
    assert caps == [captions_for(5), captions_for(2)]
    missing = data.caption_file(layout, 7, labels[6])
    missing.unlink()
    with pytest.raises(DataError, match=str(missing.name)):
        data.read_captions(layout, [7], [labels[6]])


def test_pad_captions_cycles():
    assert data.pad_captions(["a", "b", "c"], 7) == (["a", "b", "c", "a", "b", "c", "a"], 3)
    full = [str(i) for i in range(12)]
    assert data.pad_captions(full, 10) == (full[:10], 10)


def test_missing_dataset_says_download(tmp_path):
    with pytest.raises(DataError, match="flowercli download"):
        data.require_dataset(DataLayout(tmp_path))
    with pytest.raises(DataError, match="imagelabels.mat"):
        data.read_labels(DataLayout(tmp_path))


def test_corrupt_mat_is_a_data_error(layout):
    layout.labels_mat.write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DataError, match="imagelabels.mat"):
        data.read_labels(layout)


# ---------------------------------------------------------------------------------------------
# Embeddings HDF5


def sample_embeddings(n: int = 5, d: int = 8, dtype=np.float16) -> embeddings.Embeddings:
    rng = np.random.default_rng(0)
    return embeddings.Embeddings(
        path=None,
        captions=[[f"caption {i}.{j} ünïcode" for j in range(10)] for i in range(n)],
        vectors=rng.normal(size=(n, 10, d)).astype(dtype),
        n_captions=np.array([10, 3, 10, 10, 7][:n]),
        labels=np.arange(n) % N_CLASSES + 1,
        image_ids=np.arange(1, n + 1),
        split=np.array(["train", "val", "test", "train", "val"][:n]),
        class_split=np.array(["", "", "", "", ""][:n]),
        attrs={"encoder": "some/encoder", "pooling": "mean", "max_length": 64, "flowercli_version": "0.1.0",
               "normalised": False},
    )


def test_schema_round_trip(tmp_path):
    emb = sample_embeddings()
    path = embeddings.write_embeddings(tmp_path / "e" / "x.h5", emb)
    back = embeddings.open_embeddings(path)
    assert back.path == path and len(back) == 5
    assert back.captions == emb.captions
    assert back.vectors.dtype == np.float16 and np.array_equal(back.vectors, emb.vectors)
    for name in ("n_captions", "labels", "image_ids", "split", "class_split"):
        assert np.array_equal(getattr(back, name), getattr(emb, name)), name
    assert back.split.dtype.kind == "U"
    assert back.dim == 8 and back.encoder == "some/encoder"
    attrs = embeddings.read_embeddings_attrs(path)
    assert attrs["schema_version"] == embeddings.SCHEMA_VERSION and attrs["dim"] == 8
    assert attrs["pooling"] == "mean" and attrs["normalised"] is False
    assert type(attrs["max_length"]) is int  # plain Python, JSON-ready
    with h5py.File(path) as f:  # the on-disk schema other tools rely on
        assert f["vectors"].shape == (5, 10, 8) and f["captions"].shape == (5, 10)
        assert h5py.check_string_dtype(f["captions"].dtype).encoding == "utf-8"
    assert list(tmp_path.joinpath("e").iterdir()) == [path]  # no temp files left


def test_float32_vectors_round_trip(tmp_path):
    emb = sample_embeddings(dtype=np.float32)
    back = embeddings.open_embeddings(embeddings.write_embeddings(tmp_path / "x.h5", emb))
    assert back.vectors.dtype == np.float32 and np.array_equal(back.vectors, emb.vectors)


def test_write_refuses_bad_shapes(tmp_path):
    emb = sample_embeddings()
    emb.vectors = emb.vectors[:, :5]
    with pytest.raises(ValueError, match="vectors"):
        embeddings.write_embeddings(tmp_path / "x.h5", emb)
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_or_truncated_file_is_a_one_line_data_error(tmp_path, damage):
    path = embeddings.write_embeddings(tmp_path / "x.h5", sample_embeddings(n=5, d=256))
    raw = path.read_bytes()
    path.write_bytes({"truncate": raw[: len(raw) // 2], "garbage": b"\x00junk" * 999, "empty": b""}[damage])
    with pytest.raises(DataError) as info:
        embeddings.open_embeddings(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg and "corrupt or truncated" in msg


def test_missing_file_and_wrong_schema(tmp_path):
    with pytest.raises(DataError, match="not found.*flowercli embed"):
        embeddings.open_embeddings(tmp_path / "nope.h5")
    path = embeddings.write_embeddings(tmp_path / "x.h5", sample_embeddings())
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    for reader in (embeddings.open_embeddings, embeddings.read_embeddings_attrs):
        with pytest.raises(DataError, match=r"x\.h5 has schema_version 99"):
            reader(path)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = embeddings.SCHEMA_VERSION
        del f["n_captions"]
    with pytest.raises(DataError, match="lacks dataset.*n_captions"):
        embeddings.open_embeddings(path)


def test_the_two_readers_still_load_from_data_and_nothing_else_does():
    # open_embeddings and read_embeddings_attrs live in flowercli.embeddings; data hands out only those two.
    assert data.open_embeddings is embeddings.open_embeddings
    assert data.read_embeddings_attrs is embeddings.read_embeddings_attrs
    with pytest.raises(AttributeError, match="write_embeddings"):
        data.write_embeddings  # noqa: B018


def test_write_is_atomic(tmp_path, monkeypatch):
    """A writer that fails midway leaves neither a final file nor a temp file; an old file survives."""
    path = tmp_path / "x.h5"
    old = sample_embeddings()
    embeddings.write_embeddings(path, old)
    before = path.read_bytes()

    real = h5py.Group.create_dataset

    def failing(self, name, *args, **kwargs):
        if name == "labels":  # after captions and vectors are written
            raise RuntimeError("disk on fire")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    new = sample_embeddings()
    new.vectors = new.vectors * 2
    with pytest.raises(RuntimeError, match="disk on fire"):
        embeddings.write_embeddings(path, new)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]
    fresh = tmp_path / "fresh.h5"
    with pytest.raises(RuntimeError):
        embeddings.write_embeddings(fresh, new)
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["x.h5"]
