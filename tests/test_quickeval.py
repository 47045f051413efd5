"""`train --eval-every` (quick FID, recall, best.pt) and `train --tensorboard`, on tiny runs with a tiny
stand-in for the Inception network (test_metrics.py)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flowercli.checkpoint import list_checkpoints, load_checkpoint
from flowercli.cli import app
from flowercli.quickeval import best_from_log
from flowercli.runconfig import make_config
from flowercli.runreport import load_run, summarise
from flowercli.train import train
from test_metrics import _TinyFeatures, save_scripted
from test_train import _assert_same_state

runner = CliRunner()
# 18 training images (classes 1-3), batch 4: 4 steps an epoch; the evaluated split is class 4 (6 images).
TINY = dict(image_size=16, g_channels=8, d_channels=8, cond_dim=8, batch_size=4, log_every=1, threads=1)
N = 8  # quick-eval images
TEST_IMAGES = 6


@pytest.fixture(scope="module")
def tiny_net(tmp_path_factory) -> Path:
    return save_scripted(_TinyFeatures(), tmp_path_factory.mktemp("nets") / "tiny.pt")


@pytest.fixture
def data(embedded_dir, tmp_path) -> Path:
    """A private copy of the embedded miniature dataset: the quick eval caches real statistics in it."""
    shutil.copytree(embedded_dir, tmp_path / "data")
    return tmp_path / "data"


def config(runs: Path, data: Path, recipe: str = "modern", **kw):
    return make_config(recipe, data_dir=data, runs_dir=runs, run="r", **{**TINY, **kw})


def lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def cli_args(data: Path, runs: Path, *more: str) -> list[str]:
    return ["train", "-d", str(data), "--runs-dir", str(runs), "--run", "r", "-q", "--batch-size", "4",
            "--set", "threads=1", "--set", "log_every=1", "--set", "model.image_size=16",
            "--set", "model.g_channels=8", "--set", "model.d_channels=8", "--set", "model.cond_dim=8", *more]


@pytest.mark.parametrize("recipe", ["modern", "reference"])
def test_quick_eval_leaves_training_bit_identical(tmp_path, data, tiny_net, recipe):
    plain = train(config(tmp_path / "a", data, recipe, epochs=2))
    watched = train(config(tmp_path / "b", data, recipe, epochs=2, eval_every=3, quick_eval_n=N, inception=tiny_net))
    a, b = load_checkpoint(plain.checkpoint), load_checkpoint(watched.checkpoint)
    assert a["step"] == b["step"] == 8
    _assert_same_state(a, b)
    # The global RNGs were never drawn from (the loop does not use them; the checkpoint keeps them).
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert torch.equal(a["rng"]["numpy"]["keys"], b["rng"]["numpy"]["keys"])
    assert a["rng"]["numpy"]["pos"] == b["rng"]["numpy"]["pos"] and a["rng"]["python"] == b["rng"]["python"]
    # Every step's losses, and the EMA generator's sample grids, are the same as without quick evals.
    la, lb = lines(plain.run_dir), lines(watched.run_dir)
    assert [(r["step"], r["loss_d"], r["loss_g"]) for r in la] == [(r["step"], r["loss_d"], r["loss_g"]) for r in lb]
    assert [r["step"] for r in lb if "quick_fid" in r] == [3, 6, 8]
    for epoch in (1, 2):
        name = f"samples/epoch-{epoch:04d}.png"
        assert (plain.run_dir / name).read_bytes() == (watched.run_dir / name).read_bytes()


def test_quick_eval_logs_keeps_best_and_measures_what_eval_measures(tmp_path, data, tiny_net):
    runs = tmp_path / "runs"
    res = runner.invoke(app, cli_args(data, runs, "--epochs", "2", "--eval-every", "2", "--keep", "1",
                                      "--set", f"quick_eval_n={N}", "--set", f"inception={tiny_net}"))
    assert res.exit_code == 0, res.output
    run = runs / "r"
    log = lines(run)
    quick = [r for r in log if "quick_fid" in r]
    assert [r["step"] for r in quick] == [2, 4, 6, 8]
    best = None
    for r in quick:  # merged into the step's own line, so `flowercli report` sees one line per step
        assert {"loss_d", "loss_g", "img_per_s", "time"} <= r.keys()
        assert r["quick_n"] == N and 0 <= r["quick_recall"] <= 1 and r["quick_eval_seconds"] >= 0
        assert np.isfinite(r["quick_fid"])
        if best is None or r["quick_fid"] < best["quick_fid"]:
            best = {"step": r["step"], "quick_fid": r["quick_fid"],
                    "checkpoint": f"checkpoints/step-{r['step']:07d}.pt"}
            assert r["best"] == best
        else:
            assert "best" not in r
    # best.pt holds the best step's weights although --keep 1 rotated every other step file away.
    kept = load_checkpoint(run / "checkpoints" / "best.pt")
    assert kept["step"] == best["step"]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-0000008.pt"]
    if best["step"] != 8:
        assert not (run / best["checkpoint"]).exists()
    # `flowercli report` reads the same best, and none of the quick-eval fields as a loss term.
    summary = summarise(load_run(run))
    assert summary["quick_fid"]["best"] == {"step": best["step"], "value": best["quick_fid"],
                                            "checkpoint": str(run / "checkpoints" / "best.pt")}
    assert summary["quick_fid"]["latest"] == {"step": 8, "value": quick[-1]["quick_fid"]}
    assert set(summary["losses"]).isdisjoint({"quick_recall", "quick_eval_seconds", "quick_n"})
    # The real side is the evaluated split's images alone (class 4), cached like eval's.
    cached = sorted((data / "cache" / "eval").glob("*.npz"))
    features = [p for p in cached if p.name.startswith("real-features-")]
    assert sum(len(np.load(p)["features"]) for p in features) == TEST_IMAGES
    assert [p.name.split("-")[:4] for p in cached if p.name.startswith("real-stats-")] == \
        [["real", "stats", "classes", "test"]]
    # The quick FID is eval's FID on that step's checkpoint with --n N (and the same recall).
    from flowercli.config import EvalConfig
    from flowercli.generate import load_generator
    from flowercli.metrics.evaluate import evaluate

    report = evaluate(EvalConfig(data_dir=data, n=N, n_other=0, inception=tiny_net, colour_seeds=0, sheet=0,
                                 diversity_prompts=0, name_seeds=0, allow_download=False),
                      load_generator(run / "checkpoints" / "step-0000008.pt"))
    assert report["fid"]["value"] == pytest.approx(quick[-1]["quick_fid"], rel=1e-3)
    assert report["diversity"]["recall"] == pytest.approx(quick[-1]["quick_recall"], abs=1e-4)


def test_resumed_run_reads_its_best_back(tmp_path, data, tiny_net):
    kw = dict(epochs=2, eval_every=2, quick_eval_n=N, inception=tiny_net)
    straight = train(config(tmp_path / "a", data, **kw))
    half = config(tmp_path / "b", data, max_steps=4, **kw)
    train(half)
    resumed = train(config(tmp_path / "b", data, resume=True, **kw))
    assert resumed.step == 8

    def quick(run_dir):
        return [{k: r.get(k) for k in ("step", "quick_fid", "quick_recall", "best")} for r in lines(run_dir)
                if "quick_fid" in r]

    # Same scores, and a best line only where the score beats the best of both sessions.
    assert quick(straight.run_dir) == quick(resumed.run_dir)
    assert (load_checkpoint(straight.run_dir / "checkpoints" / "best.pt")["step"]
            == load_checkpoint(resumed.run_dir / "checkpoints" / "best.pt")["step"])


def test_img_per_s_counts_training_not_the_quick_evals(tmp_path, data, tiny_net, monkeypatch):
    """A step "takes" 0.5 s and a quick eval 100 s on a clock the test moves (the training log's own
    clock: real sleeps would make the figures depend on the machine's load)."""
    import types

    import flowercli.train as train_mod
    import flowercli.trainlog as trainlog_mod
    from flowercli.quickeval import QuickEval

    now = [1_000.0]
    clock = types.SimpleNamespace(time=lambda: now[0], perf_counter=lambda: now[0])
    monkeypatch.setattr(trainlog_mod, "time", clock)
    run_step, measure = train_mod.run_step, QuickEval.measure

    def step(*a, **k):
        now[0] += 0.5
        return run_step(*a, **k)

    def slow_measure(self, G_ema, step):
        now[0] += 100.0
        return measure(self, G_ema, step)

    monkeypatch.setattr(train_mod, "run_step", step)
    monkeypatch.setattr(QuickEval, "measure", slow_measure)
    res = train(config(tmp_path / "runs", data, epochs=2, max_steps=5, eval_every=4, quick_eval_n=N,
                       inception=tiny_net))
    log = lines(res.run_dir)
    assert [r["step"] for r in log if "quick_fid" in r] == [4, 5]
    # 4 images per 0.5 s of training at every step, the quick evals' steps too...
    assert [r["img_per_s"] for r in log] == [8.0] * 5
    assert res.images_per_second == 8.0
    # ...while `time` stays the wall-clock time since the start, the quick evals included.
    assert [r["time"] for r in log] == [0.5, 1.0, 1.5, 102.0, 202.5]


def test_best_from_log_takes_the_newest_best_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "log.jsonl"
    recs = [{"step": 2, "quick_fid": 9.0, "best": {"step": 2, "quick_fid": 9.0, "checkpoint": "a"}},
            {"step": 3, "loss_d": 1.0},
            {"step": 4, "quick_fid": 7.0, "best": {"step": 4, "quick_fid": 7.0, "checkpoint": "b"}},
            {"step": 6, "quick_fid": 5.0, "best": {"step": 6, "quick_fid": 5.0, "checkpoint": "c"}}]
    path.write_text("\n".join(json.dumps(r) for r in recs) + '\n{"step": 5, "quick_f')  # a line cut by a kill
    assert best_from_log(path, 5)["checkpoint"] == "b"  # step 6 is retrained after a resume from step 5
    assert best_from_log(path, 6)["checkpoint"] == "c"
    assert best_from_log(path, 1) is None
    assert best_from_log(tmp_path / "none.jsonl", 9) is None


def test_best_from_log_ignores_the_lines_a_resume_trained_again(tmp_path):
    path = tmp_path / "log.jsonl"
    recs = [{"step": 2, "quick_fid": 9.0, "best": {"step": 2, "quick_fid": 9.0, "checkpoint": "a"}},
            {"step": 4, "quick_fid": 5.0, "best": {"step": 4, "quick_fid": 5.0, "checkpoint": "b"}},
            {"step": 6, "quick_fid": 4.0, "best": {"step": 6, "quick_fid": 4.0, "checkpoint": "c"}},
            # Resumed from step 3: its step 4 scored worse than step 2, no best; stopped at step 5.
            {"step": 4, "quick_fid": 9.5},
            {"step": 5, "loss_d": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    for step in (5, 9, 3):  # not the step 4 (or 6) of before the resume
        assert best_from_log(path, step)["checkpoint"] == "a"
    recs.append({"step": 6, "quick_fid": 7.0, "best": {"step": 6, "quick_fid": 7.0, "checkpoint": "d"}})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert best_from_log(path, 6)["checkpoint"] == "d" and best_from_log(path, 5)["checkpoint"] == "a"


FIDS = {2: 9.0, 4: 7.0, 6: 5.0, 8: 6.0}  # quick FID by step: bests at 2, 4 and 6


@pytest.fixture
def scripted_fids(monkeypatch):
    """The quick FID of each step is FIDS[step] (the measurement runs, its value is replaced)."""
    from flowercli.quickeval import QuickEval

    measure, at = QuickEval.measure, {}

    def measure_at(self, G_ema, step):
        at["step"] = step
        return measure(self, G_ema, step)

    monkeypatch.setattr(QuickEval, "measure", measure_at)
    monkeypatch.setattr("flowercli.metrics.fid.frechet_distance_fast", lambda *a, **k: FIDS[at["step"]])


def test_resume_from_before_the_best_step_replaces_best_pt(tmp_path, data, tiny_net, scripted_fids):
    from dataclasses import replace

    from flowercli.report import ListReporter

    cfg = config(tmp_path / "a", data, epochs=2, eval_every=2, quick_eval_n=N, inception=tiny_net,
                 keep=0, checkpoint_every=1)
    straight = train(cfg)
    ckpts = straight.run_dir / "checkpoints"
    assert load_checkpoint(ckpts / "best.pt")["step"] == 6
    for name, gone in (("relinked", (6, 7, 8)), ("removed", (4, 6, 7, 8))):
        # The checkpoints after step 5 deleted (and for "removed" the best before it, step 4's, too).
        run = Path(shutil.copytree(straight.run_dir, tmp_path / name / "r"))
        for s in gone:
            (run / "checkpoints" / f"step-{s:07d}.pt").unlink()
        rep = ListReporter()
        resumed = replace(cfg, runs_dir=tmp_path / name, resume=True)
        assert train(replace(resumed, max_steps=5), rep).step == 5  # resumes, trains no step
        warned = [m for kind, m in rep.messages if kind == "warn"]
        best = run / "checkpoints" / "best.pt"
        if name == "relinked":
            assert warned == [f"{best} held step 6, after the resumed step 5: it now holds step 4 (quick FID 7.0), "
                              "the best up to step 5"]
            assert load_checkpoint(best)["step"] == 4
        else:
            assert warned == [f"{best} held step 6, after the resumed step 5: removed, as the checkpoint of its best "
                              "before it (step 4) is gone; the next quick eval (--eval-every) makes a new one"]
            assert not best.exists()
        # Trained on, the run keeps the best a straight run keeps (step 6, scored again).
        assert train(resumed).step == 8
        assert load_checkpoint(best)["step"] == 6
        assert [(r["step"], r.get("best")) for r in lines(run)[-3:]] == [
            (6, {"step": 6, "quick_fid": 5.0, "checkpoint": "checkpoints/step-0000006.pt"}), (7, None), (8, None)]


def test_resume_keeps_a_best_pt_of_an_earlier_step(tmp_path):
    """best.pt of a step at or before the resumed one is left alone (no checkpoint is read to check)."""
    from flowercli.quickeval import reconcile_best
    from flowercli.report import ListReporter

    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    for s in (2, 4, 5):
        (ckpts / f"step-{s:07d}.pt").write_bytes(f"step {s}".encode())
    (ckpts / "best.pt").write_bytes(b"step 4")
    recs = [{"step": 2, "best": {"step": 2, "quick_fid": 9.0}}, {"step": 4, "best": {"step": 4, "quick_fid": 7.0}}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rep = ListReporter()
    for step in (4, 5):
        reconcile_best(tmp_path, step, rep)
        assert (ckpts / "best.pt").read_bytes() == b"step 4" and rep.messages == []
    reconcile_best(tmp_path, 3, rep)  # from step 3, step 4 is trained again: best.pt becomes step 2's
    assert (ckpts / "best.pt").read_bytes() == b"step 2" and [k for k, _ in rep.messages] == ["warn"]
    reconcile_best(tmp_path, 3, rep)  # once is enough: it holds step 2's file now
    assert len(rep.messages) == 1
    (ckpts / "best.pt").unlink()  # (a hard link: writing through it would change step 2's file)
    (ckpts / "best.pt").write_bytes(b"step 4")
    reconcile_best(tmp_path, 1, rep)  # no best up to step 1: removed
    assert not (ckpts / "best.pt").exists() and "no quick eval up to it logged a best" in rep.messages[-1][1]


@pytest.mark.parametrize("links", [True, False])
def test_best_pt_outlives_rotation_and_is_a_copy_where_links_are_refused(tmp_path, monkeypatch, links):
    from flowercli.checkpoint import link_checkpoint, save_checkpoint

    if not links:
        def refuse(src, dst):
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr("flowercli.checkpoint.os.link", refuse)
    folder = tmp_path / "checkpoints"
    first = save_checkpoint({"step": 1, "config": {}, "G_ema": {"w": torch.ones(2)}}, folder, keep=1)
    best = link_checkpoint(first, "best.pt")
    save_checkpoint({"step": 2, "config": {}, "G_ema": {"w": torch.zeros(2)}}, folder, keep=1)
    assert not first.exists() and [p.name for p in list_checkpoints(folder)] == ["step-0000002.pt"]
    assert best == folder / "best.pt" and load_checkpoint(best)["step"] == 1
    assert torch.equal(load_checkpoint(folder / "latest.pt")["G_ema"]["w"], torch.zeros(2))
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "latest.pt", "step-0000002.pt"]  # no temporaries


def test_tensorboard_events_hold_the_logged_numbers_and_the_samples(tmp_path, data, tiny_net):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = tmp_path / "runs"
    res = runner.invoke(app, cli_args(data, runs, "--epochs", "2", "--eval-every", "4", "--tensorboard",
                                      "--set", f"quick_eval_n={N}", "--set", f"inception={tiny_net}"))
    assert res.exit_code == 0, res.output
    run = runs / "r"
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss_d", "train/loss_g", "speed/img_per_s", "lr/G", "lr/D", "quick/fid", "quick/recall",
            "quick/eval_seconds"} <= set(tags["scalars"])
    assert not {"train/step", "train/epoch", "train/time", "train/quick_n"} & set(tags["scalars"])
    log = lines(run)
    for tag, key in (("train/loss_d", "loss_d"), ("train/loss_g", "loss_g"), ("quick/fid", "quick_fid")):
        events = acc.Scalars(tag)
        want = [(r["step"], r[key]) for r in log if key in r]
        assert [e.step for e in events] == [s for s, _ in want]
        assert [e.value for e in events] == pytest.approx([v for _, v in want], rel=1e-6)
    cfg = json.loads((run / "config.json").read_text())["config"]
    assert [e.value for e in acc.Scalars("lr/G")] == pytest.approx([cfg["lr_g"]] * len(log))
    assert [e.value for e in acc.Scalars("lr/D")] == pytest.approx([cfg["lr_d"]] * len(log))
    images = acc.Images("samples")
    assert [e.step for e in images] == [4, 8]
    import io

    with Image.open(io.BytesIO(images[-1].encoded_image_string)) as got, Image.open(run / "samples" /
                                                                                     "epoch-0002.png") as want:
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want.convert("RGB")))


def test_tensorboard_missing_is_one_line_before_training(tmp_path, data, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    res = runner.invoke(app, cli_args(data, tmp_path / "runs", "--max-steps", "1", "--tensorboard"))
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "Error: --tensorboard needs the tensorboard package: pip install 'flowercli[tensorboard]'"]
    assert not (tmp_path / "runs").exists()


def test_bad_quick_eval_settings(tmp_path, data):
    runs = tmp_path / "runs"
    negative = runner.invoke(app, cli_args(data, runs, "--eval-every", "-1"))
    assert negative.exit_code == 2 and "--eval-every" in negative.output
    few = runner.invoke(app, cli_args(data, runs, "--eval-every", "2", "--set", "quick_eval_n=3"))
    assert few.exit_code == 2 and "quick_eval_n='3'" in few.output
    missing = runner.invoke(app, cli_args(data, runs, "--eval-every", "2", "--set",
                                          f"inception={tmp_path / 'no.pt'}", "--max-steps", "1"))
    assert missing.exit_code == 1 and "no such file" in missing.output and "Traceback" not in missing.output
    assert not runs.exists()
    # Off (the default) needs no FID network at all.
    off = runner.invoke(app, cli_args(data, runs, "--set", f"inception={tmp_path / 'no.pt'}", "--max-steps", "1"))
    assert off.exit_code == 0, off.output
    assert not (runs / "r" / "checkpoints" / "best.pt").exists() and not (runs / "r" / "tensorboard").exists()
    assert not any("quick_fid" in r for r in lines(runs / "r"))


def test_quick_eval_leaves_g_ema_untouched(tmp_path, data, tiny_net):
    """The one measure() call: G_ema's weights and buffers, its mode and the RNG are as before."""
    from flowercli.quickeval import QuickEval
    from flowercli.train import _named_and_checked, build_nets
    from flowercli.traindata import load_train_data

    cfg = _named_and_checked(config(tmp_path / "runs", data, eval_every=1, quick_eval_n=N, inception=tiny_net))
    train_data = load_train_data(cfg, cfg.embeddings)
    from dataclasses import replace

    cfg = replace(cfg, model=replace(cfg.model, text_dim=train_data.vectors.shape[-1],
                                     n_classes=len(train_data.classes)))
    torch.manual_seed(0)
    nets = build_nets(cfg.model, cfg, torch.device("cpu"), cfg.channels_last)
    nets.G_ema.train()
    before = {k: v.clone() for k, v in nets.G_ema.state_dict().items()}
    rng = torch.get_rng_state()
    (tmp_path / "runs" / "r").mkdir(parents=True)
    quick = QuickEval(cfg, train_data, tmp_path / "runs" / "r", torch.device("cpu"), 0)
    first = quick.measure(nets.G_ema, 1)
    assert nets.G_ema.training and torch.equal(torch.get_rng_state(), rng)
    for k, v in nets.G_ema.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert first.is_best and quick.measure(nets.G_ema, 2).fid == first.fid  # repeatable
