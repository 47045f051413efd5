"""generate: files, seeds, JSON, interpolation, packaged-model fallback and bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flowercli.cli import app
from flowercli.errors import CheckpointError
from flowercli.generate import load_generator
from flowercli.runconfig import make_config
from flowercli.train import train

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(embedded_dir, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("gen-runs")
    cfg = make_config("modern", data_dir=embedded_dir, runs_dir=runs, run="g", image_size=16, g_channels=8,
                      d_channels=8, cond_dim=8, batch_size=4, max_steps=2)
    return train(cfg).checkpoint


def gen(args, checkpoint, out):
    return runner.invoke(app, ["generate", *args, "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu"])


def test_writes_pngs_and_grid_and_prints_paths(checkpoint, tmp_path):
    res = gen(["this flower has red petals", "-n", "4"], checkpoint, tmp_path / "o")
    assert res.exit_code == 0, res.output
    paths = res.stdout.strip().splitlines()
    assert paths == [str(tmp_path / "o" / f"seed{k:04d}.png") for k in range(4)]
    assert Image.open(paths[0]).size == (16, 16)
    assert (tmp_path / "o" / "grid.png").is_file()


def test_first_images_do_not_depend_on_n(checkpoint, tmp_path):
    gen(["a yellow flower", "-n", "2", "--seed", "5"], checkpoint, tmp_path / "a")
    gen(["a yellow flower", "-n", "6", "--seed", "5"], checkpoint, tmp_path / "b")
    for name in ("seed0005.png", "seed0006.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / name)), np.asarray(Image.open(tmp_path / "b" / name)))
    # ...and different seeds and different prompts give different images.
    a5, a6 = (np.asarray(Image.open(tmp_path / "a" / n)) for n in ("seed0005.png", "seed0006.png"))
    assert not np.array_equal(a5, a6)
    gen(["a blue flower", "-n", "1", "--seed", "5"], checkpoint, tmp_path / "c")
    assert not np.array_equal(a5, np.asarray(Image.open(tmp_path / "c" / "seed0005.png")))


def test_json_several_prompts_and_prompts_file(checkpoint, tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text("a white flower\n\n")
    res = gen(["a red flower", "--prompts-file", str(pf), "-n", "2", "--json"], checkpoint, tmp_path / "o")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["prompt"], r["seed"]) for r in rows] == [("a red flower", 0), ("a red flower", 1),
                                                        ("a white flower", 0), ("a white flower", 1)]
    assert all(Path(r["path"]).is_file() and r["checkpoint"] == str(checkpoint) for r in rows)


def test_interpolate(checkpoint, tmp_path):
    res = gen(["--interpolate", "a red flower", "--interpolate", "a blue flower", "--steps", "5"], checkpoint, tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert len(res.stdout.split()) == 5
    ends = [np.asarray(Image.open(tmp_path / "o" / f"interp{k:03d}.png")) for k in (0, 4)]
    assert not np.array_equal(*ends)


def test_run_folder_and_newest_run_default(checkpoint, tmp_path):
    runs = checkpoint.parent.parent.parent
    res = runner.invoke(app, ["generate", "a red flower", "-n", "1", "--runs-dir", str(runs), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["generate", "a red flower", "-n", "1", "-c", str(checkpoint.parent.parent), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output


def test_long_prompt_is_truncated_with_a_warning(checkpoint, tmp_path):
    res = gen([" ".join(["petals"] * 300), "-n", "1"], checkpoint, tmp_path)
    assert res.exit_code == 0, res.output
    assert "truncated" in res.stderr


@pytest.mark.parametrize("args,message", [
    (["", "-n", "1"], "prompt is empty"),
    (["   ", "-n", "1"], "prompt is empty"),
    (["a red flower", "-n", "0"], "-n must be between"),
    (["a red flower", "-n", "-3"], "-n must be between"),
    (["a red flower", "-n", "100000000"], "-n must be between"),
    ([], "give at least one prompt"),
    (["--interpolate", "only one"], "exactly two"),
])
def test_bad_input(checkpoint, tmp_path, args, message):
    res = gen(args, checkpoint, tmp_path / "o")
    assert res.exit_code == 1
    assert message in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "o" / "grid.png").exists()


def test_missing_corrupt_and_hostile_checkpoints(tmp_path, checkpoint):
    res = gen(["a red flower"], tmp_path / "nope.pt", tmp_path / "o")
    assert res.exit_code == 1 and "does not exist" in res.stderr
    bad = tmp_path / "bad.pt"
    bad.write_bytes(checkpoint.read_bytes()[:5000])
    res = gen(["a red flower"], bad, tmp_path / "o")
    assert res.exit_code == 1 and "damaged or incomplete (truncated?" in res.stderr and str(bad) in res.stderr

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"G_ema": Evil(), "config": {}}, evil)
    res = gen(["a red flower"], evil, tmp_path / "o")
    assert res.exit_code == 1 and "refused" in res.stderr
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(CheckpointError):
        load_generator(tmp_path / "nope.pt")


def test_unwritable_output_folder(checkpoint, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    res = gen(["a red flower", "-n", "1"], checkpoint, blocker / "sub")
    assert res.exit_code == 1 and "cannot write to output folder" in res.stderr


def test_images_from_vectors_checks_dimension(checkpoint):
    g = load_generator(checkpoint)
    assert g.images_from_vectors(np.zeros((3, 32), np.float32), [0, 1, 2]).shape == (3, 16, 16, 3)
    with pytest.raises(Exception, match="do not fit"):
        g.images_from_vectors(np.zeros((1, 7), np.float32), [0])


def test_export_is_small_and_generates_like_the_checkpoint(checkpoint, tmp_path):
    small = tmp_path / "small.pt"
    r = runner.invoke(app, ["export", str(small), "--checkpoint", str(checkpoint), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["path"] == str(small) and info["bytes"] == small.stat().st_size
    assert small.stat().st_size < checkpoint.stat().st_size / 3
    state = torch.load(small, weights_only=True)
    assert {"G", "D", "opt_G", "opt_D", "rng"}.isdisjoint(state)
    assert state["meta"]["dtype"] == "float16"
    a = load_generator(checkpoint).images_from_vectors(np.random.default_rng(0).normal(size=(4, 32)) * 0.05, [0, 1, 2, 3])
    b = load_generator(small).images_from_vectors(np.random.default_rng(0).normal(size=(4, 32)) * 0.05, [0, 1, 2, 3])
    # float16 weights: the same images up to rounding (a few levels of 255).
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 8
    r32 = runner.invoke(app, ["export", str(tmp_path / "f32.pt"), "--checkpoint", str(checkpoint), "--fp32", "-q"])
    assert r32.exit_code == 0 and (tmp_path / "f32.pt").stat().st_size > small.stat().st_size


def test_export_bad_input(checkpoint, tmp_path):
    r = runner.invoke(app, ["export", str(tmp_path / "x.pt")])
    assert r.exit_code != 0 and "--run NAME or --checkpoint" in r.output
    r = runner.invoke(app, ["export", str(tmp_path / "x.pt"), "--run", "nope", "--runs-dir", str(tmp_path)])
    assert r.exit_code != 0 and "no run named 'nope'" in r.output
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    r = runner.invoke(app, ["export", str(tmp_path / "x.pt"), "--checkpoint", str(tmp_path / "bad.pt")])
    assert r.exit_code != 0 and "corrupt" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.pt").exists()


def test_packaged_model_is_used_without_runs(checkpoint, tmp_path, monkeypatch):
    import flowercli.generate as g

    packaged = tmp_path / "pretrained" / "generator.pt"
    assert runner.invoke(app, ["export", str(packaged), "--checkpoint", str(checkpoint), "-q"]).exit_code == 0
    monkeypatch.setattr(g, "PACKAGED", packaged)
    out = tmp_path / "out"
    r = runner.invoke(app, ["generate", "yellow petals", "-n", "2", "--runs-dir", str(tmp_path / "no-runs"),
                            "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "packaged pretrained generator" in r.stderr
    assert r.stdout.split() == [str(out / "seed0000.png"), str(out / "seed0001.png")]
    # --checkpoint still wins over the packaged model.
    r = runner.invoke(app, ["generate", "yellow petals", "-n", "1", "--runs-dir", str(tmp_path / "no-runs"),
                            "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o2"), "--device", "cpu"])
    assert r.exit_code == 0 and "packaged" not in r.stderr


def test_sampled_condition_is_seeded_per_image(checkpoint):
    g = load_generator(checkpoint)
    v = np.random.default_rng(1).normal(size=(4, 32)) * 0.05
    mean = g.images_from_vectors(v, [0, 1, 2, 3])
    g.sample_condition = True
    sampled = g.images_from_vectors(v, [0, 1, 2, 3])
    assert not np.array_equal(mean, sampled)  # the CA noise moved the condition
    np.testing.assert_array_equal(sampled[:2], g.images_from_vectors(v[:2], [0, 1]))  # image k depends on seed k only
