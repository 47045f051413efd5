"""Safe extraction of tar (any compression) and zip archives within ArchiveLimits.

The one place that unpacks files from the network: hostile member names, links pointing outside,
special files and archive bombs are refused before anything lands outside the target folder, and a
refused or failed extraction leaves nothing behind.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from flowercli.config import IMAGES_LIMITS, ArchiveLimits
from flowercli.errors import DataError
from flowercli.fsutil import CHUNK
from flowercli.report import Reporter

try:  # Python builds without liblzma exist; .tar.xz is then simply unsupported.
    import lzma

    _LZMA_ERRORS: tuple[type[BaseException], ...] = (lzma.LZMAError,)
except ImportError:  # pragma: no cover
    _LZMA_ERRORS = ()


class _Corrupt(Exception):
    pass


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


_READ_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError, NotImplementedError, *_LZMA_ERRORS,
)


def _archive_kind(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4)
    return "zip" if head[:4] in (b"PK\x03\x04", b"PK\x05\x06") else "tar"


# (name, kind, size, link target, opener) for every member, in archive order.
_Member = tuple[str, str, int, str, Callable[[], BinaryIO]]


def _tar_members(path: Path) -> Iterator[_Member]:
    try:
        tar = tarfile.open(path, "r:*")
    except tarfile.ReadError:
        raise _Corrupt("not a tar, tar.gz, tar.bz2, tar.xz or zip file") from None
    except _READ_ERRORS as e:
        raise _Corrupt(_one_line(e)) from None
    with tar:
        it = iter(tar)
        while True:
            try:
                m = next(it)
            except StopIteration:
                _drain(tar.fileobj)
                return
            except _READ_ERRORS as e:
                raise _Corrupt(_one_line(e)) from None
            if m.isreg():
                kind = "file"
            elif m.isdir():
                kind = "dir"
            elif m.issym():
                kind = "symlink"
            elif m.islnk():
                kind = "hardlink"
            elif m.ischr() or m.isblk():
                kind = "device"
            elif m.isfifo():
                kind = "fifo"
            else:
                kind = "special file"
            yield m.name, kind, m.size, m.linkname, (lambda m=m: tar.extractfile(m))  # type: ignore[misc]


class _Readable(Protocol):
    """What _drain needs of a stream: a tar's fileobj is no BinaryIO, only something to read."""

    def read(self, size: int, /) -> bytes: ...


def _drain(fileobj: _Readable) -> None:
    """Read a tar's compressed stream to its very end.

    tarfile stops at the end-of-archive blocks, before the gzip/bz2/xz trailer whose CRC covers
    every byte: without this, damage inside a stored (incompressible) member goes unnoticed.
    """
    try:
        while fileobj.read(CHUNK):
            pass
    except _READ_ERRORS as e:
        raise _Corrupt(_one_line(e)) from None


def _zip_members(path: Path, read_links: bool = True) -> Iterator[_Member]:
    try:
        zf = zipfile.ZipFile(path)
    except _READ_ERRORS as e:
        raise _Corrupt(_one_line(e)) from None
    with zf:
        for info in zf.infolist():
            mode = info.external_attr >> 16
            link = ""
            if info.flag_bits & 0x1:
                kind = "encrypted file"
            elif info.is_dir() or stat.S_ISDIR(mode):
                kind = "dir"
            elif stat.S_ISLNK(mode):
                kind = "symlink"
                try:
                    link = zf.read(info)[:4096].decode("utf-8", "replace") if read_links else ""
                except _READ_ERRORS as e:
                    raise _Corrupt(_one_line(e)) from None
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                kind = "device"
            elif stat.S_ISFIFO(mode):
                kind = "fifo"
            elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: no Unix type recorded (plain file)
                kind = "special file"
            else:
                kind = "file"
            yield info.filename, kind, info.file_size, link, (lambda info=info: zf.open(info))  # type: ignore[misc]


def _safe_relpath(name: str) -> tuple[str | None, str | None]:
    """(relative path, None) for a harmless member name, (None, why) for a hostile one."""
    if "\x00" in name:
        return None, "has a NUL byte in its name"
    name = name.replace("\\", "/")  # a Windows separator must not smuggle in `..\\`
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return None, "has an absolute path"
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None, "has a '..' path component"
    return ("/".join(parts) or None), None


def safe_extract(archive: Path, dest: Path, *, select: Callable[[str], bool] | None = None,
                 limits: ArchiveLimits = IMAGES_LIMITS, what: str = "an archive",
                 report: Reporter = Reporter()) -> list[str]:
    """Extract a tar (any compression) or zip archive into `dest`; return the files written.

    Refuses the whole archive (DataError) when any member has an absolute path or a `..`
    component, is a link pointing outside `dest`, is a device, fifo or other special file, or when
    it passes one of `limits` (`what` names the kind of archive in the message). The limits are
    checked from the headers before anything is written (a zip's central directory; a tar's headers,
    spread through its stream, each before its member) and again on the bytes actually written,
    which a lying header cannot dodge. A refused or failed extraction leaves nothing: what it wrote
    is removed. Links inside the archive are not recreated (the dataset has none); hard links become
    copies. Files are written 0644 regardless of the modes stored in the archive. `select(relpath)`
    limits what is written; every member is still checked.
    """
    is_zip = _archive_kind(archive) == "zip"
    members = _zip_members if is_zip else _tar_members
    packed = max(archive.stat().st_size, 1)
    max_total = min(limits.total_bytes, int(limits.ratio * packed))

    def refuse(why: str, name: str) -> DataError:
        return DataError(f"refusing to extract {archive.name}: member {name[:200]!r} {why}; "
                         "the archive is unsafe or damaged")

    def too_much(total: int, name: str) -> DataError:
        if total > limits.total_bytes:
            return refuse(f"takes the extracted size beyond the limit of {limits.total_bytes:,} bytes for {what}", name)
        return refuse(f"takes the extracted size beyond {limits.ratio:g} times the archive's {packed:,} bytes, the "
                      f"limit for {what} (a compression bomb?)", name)

    def too_big(name: str) -> DataError:
        return refuse(f"is larger than the limit of {limits.member_bytes:,} bytes for one file of {what}", name)

    def check_header(count: int, kind: str, size: int, total: int, rel: str | None, name: str) -> int:
        """The limits a header alone can break; returns the declared total so far."""
        if count > limits.members:
            raise refuse(f"is beyond the limit of {limits.members:,} members for {what}", name)
        if kind != "file" or rel is None or (select is not None and not select(rel)):
            return total
        if size > limits.member_bytes:
            raise too_big(name)
        if total + size > max_total:
            raise too_much(total + size, name)
        return total + size

    created = not dest.exists()
    written: list[str] = []
    done: set[str] = set()
    folders: set[Path] = set()  # already created: saves a mkdir call per file
    total = declared = count = 0
    try:
        if is_zip:
            _zip_precheck(archive, check_header)
        dest.mkdir(parents=True, exist_ok=True)
        with report.task(f"Extracting {archive.name}") as task:
            for name, kind, size, link, open_member in members(archive):
                count += 1
                rel, why = _safe_relpath(name)
                declared = check_header(count, kind, size, declared, rel, name)
                if why:
                    raise refuse(why, name)
                if rel is None:
                    continue
                if kind in ("device", "fifo", "special file", "encrypted file"):
                    raise refuse(f"is a {kind}", name)
                if kind == "symlink":
                    target = link.replace("\\", "/")
                    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
                    if target.startswith("/") or re.match(r"^[A-Za-z]:", target) or resolved == ".." \
                            or resolved.startswith("../"):
                        raise refuse(f"is a link pointing outside the archive ({target[:200]!r})", name)
                    report.debug(f"{archive.name}: not recreating symlink {rel}")
                    continue
                if kind == "hardlink":
                    linked, why = _safe_relpath(link)
                    if why or linked is None:
                        raise refuse(f"is a hard link pointing outside the archive ({link[:200]!r})", name)
                    if (select is not None and not select(rel)) or linked not in done:
                        continue
                    source = dest.joinpath(*linked.split("/"))
                    size = source.stat().st_size  # copies count too, or links would dodge the limits
                    kind = "copy"
                elif select is not None and not select(rel):
                    continue
                path = dest.joinpath(*rel.split("/"))
                try:
                    if kind == "dir":
                        path.mkdir(parents=True, exist_ok=True)
                        continue
                    if kind == "copy" and total + size > max_total:
                        raise too_much(total + size, name)
                    if path.parent not in folders:
                        path.parent.mkdir(parents=True, exist_ok=True)
                        folders.add(path.parent)
                    if kind == "copy":
                        shutil.copyfile(source, path, follow_symlinks=False)
                        total += size
                    else:
                        # The declared size can lie (zip bombs): count what actually comes out.
                        # The lambda runs inside _write_member, in this iteration: `name` and `total`
                        # are this member's.
                        limit = min(limits.member_bytes, max_total - total)
                        total += _write_member(open_member, path, limit,
                                               lambda n: too_big(name) if n > limits.member_bytes  # noqa: B023
                                               else too_much(total + n, name))  # noqa: B023
                except (FileExistsError, NotADirectoryError, IsADirectoryError):
                    raise refuse("clashes with another member (a file and a folder of the same name)", name) from None
                written.append(rel)
                done.add(rel)
                task.advance()
    except BaseException as e:
        # Nothing half-extracted stays behind: the folder if this call made it, else the files it wrote.
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        else:
            for rel in written:
                dest.joinpath(*rel.split("/")).unlink(missing_ok=True)
        if isinstance(e, _Corrupt):
            raise DataError(f"{archive.name} is corrupt or not a tar/zip archive ({e}); "
                            "check where it came from") from None
        raise
    return written


def _zip_precheck(archive: Path, check_header: Callable[..., int]) -> None:
    """The limits checked on a zip's central directory, before a byte is extracted."""
    declared = 0
    for count, (name, kind, size, _link, _open) in enumerate(_zip_members(archive, read_links=False), 1):
        declared = check_header(count, kind, size, declared, _safe_relpath(name)[0], name)


def _write_member(open_member: Callable[[], BinaryIO], path: Path, limit: int,
                  too_big: Callable[[int], DataError]) -> int:
    try:
        src = open_member()
    except _READ_ERRORS as e:
        raise _Corrupt(_one_line(e)) from None
    # O_NOFOLLOW: never write through a link, whatever is already in the folder.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    n = 0
    try:
        fd = os.open(path, flags, 0o644)
    except BaseException:
        src.close()
        raise
    try:
        with src, os.fdopen(fd, "wb") as out:
            while True:
                try:
                    chunk = src.read(min(CHUNK, limit - n + 1))
                except _READ_ERRORS as e:
                    raise _Corrupt(_one_line(e)) from None
                if not chunk:
                    return n
                n += len(chunk)
                if n > limit:  # refused as soon as it passes: never more than `limit` bytes on disk
                    raise too_big(n)
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)  # a half-written member is no member
        raise
