"""Where each of the four archives comes from and the checksum it must match.

The published dataset's facts (official URLs and md5 sums, the captions' Google Drive id), a mirror's
SHA256SUMS, and the helpers that tell URLs from local paths.
"""

from __future__ import annotations

import posixpath
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flowercli.config import DownloadConfig
from flowercli.errors import DataError, InputError
from flowercli.report import Reporter

if TYPE_CHECKING:
    from flowercli.download.http import _Http

# Facts about the published dataset (not user settings, so they live here rather than in config.py).
OFFICIAL_BASE_URL = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"
OFFICIAL_MD5 = {
    "102flowers.tgz": "52808999861908f626f3c1f4e79d11fa",
    "imagelabels.mat": "e0620be6f572b9609742df49c70aed4d",
    "setid.mat": "a5357ecc9cb78c4bef273ce3793fc85c",
}
OFFICIAL_IMAGES = 8189
OFFICIAL_CLASSES = 102
# Reed et al. 2016, "Learning Deep Representations of Fine-Grained Visual Descriptions".
CAPTIONS_NAME = "cvpr2016_flowers.tar.gz"
CAPTIONS_DRIVE_ID = "0B0ywwgffWnLLcms2WWJQRFNSWEM"
DRIVE_DOWNLOAD_URL = "https://drive.google.com/uc?export=download&id={id}"
# Names a mirror may use for the captions archive, looked for when --captions is not given.
CAPTIONS_CANDIDATES = (
    CAPTIONS_NAME, "cvpr2016_flowers.tgz", "cvpr2016_flowers.zip",
    "text_c10.tar.gz", "text_c10.tgz", "text_c10.zip", "captions.tar.gz", "captions.tgz", "captions.zip",
)

ROLES = ("images", "labels", "setid", "captions")
_ROLE_FILES = {"images": "102flowers.tgz", "labels": "imagelabels.mat", "setid": "setid.mat"}


@dataclass(frozen=True)
class Source:
    role: str  # images | labels | setid | captions
    name: str  # file name under <data>/.downloads/
    location: str  # http(s) URL or absolute local path
    md5: str | None = None
    sha256: str | None = None
    checked_by: str = "no known checksum"  # where the expected checksum comes from
    drive: bool = False  # Google Drive: may answer with a "can't scan for viruses" page first

    @property
    def is_url(self) -> bool:
        return _is_url(self.location)


def resolve_sources(cfg: DownloadConfig, net: _Http, report: Reporter = Reporter()) -> list[Source]:
    """Where each of the four archives comes from and the checksum it must match."""
    if cfg.mirror is not None and not cfg.mirror.strip():
        raise InputError("--mirror is empty; give a folder or a base URL holding 102flowers.tgz, "
                         "imagelabels.mat and setid.mat")
    if cfg.captions is not None and not cfg.captions.strip():
        raise InputError("--captions is empty; give the path or URL of a captions archive")
    sources: list[Source] = []
    sums: dict[str, str] | None = None
    mirror = _normalise_location(cfg.mirror) if cfg.mirror else None
    if mirror is None:
        for role, name in _ROLE_FILES.items():
            sources.append(Source(role, name, OFFICIAL_BASE_URL + name, md5=OFFICIAL_MD5[name],
                                  checked_by="official md5"))
    else:
        if not _is_url(mirror) and not Path(mirror).is_dir():
            raise DataError(f"mirror {cfg.mirror} is not a folder; give a folder or an http(s) base URL")
        host = urllib.parse.urlsplit(mirror).hostname or ""
        if mirror.lower().startswith("http://") and host not in ("localhost", "127.0.0.1", "::1"):
            report.warn(f"{mirror} is plain HTTP: the files and their SHA256SUMS can be altered in transit; "
                        "prefer https")
        sums = _read_sums(mirror, net)
        report.debug(f"mirror {mirror}: " + ("SHA256SUMS found" if sums is not None else "no SHA256SUMS, "
                                             "checking the official md5 sums"))
        for role, name in _ROLE_FILES.items():
            location = _join(mirror, name)
            if not _is_url(location) and not Path(location).is_file():
                raise DataError(f"mirror {cfg.mirror} has no {name}; a mirror must hold 102flowers.tgz, "
                                "imagelabels.mat and setid.mat")
            if sums is not None and name in sums:
                sources.append(Source(role, name, location, sha256=sums[name], checked_by="SHA256SUMS of the mirror"))
            else:
                if sums is not None:
                    report.warn(f"{name} is not listed in the mirror's SHA256SUMS; checking the official md5")
                sources.append(Source(role, name, location, md5=OFFICIAL_MD5[name], checked_by="official md5"))
    sources.append(_captions_source(cfg, mirror, sums, net, report))
    return sources


def _captions_source(cfg: DownloadConfig, mirror: str | None, sums: dict[str, str] | None,
                     net: _Http, report: Reporter) -> Source:
    if cfg.captions:
        location = _normalise_location(cfg.captions)
        drive_id = _drive_file_id(location)
        if drive_id:
            return Source("captions", CAPTIONS_NAME, DRIVE_DOWNLOAD_URL.format(id=drive_id), drive=True)
        if not _is_url(location) and Path(location).is_dir():
            raise DataError(f"--captions {cfg.captions} is a folder; give an archive (tar, tgz or zip), "
                            f"e.g. one made with: tar czf captions.tgz -C {cfg.captions} .")
        if not _is_url(location) and not Path(location).is_file():
            raise DataError(f"captions archive {cfg.captions} does not exist; give a tar, tgz or zip path or URL")
        name = _safe_download_name(location)
        # A captions archive that sits in the mirror is covered by the mirror's SHA256SUMS.
        if mirror is not None and sums is not None and _join(mirror, _basename(location)) == location:
            if _basename(location) in sums:
                return Source("captions", name, location, sha256=sums[_basename(location)],
                              checked_by="SHA256SUMS of the mirror")
        report.debug(f"captions archive {location}: no known checksum; its sha256 goes into the manifest")
        return Source("captions", name, location)
    if mirror is None:
        return Source("captions", CAPTIONS_NAME, DRIVE_DOWNLOAD_URL.format(id=CAPTIONS_DRIVE_ID), drive=True)
    for candidate in CAPTIONS_CANDIDATES:
        location = _join(mirror, candidate)
        listed = sums is not None and candidate in sums
        if (listed or net.exists(location)) if _is_url(location) else Path(location).is_file():
            if listed:
                return Source("captions", candidate, location, sha256=sums[candidate],  # type: ignore[index]
                              checked_by="SHA256SUMS of the mirror")
            return Source("captions", candidate, location)
    hint = ""
    others = sorted(n for n in (sums or {}) if "caption" in n.lower() or "text_c10" in n.lower())
    if not _is_url(mirror):
        others = sorted(p.name for p in Path(mirror).iterdir() if "caption" in p.name.lower()) or others
    if others:
        hint = f" (e.g. --captions {_join(mirror, others[0])})"
    raise DataError(f"mirror {cfg.mirror} holds no captions archive (looked for {CAPTIONS_NAME} and "
                    f"similar names); pass one with --captions PATH|URL{hint}")


def _read_sums(mirror: str, net: _Http) -> dict[str, str] | None:
    location = _join(mirror, "SHA256SUMS")
    if _is_url(location):
        data = net.get_small(location)
        if data is None:
            return None
        text = data.decode("utf-8", "replace")
    else:
        if not Path(location).is_file():
            return None
        text = Path(location).read_text(encoding="utf-8", errors="replace")
    sums: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line)
        if not m:
            raise DataError(f"{location} line {n} is not '<sha256>  <file name>'; fix or remove the file")
        sums[m.group(2).strip().removeprefix("./")] = m.group(1).lower()
    return sums


# ---------------------------------------------------------------------------------------------
# Locations


def _is_url(s: str) -> bool:
    return urllib.parse.urlsplit(s).scheme.lower() in ("http", "https")


def _normalise_location(s: str) -> str:
    """URLs stay as given; local paths (and file:// URLs) become absolute paths."""
    s = s.strip()
    if _is_url(s):
        return s
    if s.lower().startswith("file://"):
        s = urllib.request.url2pathname(urllib.parse.urlsplit(s).path)
    return str(Path(s).expanduser().resolve())


def _join(base: str, name: str) -> str:
    if _is_url(base):
        parts = urllib.parse.urlsplit(base)
        path = parts.path if parts.path.endswith("/") else parts.path + "/"
        return urllib.parse.urlunsplit(parts._replace(path=path + urllib.parse.quote(name)))
    return str(Path(base) / name)


def _basename(location: str) -> str:
    if _is_url(location):
        return urllib.parse.unquote(posixpath.basename(urllib.parse.urlsplit(location).path))
    return Path(location).name


def _safe_download_name(location: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", _basename(location)).strip("._") or "captions"
    # Never let a captions archive overwrite one of the official archives under .downloads.
    return f"captions-{name}" if name in _ROLE_FILES.values() else name


def _drive_file_id(location: str) -> str | None:
    parts = urllib.parse.urlsplit(location)
    if not parts.hostname or not parts.hostname.endswith(("drive.google.com", "drive.usercontent.google.com")):
        return None
    m = re.search(r"/file/d/([\w-]+)", parts.path)
    if m:
        return m.group(1)
    ids = urllib.parse.parse_qs(parts.query).get("id")
    return ids[0] if ids else None


def _request(cfg: DownloadConfig) -> dict:
    """What the user asked for, normalised: a second run with the same request may be a no-op."""
    mirror = _normalise_location(cfg.mirror) if cfg.mirror and cfg.mirror.strip() else None
    return {
        "mirror": mirror.rstrip("/") if mirror and _is_url(mirror) else mirror,
        "captions": _normalise_location(cfg.captions) if cfg.captions and cfg.captions.strip() else None,
    }
