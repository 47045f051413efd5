"""`flowercli report`: the summary read from a run's files (pure), and the PNG drawn from it."""

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flowercli.cli import app
from flowercli.runreport import LogRead, RunData, curve, read_log, sessions, summarise, summary_lines

runner = CliRunner()
KEYS = {"run", "name", "step", "epoch", "epochs", "max_steps", "png", "log", "time", "img_per_s", "losses",
        "quick_fid", "checkpoints", "samples", "captions", "encoder"}


@pytest.fixture(scope="module")
def tiny_run(embedded_dir, tmp_path_factory) -> Path:
    """A real two-epoch run of the tiny model, trained through the CLI, a log line per step."""
    runs = tmp_path_factory.mktemp("report") / "runs"
    res = runner.invoke(app, ["train", "-d", str(embedded_dir), "--runs-dir", str(runs), "--run", "tiny", "-q",
                              "--epochs", "2", "--batch-size", "4", "--set", "threads=1", "--set", "log_every=1",
                              "--set", "model.image_size=16", "--set", "model.g_channels=8",
                              "--set", "model.d_channels=8", "--set", "model.cond_dim=8"])
    assert res.exit_code == 0, res.output
    return runs / "tiny"


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "runs" / run.name
    shutil.copytree(run, dst)
    (dst / "report.png").unlink(missing_ok=True)
    return dst


def log_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_report_prints_the_summary_and_writes_the_png(tiny_run):
    lines, config = log_lines(tiny_run), json.loads((tiny_run / "config.json").read_text())
    res = runner.invoke(app, ["report", "tiny", "--runs-dir", str(tiny_run.parent)])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert f"steps        {lines[-1]['step']:,} (epoch 2.00 of 2)" in out
    assert "wall clock" in out and f"cpu, 1 thread, {config['precision'].removeprefix('torch.')}" in out
    assert f"latest {tiny_run / 'checkpoints'}" in out and "step-" in out
    assert f"loss_d {lines[-1]['loss_d']:.3f}" in out and f"loss_g {lines[-1]['loss_g']:.3f}" in out
    enc = config["encoder"]  # the synthetic captions record no archive: the set is unknown
    assert f"captions     unknown; encoder {enc['encoder']} ({enc['dim']}-d, {enc['pooling']})" in out
    assert "quick FID    none logged" in out and "epoch-0002.png" in out
    png = tiny_run / "report.png"
    assert f"report       {png}" in out
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.width >= 1000 and im.height >= 600
        assert len(np.unique(np.asarray(im.convert("L")))) > 20  # drawn on, not a blank page
    # The run's path works as well as its name, with the same numbers.
    again = runner.invoke(app, ["report", str(tiny_run), "--runs-dir", str(tiny_run.parent / "elsewhere")])
    assert again.exit_code == 0 and again.stdout == out


def test_json_has_stable_keys_and_the_logged_numbers(tiny_run, tmp_path):
    lines, config = log_lines(tiny_run), json.loads((tiny_run / "config.json").read_text())
    res = runner.invoke(app, ["report", str(tiny_run), "--json", "--out", str(tmp_path / "sub" / "r.png")])
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert set(s) == KEYS
    assert s["step"] == lines[-1]["step"] and s["epoch"] == 2.0 and s["epochs"] == 2 and s["max_steps"] is None
    assert s["png"] == str(tmp_path / "sub" / "r.png") and Path(s["png"]).is_file()
    assert s["log"] == {**s["log"], "lines": len(lines), "skipped": 0, "sessions": 1, "non_finite_step": None}
    assert s["time"]["wall_s"] == lines[-1]["time"] and s["time"]["threads"] == 1 and s["time"]["device"] == "cpu"
    assert s["img_per_s"]["latest"] == lines[-1]["img_per_s"]
    assert s["losses"]["loss_d"] == lines[-1]["loss_d"] and list(s["losses"])[:2] == ["loss_d", "loss_g"]
    assert s["quick_fid"] == {"n": 0, "latest": None, "best": None}
    ckpt = Path(s["checkpoints"]["latest"])
    assert ckpt.is_file() and ckpt.parent == tiny_run / "checkpoints" and s["checkpoints"]["latest_step"] == s["step"]
    assert s["samples"]["newest_epoch"] == 2 and s["samples"]["count"] == 2
    assert s["captions"] == {"archive": None, "sha256": None}
    assert s["encoder"] == {"name": config["encoder"]["encoder"], "dim": 32, "pooling": "mean"}


def test_quick_fid_best_and_damaged_lines(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path)
    lines = log_lines(run)
    for i, rec in enumerate(lines):
        if i % 2:
            rec["quick_fid"] = 300.0 - 10 * i + (25 if i == len(lines) - 1 else 0)
    best = min((r for r in lines if "quick_fid" in r), key=lambda r: r["quick_fid"])
    text = [json.dumps(r) + "\n" for r in lines]
    (run / "log.jsonl").write_text("".join(text[:3] + ["\n", "   \n"] + text[3:]) + '{"step": 99, "loss_d')
    config = json.loads((run / "config.json").read_text())
    config["encoder"].update(captions_archive="captions_reed.tgz", captions_sha256="ab" * 32)
    (run / "config.json").write_text(json.dumps(config))
    res = runner.invoke(app, ["report", str(run), "--json"])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    assert "skipped 3 empty or unreadable line(s)" in res.stderr
    s = json.loads(res.stdout)
    fids = [r for r in lines if "quick_fid" in r]
    assert s["quick_fid"]["n"] == len(fids) and s["quick_fid"]["latest"] == {"step": fids[-1]["step"],
                                                                              "value": fids[-1]["quick_fid"]}
    assert s["quick_fid"]["best"] == {"step": best["step"], "value": best["quick_fid"], "checkpoint": None}
    assert s["log"]["skipped"] == 3 and s["log"]["lines"] == len(lines) and Path(s["png"]).is_file()
    assert s["captions"] == {"archive": "captions_reed.tgz", "sha256": "ab" * 32}
    text_res = runner.invoke(app, ["report", str(run)])
    assert f"best {best['quick_fid']:.2f} at step {best['step']:,}" in text_res.stdout
    assert "captions     captions_reed.tgz (sha256 abababababab); encoder" in text_res.stdout


def test_not_a_run_is_one_line_error(tmp_path, tiny_run):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for args, says in ((["report", str(tmp_path / "empty")], "is not a training run"),
                       (["report", "nope", "--runs-dir", str(tmp_path)], "no run named 'nope'"),
                       (["report", str(tmp_path / "file.txt")], "is a file, not a run folder"),
                       (["report", str(tiny_run), "--out", str(tmp_path)], "is a folder"),
                       (["report", str(tiny_run), "--out", str(tmp_path / "r.jpg")], "ending in .png")):
        res = runner.invoke(app, args)
        assert res.exit_code == 1, (args, res.output)
        assert says in res.stderr and res.stderr.startswith("Error: ") and len(res.stderr.strip().splitlines()) == 1
        assert "Traceback" not in res.output
    assert not (tmp_path / "empty" / "report.png").exists()


def test_without_matplotlib_summary_and_json_still_work(tiny_run, tmp_path, monkeypatch):
    run = copy_run(tiny_run, tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` finds when it is missing
    res = runner.invoke(app, ["report", str(run)])
    assert res.exit_code == 0, res.output
    assert "steps" in res.stdout and "report " not in res.stdout and not (run / "report.png").exists()
    assert res.stderr.count("pip install 'flowercli[plots]'") == 1 and len(res.stderr.strip().splitlines()) == 1
    res = runner.invoke(app, ["report", str(run), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["png"] is None
    res = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "r.png")])
    assert res.exit_code == 1 and "needs matplotlib" in res.stderr and "flowercli[plots]" in res.stderr
    assert not (tmp_path / "r.png").exists() and res.stdout == ""


def test_help_has_examples():
    res = runner.invoke(app, ["report", "--help"])
    assert res.exit_code == 0 and "flowercli report my-run --json" in res.stdout and "--out" in res.stdout


# --- the summary alone, on logs written here (no training) ------------------------------------

def rec(step, time, **kw):
    return {"step": step, "epoch": step / 4, "loss_d": 1.0, "loss_g": 2.0, "img_per_s": 10.0, "time": time, **kw}


def fake_run(tmp_path, records, raw_tail="") -> RunData:
    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + raw_tail)
    log = read_log(run / "log.jsonl")
    return RunData(run_dir=run, config={}, log=log, checkpoints=[], samples=[])


def test_resumed_runs_add_up_their_sessions_and_later_lines_win(tmp_path):
    # Killed after logging step 4 with the last checkpoint at step 2; the resume logs 3 and 4 again.
    first = [rec(1, 1.0), rec(2, 2.0), rec(3, 3.0, loss_d=9.0), rec(4, 4.0)]
    second = [rec(3, 0.5, loss_d=3.0), rec(4, 1.0), rec(5, 1.5, loss_d=5.0)]
    run = fake_run(tmp_path, first + second)
    assert [len(s) for s in sessions(run.log.records)] == [4, 3]
    assert [r["step"] for r in curve(run.log.records)] == [1, 2, 3, 4, 5]
    assert curve(run.log.records)[2]["loss_d"] == 3.0
    s = summarise(run)
    assert s["time"]["wall_s"] == 5.5 and s["log"]["sessions"] == 2 and s["step"] == 5
    assert s["losses"] == {"loss_d": 5.0, "loss_g": 2.0}
    assert any("over 2 sessions" in line for line in summary_lines(s))


def test_read_log_skips_what_it_cannot_use(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"step": 1}\n\n[1, 2]\n{"no_step": 1}\n{"step": "3"}\n\x00\x00\n{"step": 2, "loss_d": 0.')
    log = read_log(path)
    assert [r["step"] for r in log.records] == [1] and log.skipped == 6
    assert read_log(tmp_path / "missing.jsonl") == LogRead()


def test_best_from_the_log_wins_and_nan_is_reported(tmp_path):
    records = [rec(1, 1.0, quick_fid=90.0), rec(2, 2.0, quick_fid=80.0),
               rec(3, 3.0, quick_fid=85.0, best={"step": 1, "quick_fid": 90.0, "checkpoint": "best.pt"}),
               rec(4, 4.0, loss_g=math.nan, mode_seek=0.1)]
    s = summarise(fake_run(tmp_path, records))
    assert s["quick_fid"]["best"] == {"step": 1, "value": 90.0, "checkpoint": "best.pt"}
    assert s["quick_fid"]["latest"] == {"step": 3, "value": 85.0}
    assert s["losses"] == {"loss_d": 1.0, "loss_g": None, "mode_seek": 0.1}
    assert s["log"]["non_finite_step"] == 4
    assert any("NaN or infinite, first at step 4" in line for line in summary_lines(s))
    # A line that only flags itself as the best so far.
    s = summarise(fake_run(tmp_path, records[:2] + [rec(3, 3.0, quick_fid=85.0, best=True)]))
    assert s["quick_fid"]["best"] == {"step": 3, "value": 85.0, "checkpoint": None}
    # The run's best.pt is named as the best checkpoint.
    (tmp_path / "r" / "checkpoints" / "best.pt").write_bytes(b"x")
    s = summarise(fake_run(tmp_path, records[:2]))
    assert s["quick_fid"]["best"]["checkpoint"] == s["checkpoints"]["best"] == str(tmp_path / "r/checkpoints/best.pt")


def test_an_empty_log_is_a_run_without_numbers(tmp_path):
    s = summarise(fake_run(tmp_path, [], raw_tail="\n"))
    assert set(s) == KEYS and s["step"] is None and s["time"]["wall_s"] is None and s["losses"] == {}
    assert s["log"]["skipped"] == 1 and "steps        no log lines yet" in summary_lines(s)
