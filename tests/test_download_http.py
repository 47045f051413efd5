"""The HTTP client: HTTP mirrors, resume with Range after a dropped connection or a killed run,
retries, Google Drive's confirm page, and the FID network downloaded through the same client.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
import urllib.parse

import pytest

import flowercli.download as dl
from flowercli.config import DataLayout
from flowercli.download import sources
from flowercli.download.http import _drive_next_url
from flowercli.download.sources import _drive_file_id
from flowercli.errors import DownloadError

from conftest import N_IMAGES
from download_support import cfg, copy_sources, serve  # noqa: F401  (serve: the fixture)


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
    page = (b'<html><title>Google Drive - Virus scan warning</title><body>'
            b'<form id="download-form" action="/download" method="get">'
            b'<input type="submit" value="Download anyway"><input type="hidden" name="id" value="FILEID">'
            b'<input type="hidden" name="export" value="download"><input type="hidden" name="confirm" value="t">'
            b'<input type="hidden" name="uuid" value="u-1"></form></body></html>')

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
    monkeypatch.setattr(sources, "OFFICIAL_BASE_URL", srv.url)
    monkeypatch.setattr(sources, "OFFICIAL_MD5", md5)
    monkeypatch.setattr(sources, "CAPTIONS_DRIVE_ID", "FILEID")
    monkeypatch.setattr(sources, "DRIVE_DOWNLOAD_URL", srv.url + "uc?export=download&id={id}")
    manifest = dl.download(cfg(tmp_path / "data"))
    assert manifest["counts"]["captions"] == 10 * N_IMAGES
    assert manifest["sources"]["images"]["verified_with"] == "official md5"
    assert manifest["sources"]["captions"]["file"] == ".downloads/cvpr2016_flowers.tar.gz"
    assert [p for _, p, _ in srv.log if p.startswith(("/uc", "/download"))] == \
        ["/uc?export=download&id=FILEID", "/download?id=FILEID&export=download&confirm=t&uuid=u-1"]


def test_drive_confirm_page_variants():
    base = "https://drive.google.com/uc?export=download&id=ABC"
    link = '<a id="uc-download-link" href="/uc?export=download&amp;confirm=X1y_&amp;id=ABC">Download anyway</a>'
    assert _drive_next_url(link, base) == "https://drive.google.com/uc?export=download&confirm=X1y_&id=ABC"
    import http.cookiejar

    jar = http.cookiejar.CookieJar()
    jar.set_cookie(http.cookiejar.Cookie(0, "download_warning_123", "TOK", None, False, ".drive.google.com", True,
                                         True, "/", True, False, None, False, None, None, {}))
    assert _drive_next_url("<html>virus scan</html>", base, jar).endswith("id=ABC&confirm=TOK")
    with pytest.raises(DownloadError, match="quota"):
        _drive_next_url("<html>Too many users have viewed or downloaded this file recently</html>", base)
    with pytest.raises(DownloadError, match="--captions"):
        _drive_next_url("<html>Sign in</html>", base)
    assert _drive_file_id("https://drive.google.com/file/d/0B0ywwgffWnLLcms2WWJQRFNSWEM/view?usp=sharing") \
        == "0B0ywwgffWnLLcms2WWJQRFNSWEM"


def test_killed_download_leaves_no_dataset_and_resumes(sources_dir, tmp_path, serve):
    srv = serve(sources_dir, chunk_delay=0.05)
    data = tmp_path / "data"
    part = data / ".downloads" / "102flowers.tgz.part"
    proc = subprocess.Popen([sys.executable, "-m", "flowercli", "download", "--mirror", srv.url,
                             "--data-dir", str(data), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 90  # the child's start alone can take a minute on a loaded machine
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
# The FID network, downloaded through the same client


def test_fid_network_download_is_resumed_and_recorded(tmp_path, serve, monkeypatch):
    """A dropped connection is resumed with Range; the file appears under its name only when complete,
    its sha256 is recorded, and a later run uses it without asking the server again."""
    from flowercli.metrics import features
    from flowercli.report import ListReporter

    (tmp_path / "srv").mkdir()
    body = bytes(range(256)) * 400  # 100 KB stands in for the 95 MB network
    (tmp_path / "srv" / "net.pt").write_bytes(body)
    srv = serve(tmp_path / "srv", drop_once={"net.pt"})
    monkeypatch.setattr(features, "NVIDIA_URL", srv.url + "net.pt")
    cache = tmp_path / "cache"
    path = features.download_nvidia_inception(cache, ListReporter())
    assert path == cache / features.NVIDIA_FILE and path.read_bytes() == body
    assert [rng for _, p, rng in srv.log if p == "/net.pt"] == [None, f"bytes={len(body) // 2}-"]
    digest = hashlib.sha256(body).hexdigest()
    assert (cache / (features.NVIDIA_FILE + ".sha256")).read_text().split() == [digest, features.NVIDIA_FILE]
    assert sorted(p.name for p in cache.iterdir()) == [features.NVIDIA_FILE, features.NVIDIA_FILE + ".sha256"]
    requests = len(srv.log)
    assert features.download_nvidia_inception(cache, ListReporter()) == path and len(srv.log) == requests


def test_fid_network_download_failure_names_the_offline_ways(tmp_path, serve, monkeypatch):
    from flowercli.metrics import features

    srv = serve(tmp_path)  # serves nothing: 404
    monkeypatch.setattr(features, "NVIDIA_URL", srv.url + "net.pt")
    with pytest.raises(features.InceptionError) as info:
        features.download_nvidia_inception(tmp_path / "cache")
    msg = str(info.value)
    assert msg.startswith(srv.url + "net.pt: HTTP 404") and "\n" not in msg
    assert "pip install 'flowercli[offline]'" in msg and "--inception PATH" in msg and "--mirror" not in msg
    assert not (tmp_path / "cache" / features.NVIDIA_FILE).exists()
