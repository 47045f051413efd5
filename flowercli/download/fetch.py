"""Archives under `<data>/.downloads/`: reuse a verified copy, else fetch or copy it into `NAME.part`,
verify it, and only then rename it to `NAME`. A bad download never replaces a good one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

from flowercli.config import DataLayout
from flowercli.download.http import _Http
from flowercli.download.sources import Source
from flowercli.errors import ChecksumError
from flowercli.fsutil import CHUNK
from flowercli.report import Reporter, Task


def _hashes(path: Path) -> tuple[str, str, int]:
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            md5.update(chunk)
            sha.update(chunk)
            size += len(chunk)
    return md5.hexdigest(), sha.hexdigest(), size


def _matches(src: Source, md5: str, sha: str) -> bool | None:
    """True/False when src has an expected checksum, None when there is none to check."""
    if src.sha256:
        return sha == src.sha256
    if src.md5:
        return md5 == src.md5
    return None


def _copy_with_progress(src: BinaryIO, dst: BinaryIO, task: Task) -> None:
    while chunk := src.read(CHUNK):
        dst.write(chunk)
        task.advance(len(chunk))


def _ensure_archive(src: Source, layout: DataLayout, net: _Http, previous: dict | None,
                    report: Reporter) -> dict:
    """Make `.downloads/<name>` hold src's verified bytes; return its manifest record."""
    dest = layout.downloads / src.name
    if dest.exists():
        md5, sha, size = _hashes(dest)
        ok = _matches(src, md5, sha)
        prev = (previous or {}).get("sources", {}).get(src.role, {})
        if ok or (ok is None and src.is_url and prev.get("location") == src.location and prev.get("sha256") == sha):
            report.debug(f"{src.name}: kept copy verified ({src.checked_by}), not fetched again")
            return _record(src, layout, md5, sha, size)
    part = dest.with_name(dest.name + ".part")
    if src.is_url:
        report.info(f"Fetching {src.name} from {src.location}")
        net.fetch(src, part)
    else:
        report.info(f"Copying {src.name} from {src.location}")
        with open(src.location, "rb") as fin, open(part, "wb") as fout, \
                report.task(f"Copying {src.name}", total=os.path.getsize(src.location)) as task:
            _copy_with_progress(fin, fout, task)
    md5, sha, size = _hashes(part)
    if _matches(src, md5, sha) is False:
        bad = dest.with_name(dest.name + ".bad")
        os.replace(part, bad)  # moved aside, never resumed: the next run fetches it afresh
        want, got = (src.sha256, sha) if src.sha256 else (src.md5 or "", md5)
        algo = "sha256" if src.sha256 else "md5"
        raise ChecksumError(f"checksum mismatch for {src.name} from {src.location}: {algo} {got[:12]}… "
                            f"is not {want[:12]}… ({src.checked_by}); the file is corrupt or not the "
                            f"expected one (kept as {bad}); nothing installed was changed")
    os.replace(part, dest)
    if _matches(src, md5, sha):
        report.debug(f"{src.name}: verified ({src.checked_by})")
    return _record(src, layout, md5, sha, size)


def _record(src: Source, layout: DataLayout, md5: str, sha: str, size: int) -> dict:
    return {
        "file": str((layout.downloads / src.name).relative_to(layout.root)),
        "location": src.location,
        "bytes": size,
        "md5": md5,
        "sha256": sha,
        "verified_with": src.checked_by if (src.md5 or src.sha256) else "none (no known checksum)",
    }
