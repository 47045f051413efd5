"""tools/release_model.py on a tiny checkpoint: the caption set of the release comes from the checkpoint."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from flowercli.checkpoint import SCHEMA_VERSION
from flowercli.models import Generator
from flowercli.runconfig import config_to_dict, make_config

TOOL = Path(__file__).resolve().parents[1] / "tools" / "release_model.py"
REED = {"archive": "captions_reed.tgz", "sha256": "f23b" * 16}
OTHER = {"archive": "captions_substitute.tgz", "sha256": "b04f" * 16}


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("release_model", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkpoint(folder: Path, captions: dict | None = None, meta: dict | None = None) -> Path:
    """A training checkpoint of a tiny generator, its embeddings' caption record `captions` (or none)."""
    cfg = make_config("modern", image_size=16, g_channels=8, d_channels=8, cond_dim=8, text_dim=8, n_classes=3)
    torch.manual_seed(0)
    encoder = {"encoder": "tiny", "dim": 8, "pooling": "mean"}
    if captions:
        encoder.update(captions_archive=captions["archive"], captions_sha256=captions["sha256"])
    state = {"schema_version": SCHEMA_VERSION, "flowercli_version": "0.1.0", "config": config_to_dict(cfg),
             "step": 3, "epoch": 1, "G_ema": Generator(cfg.model).state_dict(), "encoder": encoder,
             "data": {"split": "classes", "classes": [1, 2, 3]}, **({"meta": meta} if meta else {})}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "step-0000003.pt")
    return folder / "step-0000003.pt"


def release(tool, monkeypatch, source: Path, out: Path, *options: str) -> dict:
    """Run the tool; return generator.json and the card's text as {"json", "card"}."""
    monkeypatch.setattr(sys, "argv", ["release_model.py", str(source), "--out", str(out), *options])
    tool.main()
    return {"json": json.loads((out / "generator.json").read_text()), "card": (out / "README.md").read_text()}


def test_caption_set_comes_from_the_checkpoint(tool, monkeypatch, tmp_path):
    src = checkpoint(tmp_path / "run", REED)
    got = release(tool, monkeypatch, src, tmp_path / "out")
    assert got["json"]["data"]["caption_set"] == REED
    assert f"caption set `{REED['archive']}`, sha256 `{REED['sha256']}`." in got["card"]
    # A note joins the same set in both files.
    got = release(tool, monkeypatch, src, tmp_path / "noted", "--captions-note", "Checked at release.",
                  "--captions-sha256", REED["sha256"])
    assert got["json"]["data"]["caption_set"] == {**REED, "note": "Checked at release."}
    assert f"sha256 `{REED['sha256']}`. Checked at release." in got["card"]


def test_options_name_what_the_checkpoint_does_not_record(tool, monkeypatch, tmp_path):
    src = checkpoint(tmp_path / "old")  # embeddings made before the caption record
    with pytest.raises(SystemExit, match=r"does not record which caption set it was trained on .*"
                                         r"--captions-archive NAME --captions-sha256 HEX"):
        release(tool, monkeypatch, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything is written
    got = release(tool, monkeypatch, src, tmp_path / "out", "--captions-archive", OTHER["archive"],
                  "--captions-sha256", OTHER["sha256"])
    assert got["json"]["data"]["caption_set"] == OTHER
    # Released again from its own output: the record it carries now is the default, options override it.
    again = tmp_path / "out" / "generator.safetensors"
    assert release(tool, monkeypatch, again, tmp_path / "again")["json"]["data"]["caption_set"] == OTHER
    renamed = release(tool, monkeypatch, again, tmp_path / "renamed", "--captions-archive", "subst.tgz")
    assert renamed["json"]["data"]["caption_set"] == {**OTHER, "archive": "subst.tgz"}
    assert "caption set `subst.tgz`" in renamed["card"]
    # Another sha256 is another set: the earlier record's archive name does not stay with it.
    other = release(tool, monkeypatch, again, tmp_path / "other", "--captions-sha256", REED["sha256"])
    assert other["json"]["data"]["caption_set"] == {"archive": "unknown", "sha256": REED["sha256"]}


def test_options_cannot_contradict_the_embeddings_record(tool, monkeypatch, tmp_path):
    src = checkpoint(tmp_path / "run", REED)
    for option, value in (("--captions-sha256", OTHER["sha256"]), ("--captions-archive", OTHER["archive"])):
        with pytest.raises(SystemExit, match=rf"^{option} {value} contradicts .*step-0000003.pt, trained on the "
                                             rf"caption set captions_reed.tgz \(sha256 {REED['sha256']}\)"):
            release(tool, monkeypatch, src, tmp_path / "out", option, value)
    assert not (tmp_path / "out").exists()
