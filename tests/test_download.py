"""`flowercli download`: local and HTTP mirrors, resume, checksums, hostile archives, the fast path.

Everything runs offline against the miniature `sources_dir` fixture (copied before changing it)
and, for HTTP, a real server on 127.0.0.1 started by the test.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import io
import json
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import flowercli.download as dl
from flowercli.cli import app
from flowercli.config import ArchiveLimits, DataLayout, DownloadConfig
from flowercli.data import class_split_of, read_class_splits
from flowercli.errors import ChecksumError, DataError, DownloadError
from flowercli.report import ListReporter

from conftest import N_CLASSES, N_IMAGES, image_label, sha256

runner = CliRunner()


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
        self.send_header("ETag", '"%s"' % hashlib.md5(data).hexdigest())
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


# ---------------------------------------------------------------------------------------------
# Local mirror, fast path, CLI


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


def test_second_run_is_a_fast_noop_and_force_reextracts(sources_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    dl.download(cfg(data, mirror=str(sources_dir)))
    before = dataset_files(data)
    calls = []
    real = dl.safe_extract
    monkeypatch.setattr(dl, "safe_extract", lambda *a, **k: calls.append(a) or real(*a, **k))
    t0 = time.perf_counter()
    again = dl.download(cfg(data, mirror=str(sources_dir)))
    assert time.perf_counter() - t0 < 2.0
    assert again["status"] == "verified" and calls == [] and dataset_files(data) == before
    forced = dl.download(cfg(data, mirror=str(sources_dir), force=True))
    assert forced["status"] == "installed" and len(calls) == 2
    assert dataset_files(data).keys() == before.keys()


def test_noop_check_notices_damage_and_repairs_from_kept_archives(sources_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    mirror = copy_sources(sources_dir, tmp_path / "mirror")
    dl.download(cfg(data, mirror=str(mirror)))
    (DataLayout(data).jpg / "image_00003.jpg").unlink()
    shutil.rmtree(mirror)  # the repair must come from .downloads, not from the mirror
    mirror.mkdir()
    (mirror / "SHA256SUMS").write_text((sources_dir / "SHA256SUMS").read_text())
    for name in ("imagelabels.mat", "setid.mat", "102flowers.tgz", "captions.tgz"):
        (mirror / name).write_bytes(b"not used")
    out = dl.download(cfg(data, mirror=str(mirror)))
    assert out["status"] == "installed" and (DataLayout(data).jpg / "image_00003.jpg").is_file()


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
    for text in ("Examples:", "flowercli download --mirror", "--captions", "--data-dir", "--force", "--json", "--quiet"):
        assert text in r.stdout, text


# ---------------------------------------------------------------------------------------------
# HTTP


def test_http_mirror(sources_dir, tmp_path, serve):
    srv = serve(sources_dir)
    manifest = dl.download(cfg(tmp_path / "data", mirror=srv.url))
    assert manifest["counts"]["images"] == N_IMAGES
    assert manifest["sources"]["images"]["location"] == srv.url + "102flowers.tgz"
    assert manifest["sources"]["captions"]["verified_with"] == "SHA256SUMS of the mirror"
    assert ("GET", "/SHA256SUMS", None) in srv.log


@pytest.mark.parametrize("ignore_range", [False, True], ids=["resume-with-range", "server-ignores-range"])
def test_http_connection_dropped_halfway(sources_dir, tmp_path, serve, ignore_range):
    srv = serve(sources_dir, drop_once={"102flowers.tgz"}, ignore_range=ignore_range)
    manifest = dl.download(cfg(tmp_path / "data", mirror=srv.url))
    assert manifest["status"] == "installed"
    gets = [(path, rng) for method, path, rng in srv.log if method == "GET" and path == "/102flowers.tgz"]
    half = (sources_dir / "102flowers.tgz").stat().st_size // 2
    assert gets == [("/102flowers.tgz", None), ("/102flowers.tgz", f"bytes={half}-")]
    assert (DataLayout(tmp_path / "data").downloads / "102flowers.tgz").read_bytes() == \
        (sources_dir / "102flowers.tgz").read_bytes()


def test_partial_file_from_an_earlier_run_is_resumed(sources_dir, tmp_path, serve):
    srv = serve(sources_dir)
    layout = DataLayout(tmp_path / "data")
    layout.downloads.mkdir(parents=True)
    body = (sources_dir / "102flowers.tgz").read_bytes()
    (layout.downloads / "102flowers.tgz.part").write_bytes(body[:1000])
    (layout.downloads / "102flowers.tgz.part.json").write_text(json.dumps({"url": srv.url + "102flowers.tgz"}))
    dl.download(cfg(layout.root, mirror=srv.url))
    assert ("GET", "/102flowers.tgz", "bytes=1000-") in srv.log
    assert (layout.downloads / "102flowers.tgz").read_bytes() == body


def test_complete_partial_file_is_not_fetched_again(sources_dir, tmp_path, serve):
    """Killed after the last byte but before the rename: the server answers 416 and we are done."""
    srv = serve(sources_dir)
    layout = DataLayout(tmp_path / "data")
    layout.downloads.mkdir(parents=True)
    body = (sources_dir / "102flowers.tgz").read_bytes()
    (layout.downloads / "102flowers.tgz.part").write_bytes(body)
    (layout.downloads / "102flowers.tgz.part.json").write_text(json.dumps({"url": srv.url + "102flowers.tgz"}))
    dl.download(cfg(layout.root, mirror=srv.url))
    assert [rng for _, path, rng in srv.log if path == "/102flowers.tgz"] == [f"bytes={len(body)}-"]


def test_http_missing_file_and_unreachable_server(sources_dir, tmp_path, serve):
    mirror = copy_sources(sources_dir, tmp_path / "mirror")
    (mirror / "setid.mat").unlink()
    srv = serve(mirror)
    with pytest.raises(DownloadError, match=r"setid\.mat: HTTP 404"):
        dl.download(cfg(tmp_path / "data", mirror=srv.url))
    port = srv.server_address[1]
    srv.shutdown()
    srv.server_close()
    with pytest.raises(DownloadError, match=r"after 3 attempts"):
        dl.download(cfg(tmp_path / "data2", mirror=f"http://127.0.0.1:{port}/", retries=2))


def test_default_sources_with_google_drive_confirm_page(sources_dir, tmp_path, serve, monkeypatch):
    """The official path end to end, with the Drive 'cannot scan for viruses' page in between."""
    srv = serve(sources_dir)
    page = ('<html><title>Google Drive - Virus scan warning</title><body>'
            '<form id="download-form" action="/download" method="get">'
            '<input type="submit" value="Download anyway"><input type="hidden" name="id" value="FILEID">'
            '<input type="hidden" name="export" value="download"><input type="hidden" name="confirm" value="t">'
            '<input type="hidden" name="uuid" value="u-1"></form></body></html>').encode()

    def confirm(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/html; charset=utf-8")
        handler.send_header("Content-Length", str(len(page)))
        handler.end_headers()
        handler.wfile.write(page)

    def archive(handler):
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query)
        assert q == {"id": ["FILEID"], "export": ["download"], "confirm": ["t"], "uuid": ["u-1"]}
        handler.send_file("captions.tgz")

    srv.routes.update({"/uc": confirm, "/download": archive})
    md5 = {n: hashlib.md5((sources_dir / n).read_bytes()).hexdigest() for n in dl.OFFICIAL_MD5}
    monkeypatch.setattr(dl, "OFFICIAL_BASE_URL", srv.url)
    monkeypatch.setattr(dl, "OFFICIAL_MD5", md5)
    monkeypatch.setattr(dl, "CAPTIONS_DRIVE_ID", "FILEID")
    monkeypatch.setattr(dl, "DRIVE_DOWNLOAD_URL", srv.url + "uc?export=download&id={id}")
    manifest = dl.download(cfg(tmp_path / "data"))
    assert manifest["counts"]["captions"] == 10 * N_IMAGES
    assert manifest["sources"]["images"]["verified_with"] == "official md5"
    assert manifest["sources"]["captions"]["file"] == ".downloads/cvpr2016_flowers.tar.gz"
    assert [p for _, p, _ in srv.log if p.startswith(("/uc", "/download"))] == \
        ["/uc?export=download&id=FILEID", "/download?id=FILEID&export=download&confirm=t&uuid=u-1"]


def test_drive_confirm_page_variants():
    base = "https://drive.google.com/uc?export=download&id=ABC"
    link = '<a id="uc-download-link" href="/uc?export=download&amp;confirm=X1y_&amp;id=ABC">Download anyway</a>'
    assert dl._drive_next_url(link, base) == "https://drive.google.com/uc?export=download&confirm=X1y_&id=ABC"
    import http.cookiejar

    jar = http.cookiejar.CookieJar()
    jar.set_cookie(http.cookiejar.Cookie(0, "download_warning_123", "TOK", None, False, ".drive.google.com", True,
                                         True, "/", True, False, None, False, None, None, {}))
    assert dl._drive_next_url("<html>virus scan</html>", base, jar).endswith("id=ABC&confirm=TOK")
    with pytest.raises(DownloadError, match="quota"):
        dl._drive_next_url("<html>Too many users have viewed or downloaded this file recently</html>", base)
    with pytest.raises(DownloadError, match="--captions"):
        dl._drive_next_url("<html>Sign in</html>", base)
    assert dl._drive_file_id("https://drive.google.com/file/d/0B0ywwgffWnLLcms2WWJQRFNSWEM/view?usp=sharing") \
        == "0B0ywwgffWnLLcms2WWJQRFNSWEM"


def test_killed_download_leaves_no_dataset_and_resumes(sources_dir, tmp_path, serve):
    srv = serve(sources_dir, chunk_delay=0.05)
    data = tmp_path / "data"
    part = data / ".downloads" / "102flowers.tgz.part"
    proc = subprocess.Popen([sys.executable, "-m", "flowercli", "download", "--mirror", srv.url,
                             "--data-dir", str(data), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while not (part.exists() and part.stat().st_size >= 2048) and time.time() < deadline:
            time.sleep(0.02)
        assert part.exists(), "the download never started"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not DataLayout(data).dataset.exists()
    kept = part.stat().st_size
    srv.chunk_delay = 0.0
    dl.download(cfg(data, mirror=srv.url))
    assert ("GET", "/102flowers.tgz", f"bytes={kept}-") in srv.log
    assert len(list(DataLayout(data).jpg.iterdir())) == N_IMAGES


# ---------------------------------------------------------------------------------------------
# Checksums, damaged and missing files: one line, exit 1, nothing good lost


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


def test_captions_archive_without_text_c10(sources_dir, tmp_path):
    members = [(n, d) for n, d in captions_members(sources_dir) if not n.startswith("text_c10")]
    caps = write_archive(tmp_path / "caps.tgz", members)
    r = runner.invoke(app, ["download", "--mirror", str(sources_dir), "--captions", str(caps), "-d", str(tmp_path / "d")])
    err = one_line_error(r)
    assert "holds no text_c10/" in err and "--captions" in err
    assert not (tmp_path / "d" / "oxford102").exists()


@pytest.mark.parametrize("drop, missing", [
    ({"testclasses.txt"}, r"has no testclasses\.txt"),
    ({"trainvalclasses.txt", "valclasses.txt"}, r"has no trainvalclasses\.txt \(or trainclasses\.txt \+ valclasses\.txt\)"),
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


def test_split_files_that_contradict_each_other_are_refused(sources_dir, tmp_path):
    members = [(n, d) for n, d in captions_members(sources_dir) if n != "testclasses.txt"]
    trainval = dict(members)["trainvalclasses.txt"]
    members.append(("testclasses.txt", trainval.splitlines(keepends=True)[0]))
    caps = write_archive(tmp_path / "caps.tgz", members)
    with pytest.raises(DataError, match=r"in testclasses\.txt and in the training classes"):
        dl.download(cfg(tmp_path / "data", mirror=str(sources_dir), captions=str(caps)))


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


def test_short_captions_are_counted_not_fatal(sources_dir, tmp_path):
    members = captions_members(sources_dir)
    members = [(n, b"one caption\n\n" if n.endswith(("image_00001.txt", "image_00007.txt")) else d) for n, d in members]
    caps = write_archive(tmp_path / "caps.tgz", members)
    manifest = dl.download(cfg(tmp_path / "data", mirror=str(sources_dir), captions=str(caps)))
    assert manifest["counts"]["images_with_fewer_than_10_captions"] == 2
    assert manifest["counts"]["captions"] == 10 * N_IMAGES - 18


def test_data_that_do_not_belong_together_are_refused(sources_dir, tmp_path):
    import numpy as np
    import scipy.io

    members = [(n, d) for n, d in captions_members(sources_dir) if not n.endswith("image_00005.txt")]
    caps = write_archive(tmp_path / "caps.tgz", members)
    with pytest.raises(DataError, match=r"1 images have no captions file \(first: text_c10/class_00001/image_00005"):
        dl.download(cfg(tmp_path / "d1", mirror=str(sources_dir), captions=str(caps)))

    mirror = copy_sources(sources_dir, tmp_path / "mirror")
    labels = scipy.io.loadmat(mirror / "imagelabels.mat")["labels"]
    scipy.io.savemat(mirror / "imagelabels.mat", {"labels": np.concatenate([labels, [[1]]], axis=1)})
    write_sums(mirror)
    with pytest.raises(DataError, match=r"lacks 1 of the 25 images .*image_00025\.jpg"):
        dl.download(cfg(tmp_path / "d2", mirror=str(mirror)))

    shutil.copy(sources_dir / "imagelabels.mat", mirror)
    scipy.io.savemat(mirror / "setid.mat", {"trnid": np.arange(1, 20)[None], "valid": np.array([[20]]),
                                            "tstid": np.array([[21]])})
    write_sums(mirror)
    with pytest.raises(DataError, match=r"setid\.mat: .*each image id 1\.\.24 once"):
        dl.download(cfg(tmp_path / "d3", mirror=str(mirror)))
    assert not any((tmp_path / d / "oxford102").exists() for d in ("d1", "d2", "d3"))


# ---------------------------------------------------------------------------------------------
# Interruptions and faults during install


def test_failure_during_reinstall_keeps_the_previous_dataset(sources_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    dl.download(cfg(data, mirror=str(sources_dir)))
    before = dataset_files(data)
    manifest = DataLayout(data).manifest.read_text()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(dl, "validate", interrupted)
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

    monkeypatch.setattr(dl, "_copy_with_progress", full)
    r = runner.invoke(app, ["download", "--mirror", str(mirror), "-d", str(data)])
    assert "no space left on the device" in one_line_error(r)
    assert dataset_files(data) == before


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
    real = dl._tar_members
    monkeypatch.setattr(dl, "_tar_members", lambda p: ((n, k, 1, li, o) for n, k, _s, li, o in real(p)))
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


def test_oversized_caption_file_is_refused_by_validation(dataset_dir, tmp_path):
    """Caption files are read with a cap: one placed by hand (or let through by raised limits) is named."""
    from flowercli.config import CAPTION_FILE_MAX_BYTES

    layout = DataLayout(Path(shutil.copytree(dataset_dir, tmp_path / "data")))
    path = next(layout.text_c10.rglob("image_00002.txt"))
    path.write_bytes(b"a red flower\n" * (CAPTION_FILE_MAX_BYTES // 13 + 1))
    with pytest.raises(DataError, match=r"caption file text_c10/class_00002/image_00002\.txt is larger than "
                                        r"1,048,576 bytes: not a caption file; pass"):
        dl.validate(layout)


def test_another_copy_of_the_same_mirror_is_not_extracted_again(sources_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    dl.download(cfg(data, mirror=str(sources_dir)))
    before = dataset_files(data)
    other = copy_sources(sources_dir, tmp_path / "other")
    calls = []
    monkeypatch.setattr(dl, "safe_extract", lambda *a, **k: calls.append(a))
    out = dl.download(cfg(data, mirror=str(other)))
    assert out["status"] == "verified" and calls == []
    assert json.loads(DataLayout(data).manifest.read_text())["request"]["mirror"] == str(other)
    before.pop("manifest.json")
    after = dataset_files(data)
    after.pop("manifest.json")
    assert after == before
    # and now it is the plain fast path for that mirror
    assert dl.download(cfg(data, mirror=str(other)))["status"] == "verified"


def test_a_second_download_into_the_same_data_dir_is_refused(sources_dir, tmp_path):
    import fcntl

    layout = DataLayout(tmp_path / "data")
    layout.downloads.mkdir(parents=True)
    with open(layout.downloads / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # what a running download holds
        r = runner.invoke(app, ["download", "--mirror", str(sources_dir), "-d", str(layout.root)])
        assert "another flowercli download is working" in one_line_error(r)
    assert dl.download(cfg(layout.root, mirror=str(sources_dir)))["status"] == "installed"
