"""Safe extraction: corrupt archives, hostile members, and the limits of each kind of archive.
"""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

import flowercli.download as dl
from flowercli.cli import app
from flowercli.config import ArchiveLimits, DownloadConfig
from flowercli.download import archive as archive_mod
from flowercli.errors import DataError

from download_support import (
    captions_members,
    cfg,
    copy_sources,
    dataset_files,
    leftovers,
    one_line_error,
    write_archive,
    write_sums,
)

runner = CliRunner()


# ---------------------------------------------------------------------------------------------
# Corrupt archives


def test_corrupt_archive_with_matching_checksum(sources_dir, tmp_path):
    mirror = copy_sources(sources_dir, tmp_path / "mirror")
    raw = (mirror / "102flowers.tgz").read_bytes()
    (mirror / "102flowers.tgz").write_bytes(raw[: len(raw) // 2])  # truncated ...
    write_sums(mirror)  # ... yet listed in SHA256SUMS: only extraction can tell
    r = runner.invoke(app, ["download", "--mirror", str(mirror), "-d", str(tmp_path / "data")])
    assert "102flowers.tgz is corrupt" in one_line_error(r)
    assert not (tmp_path / "data" / "oxford102").exists() and leftovers(tmp_path / "data") == []


def test_captions_archive_that_is_not_an_archive(sources_dir, tmp_path):
    (tmp_path / "caps.tgz").write_bytes(b"<html>not found</html>")
    r = runner.invoke(app, ["download", "--mirror", str(sources_dir), "--captions", str(tmp_path / "caps.tgz"),
                            "-d", str(tmp_path / "data")])
    assert "caps.tgz is corrupt or not a tar/zip archive" in one_line_error(r)


# ---------------------------------------------------------------------------------------------
# Hostile archives (issue 7)


def _tar(path: Path, *infos: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w:gz") as t:
        t.addfile(_file("ok/readme.txt", b"fine"), io.BytesIO(b"fine"))
        for info in infos:
            t.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return path


def _file(name: str, data: bytes = b"evil") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info


def _special(name: str, type_: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = type_, link
    return info


TAR_ATTACKS = {
    "absolute path": _file("/tmp/flowercli-evil"),
    "dotdot": _file("../evil"),
    "nested dotdot": _file("ok/../../evil"),
    "symlink absolute": _special("ok/passwd", tarfile.SYMTYPE, "/etc/passwd"),
    "symlink up": _special("ok/up", tarfile.SYMTYPE, "../../evil"),
    "hardlink up": _special("ok/hard", tarfile.LNKTYPE, "../evil"),
    "char device": _special("ok/null", tarfile.CHRTYPE),
    "block device": _special("ok/sda", tarfile.BLKTYPE),
    "fifo": _special("ok/fifo", tarfile.FIFOTYPE),
}


@pytest.mark.parametrize("attack", list(TAR_ATTACKS))
def test_hostile_tar_is_refused(tmp_path, attack):
    archive = _tar(tmp_path / "evil.tgz", TAR_ATTACKS[attack])
    dest = tmp_path / "box" / "dest"
    with pytest.raises(DataError, match=r"refusing to extract evil\.tgz: member"):
        dl.safe_extract(archive, dest)
    assert not (tmp_path / "box" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not Path("/tmp/flowercli-evil").exists()


def _zip(path: Path, name: str, data: bytes = b"evil", mode: int | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ok/readme.txt", b"fine")
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.create_system = 3
            info.external_attr = mode << 16
        z.writestr(info, data)
    return path


ZIP_ATTACKS = {
    "absolute path": ("/tmp/flowercli-evil", b"evil", None),
    "dotdot": ("../evil", b"evil", None),
    "backslash dotdot": ("ok\\..\\..\\evil", b"evil", None),
    "drive letter": ("C:/evil", b"evil", None),
    "symlink up": ("ok/up", b"../../evil", stat.S_IFLNK | 0o777),
    "symlink absolute": ("ok/passwd", b"/etc/passwd", stat.S_IFLNK | 0o777),
    "char device": ("ok/null", b"", stat.S_IFCHR | 0o666),
    "fifo": ("ok/fifo", b"", stat.S_IFIFO | 0o666),
}


@pytest.mark.parametrize("attack", list(ZIP_ATTACKS))
def test_hostile_zip_is_refused(tmp_path, attack):
    archive = _zip(tmp_path / "evil.zip", *ZIP_ATTACKS[attack])
    dest = tmp_path / "box" / "dest"
    with pytest.raises(DataError, match=r"refusing to extract evil\.zip: member"):
        dl.safe_extract(archive, dest)
    assert not (tmp_path / "box" / "evil").exists() and not (tmp_path / "evil").exists()


def limits(**kw) -> ArchiveLimits:
    """Generous limits but for the ones a test sets."""
    return replace(ArchiveLimits(total_bytes=2**30, members=1000, member_bytes=2**30, ratio=1e9), **kw)


def test_extraction_limits_and_harmless_oddities(tmp_path):
    many = _tar(tmp_path / "many.tgz", *[_file(f"ok/f{i}") for i in range(5)])
    with pytest.raises(DataError, match="limit of 3 members"):
        dl.safe_extract(many, tmp_path / "a", limits=limits(members=3))
    big = _tar(tmp_path / "big.tgz", _file("ok/big", b"x" * 1000))
    with pytest.raises(DataError, match="limit of 500 bytes"):
        dl.safe_extract(big, tmp_path / "b", limits=limits(total_bytes=500))
    bigzip = _zip(tmp_path / "big.zip", "ok/big", b"x" * 1000)
    with pytest.raises(DataError, match="limit of 500 bytes"):
        dl.safe_extract(bigzip, tmp_path / "c", limits=limits(total_bytes=500))
    assert not any((tmp_path / d).exists() for d in "abc")  # refused before a byte was written
    # Inside links are skipped or copied, setuid bits dropped: nothing points anywhere.
    setuid = _file("ok/tool", b"#!/bin/sh\n")
    setuid.mode = 0o4755
    odd = _tar(tmp_path / "odd.tgz", setuid, _special("ok/inner", tarfile.SYMTYPE, "readme.txt"),
               _special("ok/copy", tarfile.LNKTYPE, "ok/readme.txt"))
    files = dl.safe_extract(odd, tmp_path / "d")
    assert sorted(files) == ["ok/copy", "ok/readme.txt", "ok/tool"]
    assert not (tmp_path / "d" / "ok" / "inner").exists()
    assert (tmp_path / "d" / "ok" / "copy").read_bytes() == b"fine"
    assert stat.S_IMODE((tmp_path / "d" / "ok" / "tool").stat().st_mode) & 0o7111 == 0


def test_hostile_captions_archive_through_the_cli(sources_dir, tmp_path):
    members = captions_members(sources_dir) + [("../../escaped.txt", b"gotcha")]
    (tmp_path / "work").mkdir()
    caps = write_archive(tmp_path / "work" / "caps.tgz", members)
    r = runner.invoke(app, ["download", "--mirror", str(sources_dir), "--captions", str(caps),
                            "-d", str(tmp_path / "work" / "data")])
    assert "refusing to extract caps.tgz" in one_line_error(r)
    assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path / "work" / "data" / "oxford102").exists()


def test_hard_links_count_towards_the_size_limit_and_clashes_are_refused(tmp_path):
    links = [_special(f"ok/copy{i}", tarfile.LNKTYPE, "ok/big") for i in range(5)]
    bomb = _tar(tmp_path / "links.tgz", _file("ok/big", b"x" * 200), *links)
    with pytest.raises(DataError, match="limit of 500 bytes"):
        dl.safe_extract(bomb, tmp_path / "a", limits=limits(total_bytes=500))
    assert not (tmp_path / "a").exists()  # what was written before the refusal is gone
    clash = _tar(tmp_path / "clash.tgz", _file("ok/readme.txt/inner"))
    with pytest.raises(DataError, match="clashes with another member"):
        dl.safe_extract(clash, tmp_path / "b")


# Each kind of archive has limits that fit what it can be (config.CAPTIONS_LIMITS, IMAGES_LIMITS).
# Bombs are made of zeros or repeated text: kilobytes on disk, refused long before they unpack.
CAPTION_BOMBS = {
    # one "caption file" of 1.3 MB (the cap is 1 MB): refused from its header, before it is written
    "member past the cap": ([("text_c10/class_00001/notes.txt", b"a red flower\n" * 100_000)],
                            "larger than the limit of 1,048,576 bytes for one file of a captions archive"),
    # 30 files of 400 KB zeros, each under the cap, 12 MB in all from ~15 KB: a ratio of ~800 (limit 100)
    "ratio bomb": ([(f"text_c10/class_00001/pad_{i:02d}.txt", bytes(400_000)) for i in range(30)],
                   "100 times the archive's"),
}


@pytest.mark.parametrize("suffix", [".tgz", ".zip"])
@pytest.mark.parametrize("bomb", list(CAPTION_BOMBS))
def test_captions_archive_past_its_limits_is_refused(sources_dir, tmp_path, bomb, suffix):
    data = tmp_path / "data"
    dl.download(cfg(data, mirror=str(sources_dir)))
    before = dataset_files(data)
    extra, says = CAPTION_BOMBS[bomb]
    caps = write_archive(tmp_path / f"caps{suffix}", captions_members(sources_dir) + extra)
    assert caps.stat().st_size < 100_000
    r = runner.invoke(app, ["download", "--mirror", str(sources_dir), "--captions", str(caps), "-d", str(data)])
    err = one_line_error(r)
    assert f"refusing to extract caps{suffix}" in err and says in err
    assert dataset_files(data) == before and leftovers(data) == []


def test_member_that_unpacks_past_its_header_is_refused_while_writing(sources_dir, tmp_path, monkeypatch):
    """A header that under-states a member's size: the bytes written are counted, the half file removed."""
    big = tmp_path / "big.tgz"
    write_archive(big, [("text_c10/a.txt", b"x" * 5000), ("text_c10/b.txt", b"y" * 10)])
    real = archive_mod._tar_members
    monkeypatch.setattr(archive_mod, "_tar_members", lambda p: ((n, k, 1, li, o) for n, k, _s, li, o in real(p)))
    dest = tmp_path / "box"
    dest.mkdir()
    (dest / "kept.txt").write_text("not ours")
    with pytest.raises(DataError, match="a.txt' is larger than the limit of 1,000 bytes for one file of a captions"):
        dl.safe_extract(big, dest, limits=limits(member_bytes=1000), what="a captions archive")
    assert sorted(p.name for p in dest.rglob("*")) == ["kept.txt", "text_c10"]  # no half a.txt


@pytest.mark.parametrize("role", ["captions", "images"])
def test_archive_with_more_members_than_its_kind_allows(sources_dir, tmp_path, role):
    """The member cap of each kind (lowered here: the fixture's archives have ~30 members)."""
    data = tmp_path / "data"
    dl.download(cfg(data, mirror=str(sources_dir)))
    before = dataset_files(data)
    low = {f"{role}_limits": replace(getattr(DownloadConfig(data_dir=data), f"{role}_limits"), members=10)}
    with pytest.raises(DataError) as info:
        dl.download(cfg(data, mirror=str(sources_dir), force=True, **low))
    what = "a captions archive" if role == "captions" else "the images archive"
    assert f"limit of 10 members for {what}" in str(info.value) and "\n" not in str(info.value)
    assert dataset_files(data) == before and leftovers(data) == []
