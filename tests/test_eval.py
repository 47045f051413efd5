"""`flowercli eval` end to end on the miniature dataset, with fake generators and a tiny stand-in
for the Inception network, so nothing here depends on training or on the 87 MB network."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from flowercli.cli import app
from flowercli.config import EvalConfig
from flowercli.errors import DataError, InputError
from flowercli.metrics import evaluate as ev
from flowercli.metrics import real
from flowercli.report import ListReporter
from test_metrics import _TinyFeatures, save_scripted

from conftest import COLOURS

PROMPT_RGB = {"white": (240, 240, 235), "yellow": (235, 215, 40), "orange": (240, 140, 20), "red": (200, 20, 30),
              "pink": (240, 150, 180), "purple": (130, 50, 190), "blue": (50, 80, 210)}


@pytest.fixture(scope="module")
def tiny_net(tmp_path_factory) -> Path:
    return save_scripted(_TinyFeatures(), tmp_path_factory.mktemp("nets") / "tiny.pt")


@pytest.fixture
def data(dataset_dir, tmp_path) -> Path:
    """A private copy of the miniature dataset (eval writes its cache under the data dir)."""
    shutil.copytree(dataset_dir / "oxford102", tmp_path / "data" / "oxford102")
    return tmp_path / "data"


def make_embeddings(root: Path):
    """Embeddings in the shape `open_embeddings` returns; vectors are one-hot classes (+ a caption code)."""
    from flowercli.config import DataLayout
    from flowercli.data import class_split_of, image_splits, pad_captions, read_captions, read_class_splits, read_labels

    layout = DataLayout(root)
    labels = read_labels(layout)
    ids = np.arange(1, len(labels) + 1)
    captions = [pad_captions(c)[0] for c in read_captions(layout, ids, labels)]
    vectors = np.zeros((len(ids), 10, 8), np.float16)
    vectors[np.arange(len(ids)), :, labels - 1] = 1.0
    vectors[:, :, 4] = ids[:, None] / 100  # every image's vectors differ, so lookups are exact
    vectors[:, :, 5] = np.arange(10)[None] / 10
    return SimpleNamespace(path=None, captions=captions, vectors=vectors, n_captions=np.full(len(ids), 10),
                           labels=labels, image_ids=ids, split=image_splits(layout, len(ids)),
                           class_split=class_split_of(labels, read_class_splits(layout)), attrs={})


def _disc(rgb, seed: int, size: int, background) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    img = np.empty((size, size, 3))
    img[:] = background
    r = size * (0.3 + 0.1 * rng.random())
    img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r] = rgb
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


class FakeGenerator:
    """Draws what the dataset's images look like: a disc of the caption's class colour
    ("good"), or uniform noise ("noise"). Classes are looked up from the exact caption vector."""

    def __init__(self, emb, mode: str = "good", size: int = 32, meta: dict | None = None):
        self.mode = mode
        self.image_size = size
        self.meta = meta or {}
        self.checkpoint = Path("fake.pt")
        flat = np.asarray(emb.vectors, np.float32).reshape(-1, emb.vectors.shape[-1])
        self._label = {v.tobytes(): int(c) for v, c in zip(flat, np.repeat(emb.labels, 10))}
        self.calls = 0

    def _image(self, rgb, seed: int, background=(60, 60, 60)) -> np.ndarray:
        if self.mode == "noise":
            return np.random.default_rng(seed).integers(0, 256, (self.image_size,) * 2 + (3,), dtype=np.uint8)
        return _disc(rgb, seed, self.image_size, background)

    def images_from_vectors(self, vectors, seeds, batch_size: int = 64) -> np.ndarray:
        self.calls += len(seeds)
        labels = [self._label[np.asarray(v, np.float32).tobytes()] for v in vectors]
        return np.stack([self._image(COLOURS[c][1], s) for c, s in zip(labels, seeds)])

    def images_from_prompts(self, prompts, seeds) -> np.ndarray:
        from flowercli.metrics.colour import caption_colour

        return np.stack([self._image(PROMPT_RGB[caption_colour(p)], s, (40, 140, 40)) for p, s in zip(prompts, seeds)])


def _cfg(data: Path, tiny_net: Path, **kw) -> EvalConfig:
    base = dict(data_dir=data, n=24, n_other=12, batch_size=8, inception=tiny_net, colour_seeds=2, sheet=6,
                allow_download=False, precision="fp32")
    base.update(diversity_prompts=4, diversity_seeds=3)  # a few extra images: test_diversity.py covers them
    base.update(kw)
    return EvalConfig(**base)


META = {"split": "classes", "encoder": "fake", "step": 7}


def test_caption_plan_cycles_every_caption_in_a_fixed_order(data):
    emb = make_embeddings(data)
    rows = np.flatnonzero(emb.class_split == "test")
    r1, c1 = ev.caption_plan(emb, rows, 150, seed=3)
    r2, c2 = ev.caption_plan(emb, rows, 150, seed=3)
    assert (r1 == r2).all() and (c1 == c2).all()
    pairs = set(zip(r1[:60].tolist(), c1[:60].tolist()))
    assert len(pairs) == 60 == len(rows) * 10  # all captions once before any repeats
    assert (r1[60:120] == r1[:60]).all()  # then the same order again
    r3, _ = ev.caption_plan(emb, rows, 60, seed=4)
    assert not (r3 == r1[:60]).all()


def test_split_masks_follow_the_training_rule(data):
    emb = make_embeddings(data)
    mode, train, test = ev.split_masks(emb, "classes")
    assert mode == "classes" and set(emb.labels[test]) == {4} and set(emb.labels[train]) == {1, 2, 3}
    mode, train, test = ev.split_masks(emb, "images")
    assert (test == (emb.split == "test")).all() and not (train & test).any()
    assert ev.split_masks(emb, None)[0] == "classes"


def test_good_generator_scores_better_than_noise_and_files_are_written(data, tiny_net, tmp_path):
    emb = make_embeddings(data)
    out = tmp_path / "run" / "eval"
    good = ev.evaluate(_cfg(data, tiny_net, out_dir=out), FakeGenerator(emb, "good", meta=META), embeddings=emb)
    noise = ev.evaluate(_cfg(data, tiny_net), FakeGenerator(emb, "noise", meta=META), embeddings=emb)

    fid = good["fid"]
    assert fid["n_generated"] == 24 and fid["n_real"] == 6  # class 4 = the unseen test class
    assert fid["ceiling"]["n_a"] == fid["ceiling"]["n_b"] == 3 and fid["ceiling"]["value"] >= 0
    assert 0 <= fid["value"] < noise["fid"]["value"]

    acc, acc_noise = good["class_accuracy"], noise["class_accuracy"]
    assert acc["test"]["unseen_classes"] and not acc["train"]["unseen_classes"]
    assert acc["test"]["n"] == 24 and acc["train"]["n"] == 12 and acc["train"]["classes"] == 3
    assert acc["test"]["top1"] == 1.0 and acc["train"]["top1"] == 1.0
    assert acc_noise["train"]["top1"] < 0.7
    assert acc["classifier"]["classes"] == 4 and acc["classifier"]["top1"] == 1.0
    assert acc["test"]["ceiling"]["n"] >= 1

    col = good["colour"]
    assert col["n"] == 7 * 4 * 2 and col["agreement"] == 1.0 and set(col["by_colour"]) == set(PROMPT_RGB)
    assert noise["colour"]["agreement"] < 0.5
    assert col["ceiling"]["agreement"] == 1.0 and col["ceiling"]["n_images"] == 6

    assert json.loads((out / "report.json").read_text()) == good
    from PIL import Image

    with Image.open(out / "samples.png") as im:
        assert im.format == "PNG" and im.size[0] > 6 * 32
    assert not list(out.glob(".*tmp"))


def test_same_call_same_numbers_and_real_side_is_cached(data, tiny_net):
    emb = make_embeddings(data)
    rep1, rep2 = ListReporter(), ListReporter()
    a = ev.evaluate(_cfg(data, tiny_net), FakeGenerator(emb, meta=META), rep1, embeddings=emb)
    gen = FakeGenerator(emb, meta=META)
    b = ev.evaluate(_cfg(data, tiny_net), gen, rep2, embeddings=emb)
    assert a == b
    assert a["protocol"]["condition"] == "mean"  # FakeGenerator has no sampled condition
    gen.sample_condition = True
    assert ev.evaluate(_cfg(data, tiny_net, n=8, n_other=0, colour_seeds=0), gen,
                       embeddings=emb)["protocol"]["condition"] == "sampled"
    first = " ".join(m for _, m in rep1.messages)
    second = " ".join(m for _, m in rep2.messages)
    assert "real images once" in first and "classifier once" in first
    assert "real images once" not in second and "classifier once" not in second
    kinds = sorted(p.name.split("-n")[0].split("-32px")[0] for p in (data / "cache" / "eval").iterdir())
    assert kinds == ["classifier", "real-features", "real-stats-classes-test"]
    # Another image size is another key: new features, the old file stays.
    ev.evaluate(_cfg(data, tiny_net, n=8, n_other=0, colour_seeds=0), FakeGenerator(emb, size=16, meta=META),
                embeddings=emb)
    assert len(list((data / "cache" / "eval").glob("real-features-*"))) == 2
    # A different seed changes the generated side only.
    c = ev.evaluate(_cfg(data, tiny_net, seed=1), FakeGenerator(emb, meta=META), embeddings=emb)
    assert c["fid"]["ceiling"] != a["fid"]["ceiling"] or c["fid"]["value"] != a["fid"]["value"]


def test_real_features_are_cached_in_chunks_and_resume(data, tiny_net, monkeypatch):
    emb = make_embeddings(data)
    monkeypatch.setattr(real, "REAL_CHUNK", 10)
    ev.evaluate(_cfg(data, tiny_net, n=8, n_other=0, colour_seeds=0), FakeGenerator(emb, meta=META), embeddings=emb)
    chunks = sorted((data / "cache" / "eval").glob("real-features-*"))
    assert len(chunks) == 3  # 24 images: 10 + 10 + 4
    chunks[1].unlink()  # as if interrupted while writing the second chunk
    rep = ListReporter()
    ev.evaluate(_cfg(data, tiny_net, n=8, n_other=0, colour_seeds=0), FakeGenerator(emb, meta=META), rep,
                embeddings=emb)
    assert any("features of 10 real images" in m for _, m in rep.messages)
    assert len(list((data / "cache" / "eval").glob("real-features-*"))) == 3


def test_train_split_and_bad_settings(data, tiny_net):
    emb = make_embeddings(data)
    rep = ev.evaluate(_cfg(data, tiny_net, split="train", n_other=6), FakeGenerator(emb, meta=META), embeddings=emb)
    assert rep["fid"]["n_real"] == 18 and rep["protocol"]["split"] == "train"
    assert rep["class_accuracy"]["test"]["n"] == 6
    with pytest.raises(InputError, match="--split"):
        ev.evaluate(_cfg(data, tiny_net, split="val"), FakeGenerator(emb, meta=META), embeddings=emb)
    with pytest.raises(InputError, match="--n"):
        ev.evaluate(_cfg(data, tiny_net, n=1), FakeGenerator(emb, meta=META), embeddings=emb)
    (data / "oxford102" / "jpg" / "image_00004.jpg").unlink()
    with pytest.raises(DataError, match="image_00004.jpg is missing"):
        ev.evaluate(_cfg(data, tiny_net), FakeGenerator(emb, meta=META), embeddings=emb)


def test_evaluate_reads_the_run_embeddings_file(embedded_dir, tiny_net, tmp_path):
    """Through the real HDF5 reader: the embeddings path recorded in the run's metadata."""
    from flowercli.embeddings import open_embeddings

    data = tmp_path / "data"
    shutil.copytree(embedded_dir, data)
    h5 = next((data / "embeddings").glob("*.h5"))
    emb = open_embeddings(h5)
    meta = {"split": "classes", "embeddings": str(tmp_path / "elsewhere" / h5.name), "data_dir": str(data),
            "encoder": emb.encoder}
    rep = ev.evaluate(_cfg(None, tiny_net, n=12, n_other=0, colour_seeds=1), FakeGenerator(emb, meta=meta))
    assert rep["fid"]["n_real"] == 6 and rep["run"]["embeddings"] == str(h5)
    with pytest.raises(DataError, match="embeddings"):
        ev.evaluate(_cfg(tmp_path / "empty", tiny_net), FakeGenerator(emb, meta=meta))


# ---------------------------------------------------------------------------------------------
# Species-name prompts and the caption set.


def test_name_plan_every_class_every_template_with_its_article():
    from flowercli.metrics import names

    class_names = ["orange dahlia", "sunflower", "english marigold", "bird of paradise"]
    plan = names.name_plan(class_names, [2, 1, 3], seeds=2)
    assert len(plan.prompts) == len(plan.classes) == len(plan.templates) == 3 * len(names.TEMPLATES) * 2
    for c in (1, 2, 3):
        assert np.bincount(plan.templates[plan.classes == c]).tolist() == [2] * len(names.TEMPLATES)
    assert all(class_names[c - 1] in p for p, c in zip(plan.prompts, plan.classes))
    assert not any("bird of paradise" in p for p in plan.prompts)  # only the classes asked for
    for prompt in ("a photo of an orange dahlia", "a sunflower in bloom", "this flower is an english marigold",
                   "my garden has a beautiful orange dahlia", "a photo of a sunflower"):
        assert prompt in plan.prompts
    assert not any(" a orange" in p or " a english" in p or "an sunflower" in p for p in plan.prompts)
    assert names.article("Azalea") == "an" and names.article("hibiscus") == "a"
    from flowercli.data import NAME_TEMPLATES

    assert not set(NAME_TEMPLATES) & set(names.TEMPLATES)  # eval's sentences are not training's
    assert names.name_plan(class_names, [1], 0).prompts == []
    with pytest.raises(DataError, match="class 5 has no name"):
        names.name_plan(class_names, [1, 5], 1)


def test_species_accuracy_splits_training_and_unseen_species():
    from flowercli.metrics import names

    predicted = np.array([[1, 2], [2, 1], [3, 1], [4, 3], [3, 4], [4, 1]])  # best first
    truth = np.array([1, 1, 3, 4, 4, 4])
    templates = np.array([0, 1, 0, 0, 1, 1])
    acc = names.species_accuracy(predicted, truth, [1, 2, 3], [4], templates, ("t0", "t1"))
    assert acc["train"]["top1"] == pytest.approx(2 / 3) and acc["train"]["top5"] == 1.0
    assert acc["train"]["n"] == 3 and acc["train"]["classes"] == 3
    assert acc["unseen"]["top1"] == pytest.approx(2 / 3) and acc["unseen"]["n"] == 3
    assert acc["unseen"]["classes"] == 1
    assert acc["train"]["by_template"] == {"t0": 1.0, "t1": 0.0}
    assert acc["unseen"]["by_template"] == {"t0": 1.0, "t1": 0.5}
    no_unseen = names.species_accuracy(predicted[:3], truth[:3], [1, 2, 3], [])
    assert no_unseen["unseen"]["n"] == 0 and np.isnan(no_unseen["unseen"]["top1"])
    assert "by_template" not in no_unseen["train"]


class NameGenerator(FakeGenerator):
    """Draws the class a species-name prompt names (the fixture's names are "<colour> flower") the way
    it draws that class's captions, and records prompts and seeds."""

    def images_from_prompts(self, prompts, seeds) -> np.ndarray:
        from flowercli.metrics.colour import caption_colour

        self.prompts = getattr(self, "prompts", []) + list(prompts)
        self.seeds = getattr(self, "seeds", []) + list(seeds)
        by_colour = {name: c for c, (name, _) in COLOURS.items()}
        return np.stack([self._image(COLOURS[by_colour[caption_colour(p)]][1], s) for p, s in zip(prompts, seeds)])


def test_species_names_and_caption_set_are_reported(data, tiny_net):
    from flowercli.metrics import names

    emb = make_embeddings(data)
    emb.attrs = {"captions_archive": "captions.tgz", "captions_sha256": "a" * 64}
    meta = {**META, "encoder_info": {"captions_archive": "other.tgz", "captions_sha256": "b" * 64}}
    gen, rep = NameGenerator(emb, meta=meta), ListReporter()
    report = ev.evaluate(_cfg(data, tiny_net, colour_seeds=0, name_seeds=2), gen, rep, embeddings=emb)

    sn, acc = report["species_names"], report["class_accuracy"]
    assert sn["templates"] == list(names.TEMPLATES) and sn["seeds_per_template"] == 2
    assert sn["n"] == len(gen.prompts) == 4 * len(names.TEMPLATES) * 2 and "skipped" not in sn
    assert "a photo of a red flower" in gen.prompts and "this flower is a white flower" in gen.prompts
    assert gen.seeds == [ev.SEED_OFFSETS["names"] + i for i in range(sn["n"])]  # its own noise seeds
    assert sn["train"]["classes"] == 3 and sn["train"]["n"] == 24  # classes 1-3 trained on
    assert sn["unseen"]["classes"] == 1 and sn["unseen"]["n"] == 8  # class 4 held out
    assert sn["train"]["top1"] == sn["unseen"]["top1"] == 1.0
    assert set(sn["unseen"]["by_template"]) == set(names.TEMPLATES)
    assert sn["train"]["ceiling"] == acc["train"]["ceiling"] and sn["unseen"]["ceiling"] == acc["test"]["ceiling"]

    assert report["caption_set"] == {"generator": {"archive": "other.tgz", "sha256": "b" * 64},
                                     "data": {"archive": "captions.tgz", "sha256": "a" * 64}, "same": False}
    warned = [m for kind, m in rep.messages if kind == "warn"]
    assert any("other.tgz" in m and "captions.tgz" in m for m in warned)

    # Same captions: no warning. An older checkpoint without them: "unknown", no warning either.
    same, rep2 = {**META, "encoder_info": dict(emb.attrs)}, ListReporter()
    again = ev.evaluate(_cfg(data, tiny_net, colour_seeds=0, name_seeds=0), NameGenerator(emb, meta=same), rep2,
                        embeddings=emb)
    assert again["caption_set"]["same"] is True and not [m for k, m in rep2.messages if k == "warn"]
    assert again["species_names"]["n"] == 0 and again["species_names"]["skipped"] == "name_seeds is 0"
    old = ev.evaluate(_cfg(data, tiny_net, colour_seeds=0, name_seeds=0), NameGenerator(emb, meta=META),
                      embeddings=emb)
    assert old["caption_set"]["generator"] == {"archive": "unknown", "sha256": "unknown"}
    assert old["caption_set"]["same"] is None
    with pytest.raises(InputError, match="name_seeds"):
        ev.evaluate(_cfg(data, tiny_net, name_seeds=-1), NameGenerator(emb, meta=META), embeddings=emb)


def test_species_names_skipped_without_classnames(data, tiny_net):
    (data / "oxford102" / "classnames.txt").unlink()
    emb = make_embeddings(data)
    gen, rep = NameGenerator(emb, meta=META), ListReporter()
    report = ev.evaluate(_cfg(data, tiny_net, colour_seeds=0), gen, rep, embeddings=emb)
    sn = report["species_names"]
    assert sn["n"] == 0 and "classnames.txt is absent" in sn["skipped"] and "train" not in sn
    assert not getattr(gen, "prompts", [])
    assert any(k == "warn" and "species-name accuracy skipped" in m for k, m in rep.messages)
    # The rest of the report is there, and the data's caption set comes from manifest.json (none here).
    assert report["fid"]["n_generated"] == 24
    assert report["caption_set"]["data"] == {"archive": "unknown", "sha256": "unknown"}


# ---------------------------------------------------------------------------------------------
# CLI.


@pytest.fixture
def fake_cli(monkeypatch, data, tmp_path, tiny_net):
    """`flowercli eval` with the generator loader and embeddings reader replaced by fakes."""
    import flowercli.generate

    emb = make_embeddings(data)
    run = tmp_path / "runs" / "demo"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step-0000007.pt").write_bytes(b"")
    loaded = []

    def fake_load(checkpoint=None, device="cpu", runs_dir=None, sample_condition=None):
        loaded.append(Path(checkpoint))
        gen = FakeGenerator(emb, meta={**META, "data_dir": str(data), "embeddings": "fake.h5"})
        gen.sample_condition = bool(sample_condition)
        return gen

    monkeypatch.setattr(flowercli.generate, "load_generator", fake_load)
    # Fewer extra images than the protocol's defaults: the CLI test is about wiring, not numbers.
    # Patched where the eval command looks the class up (cli.py imports it by name).
    import functools

    import flowercli.cli

    monkeypatch.setattr(flowercli.cli, "EvalConfig", functools.partial(EvalConfig, n_other=8, colour_seeds=1))
    monkeypatch.setattr(ev, "load_embeddings", lambda path: emb)
    monkeypatch.setenv("FLOWERCLI_INCEPTION", str(tiny_net))
    (data / "embeddings").mkdir()
    (data / "embeddings" / "fake.h5").write_bytes(b"")
    return SimpleNamespace(runs=tmp_path / "runs", run=run, loaded=loaded, data=data)


def test_cli_eval_help_has_examples():
    result = CliRunner().invoke(app, ["eval", "--help"])
    assert result.exit_code == 0
    assert "Examples:" in result.output and "flowercli eval --run" in result.output
    for opt in ("--run", "--checkpoint", "--n", "--seed", "--split", "--batch-size", "--device", "--inception",
                "--data-dir", "--runs-dir", "--json", "--quiet", "--verbose"):
        assert opt in result.output


def test_cli_eval_json_table_and_report(fake_cli):
    args = ["eval", "--run", "demo", "--runs-dir", str(fake_cli.runs), "-n", "16", "--batch-size", "8", "-q"]
    result = CliRunner().invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fid"]["n_generated"] == 16 and report["protocol"]["split"] == "test"
    assert fake_cli.loaded == [fake_cli.run / "checkpoints" / "step-0000007.pt"]
    on_disk = json.loads((fake_cli.run / "eval" / "report.json").read_text())
    assert on_disk == report and (fake_cli.run / "eval" / "samples.png").is_file()
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "FID" in table.stdout and "ceiling" in table.stdout and "colour agreement" in table.stdout
    assert "class top-1 (test unseen)" in table.stdout
    assert json.loads((fake_cli.run / "eval" / "report.json").read_text()) == report  # same numbers again
    sampled = CliRunner().invoke(app, args + ["--json", "--sample-condition"])
    assert sampled.exit_code == 0, sampled.output
    assert json.loads(sampled.stdout)["protocol"]["condition"] == "sampled"


def test_cli_eval_table_shows_species_names_and_caption_set(fake_cli, monkeypatch):
    emb = make_embeddings(fake_cli.data)
    emb.attrs = {"captions_archive": "captions.tgz", "captions_sha256": "a" * 64}
    monkeypatch.setattr(ev, "load_embeddings", lambda path: emb)
    result = CliRunner().invoke(app, ["eval", "--run", "demo", "--runs-dir", str(fake_cli.runs), "-n", "8",
                                      "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "step 7, captions captions.tgz" in out
    for row in ("name top-1 (training species)", "name top-5 (training species)", "name top-1 (unseen species)"):
        assert row in out
    assert "Captions: captions.tgz (sha256 aaaaaaaaaaaa); the generator was trained on: unknown." in out
    assert "trained on captions" not in result.stderr  # an unknown side is not a difference
    report = json.loads((fake_cli.run / "eval" / "report.json").read_text())
    assert report["species_names"]["n"] == 4 * 4 * 2 and report["caption_set"]["same"] is None


def test_cli_eval_errors(fake_cli):
    runner = CliRunner()
    r = runner.invoke(app, ["eval"])
    assert r.exit_code == 1 and "Error:" in r.stderr and "--run NAME or --checkpoint" in r.stderr
    r = runner.invoke(app, ["eval", "--run", "nope", "--runs-dir", str(fake_cli.runs)])
    assert r.exit_code == 1 and "no run named 'nope'" in r.stderr
    r = runner.invoke(app, ["eval", "--run", "demo", "--runs-dir", str(fake_cli.runs), "--split", "val"])
    assert r.exit_code == 2
    r = runner.invoke(app, ["eval", "--run", "demo", "--runs-dir", str(fake_cli.runs), "-n", "1"])
    assert r.exit_code == 1 and "--n must be" in r.stderr and "Traceback" not in r.output
    r = runner.invoke(app, ["eval", "--run", "demo", "--runs-dir", str(fake_cli.runs), "--inception",
                            str(fake_cli.runs / "missing.pt")])
    assert r.exit_code == 1 and "no such file" in r.stderr
