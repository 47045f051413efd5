"""The switches that make G use its noise, in training and generation, and `train --set FIELD=VALUE`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from flowercli.checkpoint import load_checkpoint
from flowercli.cli import app
from flowercli.config import parse_set
from flowercli.errors import InputError
from flowercli.generate import load_generator
from flowercli.runconfig import make_config, validate_config
from flowercli.train import train

runner = CliRunner()
TINY = dict(image_size=16, g_channels=8, d_channels=8, cond_dim=8, batch_size=4, log_every=1)


def tiny_config(tmp_path, embedded_dir, recipe="modern", run="r", **kw):
    return make_config(recipe, data_dir=embedded_dir, runs_dir=tmp_path / "runs", run=run, **{**TINY, **kw})


# --- Training with each switch ----------------------------------------------------------------

SWITCHES = {
    "concat": {"noise_layers": "concat"},
    "chunks": {"noise_layers": "chunks"},
    "mbstd": {"mbstd_group": 4},
    "mbstd_odd_group": {"mbstd_group": 3},  # 3 does not divide the batch of 4: groups of 2
    "mbstd_no_sn": {"mbstd_group": 2, "spectral_norm": False},  # three D calls instead of one
    "mode_seek_pairs": {"mode_seek": 0.1, "mode_seek_pairs": 2},
    "mode_seek_pairs_no_ca": {"mode_seek": 0.1, "mode_seek_pairs": 3, "cond_aug": False},
}


@pytest.mark.parametrize("name", list(SWITCHES))
def test_each_switch_trains_a_step(tmp_path, embedded_dir, name):
    kw = SWITCHES[name]
    result = train(tiny_config(tmp_path, embedded_dir, max_steps=1, **kw))
    state = load_checkpoint(result.checkpoint)
    for key, value in kw.items():
        assert state["config"]["model"][key] == value
    line = json.loads((result.run_dir / "log.jsonl").read_text().splitlines()[-1])
    assert all(np.isfinite([line["loss_d"], line["loss_g"]]))
    assert ("mode_seek" in line) == ("mode_seek" in kw)


def test_mode_seek_pairs_is_deterministic_and_not_the_half_batch_term(tmp_path, embedded_dir):
    def g_after(run, **kw):
        return load_checkpoint(train(tiny_config(tmp_path, embedded_dir, run=run, max_steps=2, **kw)).checkpoint)["G"]

    a = g_after("a", mode_seek=0.5, mode_seek_pairs=2)
    b = g_after("b", mode_seek=0.5, mode_seek_pairs=2)
    half = g_after("c", mode_seek=0.5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], half[k]) for k in a if a[k].is_floating_point())


def test_switches_are_validated():
    def refused(match, **kw):
        with pytest.raises(InputError, match=match):
            validate_config(make_config("modern", **kw))

    refused("needs conditional BatchNorm", noise_layers="concat", cond_bn=False)
    refused("unknown model.noise_layers", noise_layers="all")
    refused("noise_dim must be at least 4.*raise model.noise_dim", noise_layers="chunks", noise_dim=3)
    refused("give it a weight", mode_seek_pairs=4)
    refused("at most --batch-size", mode_seek=0.1, mode_seek_pairs=9, batch_size=8)
    refused("needs model.cond_aug", sample_condition=True, cond_aug=False)
    refused("0 \\(off\\) or more", mbstd_group=-1)
    validate_config(make_config("modern", noise_layers="chunks", noise_dim=4, mbstd_group=4, mode_seek=0.1,
                                mode_seek_pairs=8, batch_size=8, sample_condition=True))
    # The shipped recipes leave every switch off.
    for recipe in ("modern", "reference"):
        m = make_config(recipe).model
        assert (m.noise_layers, m.mbstd_group, m.mode_seek_pairs, m.sample_condition) == ("none", 0, 0, False)


# --- train --set FIELD=VALUE ------------------------------------------------------------------

def test_parse_set_types():
    got = parse_set(["model.noise_layers=concat", "model.mbstd_group=4", "beta1=0.5", "lr_g=1e-3",
                     "channels_last=false", "model.cond_aug=1", "model.text_proj=0", "model.sample_condition=TRUE",
                     "model.diffaug=color,translation", "split=images", "beta1=0.25", "noise_dim=64"])
    assert got == {"noise_layers": "concat", "mbstd_group": 4, "beta1": 0.25, "lr_g": 1e-3, "channels_last": False,
                   "cond_aug": True, "text_proj": False, "sample_condition": True, "diffaug": "color,translation",
                   "split": "images", "noise_dim": 64}  # model. may be left out
    assert type(got["mbstd_group"]) is int and type(got["lr_g"]) is float
    assert parse_set(["model.diffaug="]) == {"diffaug": ""}  # an empty string is a value
    assert parse_set([]) == {}


@pytest.mark.parametrize("item,message", [
    ("model.nosie_layers=concat", "unknown field 'model.nosie_layers'; did you mean model.noise_layers"),
    ("nosie_layers=concat", "did you mean model.noise_layers"),
    ("model.mbstd_group=four", "model.mbstd_group='four': expected an integer"),
    ("model.mbstd_group=-1", "expected an integer of at least 0"),
    ("model.mbstd_group=2.5", "expected an integer"),
    ("beta1=fast", "beta1='fast': expected a finite number"),
    ("beta1=nan", "expected a finite number"),
    ("model.cond_bn=yes", "model.cond_bn='yes': expected a bool: true, false, 1 or 0"),
    ("model.noise_layers=all", "expected one of none, concat, chunks"),
    ("recipe=reference", "recipe cannot be changed with --set: use --recipe"),
    ("model.text_dim=12", "comes from the embeddings file"),
    ("beta1", "is not FIELD=VALUE"),
])
def test_parse_set_refuses(item, message):
    with pytest.raises(ValueError) as e:
        parse_set([item])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_train_cli_set_overrides_recipe_and_flags(tmp_path, embedded_dir):
    args = ["train", "--data-dir", str(embedded_dir), "--runs-dir", str(tmp_path / "runs"), "--run", "s",
            "--set", "image_size=16", "--set", "g_channels=8", "--set", "d_channels=8", "--batch-size", "4",
            "--max-steps", "1", "--lr", "1e-3", "-q", "--set", "model.noise_layers=chunks",
            "--set", "model.mbstd_group=2", "--set", "beta1=0.5", "--set", "lr_g=2e-3", "--set", "model.mode_seek=0.1",
            "--set", "model.mode_seek_pairs=2", "--set", "model.sample_condition=true"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "runs" / "s" / "config.json").read_text())["config"]
    assert saved["beta1"] == 0.5 and saved["lr_g"] == 2e-3  # --set wins over the recipe and over --lr
    m = saved["model"]
    assert (m["noise_layers"], m["mbstd_group"], m["mode_seek_pairs"], m["sample_condition"]) == ("chunks", 2, 2, True)
    # The run's intended generation default travels with the checkpoint.
    assert load_generator(tmp_path / "runs" / "s", "cpu").sample_condition is True


@pytest.mark.parametrize("value,message", [
    ("model.noise_layer=concat", "did you mean model.noise_layers"),
    ("model.mbstd_group=x", "expected an integer"),
    ("model.cond_bn=maybe", "expected a bool"),
])
def test_train_cli_set_usage_errors(tmp_path, embedded_dir, value, message):
    res = runner.invoke(app, ["train", "--data-dir", str(embedded_dir), "--runs-dir", str(tmp_path / "runs"),
                              "--set", value])
    assert res.exit_code == 2
    assert message in res.output and "--set" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "runs").exists()


def test_train_cli_set_invalid_combination(tmp_path, embedded_dir):
    res = runner.invoke(app, ["train", "--data-dir", str(embedded_dir), "--runs-dir", str(tmp_path / "runs"),
                              "--set", "model.cond_bn=false", "--set", "model.noise_layers=concat"])
    assert res.exit_code == 1 and "needs conditional BatchNorm" in res.output and "Traceback" not in res.output


def test_train_help_shows_set():
    res = runner.invoke(app, ["train", "--help"])
    assert res.exit_code == 0 and "--set" in res.output and "model.noise_layers=concat" in res.output


# --- generate --sample-condition ----------------------------------------------------------------

@pytest.fixture(scope="module")
def ca_checkpoint(embedded_dir, tmp_path_factory) -> Path:
    """A conditioning-augmentation generator (modern recipe) with noise at every layer."""
    runs = tmp_path_factory.mktemp("noise-runs")
    cfg = make_config("modern", data_dir=embedded_dir, runs_dir=runs, run="ca", image_size=16, g_channels=8,
                      d_channels=8, cond_dim=8, batch_size=4, max_steps=2, noise_layers="concat")
    return train(cfg).checkpoint


def _generate(checkpoint, out, *extra):
    res = runner.invoke(app, ["generate", "red petals", "--checkpoint", str(checkpoint), "--out", str(out),
                              "--device", "cpu", *extra])
    assert res.exit_code == 0, res.output
    return np.stack([np.asarray(Image.open(p)) for p in res.stdout.split()])


def test_generate_sample_condition_is_seeded_per_image(ca_checkpoint, tmp_path):
    mean = _generate(ca_checkpoint, tmp_path / "mean", "-n", "4")
    sampled = _generate(ca_checkpoint, tmp_path / "s", "-n", "4", "--sample-condition")
    assert not np.array_equal(mean, sampled)  # the condition was sampled, not the mean
    np.testing.assert_array_equal(mean, _generate(ca_checkpoint, tmp_path / "m2", "-n", "4", "--mean-condition"))
    # Image k depends on seed k only: the first two of -n 4, and image 2 of --seed 0 is image 0 of --seed 2.
    np.testing.assert_array_equal(sampled[:2], _generate(ca_checkpoint, tmp_path / "s2", "-n", "2", "--sample-condition"))
    np.testing.assert_array_equal(sampled[2:3], _generate(ca_checkpoint, tmp_path / "s3", "-n", "1", "--seed", "2",
                                                          "--sample-condition"))


def test_generate_sample_condition_default_from_checkpoint(ca_checkpoint, tmp_path):
    state = load_checkpoint(ca_checkpoint)
    state["config"]["model"]["sample_condition"] = True
    marked = tmp_path / "marked.pt"
    torch.save(state, marked)
    assert load_generator(ca_checkpoint).sample_condition is False
    assert load_generator(marked).sample_condition is True
    sampled = _generate(ca_checkpoint, tmp_path / "s", "-n", "2", "--sample-condition")
    np.testing.assert_array_equal(sampled, _generate(marked, tmp_path / "d", "-n", "2"))
    np.testing.assert_array_equal(_generate(ca_checkpoint, tmp_path / "m", "-n", "2"),
                                  _generate(marked, tmp_path / "m2", "-n", "2", "--mean-condition"))


def test_generate_sample_condition_needs_cond_aug(embedded_dir, tmp_path):
    ckpt = train(make_config("reference", data_dir=embedded_dir, runs_dir=tmp_path / "runs", run="ref", image_size=16,
                             g_channels=8, d_channels=8, cond_dim=8, batch_size=4, max_steps=1)).checkpoint
    res = runner.invoke(app, ["generate", "red petals", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"),
                              "--device", "cpu", "--sample-condition"])
    assert res.exit_code == 1 and "needs a generator trained with conditioning augmentation" in res.output
    assert not (tmp_path / "o").exists() and "Traceback" not in res.output
    _generate(ckpt, tmp_path / "o2", "-n", "1", "--mean-condition")  # the mean is what it always uses


def test_load_generator_sample_condition_override(ca_checkpoint, embedded_dir, tmp_path):
    """`eval --sample-condition` goes through load_generator: an explicit choice wins over the run's."""
    assert load_generator(ca_checkpoint, sample_condition=True).sample_condition is True
    assert load_generator(ca_checkpoint, sample_condition=False).sample_condition is False
    ckpt = train(make_config("reference", data_dir=embedded_dir, runs_dir=tmp_path / "runs", run="ref", image_size=16,
                             g_channels=8, d_channels=8, cond_dim=8, batch_size=4, max_steps=1)).checkpoint
    with pytest.raises(InputError, match="needs a generator trained with conditioning augmentation"):
        load_generator(ckpt, sample_condition=True)
