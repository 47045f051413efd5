"""Faults (issue 7): disk full, SIGKILL, corrupt files, hostile pickles. Nothing saved may be lost.

Covered elsewhere and not repeated here (see docs/RELIABILITY.md for the full map):
tests/test_download_*.py - disk full while copying a mirror file, SIGKILL during an HTTP download
(resumed with Range), corrupt/hostile archives; tests/test_train.py - SIGINT/SIGTERM save and
exit 130/143, the run lock, --resume past a truncated checkpoint; tests/test_generate.py - a
truncated and a code-running checkpoint given to `generate`; tests/test_data.py - a truncated or
garbage HDF5 file and a writer failing midway. tests/test_soak.py kills `train` at random.
"""

from __future__ import annotations

import ast
import errno
import io
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import flowercli
import flowercli.download as dl
from flowercli.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from flowercli.cli import app
from flowercli.config import DataLayout, DownloadConfig, EmbedConfig
from flowercli.download import archive
from flowercli.download import http as download_http
from flowercli.errors import CheckpointError, DataError
from flowercli.report import ListReporter

from download_support import serve  # noqa: F401  (the fixture: a real HTTP server on 127.0.0.1)

runner = CliRunner()
TINY = ["--set", "image_size=16", "--set", "g_channels=8", "--set", "d_channels=8", "--batch-size", "4"]
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def one_error_line(result) -> str:
    """Exit 1, no traceback, one `Error:` line and it is the last line on stderr."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.output and lines[-1].startswith("Error: "), result.output
    assert sum(line.startswith("Error") for line in lines) == 1, result.output
    return lines[-1]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tiny_state(step: int) -> dict:
    return {"config": {"model": {}}, "step": step, "G_ema": {"w": torch.full((4, 4), float(step)),
                                                             "v": torch.full((256,), 7.0)}}


# ---------------------------------------------------------------------------------------------
# Disk full (ENOSPC) while writing: a clear error, the previous good file intact, no temp files


@pytest.fixture(scope="module")
def trained_runs(embedded_dir, tmp_path_factory) -> Path:
    """A runs folder whose run "r" has checkpoints at steps 1 and 2 (read-only: tests copy it)."""
    runs = tmp_path_factory.mktemp("reliability-runs")
    res = runner.invoke(app, train_args(embedded_dir, runs, "--max-steps", "2"))
    assert res.exit_code == 0, res.output
    return runs


def train_args(data: Path, runs: Path, *extra: str) -> list[str]:
    return ["train", "-d", str(data), "--runs-dir", str(runs), "--run", "r", *TINY, "--checkpoint-every", "1", *extra]


def copy_runs(trained_runs: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_runs, tmp_path / "runs"))


def test_disk_full_while_writing_a_checkpoint(tmp_path, embedded_dir, trained_runs, monkeypatch):
    runs = copy_runs(trained_runs, tmp_path)
    real_save = torch.save

    def save(obj, f, *a, **k):  # half a checkpoint, then the disk is full
        f.write(b"PK\x03\x04 half a checkpoint")
        raise ENOSPC

    monkeypatch.setattr(torch, "save", save)
    args = train_args(embedded_dir, runs, "--max-steps", "3", "--resume")
    line = one_error_line(runner.invoke(app, args))
    assert "step-0000003.pt" in line and "No space left on device" in line and "previous checkpoint is intact" in line
    ckpts = runs / "r" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest.pt", "step-0000001.pt", "step-0000002.pt"]  # no temp file
    assert load_checkpoint(ckpts / "latest.pt")["step"] == 2

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the run continues from step 2
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert load_checkpoint(ckpts / "latest.pt")["step"] == 3


def test_disk_full_while_writing_the_training_log(tmp_path, embedded_dir, trained_runs, monkeypatch):
    import flowercli.trainlog as trainlog_mod

    runs = copy_runs(trained_runs, tmp_path)

    def full(path, record):
        raise ENOSPC

    monkeypatch.setattr(trainlog_mod, "write_jsonl", full)
    line = one_error_line(runner.invoke(app, train_args(embedded_dir, runs, "--max-steps", "3", "--resume")))
    assert "No space left on device" in line
    assert load_checkpoint(runs / "r" / "checkpoints" / "latest.pt")["step"] == 2


def test_resume_repairs_a_latest_pt_left_one_checkpoint_behind(tmp_path):
    """A kill between writing step-N.pt and relinking latest.pt (seen in tests/test_soak.py)."""
    from flowercli.checkpoint import load_latest

    save_checkpoint(tiny_state(1), tmp_path, keep=3)
    latest = (tmp_path / "latest.pt").read_bytes()
    save_checkpoint(tiny_state(2), tmp_path, keep=3)
    (tmp_path / "latest.pt").unlink()
    (tmp_path / "latest.pt").write_bytes(latest)  # as the kill left it: whole, one behind
    assert load_latest(tmp_path)["step"] == 2
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 2
    assert os.path.samefile(tmp_path / "latest.pt", tmp_path / "step-0000002.pt")


def test_disk_full_while_linking_latest_keeps_the_old_latest(tmp_path, monkeypatch):
    save_checkpoint(tiny_state(1), tmp_path, keep=3)

    def no_space(*a, **k):
        raise ENOSPC

    monkeypatch.setattr(os, "link", no_space)  # no hard links here: falls back to a copy ...
    monkeypatch.setattr(shutil, "copyfile", no_space)  # ... which finds the disk full
    with pytest.raises(CheckpointError, match="step-0000002.pt.*No space left.*previous checkpoint is intact"):
        save_checkpoint(tiny_state(2), tmp_path, keep=3)
    assert load_checkpoint(tmp_path / "latest.pt")["step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("previous", [True, False], ids=["over-a-good-file", "fresh"])
def test_disk_full_while_writing_the_hdf5(tmp_path, embedded_dir, tiny_roberta, monkeypatch, previous):
    import h5py

    data = Path(shutil.copytree(embedded_dir, tmp_path / "data"))
    emb_dir = DataLayout(data).embeddings_dir
    if not previous:
        shutil.rmtree(emb_dir)
    before = tree(emb_dir) if previous else {}
    real = h5py.Group.create_dataset

    def create_dataset(self, name, *a, **k):
        if name == "labels":  # captions and vectors are already in the temp file
            raise ENOSPC
        return real(self, name, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)
    res = runner.invoke(app, ["embed", "--encoder", str(tiny_roberta), "-d", str(data), "--device", "cpu"])
    line = one_error_line(res)
    assert ".h5" in line and "No space left on device" in line
    assert ("previous file is intact" if previous else "nothing was written") in line
    if previous:
        assert tree(emb_dir) == before  # byte for byte, and no temp file
    else:
        assert not emb_dir.exists()  # not even the folder it made for the file


def test_disk_full_while_extracting_keeps_the_installed_dataset(sources_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    dl.download(DownloadConfig(data_dir=data, mirror=str(sources_dir)))
    before = tree(DataLayout(data).dataset)
    real, calls = archive._write_member, []

    def write_member(*a, **k):
        calls.append(1)
        if len(calls) == 35:  # 29 caption and split files, then the sixth image
            raise OSError(errno.ENOSPC, "No space left on device", "image_00005.jpg")
        return real(*a, **k)

    monkeypatch.setattr(archive, "_write_member", write_member)
    line = one_error_line(runner.invoke(app, ["download", "--mirror", str(sources_dir), "-d", str(data), "--force"]))
    assert "no space left on the device" in line and "free some space" in line
    assert tree(DataLayout(data).dataset) == before
    assert sorted(p.name for p in data.iterdir()) == [".downloads", "oxford102"]  # no half-extracted folder


def test_disk_full_during_an_http_download_keeps_the_part_and_resumes(sources_dir, tmp_path, serve, monkeypatch):  # noqa: F811
    srv = serve(sources_dir)
    data = tmp_path / "data"
    part = data / ".downloads" / "102flowers.tgz.part"
    real_open = open

    class Full(io.RawIOBase):  # accepts 1,000 bytes, then the disk is full
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            room = 1000 - self.n
            self.f.write(bytes(b[:room]))
            self.n += min(room, len(b))
            if len(b) > room:
                raise ENOSPC
            return len(b)

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Full(f) if str(path) == str(part) else f

    cfg = DownloadConfig(data_dir=data, mirror=srv.url, retry_wait=0.0, timeout=5.0)
    monkeypatch.setattr(download_http, "open", fake_open, raising=False)  # the module's own name lookup
    with pytest.raises(Exception) as info:
        dl.download(cfg)
    monkeypatch.undo()
    assert "no space left on the device" in str(info.value) and not isinstance(info.value, OSError)
    assert part.stat().st_size == 1000 and not DataLayout(data).dataset.exists()
    dl.download(cfg)  # space freed: the download continues where it stopped
    assert ("GET", "/102flowers.tgz", "bytes=1000-") in srv.log
    assert len(list(DataLayout(data).jpg.iterdir())) == 24


def test_disk_full_while_writing_images_leaves_no_half_set(trained_runs, tmp_path, monkeypatch):
    import flowercli.images as images

    ckpt = trained_runs / "r" / "checkpoints" / "latest.pt"
    real, calls = images.save_png, []

    def save_png(array, path):
        calls.append(path)
        if len(calls) == 3:
            raise ENOSPC
        real(array, path)

    monkeypatch.setattr(images, "save_png", save_png)
    out = tmp_path / "new" / "out"
    line = one_error_line(runner.invoke(app, ["generate", "a red flower", "-n", "4", "-c", str(ckpt), "--out", str(out),
                                              "--device", "cpu"]))
    assert "No space left on device" in line and str(out) in line
    assert not (tmp_path / "new").exists()  # the two images written and the folders made for them are gone


# ---------------------------------------------------------------------------------------------
# SIGKILL: nothing half-written under a final name, and a rerun completes

_SLOW_HDF5 = """
import sys, time, h5py
real = h5py.Group.create_dataset
def slow(self, *a, **k):  # stretch the write so that a kill lands inside it
    out = real(self, *a, **k)
    time.sleep(0.25)
    return out
h5py.Group.create_dataset = slow
from flowercli.cli import app
sys.argv = ["flowercli", *sys.argv[1:]]
app()
"""

_SLOW_EXTRACT = """
import sys, time
import flowercli.download.archive as archive
real = archive._write_member
def slow(*a, **k):
    time.sleep(0.03)
    return real(*a, **k)
archive._write_member = slow
from flowercli.cli import app
sys.argv = ["flowercli", *sys.argv[1:]]
app()
"""


def _kill_when(proc: subprocess.Popen, ready, delay: float, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    try:
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the command finished before it could be killed"
        assert ready(), "the write never started"
        time.sleep(delay)
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait()


def test_sigkill_during_embed_leaves_no_hdf5_and_a_rerun_completes(dataset_dir, tiny_roberta, tmp_path):
    from flowercli.embed import embed
    from flowercli.embeddings import open_embeddings

    data = tmp_path / "data"
    shutil.copytree(dataset_dir / "oxford102", data / "oxford102")
    emb_dir = DataLayout(data).embeddings_dir
    delay = random.uniform(0.0, 1.5)  # the write takes >= 7 x 0.25 s: the kill lands inside it
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_HDF5, "embed", "--encoder", str(tiny_roberta), "-d", str(data),
                             "--device", "cpu", "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: emb_dir.is_dir() and any(emb_dir.glob(".*.tmp")), delay)
    names = sorted(p.name for p in emb_dir.iterdir())
    assert not [n for n in names if n.endswith(".h5")], f"a half-written file is visible after a kill at +{delay:.2f} s: {names}"
    assert len(names) == 1 and names[0].endswith(f".pid{proc.pid}.tmp")  # only the dead writer's temp file

    out = embed(EmbedConfig(data_dir=data, encoder=str(tiny_roberta), device="cpu"))  # the rerun
    assert open_embeddings(out).vectors.shape[:2] == (24, 10)
    assert sorted(p.name for p in emb_dir.iterdir()) == [out.name]  # the stale temp file is cleared


def test_sigkill_during_extraction_leaves_no_dataset_and_a_rerun_completes(sources_dir, tmp_path):
    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_EXTRACT, "download", "--mirror", str(sources_dir),
                             "-d", str(data), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: data.is_dir() and any(data.glob(".oxford102.tmp-*/images/jpg/*")), random.uniform(0, 0.3))
    assert not DataLayout(data).dataset.exists()
    assert any(data.glob(".oxford102.tmp-*"))  # the half-extracted folder sits under a temporary name
    dl.download(DownloadConfig(data_dir=data, mirror=str(sources_dir)))
    assert len(list(DataLayout(data).jpg.iterdir())) == 24
    assert sorted(p.name for p in data.iterdir()) == [".downloads", "oxford102"]


def test_leftovers_of_killed_writers_are_cleared_by_the_next_write(tmp_path):
    from flowercli.fsutil import atomic_write

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {f".step-0000005.pt.pid{dead.stdout.strip()}.k3x_9q.tmp": False,  # a killed writer's: removed
                 f".x.h5.pid{dead.stdout.strip()}.tmp": False,
                 f".step-0000005.pt.pid{live.pid}.abc.tmp": True,  # a running writer's: kept
                 ".notes.tmp": True, "other.pid1.tmp": True}  # not ours: kept
        for name in names:
            (tmp_path / name).write_bytes(b"half")
        atomic_write(tmp_path / "config.json", lambda f: f.write(b"{}"))
        assert {n: (tmp_path / n).exists() for n in names} == names
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------------------------------
# Corrupt files: one line naming the file


def _zero_inside_weights(raw: bytes) -> bytes:
    """Bit rot where torch.load itself would not notice: inside a tensor's bytes, headers intact."""
    at = raw.index(np.full(64, 7.0, np.float32).tobytes()) + 64
    return raw[:at] + bytes(16) + raw[at + 16:]


def _damage(raw: bytes, how: str) -> bytes:
    return {
        "truncated-header": raw[:40],
        "truncated-middle": raw[: len(raw) // 2],
        "truncated-last-byte": raw[:-1],
        "bit-rot-in-weights": _zero_inside_weights(raw),
        "random-bytes": np.random.default_rng(0).bytes(len(raw)),
        "gzip-of-it": __import__("gzip").compress(raw),
        "text": b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n",  # an LFS pointer
    }[how]


@pytest.mark.parametrize("how", ["truncated-header", "truncated-middle", "truncated-last-byte", "bit-rot-in-weights",
                                 "random-bytes", "gzip-of-it", "text"])
def test_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, how):
    path = save_checkpoint(tiny_state(1), tmp_path, keep=3)
    path.write_bytes(_damage(path.read_bytes(), how))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg and len(msg) < 400
    if how.startswith("truncated"):  # torch would only say "failed finding central directory"
        assert "is damaged or incomplete (truncated?" in msg and msg.endswith("use another checkpoint")
    else:
        assert "corrupt" in msg


def test_resume_when_every_checkpoint_is_damaged_says_so(tmp_path, embedded_dir, trained_runs):
    runs = copy_runs(trained_runs, tmp_path)
    for p in list_checkpoints(runs / "r" / "checkpoints"):
        p.write_bytes(p.read_bytes()[:100])
    res = runner.invoke(app, train_args(embedded_dir, runs, "--max-steps", "3", "--resume"))
    line = one_error_line(res)
    assert "no readable checkpoint" in line
    warnings = [w for w in res.stderr.splitlines() if w.startswith("Warning:")]
    assert len(warnings) == 2 and all("step-000000" in w and "damaged or incomplete" in w for w in warnings)


@pytest.mark.parametrize("how", ["truncated", "empty", "text", "png-named-jpg"])
def test_damaged_image_is_one_line_naming_the_file(dataset_dir, tmp_path, how):
    from PIL import Image

    from flowercli.images import load_images

    folder = Path(shutil.copytree(DataLayout(dataset_dir).jpg, tmp_path / "jpg"))
    path = folder / "image_00002.jpg"
    raw = path.read_bytes()
    if how == "png-named-jpg":  # a valid image in another format is fine
        Image.open(io.BytesIO(raw)).save(path, format="PNG")
        assert load_images(folder, [2], 16).shape == (1, 3, 16, 16)
        return
    path.write_bytes({"truncated": raw[: len(raw) // 2], "empty": b"", "text": b"<html>404</html>"}[how])
    with pytest.raises(DataError) as info:
        load_images(folder, [1, 2, 3], 16)
    msg = str(info.value)
    assert str(path) in msg and "\n" not in msg and "flowercli download --force" in msg


def test_corrupt_archive_member_is_one_line(tmp_path):
    """A gzip stream that breaks off inside a member (not only at the end) is named, not a traceback."""
    payload = np.random.default_rng(1).bytes(200_000)  # incompressible: the damage lands inside it
    with tarfile.open(tmp_path / "a.tgz", "w:gz") as t:
        info = tarfile.TarInfo("jpg/image_00001.jpg")
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    raw = bytearray((tmp_path / "a.tgz").read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)
    (tmp_path / "a.tgz").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"^a\.tgz is corrupt or not a tar/zip archive \(.*\); check where it came from$"):
        dl.safe_extract(tmp_path / "a.tgz", tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# Hostile files: pickles that would run code are refused; no unsafe loaders anywhere


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_code_running_checkpoint_is_refused_and_resume_falls_back(tmp_path, trained_runs):
    from flowercli.checkpoint import load_latest

    runs = copy_runs(trained_runs, tmp_path)
    ckpt_dir = runs / "r" / "checkpoints"
    newest = ckpt_dir / "step-0000002.pt"
    marker = tmp_path / "pwned"
    state = load_checkpoint(newest)
    state["G_ema"] = _Payload(marker)  # a real checkpoint with one poisoned entry
    torch.save(state, newest)
    warnings: list[str] = []
    resumed = load_latest(ckpt_dir, warn=warnings.append)  # what `train --resume` reads
    assert not marker.exists(), "unpickling ran code"
    assert resumed["step"] == 1 and resumed["_path"] == str(ckpt_dir / "step-0000001.pt")
    assert warnings == [f"checkpoint {newest} is corrupt or not a flowercli checkpoint: it contains Python objects "
                        "that are not plain weights (refused for safety); trying the previous checkpoint"]


@pytest.mark.parametrize("protocol", [2, 5])
def test_plain_pickle_file_is_refused(tmp_path, protocol):
    import pickle

    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    path.write_bytes(pickle.dumps({"G_ema": _Payload(marker), "config": {}}, protocol=protocol))
    with pytest.raises(CheckpointError, match="model.pt"):
        load_checkpoint(path)
    assert not marker.exists()


def _package_sources() -> list[Path]:
    return sorted(Path(flowercli.__file__).parent.rglob("*.py"))


def test_no_unsafe_loaders_or_shells_in_the_package():
    """Every torch.load says weights_only=True, np.load allow_pickle=False; no pickle, no shell, no eval."""
    problems = []
    for path in _package_sources():
        tree_ = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree_):
            where = f"{path.name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "dill", "marshal", "shelve", "cloudpickle") for n in names):
                    problems.append(f"{where} imports an unpickler")
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if func == "torch.load" and kw.get("weights_only") != "True":
                problems.append(f"{where} torch.load without weights_only=True")
            if func in ("np.load", "numpy.load") and kw.get("allow_pickle") != "False":
                problems.append(f"{where} np.load without allow_pickle=False")
            if kw.get("shell") == "True" or func in ("os.system", "os.popen", "eval", "exec"):
                problems.append(f"{where} {func}(...) runs a shell or code")
            if kw.get("trust_remote_code") == "True":
                problems.append(f"{where} trusts remote code")
            if func.endswith(".extractall"):
                problems.append(f"{where} extractall (use download.safe_extract)")
    assert not problems, problems


def test_official_sources_are_https_and_plain_http_mirrors_are_warned_about():
    assert dl.OFFICIAL_BASE_URL.startswith("https://") and dl.DRIVE_DOWNLOAD_URL.startswith("https://")

    class Net:  # what resolve_sources asks of the network, answered offline
        def get_small(self, url):
            return None  # no SHA256SUMS: the official md5 sums apply

        def exists(self, url):
            return url.endswith("/captions.tgz")

    rep = ListReporter()
    sources = dl.resolve_sources(DownloadConfig(data_dir=Path("."), mirror="http://example.org/f/"), Net(), rep)
    assert any("plain HTTP" in m for kind, m in rep.messages if kind == "warn")
    assert {s.name: s.md5 for s in sources if s.md5} == dl.OFFICIAL_MD5  # still checked against the official sums
    rep = ListReporter()
    dl.resolve_sources(DownloadConfig(data_dir=Path("."), mirror="https://example.org/f/"), Net(), rep)
    assert not any(kind == "warn" for kind, _ in rep.messages)
