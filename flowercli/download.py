"""`flowercli download`: fetch, verify and unpack Oxford 102 Flowers and its captions.

Steps, each safe to interrupt:
1. Resolve the sources (official URLs, a mirror folder/URL, a captions archive) and the checksum each
   must match (mirror's SHA256SUMS, else the official md5).
2. Fetch each archive into `<data>/.downloads/NAME.part` (HTTP with resume, or a local copy), verify
   it, and only then rename it to `NAME`. A bad download never replaces a good one.
3. Extract into a temporary folder beside the dataset, refusing hostile archive members, validate the
   result, write `manifest.json`, and rename the folder into place. A killed run leaves no half dataset
   under the final name.
A later run with the same sources checks the manifest, the file counts and the archives' sha256, and
returns without extracting anything; so does a run whose new sources yield byte-identical archives
(only the manifest's record of the sources changes).
"""

from __future__ import annotations

import errno
import hashlib
import html
import html.parser
import http.client
import http.cookiejar
import json
import os
import posixpath
import re
import shutil
import socket
import ssl
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from flowercli import __version__
from flowercli.config import (CAPTION_FILE_MAX_BYTES, IMAGES_LIMITS, SPLIT_FILES, ArchiveLimits, DataLayout,
                              DownloadConfig, missing_split_files)
from flowercli.errors import ChecksumError, DataError, DownloadError, FlowerError, InputError
from flowercli.fsutil import sha256_file
from flowercli.report import Reporter, Task

try:  # Python builds without liblzma exist; .tar.xz is then simply unsupported.
    import lzma

    _LZMA_ERRORS: tuple[type[BaseException], ...] = (lzma.LZMAError,)
except ImportError:  # pragma: no cover
    _LZMA_ERRORS = ()

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
MANIFEST_SCHEMA = 1

ROLES = ("images", "labels", "setid", "captions")
_ROLE_FILES = {"images": "102flowers.tgz", "labels": "imagelabels.mat", "setid": "setid.mat"}
_IMAGE_RE = re.compile(r"image_(\d{5})\.jpg")
_CAPTION_RE = re.compile(r"image_(\d{5})\.txt")
_CLASS_RE = re.compile(r"class_(\d{5})")
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
# Public entry point


def download(cfg: DownloadConfig, report: Reporter = Reporter()) -> dict:
    """Make `<data_dir>/oxford102/` a complete, verified dataset; return its manifest.

    The returned dict is the content of `manifest.json` plus `"status"`: `"verified"` when the data
    was already complete (nothing extracted) or `"installed"` when it was (re-)extracted.
    """
    layout = DataLayout(Path(cfg.data_dir))
    request = _request(cfg)
    fresh = [p for p in (layout.root, layout.downloads) if not p.exists()]
    try:
        return _download(cfg, layout, request, report)
    except BaseException:
        _remove_if_unused(fresh, layout)
        raise


def _download(cfg: DownloadConfig, layout: DataLayout, request: dict, report: Reporter) -> dict:
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        layout.downloads.mkdir(parents=True, exist_ok=True)
        with _lock(layout):
            if not cfg.force:
                manifest = _verify_existing(layout, request, report)
                if manifest is not None:
                    return dict(manifest, status="verified")
            _remove_stale_temporaries(layout, report)
            previous = _read_manifest(layout)
            with _Http(cfg, report) as net:
                sources = resolve_sources(cfg, net, report)
                records = {s.role: _ensure_archive(s, layout, net, previous, report) for s in sources}
            if not cfg.force and previous is not None:
                manifest = _same_archives(layout, previous, records, request, report)
                if manifest is not None:
                    return dict(manifest, status="verified")
            manifest = _install(layout, records, request, cfg, report)
            return dict(manifest, status="installed")
    except FlowerError:
        raise
    except OSError as e:  # file-system trouble (network errors are handled inside _Http)
        raise FlowerError(_os_error_message(e, layout.root)) from e


def _remove_if_unused(fresh: list[Path], layout: DataLayout) -> None:
    """A run that failed before fetching anything (bad --mirror, ...) leaves no empty data folder.

    Only the folders this run created, and only while they hold nothing but our lock file.
    """
    if layout.downloads in fresh:
        try:
            with _lock(layout):  # refuses while another download works here
                if {p.name for p in layout.downloads.iterdir()} <= {".lock"}:
                    (layout.downloads / ".lock").unlink(missing_ok=True)
                    layout.downloads.rmdir()
        except (OSError, FlowerError):
            return  # something else is there now, or someone else is: keep it
    if layout.root in fresh:
        try:
            layout.root.rmdir()  # fails, harmlessly, unless empty
        except OSError:
            pass


def caption_set(record: dict) -> dict:
    """Which caption set a dataset holds: the archive's file name and sha256, carried by every later stage."""
    name = posixpath.basename(str(record.get("file") or "")) or _basename(str(record.get("location", "")))
    return {"archive": name, "sha256": record.get("sha256")}


def summary(manifest: dict, layout: DataLayout) -> dict:
    """The few facts a user or a script wants after `download` (what the CLI prints)."""
    counts = manifest.get("counts", {})
    return {
        "status": manifest.get("status"),
        "dataset": str(layout.dataset),
        "images": counts.get("images"),
        "classes": counts.get("classes"),
        "captions": counts.get("captions"),
        "images_with_fewer_than_10_captions": counts.get("images_with_fewer_than_10_captions"),
        "sources": {role: rec.get("location") for role, rec in manifest.get("sources", {}).items()},
        "caption_set": manifest.get("captions") or caption_set(manifest.get("sources", {}).get("captions", {})),
        "split_files": [f"{s}classes.txt" for s in manifest.get("split_files", SPLIT_FILES)],
    }


# ---------------------------------------------------------------------------------------------
# Sources


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


def resolve_sources(cfg: DownloadConfig, net: "_Http", report: Reporter = Reporter()) -> list[Source]:
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
                     net: "_Http", report: Reporter) -> Source:
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


def _read_sums(mirror: str, net: "_Http") -> dict[str, str] | None:
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


# ---------------------------------------------------------------------------------------------
# HTTP: streaming, timeouts, retries with back-off, resume with Range


class _Retryable(Exception):
    """A transient network failure: try again (resuming what was received)."""


class _Http:
    def __init__(self, cfg: DownloadConfig, report: Reporter):
        self.cfg = cfg
        self.report = report
        # Cookies matter for Google Drive's confirm step; the jar lives only as long as this run.
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))
        self.opener.addheaders = [("User-Agent", f"flowercli/{__version__} (+urllib)")]

    def __enter__(self) -> "_Http":
        return self

    def __exit__(self, *exc: object) -> None:
        self.opener.close()

    def _open(self, url: str, headers: dict[str, str] | None = None, method: str = "GET"):
        req = urllib.request.Request(url, headers=headers or {}, method=method)
        try:
            return self.opener.open(req, timeout=self.cfg.timeout)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code in (408, 425, 429) or e.code >= 500:
                raise _Retryable(f"HTTP {e.code} {e.reason}") from None
            raise  # the caller decides what a 4xx means
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, socket.gaierror):
                host = urllib.parse.urlsplit(url).hostname
                raise DownloadError(f"cannot resolve {host} ({reason.strerror}); check the network, "
                                    "or use --mirror with a local copy") from None
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise DownloadError(f"TLS certificate check failed for {url}: {reason.verify_message}") from None
            raise _Retryable(str(reason)) from None
        except (OSError, http.client.HTTPException) as e:
            raise _Retryable(f"{type(e).__name__}: {e}") from None

    def _retrying(self, what: str, url: str, fn: Callable[[], object]) -> object:
        attempt = 0
        while True:
            try:
                return fn()
            except _Retryable as e:
                attempt += 1
                if attempt > self.cfg.retries:
                    raise DownloadError(f"could not download {what} from {url} after {attempt} attempts "
                                        f"({e}); check the network or use --mirror") from None
                wait = min(self.cfg.retry_wait * 2 ** (attempt - 1), 60.0)
                self.report.info(f"{what}: {e}; retry {attempt}/{self.cfg.retries} in {wait:.0f} s")
                time.sleep(wait)

    def get_small(self, url: str, limit: int = 1 << 20) -> bytes | None:
        """A small file (SHA256SUMS); None when the server says it does not exist."""

        def once() -> bytes | None:
            try:
                with self._open(url) as resp:
                    return resp.read(limit)
            except urllib.error.HTTPError as e:
                if e.code in (404, 410):
                    return None
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
            except (OSError, http.client.HTTPException) as e:
                raise _Retryable(str(e)) from None

        return self._retrying(_basename(url), url, once)  # type: ignore[return-value]

    def exists(self, url: str) -> bool:
        def once() -> bool:
            for method, headers in (("HEAD", {}), ("GET", {"Range": "bytes=0-0"})):
                try:
                    with self._open(url, headers, method):
                        return True
                except urllib.error.HTTPError as e:
                    if e.code in (401, 403, 404, 410):  # object stores answer 403 for missing keys
                        return False
                    if e.code not in (405, 501):  # HEAD not allowed: ask with a one-byte GET
                        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
            return False

        return self._retrying(_basename(url), url, once)  # type: ignore[return-value]

    def fetch(self, src: Source, part: Path) -> None:
        """Download src into `part`, resuming what an earlier attempt or run left there."""
        meta_path = part.with_name(part.name + ".json")
        meta = _read_json(meta_path) or {}
        if part.exists() and meta.get("url") != src.location:
            part.unlink()  # left by a download from somewhere else: not ours to continue
        if not part.exists():
            meta = {"url": src.location}  # written beside the .part once the server answers
        best, stalls = (part.stat().st_size if part.exists() else 0), 0
        while True:
            try:
                self._fetch_once(src, part, meta, meta_path)
                break
            except _Retryable as e:
                size = part.stat().st_size if part.exists() else 0
                # Attempts that moved the file forward do not count: a flaky link must not exhaust
                # the retries of a long download; a server that never gets further does.
                if size > best:
                    best, stalls = size, 0
                    wait = min(self.cfg.retry_wait, 5.0)
                else:
                    stalls += 1
                    if stalls > self.cfg.retries:
                        raise DownloadError(f"could not download {src.name} from {src.location} after "
                                            f"{stalls} attempts ({e}); check the network or use --mirror") from None
                    wait = min(self.cfg.retry_wait * 2 ** (stalls - 1), 60.0)
                self.report.info(f"{src.name}: {e}; resuming in {wait:.0f} s")
                time.sleep(wait)
        meta_path.unlink(missing_ok=True)

    def _fetch_once(self, src: Source, part: Path, meta: dict, meta_path: Path) -> None:
        offset = part.stat().st_size if part.exists() else 0
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if meta.get("validator"):
                headers["If-Range"] = meta["validator"]
        url = src.location
        for _hop in range(4):
            try:
                resp = self._open(url, headers)
            except urllib.error.HTTPError as e:
                if e.code == 416 and offset:
                    m = re.fullmatch(r"bytes \*/(\d+)", (e.headers or {}).get("Content-Range", "") or "")
                    if m and int(m.group(1)) == offset:
                        return  # killed after the last byte but before the rename: nothing left to fetch
                    part.unlink()  # our partial file does not fit the remote one: start over
                    raise _Retryable("server refused to resume; restarting") from None
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}; check the URL "
                                    "(or --mirror / --captions)") from None
            ctype = resp.headers.get("Content-Type", "")
            if src.drive and ctype.startswith("text/html"):
                with resp:
                    page = resp.read(2 << 20).decode("utf-8", "replace")
                url = _drive_next_url(page, resp.geturl(), self.cookies)
                continue
            break
        else:
            raise DownloadError(f"Google Drive kept answering with web pages for {src.name}; download it "
                                "in a browser and pass the file with --captions")
        with resp:
            status = resp.status
            length = resp.headers.get("Content-Length")
            length = int(length) if length and length.isdigit() else None
            if status == 206 and offset:
                m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != offset:
                    part.unlink()
                    raise _Retryable("server sent an unexpected range; restarting")
                mode = "ab"
                total = int(m.group(2)) if m.group(2) != "*" else None
            elif status == 200:
                if offset:
                    self.report.debug(f"{src.name}: server ignored the Range request; restarting from 0")
                offset = 0
                mode = "wb"
                total = length
                validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
                meta.update(url=src.location, validator=validator)
                meta_path.write_text(json.dumps(meta))
            else:
                raise _Retryable(f"unexpected HTTP status {status}")
            got = 0
            # read1: whatever has arrived (up to a chunk), so progress and the .part file keep moving.
            read = getattr(resp, "read1", resp.read)
            with open(part, mode) as out, self.report.task(f"Downloading {src.name}", total=total) as task:
                if offset:
                    task.advance(offset)
                while True:
                    try:
                        chunk = read(_CHUNK)
                    except (OSError, http.client.HTTPException) as e:
                        raise _Retryable(f"{type(e).__name__}: {e}") from None
                    if not chunk:
                        break
                    out.write(chunk)  # a write error (disk full) is not a network problem: no retry
                    got += len(chunk)
                    task.advance(len(chunk))
            # urllib returns b"" when the peer closes early instead of raising: compare with the length.
            if length is not None and got < length:
                raise _Retryable(f"connection closed after {offset + got} of {offset + length} bytes")


class _FormParser(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict] = []
        self.links: list[str] = []
        self._form: dict | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._form = {"id": a.get("id", ""), "action": a.get("action", ""),
                          "method": a.get("method", "get").lower(), "inputs": {}}
            self.forms.append(self._form)
        elif tag == "input" and self._form is not None and a.get("name"):
            self._form["inputs"][a["name"]] = a.get("value", "")
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._form = None


def _drive_next_url(page: str, page_url: str, cookies: http.cookiejar.CookieJar | None = None) -> str:
    """Where to go after Google Drive's "can't scan this file for viruses" page.

    Drive has used three forms of it: a GET form `download-form` (current), a link carrying
    `confirm=TOKEN`, and a `download_warning_*` cookie holding the token.
    """
    parser = _FormParser()
    parser.feed(page)
    for form in parser.forms:
        if form["method"] == "get" and (form["id"] == "download-form" or "download" in form["action"]):
            action = urllib.parse.urljoin(page_url, html.unescape(form["action"]))
            return action + "?" + urllib.parse.urlencode(form["inputs"])
    for href in parser.links:
        href = html.unescape(href)
        if "confirm=" in href and ("export=download" in href or "/uc" in href or "download" in href):
            return urllib.parse.urljoin(page_url, href)
    m = re.search(r"confirm=([0-9A-Za-z_-]+)", page)
    token = m.group(1) if m else None
    if token is None and cookies is not None:
        token = next((c.value for c in cookies if c.name.startswith("download_warning")), None)
    if token:
        parts = urllib.parse.urlsplit(page_url)
        query = dict(urllib.parse.parse_qsl(parts.query), confirm=token)
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))
    if "quota" in page.lower() or "too many users" in page.lower():
        raise DownloadError("Google Drive refuses the captions download for now (download quota exceeded); "
                            "try later, or download it in a browser and pass it with --captions")
    raise DownloadError("Google Drive answered with a web page instead of the captions archive; download "
                        f"{CAPTIONS_NAME} in a browser and pass it with --captions PATH")


# ---------------------------------------------------------------------------------------------
# Archives under .downloads: reuse, fetch, verify


def _hashes(path: Path) -> tuple[str, str, int]:
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
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
    while chunk := src.read(_CHUNK):
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
        want, got = (src.sha256, sha) if src.sha256 else (src.md5, md5)
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


# ---------------------------------------------------------------------------------------------
# Safe extraction (tar of any compression, and zip)


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


def _drain(fileobj: BinaryIO) -> None:
    """Read a tar's compressed stream to its very end.

    tarfile stops at the end-of-archive blocks, before the gzip/bz2/xz trailer whose CRC covers
    every byte: without this, damage inside a stored (incompressible) member goes unnoticed.
    """
    try:
        while fileobj.read(_CHUNK):
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
                    target, why = _safe_relpath(link)
                    if why or target is None:
                        raise refuse(f"is a hard link pointing outside the archive ({link[:200]!r})", name)
                    if (select is not None and not select(rel)) or target not in done:
                        continue
                    source = dest.joinpath(*target.split("/"))
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
                        limit = min(limits.member_bytes, max_total - total)
                        total += _write_member(open_member, path, limit,
                                               lambda n: too_big(name) if n > limits.member_bytes
                                               else too_much(total + n, name))
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
            raise DataError(f"{archive.name} is corrupt or not a tar/zip archive ({e}); check where it came from") from None
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
                    chunk = src.read(min(_CHUNK, limit - n + 1))
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


# ---------------------------------------------------------------------------------------------
# Install: extract to a temporary folder, validate, rename into place


def _install(layout: DataLayout, records: dict[str, dict], request: dict, cfg: DownloadConfig,
             report: Reporter) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f".{layout.dataset.name}.tmp-", dir=layout.root))
    try:
        new = DataLayout(tmp)
        new.dataset.mkdir()

        captions = layout.root / records["captions"]["file"]
        report.info(f"Extracting {captions.name}")
        wanted = {f"{s}classes.txt" for s in SPLIT_FILES} | {"classnames.txt"}
        files = safe_extract(captions, tmp / "captions",
                             select=lambda r: "text_c10" in r.split("/") or posixpath.basename(r) in wanted,
                             limits=cfg.captions_limits, what="a captions archive", report=report)
        _place_captions(captions.name, tmp / "captions", files, new)

        images = layout.root / records["images"]["file"]
        report.info(f"Extracting {images.name}")
        files = safe_extract(images, tmp / "images", select=lambda r: bool(_IMAGE_RE.fullmatch(posixpath.basename(r))),
                             limits=cfg.images_limits, what="the images archive", report=report)
        folders = {posixpath.dirname(f) for f in files}
        if not files:
            raise DataError(f"{images.name} holds no image_NNNNN.jpg files; is it the Oxford 102 images archive?")
        if len(folders) > 1:
            raise DataError(f"{images.name} has images in {len(folders)} folders; expected one folder (jpg/)")
        os.rename(tmp / "images" / folders.pop(), new.jpg)

        shutil.copyfile(layout.root / records["labels"]["file"], new.labels_mat)
        shutil.copyfile(layout.root / records["setid"]["file"], new.setid_mat)

        report.info("Validating")
        counts = validate(new, report)
        manifest = {
            "schema_version": MANIFEST_SCHEMA,
            "flowercli_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "request": request,
            "sources": records,
            "counts": counts,
            "files": {"imagelabels.mat": records["labels"]["sha256"], "setid.mat": records["setid"]["sha256"]},
            "classnames": (new.dataset / "classnames.txt").exists(),
            "split_files": [s for s in SPLIT_FILES if new.split_file(s).is_file()],
            "captions": caption_set(records["captions"]),
        }
        (new.manifest).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _swap_into_place(new.dataset, layout.dataset)
        report.info(f"Installed {layout.dataset}")
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _place_captions(archive: str, root: Path, files: list[str], new: DataLayout) -> None:
    """Move text_c10/ and the split files, wherever they sit in the archive, into the new dataset."""
    tops = {"/".join(f.split("/")[: f.split("/").index("text_c10") + 1]) for f in files if "text_c10" in f.split("/")}
    if not tops:
        raise DataError(f"captions archive {archive} holds no text_c10/ folder; pass the Reed et al. archive "
                        f"({CAPTIONS_NAME}) or one in its layout with --captions")
    top = min(tops, key=lambda t: (t.count("/"), t))
    os.rename(root.joinpath(*top.split("/")), new.text_c10)
    home = posixpath.dirname(top)

    def pick(basename: str) -> str | None:
        found = [f for f in files if posixpath.basename(f) == basename and not f.startswith(top + "/")]
        found.sort(key=lambda f: (posixpath.dirname(f) != home, f.count("/"), f))
        return found[0] if found else None

    found = []
    for split in SPLIT_FILES:
        f = pick(f"{split}classes.txt")
        if f is not None:
            os.replace(root.joinpath(*f.split("/")), new.split_file(split))
            found.append(split)
    missing = missing_split_files(found)
    if missing:
        raise DataError(f"captions archive {archive} has no {' or '.join(missing)}; pass an archive with the class "
                        f"split (like {CAPTIONS_NAME}) with --captions")
    f = pick("classnames.txt")
    if f is not None:
        os.replace(root.joinpath(*f.split("/")), new.dataset / "classnames.txt")


def _swap_into_place(new: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    try:
        os.rename(new, final)
    except OSError:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temporaries(layout: DataLayout, report: Reporter) -> None:
    """Folders a killed run left behind; safe to remove because we hold the lock."""
    for p in layout.root.glob(f".{layout.dataset.name}.*"):
        if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name):
            report.debug(f"removing {p} left by an interrupted run")
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def _lock(layout: DataLayout) -> Iterator[None]:
    """One download per data directory at a time (a second one would swap folders under the first)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory lock
        yield
        return
    fd = os.open(layout.downloads / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DataError(f"another flowercli download is working in {layout.root}; "
                                "wait for it to finish") from None
            # A file system without locks (some network mounts): go on unlocked rather than refuse.
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Validation


def _caption_lines(data: bytes) -> int:
    return sum(1 for line in data.splitlines() if line.strip())


def validate(layout: DataLayout, report: Reporter = Reporter()) -> dict:
    """Check a dataset folder against its own .mat files; return its counts or raise DataError."""
    import numpy as np

    found = [s for s in SPLIT_FILES if layout.split_file(s).is_file()]
    missing = missing_split_files(found)
    if missing:
        raise DataError(f"{layout.dataset} has no {' or '.join(missing)}; run `flowercli download` "
                        "(with --force to re-extract)")
    for path in (layout.jpg, layout.text_c10, layout.labels_mat, layout.setid_mat):
        if not path.exists():
            raise DataError(f"{path} is missing; run `flowercli download` (with --force to re-extract)")
    labels = _load_mat(layout.labels_mat, ("labels",))["labels"]
    if labels.size == 0 or not np.all(np.equal(np.mod(labels, 1), 0)):
        raise DataError(f"{layout.labels_mat.name}: labels must be whole numbers")
    labels = labels.astype(np.int64)
    n, n_classes = len(labels), int(labels.max())
    if labels.min() < 1 or len(set(labels.tolist())) != n_classes:
        raise DataError(f"{layout.labels_mat.name}: labels must cover 1..{n_classes} without gaps "
                        f"(found {len(set(labels.tolist()))} distinct values, min {labels.min()})")

    names = {e.name for e in os.scandir(layout.jpg) if e.is_file()}
    expected = {f"image_{i:05d}.jpg" for i in range(1, n + 1)}
    missing = sorted(expected - names)
    if missing:
        raise DataError(f"the images archive lacks {len(missing)} of the {n:,} images that "
                        f"{layout.labels_mat.name} labels (first: {missing[0]}); it is incomplete")
    extra = sorted(n_ for n_ in names - expected if _IMAGE_RE.fullmatch(n_))
    if extra:
        raise DataError(f"the images archive has {len(extra)} images that {layout.labels_mat.name} does not "
                        f"label (first: {extra[0]}); the archive and the labels do not belong together")
    for name in sorted(expected):
        with open(layout.jpg / name, "rb") as f:
            if f.read(2) != b"\xff\xd8":
                raise DataError(f"{name} is not a JPEG file; the images archive is damaged")

    setid = _load_mat(layout.setid_mat, ("trnid", "valid", "tstid"))
    seen = np.concatenate([setid[k] for k in ("trnid", "valid", "tstid")]).astype(np.int64)
    if len(seen) != len(set(seen.tolist())) or set(seen.tolist()) != set(range(1, n + 1)):
        raise DataError(f"{layout.setid_mat.name}: trnid/valid/tstid must list each image id 1..{n:,} once "
                        f"(they list {len(seen):,} ids, {len(set(seen.tolist()) & set(range(1, n + 1))):,} valid "
                        "and distinct)")

    without, fewer, total_lines = [], 0, 0
    for i, label in enumerate(labels.tolist(), 1):
        path = layout.text_c10 / f"class_{label:05d}" / f"image_{i:05d}.txt"
        try:
            with open(path, "rb") as f:
                raw = f.read(CAPTION_FILE_MAX_BYTES + 1)
        except FileNotFoundError:
            without.append(path)
            continue
        if len(raw) > CAPTION_FILE_MAX_BYTES:
            raise DataError(f"caption file text_c10/{path.parent.name}/{path.name} is larger than "
                            f"{CAPTION_FILE_MAX_BYTES:,} bytes: not a caption file; pass the Reed et al. captions "
                            "archive (or one in its layout) with --captions")
        lines = _caption_lines(raw)
        total_lines += lines
        fewer += lines < 10
    if without:
        p = without[0]
        raise DataError(f"{len(without):,} images have no captions file (first: text_c10/{p.parent.name}/{p.name}); "
                        "the captions archive does not match imagelabels.mat")
    if fewer:
        report.info(f"{fewer:,} images have fewer than 10 captions")

    class_splits, members = {}, {}
    for split in found:
        path = layout.split_file(split)
        classes = []
        for k, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            m = _CLASS_RE.fullmatch(line.strip())
            if not m or not 1 <= int(m.group(1)) <= n_classes:
                raise DataError(f"{path.name} line {k}: expected class_NNNNN with NNNNN in 1..{n_classes}, "
                                f"got {line.strip()[:60]!r}")
            classes.append(int(m.group(1)))
        class_splits[split] = len(set(classes))
        members[split] = set(classes)
    seen_classes = members.get("trainval", members.get("train", set()) | members.get("val", set()))
    overlap = sorted(seen_classes & members["test"])
    if overlap:
        raise DataError(f"class {overlap[0]} is in testclasses.txt and in the training classes: the class split "
                        "files contradict each other")

    if n != OFFICIAL_IMAGES or n_classes != OFFICIAL_CLASSES:
        report.warn(f"this dataset has {n:,} images in {n_classes} classes, not the official "
                    f"{OFFICIAL_IMAGES:,} in {OFFICIAL_CLASSES}: is it the full Oxford 102 set?")
    return {
        "images": n,
        "classes": n_classes,
        "caption_files": n,
        "captions": total_lines,
        "images_with_fewer_than_10_captions": fewer,
        "setid": {"train": len(setid["trnid"]), "val": len(setid["valid"]), "test": len(setid["tstid"])},
        "split_classes": class_splits,
    }


def _load_mat(path: Path, keys: tuple[str, ...]) -> dict:
    import scipy.io

    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises many types for a bad file; all mean the same to the user
        raise DataError(f"{path.name} is not a readable MATLAB file ({type(e).__name__}: {e})") from None
    missing = [k for k in keys if k not in mat]
    if missing:
        raise DataError(f"{path.name} has no {', '.join(missing)} variable; is it the official file?")
    return {k: mat[k].ravel() for k in keys}


# ---------------------------------------------------------------------------------------------
# The fast path: a complete dataset from the same sources


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_manifest(layout: DataLayout) -> dict | None:
    m = _read_json(layout.manifest)
    return m if m and m.get("schema_version") == MANIFEST_SCHEMA else None


def _verify_existing(layout: DataLayout, request: dict, report: Reporter) -> dict | None:
    """The manifest when the installed dataset is complete and came from `request`, else None."""
    if not layout.dataset.exists():
        return None
    manifest = _read_manifest(layout)
    if manifest is None:
        report.info(f"{layout.dataset} has no valid manifest; installing afresh")
        return None
    if manifest.get("request") != request:
        report.info("sources differ from the last download; checking them")
        return None
    problem = _quick_check(layout, manifest, report)
    if problem:
        report.info(f"{problem}; installing afresh")
        return None
    report.info(f"{layout.dataset} is complete and verified; nothing to do (--force re-extracts)")
    return manifest


def _same_archives(layout: DataLayout, previous: dict, records: dict[str, dict], request: dict,
                   report: Reporter) -> dict | None:
    """New sources that gave byte-identical archives: record them in the manifest, extract nothing."""
    if any(previous.get("sources", {}).get(role, {}).get("sha256") != rec["sha256"] for role, rec in records.items()):
        return None
    if _quick_check(layout, previous, report) is not None:
        return None
    manifest = dict(previous, request=request, sources=records)
    tmp = layout.manifest.with_name(layout.manifest.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, layout.manifest)
    report.info(f"{layout.dataset}: the new sources hold the same archives; manifest updated, nothing extracted")
    return manifest


def _quick_check(layout: DataLayout, manifest: dict, report: Reporter) -> str | None:
    """Cheap checks (listings and a few hashes, no decoding): a reason to reinstall, or None."""
    try:
        counts = manifest["counts"]
        n = int(counts["images"])
        images = {e.name for e in os.scandir(layout.jpg) if e.is_file()}
        if not {f"image_{i:05d}.jpg" for i in range(1, n + 1)} <= images:
            return "images are missing from jpg/"
        captions = sum(1 for d in os.scandir(layout.text_c10) if d.is_dir()
                       for f in os.scandir(d.path) if _CAPTION_RE.fullmatch(f.name))
        if captions < int(counts["caption_files"]):
            return "caption files are missing from text_c10/"
        for split in manifest.get("split_files", SPLIT_FILES):
            if not layout.split_file(split).is_file():
                return f"{layout.split_file(split).name} is missing"
        for name, sha in manifest["files"].items():
            if sha256_file(layout.dataset / name) != sha:
                return f"{name} changed since it was installed"
        for role in ROLES:
            rec = manifest["sources"][role]
            path = layout.root / rec["file"]
            if not path.exists():
                report.info(f"{rec['file']} was removed; checked the installed files only")
            elif sha256_file(path) != rec["sha256"]:
                return f"{rec['file']} changed since it was verified"
    except (OSError, KeyError, TypeError, ValueError) as e:
        return f"the installed dataset is incomplete ({type(e).__name__}: {e})"
    return None


def _os_error_message(e: OSError, root: Path) -> str:
    where = e.filename or root
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return (f"no space left on the device while writing {where}; free some space and re-run "
                "(finished downloads are kept)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where} ({e.strerror}); choose a writable --data-dir"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        from flowercli.fsutil import nearest_existing

        blocker = nearest_existing(Path(where))
        return f"cannot write {where}: {blocker} is a file, not a folder; choose another --data-dir"
    if e.errno == errno.ENOENT and e.filename and Path(os.path.abspath(e.filename)).is_relative_to(os.path.abspath(root)):
        from flowercli.fsutil import write_error_text

        return f"cannot create {where}: {write_error_text(e)}; choose another --data-dir"
    return f"{e.strerror or e} ({where}); check the --data-dir folder"
