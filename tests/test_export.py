"""export: .safetensors and .pt, the model card beside them, and generate/eval reading the result."""

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from flowercli.cli import app
from flowercli.errors import CheckpointError
from flowercli.generate import load_generator
from flowercli.runconfig import make_config
from flowercli.train import train
from test_metrics import _TinyFeatures, save_scripted

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(embedded_dir, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("export-runs")
    cfg = make_config("modern", data_dir=embedded_dir, runs_dir=runs, run="g", image_size=16, g_channels=8,
                      d_channels=8, cond_dim=8, batch_size=4, max_steps=2)
    return train(cfg).checkpoint


def export(checkpoint: Path, out: Path, *extra: str):
    return runner.invoke(app, ["export", str(out), "--checkpoint", str(checkpoint), *extra])


def vectors(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, 32)) * 0.05


def test_safetensors_export_loads_like_the_pt_export(checkpoint, tmp_path):
    r = export(checkpoint, tmp_path / "m.safetensors", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout.strip().splitlines()[-1])
    st = tmp_path / "m.safetensors"
    assert info["path"] == str(st) and info["bytes"] == st.stat().st_size and info["card"] == str(tmp_path / "m.md")
    assert export(checkpoint, tmp_path / "m.pt", "-q").exit_code == 0

    from safetensors import safe_open

    with safe_open(str(st), "pt") as f:  # a plain safetensors file: any reader opens it
        meta = f.metadata()
        assert "fc.weight" in f.keys()
    assert meta["format"] == "pt" and json.loads(meta["step"]) == 2 and "model" in json.loads(meta["config"])
    a, b = load_generator(st), load_generator(tmp_path / "m.pt")
    for k, v in b.G.state_dict().items():  # the same weights, bit for bit
        assert np.array_equal(a.G.state_dict()[k].numpy(), v.numpy()), k
    assert a.meta["encoder_info"] == b.meta["encoder_info"] and a.meta["step"] == b.meta["step"] == 2
    np.testing.assert_array_equal(a.images_from_vectors(vectors(), [0, 1, 2, 3]),
                                  b.images_from_vectors(vectors(), [0, 1, 2, 3]))
    # float16 weights: the training checkpoint's images up to rounding.
    full = load_generator(checkpoint).images_from_vectors(vectors(), [0, 1, 2, 3])
    assert np.abs(full.astype(int) - a.images_from_vectors(vectors(), [0, 1, 2, 3]).astype(int)).max() <= 8


def test_generate_reads_safetensors(checkpoint, tmp_path):
    export(checkpoint, tmp_path / "m.safetensors", "-q")
    export(checkpoint, tmp_path / "m.pt", "-q")
    outs = {}
    for name in ("m.safetensors", "m.pt"):
        r = runner.invoke(app, ["generate", "a red flower", "-n", "2", "--checkpoint", str(tmp_path / name),
                                "--out", str(tmp_path / f"out-{name}"), "--device", "cpu"])
        assert r.exit_code == 0, r.output
        outs[name] = (tmp_path / f"out-{name}" / "grid.png").read_bytes()
    assert outs["m.safetensors"] == outs["m.pt"]


def test_export_carries_no_paths_of_this_machine(checkpoint, tmp_path, embedded_dir):
    assert export(checkpoint, tmp_path / "m.safetensors", "-q").exit_code == 0
    assert export(checkpoint, tmp_path / "m.pt", "-q").exit_code == 0
    runs = checkpoint.parent.parent.parent
    for name in ("m.safetensors", "m.md"):
        text = (tmp_path / name).read_bytes()
        assert str(runs).encode() not in text and str(embedded_dir).encode() not in text, name
    state = load_generator(tmp_path / "m.pt").meta
    assert state["data_dir"] is None and state["embeddings"] == Path(state["embeddings"]).name
    # The encoder id stays as recorded: generate needs it to embed prompts.
    assert state["encoder"] == load_generator(checkpoint).meta["encoder"]


def test_export_writes_a_model_card(checkpoint, tmp_path):
    r = export(checkpoint, tmp_path / "flowers.safetensors")
    assert r.exit_code == 0, r.output
    assert "model card" in r.stderr
    card = (tmp_path / "flowers.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["pipeline_tag"] == "text-to-image" and "model-index" not in front  # no eval report yet
    assert "## Intended use and limits" in card and "flowers.safetensors" in card
    assert "No evaluation report" in card and "2 steps" in card
    r = export(checkpoint, tmp_path / "nocard.safetensors", "--no-card", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["card"] is None and not (tmp_path / "nocard.md").exists()


@pytest.mark.parametrize("name", ["m.bin", "m", "m.safetensors.tmp"])
def test_export_needs_a_known_suffix(checkpoint, tmp_path, name):
    r = export(checkpoint, tmp_path / name)
    assert r.exit_code == 2 and ".safetensors" in r.output and "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


def test_damaged_safetensors_is_one_line(checkpoint, tmp_path):
    st = tmp_path / "m.safetensors"
    export(checkpoint, st, "-q")
    data = st.read_bytes()
    cases = {"rot.safetensors": data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:],
             "cut.safetensors": data[: len(data) - 500], "head.safetensors": data[:40]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError) as e:
            load_generator(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)
    r = runner.invoke(app, ["generate", "a red flower", "-c", str(tmp_path / "rot.safetensors"),
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "sha256" in r.stderr and "Traceback" not in r.output
    r = runner.invoke(app, ["generate", "a red flower", "-c", str(tmp_path / "cut.safetensors"),
                            "--out", str(tmp_path / "o")])
    assert r.exit_code == 1 and "truncated?" in r.stderr


def test_eval_reads_safetensors_and_export_carries_its_figures(checkpoint, embedded_dir, tmp_path, monkeypatch):
    """A real (tiny) eval of the exported file; that report, put beside the run's checkpoint, goes into the card."""
    import flowercli.cli
    import flowercli.config

    data = tmp_path / "data"
    shutil.copytree(embedded_dir, data)  # eval caches real-image features under the data dir
    monkeypatch.setenv("FLOWERCLI_INCEPTION", str(save_scripted(_TinyFeatures(), tmp_path / "tiny.pt")))
    monkeypatch.setattr(flowercli.cli, "EvalConfig",  # the eval command's settings, lighter for the test
                        functools.partial(flowercli.config.EvalConfig, n_other=8, colour_seeds=1, diversity_prompts=2,
                                          diversity_seeds=2, name_seeds=1))
    st = tmp_path / "model" / "m.safetensors"
    assert export(checkpoint, st, "-q").exit_code == 0
    r = runner.invoke(app, ["eval", "--checkpoint", str(st), "-d", str(data), "-n", "8", "--device", "cpu",
                            "--json", "-q"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["fid"]["n_generated"] == 8 and (tmp_path / "model" / "eval" / "report.json").is_file()

    # The run's own report of the exported checkpoint travels into the export and its card.
    runs = tmp_path / "runs"
    shutil.copytree(checkpoint.parent.parent, runs / "g")
    report["run"]["checkpoint"] = str(runs / "g" / "checkpoints" / checkpoint.name)
    (runs / "g" / "eval").mkdir()
    (runs / "g" / "eval" / "report.json").write_text(json.dumps(report))
    r = runner.invoke(app, ["export", str(tmp_path / "r.safetensors"), "--run", "g", "--runs-dir", str(runs), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout.splitlines()[-1])["eval"] is True, r.output
    card = (tmp_path / "r.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    metrics = front["model-index"][0]["results"][0]["metrics"]
    assert metrics[0]["type"] == "fid" and metrics[0]["value"] == round(report["fid"]["value"], 4)
    assert "| FID, unseen-class captions |" in card and "8 generated" in card
    assert str(runs).encode() not in (tmp_path / "r.safetensors").read_bytes()


@pytest.mark.parametrize("text", ['[1]', '{"run": "g"}', '{"run": {"checkpoint": "runs/h/checkpoints/other.pt"}}', "{cut"])
def test_export_leaves_out_a_report_that_is_not_its_checkpoints(checkpoint, tmp_path, text):
    """Another checkpoint's report, or a report.json that is no report at all, stays out (no traceback)."""
    runs = tmp_path / "runs"
    shutil.copytree(checkpoint.parent.parent, runs / "g")
    (runs / "g" / "eval").mkdir(exist_ok=True)
    (runs / "g" / "eval" / "report.json").write_text(text)
    r = runner.invoke(app, ["export", str(tmp_path / "m.pt"), "--run", "g", "--runs-dir", str(runs), "--json", "-q"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["eval"] is False and "Traceback" not in r.output


def test_packaged_model_is_safetensors_with_its_card_and_no_machine_paths():
    from flowercli.checkpoint import load_checkpoint
    from flowercli.generate import PACKAGED

    assert PACKAGED.name == "generator.safetensors" and not PACKAGED.with_suffix(".pt").exists()
    state = load_checkpoint(PACKAGED)
    assert state["encoder"]["encoder"] == "minilm"  # packaged too (the offline extra): generate works offline

    def strings(obj):
        if isinstance(obj, dict):
            return [s for v in obj.values() for s in strings(v)]
        return [s for v in obj for s in strings(v)] if isinstance(obj, list) else [obj] if isinstance(obj, str) else []

    texts = strings({k: v for k, v in state.items() if k != "G_ema"})
    texts += strings(json.loads(PACKAGED.with_suffix(".json").read_text()))
    assert texts and not [s for s in texts if s.startswith("/") or s[1:3] in (":\\", ":/")]
    card = (PACKAGED.parent / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["model-index"][0]["results"][0]["metrics"][0]["type"] == "fid"
    from flowercli.modelcard import caption_set

    captions = caption_set(state)  # recorded in training, or at release for an older checkpoint
    assert "--checkpoint generator.safetensors" in card and captions and captions["sha256"] in card
    assert "/work" not in card
