"""Training: every option runs a step, resume is exact, signals save, runs are locked, DDP works."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flowercli.checkpoint import list_checkpoints, load_checkpoint
from flowercli.cli import app
from flowercli.errors import CheckpointError, FlowerError
from flowercli.fsutil import run_lock
from flowercli.runconfig import make_config
from flowercli.train import train

runner = CliRunner()
TINY = dict(image_size=16, g_channels=8, d_channels=8, cond_dim=8, batch_size=4, log_every=1)


def tiny_config(tmp_path, embedded_dir, recipe="modern", **kw):
    return make_config(recipe, data_dir=embedded_dir, runs_dir=tmp_path / "runs", run="r", **{**TINY, **kw})


OPTIONS = {
    "reference": ("reference", {}),
    "modern": ("modern", {}),
    "cond_aug_off": ("modern", {"cond_aug": False}),
    "bce": ("modern", {"loss": "bce"}),
    "hinge_reference": ("reference", {"loss": "hinge"}),
    "spectral_norm_off": ("modern", {"spectral_norm": False}),
    "ma_gp": ("modern", {"ma_gp": 2.0}),
    "diffaug_all": ("modern", {"diffaug": "color,translation,cutout"}),
    "diffaug_off": ("modern", {"diffaug": ""}),
    "ema_off": ("modern", {"ema": 0.0}),
    "ttur": ("reference", {"lr_d": 4e-4, "lr_g": 1e-4}),
    "gan_int": ("modern", {"gan_int": 1.0}),
    "mode_seek": ("modern", {"mode_seek": 1.0}),
    "contrastive": ("modern", {"contrastive": 1.0}),
    "contrastive_no_sn": ("modern", {"contrastive": 1.0, "spectral_norm": False}),
    "cond_bn_off": ("modern", {"cond_bn": False}),
    "text_proj_off": ("modern", {"text_proj": False}),
    "cond_bn_reference": ("reference", {"cond_bn": True, "text_proj": True}),
    "aux_head": ("modern", {"d_head": "aux"}),
    "no_head": ("modern", {"d_head": "none"}),
    "both_heads": ("modern", {"d_head": "both", "aux_weight": 0.1}),
    "bf16": ("modern", {"precision": "bf16"}),
    "split_images": ("modern", {"split": "images"}),
    "split_all": ("modern", {"split": "all"}),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_each_option_runs_one_step(tmp_path, embedded_dir, name):
    recipe, kw = OPTIONS[name]
    cfg = tiny_config(tmp_path, embedded_dir, recipe, max_steps=1, **kw)
    result = train(cfg)
    assert result.step == 1
    state = load_checkpoint(result.checkpoint)
    assert state["config"]["recipe"] == recipe
    for key, value in kw.items():
        where = state["config"]["model"] if key in state["config"]["model"] else state["config"]
        assert where[key] == value
    line = json.loads((result.run_dir / "log.jsonl").read_text().splitlines()[-1])
    assert all(map(lambda v: v == v and abs(v) < 1e6, (line["loss_d"], line["loss_g"])))
    # The generator learned something from its one step (weights moved away from the init).
    torch.manual_seed(cfg.seed)
    assert not torch.equal(state["G"]["fc.weight"], state["G_ema"]["fc.weight"]) or cfg.ema == 0


def test_run_folder_contents(tmp_path, embedded_dir):
    result = train(tiny_config(tmp_path, embedded_dir, epochs=2, checkpoint_every=100))
    run = result.run_dir
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["split"] == "classes" and cfg["classes"] == [1, 2, 3]  # class 4 is the held-out test class
    assert (run / "samples" / "epoch-0001.png").is_file() and (run / "samples" / "epoch-0002.png").is_file()
    assert len((run / "samples" / "prompts.txt").read_text().splitlines()) == 8
    names = [p.name for p in list_checkpoints(run / "checkpoints")]
    assert names == ["step-0000004.pt", "step-0000008.pt"] and (run / "checkpoints" / "latest.pt").is_file()
    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert state["step"] == 8 and state["epoch"] == 2
    assert state["encoder"]["dim"] == 32 and "encoder" in state["encoder"]
    assert {"torch", "numpy", "python"} <= set(state["rng"])


def _assert_same_state(a, b):
    for key in ("G", "D", "G_ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for key in ("opt_G", "opt_D"):
        for pid, sa in a[key]["state"].items():
            for k, v in sa.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(b[key]["state"][pid][k])), f"{key}.{pid}.{k}"


@pytest.mark.parametrize("recipe", ["modern", "reference"])
def test_resume_is_exact(tmp_path, embedded_dir, recipe):
    straight = train(replace(tiny_config(tmp_path / "a", embedded_dir, recipe, epochs=2, ma_gp=1.0, gan_int=0.5)))
    half = tiny_config(tmp_path / "b", embedded_dir, recipe, epochs=2, max_steps=3, ma_gp=1.0, gan_int=0.5)
    train(half)
    resumed = train(replace(half, max_steps=0, resume=True))
    assert straight.step == resumed.step == 8
    _assert_same_state(load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint))


def test_existing_run_needs_resume_and_compatible_config(tmp_path, embedded_dir):
    cfg = tiny_config(tmp_path, embedded_dir, max_steps=2)
    train(cfg)
    with pytest.raises(FlowerError, match="--resume"):
        train(cfg)
    with pytest.raises(CheckpointError, match="model.g_channels differs"):
        train(replace(cfg, resume=True, max_steps=4, model=replace(cfg.model, g_channels=16)))
    with pytest.raises(CheckpointError, match="seed differs"):
        train(replace(cfg, resume=True, max_steps=4, seed=1))


def test_resume_refuses_other_encoder(tmp_path, embedded_dir):
    import shutil

    from flowercli.embeddings import open_embeddings, write_embeddings

    cfg = tiny_config(tmp_path, embedded_dir, max_steps=2)
    train(cfg)
    emb = open_embeddings(cfg.embeddings or next((embedded_dir / "embeddings").glob("*.h5")))
    other = tmp_path / "other.h5"
    emb.vectors = emb.vectors[..., :16]
    if emb.name_vectors is not None:  # the species-name vectors come from the same encoder
        emb.name_vectors = emb.name_vectors[..., :16]
    emb.attrs = {**emb.attrs, "dim": 16, "encoder": "someone-else"}
    write_embeddings(other, emb)
    with pytest.raises(CheckpointError, match="differs|trained on"):
        train(replace(cfg, resume=True, max_steps=4, embeddings=other))
    shutil.rmtree(tmp_path / "runs")


def test_resume_refuses_other_captions_or_encoder_build(tmp_path, embedded_dir):
    """The same embeddings file, re-embedded from another caption set or another encoder build."""
    import shutil

    from flowercli.embeddings import open_embeddings, write_embeddings

    data = Path(shutil.copytree(embedded_dir, tmp_path / "data"))
    h5 = next((data / "embeddings").glob("*.h5"))
    emb = open_embeddings(h5)
    started = {**emb.attrs, "captions_archive": "cvpr2016_flowers.tar.gz", "captions_sha256": "a" * 64}
    emb.attrs = started
    write_embeddings(h5, emb)
    cfg = make_config("modern", data_dir=data, runs_dir=tmp_path / "runs", run="r", max_steps=1, **TINY)
    train(cfg)
    for change, says in [({"captions_archive": "other.tgz", "captions_sha256": "b" * 64},
                          "captions cvpr2016_flowers.tar.gz (sha256 aaaaaaaaaaaa) vs other.tgz (sha256 bbbbbbbbbbbb)"),
                         ({"pooling": "cls"}, "pooling mean vs cls"),
                         ({"max_length": 32}, f"max_length {started['max_length']} vs 32")]:
        emb.attrs = {**started, **change}
        write_embeddings(h5, emb)
        with pytest.raises(CheckpointError) as info:
            train(replace(cfg, resume=True, max_steps=2))
        msg = str(info.value)
        assert says in msg and f"other data than {h5}" in msg and "(run's vs now)" in msg and "\n" not in msg
    emb.attrs = {**started, "created": "later", "embed_seconds": 9.9}  # same captions and encoder: resumes
    write_embeddings(h5, emb)
    assert train(replace(cfg, resume=True, max_steps=2)).step == 2


def test_data_differences_compare_only_what_both_sides_recorded():
    from flowercli.runconfig import data_differences

    old = {"encoder": "minilm", "dim": 384}  # a checkpoint from before the caption set was recorded
    now = {"encoder": "minilm", "dim": 384, "pooling": "mean", "captions_archive": "c.tgz", "captions_sha256": "f" * 64}
    assert data_differences(old, now) == []
    assert data_differences({**now, "captions_sha256": ""}, now) == []  # HDF5 stores "unknown" as ""
    assert data_differences({**now, "dim": 768, "encoder": "bert"}, now) == ["encoder bert vs minilm", "dim 768 vs 384"]


def test_resume_starts_a_run_without_checkpoints_then_continues_it(tmp_path, embedded_dir):
    """Start-or-continue: one command line for the first start and every restart (job scripts, requeues)."""
    args = ["train", "-d", str(embedded_dir), "--runs-dir", str(tmp_path / "runs"), "--run", "job",
            "--set", "image_size=16", "--set", "g_channels=8", "--set", "d_channels=8", "--batch-size", "4",
            "--checkpoint-every", "1", "--resume"]
    first = runner.invoke(app, args + ["--max-steps", "1"])
    assert first.exit_code == 0, first.output
    assert f"Warning: run {tmp_path / 'runs' / 'job'} has no checkpoint yet: starting it from step 0" in first.stderr
    second = runner.invoke(app, args + ["--max-steps", "2"])
    assert second.exit_code == 0, second.output
    assert "no checkpoint yet" not in second.stderr and "from step 1" in second.stderr
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(tmp_path / "runs" / "job" / "checkpoints")] == [1, 2]


def test_resume_starts_a_run_left_with_only_its_config(tmp_path, embedded_dir):
    """A first start killed before its first checkpoint leaves config.json: --resume starts it, same settings only."""
    import shutil

    from flowercli.report import ListReporter

    cfg = tiny_config(tmp_path, embedded_dir, max_steps=1)
    run_dir = train(cfg).run_dir
    shutil.rmtree(run_dir / "checkpoints")
    with pytest.raises(CheckpointError, match=r"--resume: seed differs: 0 vs 1 \(run's vs now\); start the run with the "
                                              r"settings in .*config\.json or pick another --run"):
        train(replace(cfg, resume=True, seed=1))
    assert (run_dir / "config.json").is_file()  # a refused start removes nothing of the run
    rep = ListReporter()
    assert train(replace(cfg, resume=True), rep).step == 1
    assert ("warn", f"run {run_dir} has no checkpoint yet: starting it from step 0") in rep.messages
    assert (run_dir / "checkpoints" / "step-0000001.pt").is_file()


def test_resume_without_run_takes_the_run_saved_last(tmp_path, embedded_dir):
    """--resume without --run: the run whose newest checkpoint was written last, as generate and eval pick it."""
    from flowercli.runconfig import build_config

    runs = tmp_path / "runs"
    with pytest.raises(CheckpointError, match=rf"^--resume: no run with checkpoints under {runs}; name one with --run$"):
        build_config("modern", embedded_dir, runs, None, True, None, {})
    for name, step, mtime in (("older", 9, 1_000), ("newer", 1, 2_000), ("unstarted", 0, 3_000)):
        folder = runs / name / "checkpoints"
        folder.mkdir(parents=True)
        if step:
            (folder / f"step-{step:07d}.pt").write_bytes(b"x")
            os.utime(folder / f"step-{step:07d}.pt", (mtime, mtime))
    cfg = build_config("modern", embedded_dir, runs, None, True, None, {})
    assert cfg.run == "newer" and cfg.resume


def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path, embedded_dir):
    cfg = tiny_config(tmp_path, embedded_dir, epochs=3, max_steps=4, checkpoint_every=2)
    result = train(cfg)
    newest = list_checkpoints(result.run_dir / "checkpoints")[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    from flowercli.report import ListReporter

    rep = ListReporter()
    resumed = train(replace(cfg, resume=True, max_steps=6), rep)
    assert resumed.step == 6
    assert any("damaged or incomplete" in m for kind, m in rep.messages if kind == "warn")


def test_second_process_is_locked_out(tmp_path, embedded_dir):
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    with run_lock(run_dir):
        res = runner.invoke(app, ["train", "--data-dir", str(embedded_dir), "--runs-dir", str(tmp_path / "runs"),
                                  "--run", "r", "--max-steps", "1", "--set", "image_size=16"])
    assert res.exit_code == 1
    assert "in use by another flowercli process" in res.output
    assert not (run_dir / "checkpoints").exists()


def _cli_train_args(embedded_dir, runs, *extra):
    return [sys.executable, "-m", "flowercli", "train", "--data-dir", str(embedded_dir), "--runs-dir", str(runs),
            "--run", "sig", "--set", "image_size=16", "--set", "g_channels=8", "--set", "d_channels=8",
            "--batch-size", "4", "--checkpoint-every", "1000", "-q", *extra]


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_checkpoint_and_exits(tmp_path, embedded_dir, signum, code):
    runs = tmp_path / "runs"
    proc = subprocess.Popen(_cli_train_args(embedded_dir, runs, "--epochs", "100000"),
                            stderr=subprocess.PIPE, text=True)
    log = runs / "sig" / "log.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (log.is_file() and log.stat().st_size):
        time.sleep(0.2)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "checkpoint saved" in err and "Traceback" not in err
    ckpts = list_checkpoints(runs / "sig" / "checkpoints")
    assert ckpts, "no checkpoint written on signal"
    step = load_checkpoint(ckpts[-1])["step"]
    res = subprocess.run(_cli_train_args(embedded_dir, runs, "--resume", "--max-steps", str(step + 1), "--epochs", "100000"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert load_checkpoint(list_checkpoints(runs / "sig" / "checkpoints")[-1])["step"] == step + 1


def run_in_own_group(cmd, timeout, env=None) -> subprocess.CompletedProcess:
    """Run `cmd`; on timeout kill it with all its children (torchrun's workers), then fail."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_ddp_two_cpu_processes(tmp_path, embedded_dir):
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "flowercli", "train", "--data-dir", str(embedded_dir), "--runs-dir", str(runs), "--name", "ddp",
           "--set", "image_size=16", "--set", "g_channels=8", "--set", "d_channels=8", "--batch-size", "2",
           "--max-steps", "2", "--device", "cpu", "--set", "model.ma_gp=1", "-q"]
    res = run_in_own_group(cmd, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = json.loads((runs / "ddp" / "config.json").read_text())
    assert cfg["world_size"] == 2
    state = load_checkpoint(runs / "ddp" / "checkpoints" / "latest.pt")
    assert state["step"] == 2
    assert res.stdout.strip() == str(runs / "ddp" / "checkpoints" / "step-0000002.pt")  # rank 0 alone prints


# Rank 0 of the first attempt dies right after writing its first checkpoint, as a node would.
_FAIL_AFTER_FIRST_CHECKPOINT = """
import os
import flowercli.train as train_mod
from flowercli.cli import app

if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ.get("RANK") == "0":
    save = train_mod.save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        os._exit(17)

    train_mod.save_checkpoint = save_then_die
app(prog_name="flowercli")
"""


def test_torchrun_restart_continues_with_the_same_command_line(tmp_path, embedded_dir):
    """`torchrun --max-restarts` reruns one command line: --resume starts the run, then continues it."""
    runs = tmp_path / "runs"
    script = tmp_path / "flaky_flowercli.py"
    script.write_text(_FAIL_AFTER_FIRST_CHECKPOINT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1",
           "--monitor-interval", "0.2", str(script), "train", "--resume", "--data-dir", str(embedded_dir),
           "--runs-dir", str(runs), "--name", "tr",
           "--set", "image_size=16", "--set", "g_channels=8", "--set", "d_channels=8",
           "--batch-size", "2", "--max-steps", "2", "--checkpoint-every", "1", "--device", "cpu"]
    res = run_in_own_group(cmd, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("has no checkpoint yet: starting it from step 0") == 1, res.stderr[-3000:]  # rank 0, 1st try
    assert f"Resuming {runs / 'tr'} from step 1" in res.stderr, res.stderr[-3000:]
    assert [load_checkpoint(p)["step"] for p in list_checkpoints(runs / "tr" / "checkpoints")] == [1, 2]
    assert json.loads((runs / "tr" / "config.json").read_text())["world_size"] == 2


def test_train_cli_json_and_errors(tmp_path, embedded_dir):
    args = ["train", "--data-dir", str(embedded_dir), "--runs-dir", str(tmp_path / "runs"), "--run", "c",
            "--set", "image_size=16", "--set", "g_channels=8", "--set", "d_channels=8", "--batch-size", "4",
            "--max-steps", "1"]
    res = runner.invoke(app, args + ["--json", "--threads", "1", "--set", "model.cond_bn=false", "--set",
                                     "model.text_proj=true", "--set", "model.d_head=both", "--set", "model.aux_weight=0.25",
                                     "--set", "model.mode_seek=0.5", "--set", "model.contrastive=0.3"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["step"] == 1 and Path(out["checkpoint"]).is_file()
    saved = json.loads((tmp_path / "runs" / "c" / "config.json").read_text())
    assert saved["threads"] == 1
    assert saved["config"]["model"]["cond_bn"] is False and saved["config"]["model"]["text_proj"] is True
    assert saved["config"]["model"]["d_head"] == "both" and saved["config"]["model"]["aux_weight"] == 0.25
    assert saved["config"]["model"]["mode_seek"] == 0.5
    assert saved["config"]["model"]["contrastive"] == 0.3
    logged = json.loads((tmp_path / "runs" / "c" / "log.jsonl").read_text().splitlines()[-1])
    assert "mode_seek" in logged and "contrastive_d" in logged and "contrastive_g" in logged
    bad = runner.invoke(app, args[:3] + ["--runs-dir", str(tmp_path / "r2"), "--split", "nope"])
    assert bad.exit_code == 1 and "unknown split" in bad.output
    missing = runner.invoke(app, ["train", "--data-dir", str(tmp_path / "nothing"), "--runs-dir", str(tmp_path / "r3")])
    assert missing.exit_code == 1 and "flowercli embed" in missing.output
    assert "Traceback" not in missing.output


def test_train_cli_moved_flags_are_deprecated_set_spellings(tmp_path, monkeypatch):
    """The switches that moved behind --set still work, hidden from --help, each warning with its --set spelling."""
    import flowercli.train as train_mod

    configs = []  # what `train` was asked to run; nothing trains
    monkeypatch.setattr(train_mod, "train", lambda cfg, report: configs.append(cfg) or train_mod.TrainResult(
        tmp_path, 0, 0, None, 0.0, 0.0, False))
    base = ["train", "--data-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs"), "--run", "m"]
    old = runner.invoke(app, base + ["--no-cond-bn", "--d-head", "both", "--aux-weight=0.25", "--diffaug", "",
                                     "--g-channels", "16", "--ema", "0.99", "--sample-every", "2"])
    new = runner.invoke(app, base + ["--set", "model.cond_bn=false", "--set", "model.d_head=both", "--set",
                                     "model.aux_weight=0.25", "--set", "model.diffaug=", "--set", "model.g_channels=16",
                                     "--set", "ema=0.99", "--set", "sample_every=2"])
    assert old.exit_code == 0 and new.exit_code == 0, old.output + new.output
    assert len(configs) == 2 and configs[0] == configs[1]
    assert configs[0].model.cond_bn is False and configs[0].model.aux_weight == 0.25 and configs[0].sample_every == 2
    assert "Warning: --no-cond-bn is deprecated and will be removed; use --set model.cond_bn=false" in old.stderr
    assert "use --set model.aux_weight=0.25" in old.stderr and "use --set sample_every=2" in old.stderr
    assert old.stderr.count("is deprecated") == 7 and "deprecated" not in new.stderr
    # --set still wins over them, as it did over the flags
    runner.invoke(app, base + ["--g-channels", "16", "--set", "model.g_channels=24"])
    assert configs[-1].model.g_channels == 24
    shown = runner.invoke(app, ["train", "--help"]).output
    assert "--cond-bn" not in shown and "--g-channels" not in shown and "model.g_channels" in shown
    for args, says in ((["--florp"], "No such option: --florp"), (["--epoch", "3"], "(Possible options: --epochs)"),
                       (["stray"], "unexpected extra argument (stray)"), (["--loss"], "'--loss' requires an argument"),
                       (["--cond-bn=1"], "'--cond-bn' does not take a value"), (["--no-loss", "x"], "--no-loss"),
                       (["--loss", "nope"], "model.loss='nope': expected one of bce, hinge")):
        res = runner.invoke(app, base + args)
        assert res.exit_code == 2 and says in res.output, (args, res.output)
    assert len(configs) == 3
