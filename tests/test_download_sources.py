"""Sources and the checksums they must match: a mirror's SHA256SUMS or the official md5, a bad
checksum (one line, exit 1, nothing good lost), a mirror that lacks a file or the captions.
"""

from __future__ import annotations

import re
import shutil

import pytest
from typer.testing import CliRunner

import flowercli.download as dl
from flowercli.cli import app
from flowercli.errors import ChecksumError

from download_support import cfg, copy_sources, dataset_files, leftovers, one_line_error

runner = CliRunner()


def test_wrong_checksum_keeps_previous_data(sources_dir, tmp_path):
    data = tmp_path / "data"
    assert runner.invoke(app, ["download", "--mirror", str(sources_dir), "-d", str(data)]).exit_code == 0
    before = {k: v for k, v in dataset_files(data).items()}
    kept = (data / ".downloads" / "102flowers.tgz").read_bytes()
    bad = copy_sources(sources_dir, tmp_path / "bad")
    sums = (bad / "SHA256SUMS").read_text()
    (bad / "SHA256SUMS").write_text(re.sub(r"^[0-9a-f]{64}(?=  102flowers)", "0" * 64, sums, flags=re.M))
    r = runner.invoke(app, ["download", "--mirror", str(bad), "-d", str(data)])
    err = one_line_error(r)
    assert "checksum mismatch for 102flowers.tgz" in err and "SHA256SUMS" in err
    assert dataset_files(data) == before  # the installed dataset is untouched
    assert (data / ".downloads" / "102flowers.tgz").read_bytes() == kept  # so is the verified archive
    assert (data / ".downloads" / "102flowers.tgz.bad").exists() and leftovers(data) == []


def test_corrupted_mirror_file_fails_on_a_fresh_data_dir(sources_dir, tmp_path):
    bad = copy_sources(sources_dir, tmp_path / "bad")
    raw = bytearray((bad / "imagelabels.mat").read_bytes())
    raw[-5] ^= 0xFF
    (bad / "imagelabels.mat").write_bytes(raw)
    r = runner.invoke(app, ["download", "--mirror", str(bad), "-d", str(tmp_path / "data"), "-q"])
    assert "checksum mismatch for imagelabels.mat" in one_line_error(r)
    assert r.stderr.count("\n") == 1  # with -q the error is all there is
    assert not (tmp_path / "data" / "oxford102").exists()


def test_mirror_without_sha256sums_is_checked_against_the_official_md5(sources_dir, tmp_path):
    mirror = copy_sources(sources_dir, tmp_path / "mirror")
    (mirror / "SHA256SUMS").unlink()
    with pytest.raises(ChecksumError, match=r"102flowers\.tgz.*official md5"):
        dl.download(cfg(tmp_path / "data", mirror=str(mirror)))


def test_mirror_missing_a_file_or_captions(sources_dir, tmp_path):
    mirror = copy_sources(sources_dir, tmp_path / "mirror")
    (mirror / "setid.mat").unlink()
    r = runner.invoke(app, ["download", "--mirror", str(mirror), "-d", str(tmp_path / "data")])
    assert "has no setid.mat" in one_line_error(r)
    shutil.copy(sources_dir / "setid.mat", mirror)
    (mirror / "captions.tgz").rename(mirror / "captions_substitute.tgz")
    r = runner.invoke(app, ["download", "--mirror", str(mirror), "-d", str(tmp_path / "data")])
    err = one_line_error(r)
    assert "holds no captions archive" in err and "--captions" in err and "captions_substitute.tgz" in err
    r = runner.invoke(app, ["download", "--mirror", str(tmp_path / "nowhere"), "-d", str(tmp_path / "data")])
    assert "is not a folder" in one_line_error(r)
