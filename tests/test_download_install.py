"""`flowercli download` end to end from a local mirror: the installed dataset, the CLI, where the
captions archive puts its files, faults during install, and one download per data directory.
"""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
from typer.testing import CliRunner

import flowercli.download as dl
from flowercli.cli import app
from flowercli.config import DataLayout
from flowercli.data import class_split_of, read_class_splits
from flowercli.download import fetch, install
from flowercli.errors import DataError
from flowercli.report import ListReporter

from conftest import N_CLASSES, N_IMAGES, image_label, sha256
from download_support import (
    captions_members,
    cfg,
    copy_sources,
    dataset_files,
    leftovers,
    one_line_error,
    write_archive,
)

runner = CliRunner()


# ---------------------------------------------------------------------------------------------
# Local mirror, CLI


def test_local_mirror_installs_a_complete_dataset(sources_dir, tmp_path):
    report = ListReporter()
    manifest = dl.download(cfg(tmp_path / "data", mirror=str(sources_dir)), report)
    layout = DataLayout(tmp_path / "data")
    assert manifest["status"] == "installed"
    assert len(list(layout.jpg.glob("image_*.jpg"))) == N_IMAGES
    assert len(list(layout.text_c10.glob("class_*/image_*.txt"))) == N_IMAGES
    assert layout.labels_mat.read_bytes() == (sources_dir / "imagelabels.mat").read_bytes()
    assert all(layout.split_file(s).is_file() for s in ("all", "trainval", "test", "train", "val"))
    on_disk = json.loads(layout.manifest.read_text())
    assert on_disk["counts"]["images"] == N_IMAGES and on_disk["counts"]["classes"] == N_CLASSES
    assert on_disk["counts"]["captions"] == 10 * N_IMAGES
    assert on_disk["counts"]["images_with_fewer_than_10_captions"] == 0
    sums = dict(reversed(line.split("  ")) for line in (sources_dir / "SHA256SUMS").read_text().splitlines())
    for role, name in [("images", "102flowers.tgz"), ("labels", "imagelabels.mat"), ("captions", "captions.tgz")]:
        assert on_disk["sources"][role]["sha256"] == sums[name]
        assert on_disk["sources"][role]["verified_with"] == "SHA256SUMS of the mirror"
        assert (layout.downloads / name).is_file()  # archives kept for the next run
    # The miniature set is not the official one: a warning, not a failure.
    assert any(kind == "warn" and "8,189" in msg for kind, msg in report.messages)
    assert leftovers(tmp_path / "data") == [] and not list(layout.downloads.glob("*.part"))


def test_cli_summary_and_json(sources_dir, tmp_path):
    data = tmp_path / "data"
    r = runner.invoke(app, ["download", "--mirror", str(sources_dir), "--data-dir", str(data)])
    assert r.exit_code == 0, r.output
    assert f"{N_IMAGES} images, {N_CLASSES} classes, {10 * N_IMAGES} captions" in r.stderr and "installed" in r.stderr
    assert r.stdout == ""
    r = runner.invoke(app, ["download", "--mirror", str(sources_dir), "--json"], env={"FLOWERCLI_DATA_DIR": str(data)})
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["status"] == "verified" and info["images"] == N_IMAGES and info["dataset"] == str(data / "oxford102")
    assert info["sources"]["images"] == str(sources_dir / "102flowers.tgz")


def test_help_has_examples():
    r = runner.invoke(app, ["download", "--help"])
    assert r.exit_code == 0
    for text in ("Examples:", "flowercli download --mirror", "--captions", "--data-dir", "--force", "--json",
                 "--quiet"):
        assert text in r.stdout, text


# ---------------------------------------------------------------------------------------------
# Where the captions archive puts its files


def test_captions_archive_without_text_c10(sources_dir, tmp_path):
    members = [(n, d) for n, d in captions_members(sources_dir) if not n.startswith("text_c10")]
    caps = write_archive(tmp_path / "caps.tgz", members)
    r = runner.invoke(app, ["download", "--mirror", str(sources_dir), "--captions", str(caps),
                            "-d", str(tmp_path / "d")])
    err = one_line_error(r)
    assert "holds no text_c10/" in err and "--captions" in err
    assert not (tmp_path / "d" / "oxford102").exists()


@pytest.mark.parametrize("drop, missing", [
    ({"testclasses.txt"}, r"has no testclasses\.txt"),
    ({"trainvalclasses.txt", "valclasses.txt"},
     r"has no trainvalclasses\.txt \(or trainclasses\.txt \+ valclasses\.txt\)"),
])
def test_captions_archive_missing_a_split_file(sources_dir, tmp_path, drop, missing):
    members = [(n, d) for n, d in captions_members(sources_dir) if n not in drop]
    caps = write_archive(tmp_path / "caps.zip", members)
    with pytest.raises(DataError, match=missing):
        dl.download(cfg(tmp_path / "data", mirror=str(sources_dir), captions=str(caps)))


def test_captions_archive_with_only_trainval_and_test(sources_dir, tmp_path):
    """The shape of public copies of the Reed et al. archive: no train/val/all files. `all` is derived,
    every training class counts as "train", and the summary says which files were found."""
    keep = {"trainvalclasses.txt", "testclasses.txt"}
    members = [(n, d) for n, d in captions_members(sources_dir) if not n.endswith("classes.txt") or n in keep]
    caps = write_archive(tmp_path / "reed.tgz", members)
    r = runner.invoke(app, ["download", "--mirror", str(sources_dir), "--captions", str(caps),
                            "-d", str(tmp_path / "data"), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["split_files"] == ["trainvalclasses.txt", "testclasses.txt"]
    assert info["caption_set"] == {"archive": "reed.tgz", "sha256": sha256(caps)}
    layout = DataLayout(tmp_path / "data")
    assert sorted(p.name for p in layout.dataset.glob("*classes.txt")) == ["testclasses.txt", "trainvalclasses.txt"]
    splits = read_class_splits(layout)
    assert "train" not in splits and "val" not in splits
    assert splits["all"] == sorted(splits["trainval"] + splits["test"])
    labels = np.array([image_label(i) for i in range(1, N_IMAGES + 1)])
    cs = class_split_of(labels, splits)
    assert set(cs) == {"train", "test"} and (cs == "test").sum() == np.isin(labels, splits["test"]).sum()
    # A second run verifies without re-extracting, although three split files are absent.
    r = runner.invoke(app, ["download", "--mirror", str(sources_dir), "--captions", str(caps),
                            "-d", str(tmp_path / "data"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["status"] == "verified"


@pytest.mark.parametrize("layout", ["flat.tgz", "deep.zip"])
def test_captions_found_wherever_they_sit(sources_dir, tmp_path, layout):
    members = captions_members(sources_dir)
    if layout == "deep.zip":  # text_c10 two folders down; split files one level above it
        members = [(f"release/v1/{n}", d) for n, d in members] + [("release/v1/classnames.txt", b"a\nb\nc\nd\n"),
                                                                  ("release/README", b"hi")]
    caps = write_archive(tmp_path / layout, members)
    manifest = dl.download(cfg(tmp_path / "data", mirror=str(sources_dir), captions=str(caps)))
    layout_ = DataLayout(tmp_path / "data")
    assert manifest["counts"]["captions"] == 10 * N_IMAGES
    assert manifest["sources"]["captions"]["verified_with"].startswith("none")
    assert (layout_.dataset / "classnames.txt").exists() == (layout == "deep.zip")
    assert not (layout_.dataset / "README").exists() and not (layout_.dataset / "release").exists()


# ---------------------------------------------------------------------------------------------
# Interruptions and faults during install


def test_failure_during_reinstall_keeps_the_previous_dataset(sources_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    dl.download(cfg(data, mirror=str(sources_dir)))
    before = dataset_files(data)
    manifest = DataLayout(data).manifest.read_text()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(install, "validate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dl.download(cfg(data, mirror=str(sources_dir), force=True))
    assert dataset_files(data) == before and DataLayout(data).manifest.read_text() == manifest
    assert leftovers(data) == []


def test_stale_temporary_folders_are_cleared(sources_dir, tmp_path):
    data = tmp_path / "data"
    stale = data / ".oxford102.tmp-killed" / "oxford102" / "jpg"
    stale.mkdir(parents=True)
    (stale / "image_00001.jpg").write_bytes(b"half")
    dl.download(cfg(data, mirror=str(sources_dir)))
    assert leftovers(data) == []


def test_disk_full_is_one_line_and_loses_nothing(sources_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    dl.download(cfg(data, mirror=str(sources_dir)))
    before = dataset_files(data)
    mirror = copy_sources(sources_dir, tmp_path / "mirror")
    (data / ".downloads" / "setid.mat").unlink()  # so that it has to be copied again

    def full(src, dst, task):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst.name))

    monkeypatch.setattr(fetch, "_copy_with_progress", full)
    r = runner.invoke(app, ["download", "--mirror", str(mirror), "-d", str(data)])
    assert "no space left on the device" in one_line_error(r)
    assert dataset_files(data) == before


def test_a_second_download_into_the_same_data_dir_is_refused(sources_dir, tmp_path):
    import fcntl

    layout = DataLayout(tmp_path / "data")
    layout.downloads.mkdir(parents=True)
    with open(layout.downloads / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # what a running download holds
        r = runner.invoke(app, ["download", "--mirror", str(sources_dir), "-d", str(layout.root)])
        assert "another flowercli download is working" in one_line_error(r)
    assert dl.download(cfg(layout.root, mirror=str(sources_dir)))["status"] == "installed"
