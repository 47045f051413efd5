"""The HTTP client: streaming, timeouts, retries with back-off, resume with Range, and the way past
Google Drive's "can't scan this file for viruses" page. `fetch_file` lends it to the rest of flowercli
(the FID network's download).
"""

from __future__ import annotations

import html
import html.parser
import http.client
import http.cookiejar
import json
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from flowercli import __version__
from flowercli.config import DownloadConfig
from flowercli.download.manifest import _read_json
from flowercli.download.sources import CAPTIONS_NAME, Source, _basename
from flowercli.errors import DownloadError
from flowercli.fsutil import CHUNK, fsync_dir
from flowercli.report import Reporter


class _Retryable(Exception):
    """A transient network failure: try again (resuming what was received)."""


class _Http:
    def __init__(self, cfg: DownloadConfig, report: Reporter, advice: str | None = None):
        self.cfg = cfg
        self.report = report
        # What a failed download's error tells the user to do instead. None: the dataset's advice
        # (--mirror / --captions); other users of the client (the FID network) name their own way out.
        self.advice = advice
        # Cookies matter for Google Drive's confirm step; the jar lives only as long as this run.
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))
        self.opener.addheaders = [("User-Agent", f"flowercli/{__version__} (+urllib)")]

    def __enter__(self) -> _Http:
        return self

    def __exit__(self, *exc: object) -> None:
        self.opener.close()

    def _advise(self, default: str) -> str:
        return self.advice if self.advice is not None else default

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
                raise DownloadError(f"cannot resolve {host} ({reason.strerror}); "
                                    + self._advise("check the network, or use --mirror with a local copy")) from None
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
                                        f"({e}); " + self._advise("check the network or use --mirror")) from None
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
                                            f"{stalls} attempts ({e}); "
                                            + self._advise("check the network or use --mirror")) from None
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
                    content_range = e.headers.get("Content-Range") if e.headers is not None else None
                    m = re.fullmatch(r"bytes \*/(\d+)", content_range or "")
                    if m and int(m.group(1)) == offset:
                        return  # killed after the last byte but before the rename: nothing left to fetch
                    part.unlink()  # our partial file does not fit the remote one: start over
                    raise _Retryable("server refused to resume; restarting") from None
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}; "
                                    + self._advise("check the URL (or --mirror / --captions)")) from None
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
                        chunk = read(CHUNK)
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


def fetch_file(url: str, dest: Path, cfg: DownloadConfig, report: Reporter = Reporter(),
               advice: str | None = None) -> None:
    """Download `url` to `dest` with the client's timeouts, retries and resume.

    The bytes go to `dest.part`, which a later call resumes after a failure or a kill, and become
    `dest` by a rename only once complete: `dest` is never half a file. Only the network settings of
    `cfg` are used. `advice` ends the error messages (what to do instead; None: the dataset's).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with _Http(cfg, report, advice) as net:
        net.fetch(Source("file", dest.name, url), part)
    with open(part, "rb") as f:  # on disk before the rename makes it the real file
        os.fsync(f.fileno())
    os.replace(part, dest)
    fsync_dir(dest.parent)


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
