"""Species-name captions: embedded next to the captions, added to older files, mixed into training."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flowercli.cli import app
from flowercli.config import DataLayout
from flowercli.data import NAME_TEMPLATES, name_caption, name_captions, read_class_names
from flowercli.device import StepOptions
from flowercli.embed import add_name_vectors
from flowercli.embeddings import open_embeddings, write_embeddings
from flowercli.errors import DataError, InputError
from flowercli.report import ListReporter
from flowercli.rng import step_generator
from flowercli.runconfig import make_config
from flowercli.textencoder import TextEncoder
from flowercli.train import train
from flowercli.traindata import load_train_data, make_batch

from conftest import N_CLASSES

runner = CliRunner()
TINY = dict(image_size=16, g_channels=8, d_channels=8, cond_dim=8, batch_size=4, log_every=1)


def emb_file(root: Path) -> Path:
    return next((root / "embeddings").glob("*.h5"))


@pytest.fixture
def copied(embedded_dir, tmp_path) -> Path:
    """A writable copy of the embedded data dir."""
    shutil.copytree(embedded_dir, tmp_path / "data")
    return tmp_path / "data"


def strip_names(path: Path) -> None:
    """Rewrite an embeddings file as flowercli wrote it before name vectors existed."""
    emb = open_embeddings(path)
    emb.name_captions = emb.name_vectors = None
    write_embeddings(path, emb)


def config(root: Path, tmp_path: Path, **kw):
    return make_config("modern", **{"data_dir": root, "runs_dir": tmp_path / "runs", "run": "n", "device": "cpu",
                                    **TINY, **kw})


def test_templates_and_articles():
    assert len(set(NAME_TEMPLATES)) == len(NAME_TEMPLATES) >= 6
    assert name_caption("{a} {name}", "orange dahlia") == "an orange dahlia"
    assert name_caption("this is {a} {name}", "sunflower") == "this is a sunflower"
    assert name_caption("{name}", "sunflower") == "sunflower"
    rows = name_captions(["sunflower", "english marigold"])
    assert len(rows) == 2 and all(len(r) == len(NAME_TEMPLATES) for r in rows)
    assert "an english marigold" in rows[1] and all("{" not in c for r in rows for c in r)


def test_training_templates_are_not_the_eval_templates():
    from flowercli.metrics.names import TEMPLATES

    for name in ("sunflower", "orange dahlia", "english marigold", "bird of paradise"):
        ours = {name_caption(t, name) for t in NAME_TEMPLATES}
        assert len(ours) == len(NAME_TEMPLATES)
        assert not ours & {name_caption(t, name) for t in TEMPLATES}


def test_embed_writes_name_vectors(embedded_dir):
    emb = open_embeddings(emb_file(embedded_dir))
    names = read_class_names(DataLayout(embedded_dir))
    assert len(names) == N_CLASSES
    assert emb.name_captions == name_captions(names)
    assert emb.name_vectors.shape == (N_CLASSES, len(NAME_TEMPLATES), emb.dim)
    assert emb.name_vectors.dtype == emb.vectors.dtype == np.float16
    # The same encoder, pooling and storage as the captions.
    enc = TextEncoder.load(emb.attrs["encoder"], pooling=emb.attrs["pooling"], max_length=emb.attrs["max_length"],
                           device="cpu")
    direct = enc.encode([emb.name_captions[2][3]]).astype(np.float16)[0]
    np.testing.assert_allclose(emb.name_vectors[2, 3].astype(np.float32), direct.astype(np.float32), atol=2e-3)
    # A name caption that is also a human caption ("a red flower") gets the caption's vector.
    i = int(np.flatnonzero(emb.labels == 1)[0])
    j = emb.captions[i].index("a red flower")
    t = emb.name_captions[0].index("a red flower")
    np.testing.assert_allclose(emb.name_vectors[0, t].astype(np.float32), emb.vectors[i, j].astype(np.float32),
                               atol=2e-3)


def test_files_without_names_still_open(copied):
    path = emb_file(copied)
    strip_names(path)
    emb = open_embeddings(path)
    assert emb.name_captions is None and emb.name_vectors is None and emb.vectors.shape[1] == 10


def test_add_name_vectors_to_an_existing_file(copied, embedded_dir):
    path = emb_file(copied)
    strip_names(path)
    before = open_embeddings(path)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    names = read_class_names(DataLayout(copied))
    report = ListReporter()
    assert add_name_vectors(path, names, device="cpu", report=report) is True
    assert [kind for kind, _ in report.messages] == ["info"]
    after = open_embeddings(path)
    full = open_embeddings(emb_file(embedded_dir))
    assert after.name_captions == full.name_captions
    np.testing.assert_allclose(after.name_vectors.astype(np.float32), full.name_vectors.astype(np.float32), atol=2e-3)
    assert np.array_equal(after.vectors, before.vectors) and after.captions == before.captions
    assert {k: v for k, v in after.attrs.items()} == {k: v for k, v in before.attrs.items()}
    assert path.stat().st_mtime_ns == 1_000_000_000  # the default `train` picks the newest file: age kept
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left
    # Idempotent: a second call leaves the file alone.
    inode = path.stat().st_ino
    assert add_name_vectors(path, names, device="cpu") is False
    assert path.stat().st_ino == inode
    # Other names: rewritten with them.
    assert add_name_vectors(path, [n.upper() for n in names], device="cpu") is True
    assert open_embeddings(path).name_captions[0][0] == names[0].upper()


def test_add_name_vectors_is_atomic(copied, monkeypatch):
    path = emb_file(copied)
    strip_names(path)
    original = path.read_bytes()

    def fail(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(KeyboardInterrupt):
        add_name_vectors(path, read_class_names(DataLayout(copied)), device="cpu")
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_add_name_vectors_follows_the_file_settings(copied):
    path = emb_file(copied)
    emb = open_embeddings(path)
    emb.name_captions = emb.name_vectors = None
    emb.vectors = emb.vectors.astype(np.float32)
    emb.attrs["normalised"] = True
    write_embeddings(path, emb)
    assert add_name_vectors(path, read_class_names(DataLayout(copied)), device="cpu")
    vectors = open_embeddings(path).name_vectors
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, rtol=1e-5)


def test_add_name_vectors_refuses_too_few_names(copied):
    with pytest.raises(DataError, match="classnames.txt"):
        add_name_vectors(emb_file(copied), ["red"], device="cpu")


def batch_text(data, idx, step, seed=0):
    opts = StepOptions(torch.device("cpu"))
    g = step_generator(seed, step, 0, opts.device)
    gc = step_generator(seed, step, 0, torch.device("cpu"))
    return make_batch(data, idx, g, gc, make_config("modern", **TINY).model, opts)


def test_name_mix_zero_is_the_old_batch(embedded_dir, tmp_path):
    cfg = config(embedded_dir, tmp_path)
    data = load_train_data(cfg, emb_file(embedded_dir))
    assert data.name_mix == 0 and data.name_vectors is None
    idx = torch.arange(len(data.labels))
    b = batch_text(data, idx, step=3)
    # What make_batch computed before name_mix existed.
    gc = step_generator(0, 3, 0, torch.device("cpu"))
    cap = (torch.rand(len(idx), generator=gc) * data.n_captions[idx]).long()
    assert torch.equal(b.text, data.vectors[idx, cap])
    # Mixing names in changes nothing but the caption vectors (its draws come after, from the CPU generator).
    named = load_train_data(replace(cfg, name_mix=0.5), emb_file(embedded_dir))
    m = batch_text(named, idx, step=3)
    for field in ("x", "labels", "wrong", "wrong_mask", "z", "eps"):
        assert torch.equal(getattr(b, field), getattr(m, field)), field
    assert not torch.equal(b.text, m.text)


def test_name_mix_replaces_its_fraction_with_own_class_names(embedded_dir, tmp_path):
    cfg = config(embedded_dir, tmp_path, name_mix=0.3)
    data = load_train_data(cfg, emb_file(embedded_dir))
    emb = open_embeddings(emb_file(embedded_dir))
    raw = torch.from_numpy(emb.name_vectors[np.array(data.classes) - 1].astype(np.float32))
    assert torch.allclose(data.name_vectors, (raw - data.text_mean) / data.text_std)
    # Name vectors that cannot be mistaken for caption vectors: class k, template t -> 1000 + 10 k + t.
    n_cls, n_tpl, dim = data.name_vectors.shape
    marks = 1000.0 + 10 * torch.arange(n_cls)[:, None] + torch.arange(n_tpl)[None, :]
    data = replace(data, name_vectors=marks[:, :, None].expand(n_cls, n_tpl, dim).clone())
    idx = torch.arange(len(data.labels))
    real = torch.arange(data.vectors.shape[1])[None, :] < data.n_captions[:, None]
    named = total = 0
    templates = set()
    for step in range(120):
        text = batch_text(data, idx, step).text
        is_name = text[:, 0] >= 1000
        k, t = (text[is_name, 0].long() - 1000).div(10, rounding_mode="floor"), (text[is_name, 0].long() - 1000) % 10
        assert torch.equal(k, data.labels[is_name])  # a name of the image's own class
        assert torch.equal(text[is_name], text[is_name, :1].expand(-1, dim))
        templates.update(t.tolist())
        # The others are real captions of that very image.
        same = (text[:, None, :] == data.vectors[idx]).all(-1) & real
        assert same[~is_name].any(1).all()
        named += int(is_name.sum())
        total += len(idx)
    assert abs(named / total - 0.3) < 0.05  # 2,160 draws: 0.05 is 4.5 standard deviations
    assert templates == set(range(n_tpl))
    # The same seed and step give the same batch; another seed another one.
    assert torch.equal(batch_text(data, idx, 7).text, batch_text(data, idx, 7).text)
    assert not torch.equal(batch_text(data, idx, 7).text, batch_text(data, idx, 7, seed=1).text)


def test_training_adds_missing_name_vectors(copied, tmp_path):
    path = emb_file(copied)
    strip_names(path)
    report = ListReporter()
    result = train(config(copied, tmp_path, name_mix=0.5, max_steps=2), report)
    assert result.step == 2
    assert open_embeddings(path).name_vectors is not None
    assert sum("species-name" in m for _, m in report.messages) == 1
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["config"]["name_mix"] == 0.5
    # A second run finds them and says nothing about names.
    report = ListReporter()
    train(config(copied, tmp_path, name_mix=0.5, max_steps=1, run="n2"), report)
    assert not any("species-name" in m for _, m in report.messages)


def test_name_mix_needs_class_names(copied, tmp_path):
    strip_names(emb_file(copied))
    (copied / "oxford102" / "classnames.txt").unlink()
    with pytest.raises(DataError, match="classnames.txt"):
        train(config(copied, tmp_path, name_mix=0.1, max_steps=1))
    assert not (tmp_path / "runs").exists()
    train(config(copied, tmp_path, max_steps=1))  # without names training is as before


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, math.nan])
def test_bad_name_mix_is_refused(embedded_dir, tmp_path, value):
    with pytest.raises(InputError, match="name_mix"):
        train(config(embedded_dir, tmp_path, name_mix=value, max_steps=1))


def test_cli_set_name_mix(embedded_dir, tmp_path):
    args = ["train", "--data-dir", str(embedded_dir), "--runs-dir", str(tmp_path / "runs"), "--run", "c",
            "--set", "image_size=16", "--set", "g_channels=8", "--set", "d_channels=8", "--batch-size", "4",
            "--max-steps", "1", "--device", "cpu"]
    res = runner.invoke(app, args + ["--json", "--set", "name_mix=0.25"])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "runs" / "c" / "config.json").read_text())
    assert saved["config"]["name_mix"] == 0.25
    bad = runner.invoke(app, args + ["--run", "d", "--set", "name_mix=1"])
    assert bad.exit_code == 1 and "name_mix" in bad.output and "Traceback" not in bad.output
