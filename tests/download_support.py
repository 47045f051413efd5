"""Helpers shared by the `flowercli download` tests (tests/test_download_*.py).

Everything runs offline against the miniature `sources_dir` fixture (copied before changing it)
and, for HTTP, a real server on 127.0.0.1 started by the test (the `serve` fixture: import it into
a test module to use it).
"""

from __future__ import annotations

import hashlib
import http.server
import io
import re
import shutil
import tarfile
import threading
import time
import urllib.parse
import zipfile
from pathlib import Path

import pytest

from flowercli.config import DataLayout, DownloadConfig

# ---------------------------------------------------------------------------------------------
# Helpers


def cfg(data: Path, **kw) -> DownloadConfig:
    kw.setdefault("retry_wait", 0.0)
    kw.setdefault("timeout", 5.0)
    return DownloadConfig(data_dir=data, **kw)


def copy_sources(sources_dir: Path, dest: Path) -> Path:
    shutil.copytree(sources_dir, dest)
    return dest


def write_sums(folder: Path) -> None:
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != "SHA256SUMS")
    (folder / "SHA256SUMS").write_text(
        "".join(f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n" for n in names))


def captions_members(sources_dir: Path) -> list[tuple[str, bytes | None]]:
    """(name without the top folder, data or None for a folder) of the fixture's captions archive."""
    out = []
    with tarfile.open(sources_dir / "captions.tgz") as t:
        for m in t.getmembers():
            name = m.name.split("/", 1)[1] if "/" in m.name else ""
            if name:
                out.append((name, t.extractfile(m).read() if m.isfile() else None))
    return out


def write_archive(path: Path, members: list[tuple[str, bytes | None]]) -> Path:
    """A tgz or zip (by suffix) of plain files and folders."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for name, data in members:
                if data is None:
                    z.writestr(name.rstrip("/") + "/", b"")
                else:
                    z.writestr(name, data)
    else:
        with tarfile.open(path, "w:gz") as t:
            for name, data in members:
                info = tarfile.TarInfo(name)
                if data is None:
                    info.type = tarfile.DIRTYPE
                    t.addfile(info)
                else:
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
    return path


def dataset_files(data: Path) -> dict[str, float]:
    root = DataLayout(data).dataset
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def leftovers(data: Path) -> list[str]:
    return sorted(p.name for p in data.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def one_line_error(result) -> str:
    """The error line (progress lines may precede it unless -q), after checking exit 1 and no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and lines and lines[-1].startswith("Error: "), result.output
    assert sum(line.startswith("Error") for line in lines) == 1
    return lines[-1]


# ---------------------------------------------------------------------------------------------
# A real HTTP server on 127.0.0.1 with Range support and scriptable faults


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        try:
            self._serve(head=False)
        except (BrokenPipeError, ConnectionResetError):
            # The client hung up (some tests make it time out on purpose). Left unhandled, the
            # server thread prints a traceback into whichever test's captured stderr runs next.
            pass

    def _serve(self, head: bool) -> None:
        srv = self.server
        url = urllib.parse.urlsplit(self.path)
        srv.log.append((self.command, self.path, self.headers.get("Range")))
        if url.path in srv.routes:
            return srv.routes[url.path](self)
        self.send_file(urllib.parse.unquote(url.path.lstrip("/")), head)

    def send_file(self, name: str, head: bool = False) -> None:
        srv = self.server
        file = srv.root / name
        if not file.is_file():
            return self.send_error(404)
        data = file.read_bytes()
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and not srv.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-\d*", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", f'"{hashlib.md5(data).hexdigest()}"')
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        if file.name in srv.drop_once:  # promise everything, send half, hang up
            srv.drop_once.discard(file.name)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        for i in range(0, len(body), 1024):
            self.wfile.write(body[i: i + 1024])
            if srv.chunk_delay:
                self.wfile.flush()
                time.sleep(srv.chunk_delay)


@pytest.fixture
def serve():
    servers = []

    def start(root: Path, **opts) -> http.server.ThreadingHTTPServer:
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        srv.daemon_threads = True
        srv.root, srv.log, srv.routes = Path(root), [], {}
        srv.drop_once, srv.ignore_range, srv.chunk_delay = set(), False, 0.0
        for k, v in opts.items():
            setattr(srv, k, v)
        srv.url = f"http://127.0.0.1:{srv.server_address[1]}/"
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()
