"""The CUDA path (bf16 autocast, channels_last): skipped where no GPU is present, e.g. in CI."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flowercli.cli import app
from flowercli.device import resolve_precision
from flowercli.generate import load_generator
from flowercli.runconfig import make_config
from flowercli.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
runner = CliRunner()
TINY = dict(image_size=16, g_channels=8, d_channels=8, cond_dim=8, batch_size=4, log_every=1)


@pytest.mark.parametrize("recipe,kw", [("modern", {}), ("modern", {"ma_gp": 2.0, "gan_int": 1.0}), ("reference", {})])
def test_cuda_training_bf16_channels_last_and_resume(tmp_path, embedded_dir, recipe, kw):
    assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    cfg = make_config(recipe, data_dir=embedded_dir, runs_dir=tmp_path / "runs", run="c", device="cuda",
                      max_steps=3, epochs=50, **{**TINY, **kw})
    first = train(cfg)
    assert first.step == 3
    resumed = train(make_config(recipe, data_dir=embedded_dir, runs_dir=tmp_path / "runs", run="c", device="cuda",
                                max_steps=5, epochs=50, resume=True, **{**TINY, **kw}))
    assert resumed.step == 5
    lines = [json.loads(x) for x in (resumed.run_dir / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines][-2:] == [4, 5]
    assert all(np.isfinite([x["loss_d"], x["loss_g"]]).all() for x in lines)


def test_cuda_generator_matches_cpu(tmp_path, embedded_dir):
    ckpt = train(make_config("modern", data_dir=embedded_dir, runs_dir=tmp_path / "runs", run="g", device="cpu",
                             max_steps=2, **TINY)).checkpoint
    v = np.random.default_rng(0).normal(size=(6, 32)) * 0.05
    cpu = load_generator(ckpt, "cpu").images_from_vectors(v, list(range(6)))
    gpu = load_generator(ckpt, "cuda").images_from_vectors(v, list(range(6)))
    assert np.abs(cpu.astype(int) - gpu.astype(int)).max() <= 2  # fp32 on both: rounding only
    r = runner.invoke(app, ["generate", "yellow petals", "-n", "3", "--checkpoint", str(ckpt), "--device", "cuda",
                            "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert len(r.stdout.split()) == 3
