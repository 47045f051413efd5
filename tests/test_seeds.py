"""generate --seeds (lists and ranges) and --truncation: parsing, how they combine, and that an
image depends only on its prompt, seed and truncation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flowercli.cli import app
from flowercli.errors import InputError
from flowercli.generate import MAX_IMAGES, load_generator, parse_seeds
from flowercli.runconfig import make_config
from flowercli.train import train

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(embedded_dir, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("seed-runs")
    cfg = make_config("modern", data_dir=embedded_dir, runs_dir=runs, run="s", image_size=16, g_channels=8,
                      d_channels=8, cond_dim=8, batch_size=4, max_steps=2)
    return train(cfg).checkpoint


def gen(checkpoint, out, *args):
    return runner.invoke(app, ["generate", "a red flower", *args, "--checkpoint", str(checkpoint), "--out", str(out),
                               "--device", "cpu"])


@pytest.mark.parametrize("text,seeds", [
    ("0-3,42", [0, 1, 2, 3, 42]), ("7", [7]), (" 1 , 2 ", [1, 2]), ("5-5", [5]), ("10-12,3", [10, 11, 12, 3]),
    (f"0-{MAX_IMAGES - 1}", list(range(MAX_IMAGES))),
])
def test_parse_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize("text,message", [
    ("", "is not a seed or a range"), ("a", "'a' is not a seed"), ("1,,2", "'' is not a seed"),
    ("-1", "'-1' is not a seed"), ("1-", "'1-' is not"), ("1-2-3", "'1-2-3' is not"), ("1.5", "'1.5' is not"),
    ("3-1", "runs backwards; write it as 1-3"), ("1,1", "seed 1 is given twice"), ("0-3,2", "seed 2 is given twice"),
    (f"0-{MAX_IMAGES}", f"more than {MAX_IMAGES}"), ("0-99999999999999", f"more than {MAX_IMAGES}"),
    (str(2**63), "too large"),
])
def test_parse_seeds_refuses(text, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        parse_seeds(text)


@pytest.mark.parametrize("args,message", [
    (["--seeds", "3-1"], "runs backwards"),
    (["--seeds", "x"], "'x' is not a seed or a range"),
    (["--seeds", "0-3", "-n", "4"], "not together with -n"),
    (["--seeds", "0-3", "--seed", "2"], "not together with --seed"),
    (["--truncation", "0"], "'--truncation': must be above 0 and at most 1"),
    (["--truncation", "1.5"], "'--truncation': must be above 0 and at most 1"),
    (["--truncation", "-1"], "'--truncation': must be above 0 and at most 1"),
    (["--truncation", "nan"], "'--truncation': must be above 0 and at most 1"),
])
def test_bad_seeds_and_truncation_are_usage_errors(checkpoint, tmp_path, args, message):
    r = gen(checkpoint, tmp_path / "o", *args)
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()) and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_interpolate_takes_no_seeds(checkpoint, tmp_path):
    r = runner.invoke(app, ["generate", "--interpolate", "a", "--interpolate", "b", "--seeds", "1,2",
                            "-c", str(checkpoint),
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "takes no --seeds" in r.stderr


def png(folder: Path, seed: int) -> bytes:
    return (folder / f"seed{seed:04d}.png").read_bytes()


def test_an_image_depends_only_on_its_seed(checkpoint, tmp_path):
    for name, args in {"alone": ["--seeds", "3"], "batch": ["--seeds", "0-5,9"], "n": ["--seed", "2", "-n", "3"],
                       "t-alone": ["--seeds", "3", "--truncation", "0.6"],
                       "t-batch": ["--seeds", "9,1-4", "--truncation", "0.6"]}.items():
        r = gen(checkpoint, tmp_path / name, *args)
        assert r.exit_code == 0, r.output
    assert png(tmp_path / "alone", 3) == png(tmp_path / "batch", 3) == png(tmp_path / "n", 3)
    assert png(tmp_path / "t-alone", 3) == png(tmp_path / "t-batch", 3)
    assert png(tmp_path / "alone", 3) != png(tmp_path / "t-alone", 3)  # truncation changed the image
    assert sorted(p.name for p in (tmp_path / "batch").iterdir()) == [
        "grid.png", *[f"seed{s:04d}.png" for s in (0, 1, 2, 3, 4, 5, 9)]]


def test_truncation_one_is_off_and_json_records_it(checkpoint, tmp_path):
    gen(checkpoint, tmp_path / "a", "-n", "2")
    r = gen(checkpoint, tmp_path / "b", "-n", "2", "--truncation", "1", "--json")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a" / "grid.png").read_bytes() == (tmp_path / "b" / "grid.png").read_bytes()
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(row["seed"], row["truncation"]) for row in rows] == [(0, 1.0), (1, 1.0)]
    r = gen(checkpoint, tmp_path / "c", "--seeds", "42,7", "--truncation", "0.5", "--json")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(row["seed"], row["truncation"]) for row in rows] == [(42, 0.5), (7, 0.5)]


def test_truncation_scales_z_and_a_sampled_condition_noise(checkpoint):
    g = load_generator(checkpoint)
    z1, eps1 = g.noise([5, 6])
    assert eps1 is None  # the mean condition: no condition noise to scale
    g.sample_condition = True
    z1, eps1 = g.noise([5, 6])
    g.truncation = 0.7
    z7, eps7 = g.noise([5, 6])
    assert torch.equal(z7, z1 * 0.7) and torch.equal(eps7, eps1 * 0.7)
    v = np.random.default_rng(0).normal(size=(2, 32)) * 0.05
    np.testing.assert_array_equal(g.images_from_vectors(v, [5, 6])[1:], g.images_from_vectors(v[1:], [6]))
