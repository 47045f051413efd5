"""Diversity metrics: k-NN precision/recall/density/coverage and within-prompt spread, on tiny
synthetic features, then through `evaluate()` and the CLI table on the miniature dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flowercli.cli import app
from flowercli.errors import InputError
from flowercli.metrics import evaluate as ev
from flowercli.metrics.diversity import mean_pairwise_distance, pixels, spread, within_prompt_ratios
from flowercli.metrics.diversity_eval import real_draws
from flowercli.metrics.prdc import knn_radii, prdc
from test_eval import META, FakeGenerator, _cfg, data, fake_cli, make_embeddings, tiny_net  # noqa: F401

# ---------------------------------------------------------------------------------------------
# precision, recall, density, coverage.

# Real points on a line (k=1 radii 1, 1, 2, 3) and generated points in two tight pairs.
REAL_2D = np.array([[0, 0], [1, 0], [3, 0], [6, 0]], float)
FAKE_2D = np.array([[0.4, 0], [0.5, 0.5], [10, 0], [10, 1]], float)


def test_knn_radii_by_hand():
    assert np.allclose(knn_radii(REAL_2D, 1), [1, 1, 2, 3])
    assert np.allclose(knn_radii(REAL_2D, 2), [3, 2, 3, 5])
    assert np.allclose(knn_radii(FAKE_2D, 1), [np.sqrt(0.26), np.sqrt(0.26), 1, 1])
    # A duplicate is a neighbour at distance 0, the point itself is not.
    assert np.allclose(knn_radii(np.array([[0.0], [0.0], [5.0]]), 1), [0, 0, 5])
    with pytest.raises(ValueError, match="at least 4"):
        knn_radii(REAL_2D[:3], 3)


def test_prdc_by_hand():
    # precision: the two points near the origin lie in real balls, the far pair in none -> 2/4;
    # recall: only (0, 0) lies in a generated ball (radius sqrt(0.26) around (0.4, 0)) -> 1/4;
    # density: each near point lies in the balls of (0, 0) and (1, 0) -> 4 / (1 x 4) = 1;
    # coverage: the balls of (0, 0) and (1, 0) hold a generated point, those of (3, 0), (6, 0) not -> 2/4.
    got = prdc(REAL_2D, FAKE_2D, k=1)
    assert got == pytest.approx({"precision": 0.5, "recall": 0.25, "density": 1.0, "coverage": 0.5})
    # Chunking the distance matrix changes nothing.
    assert prdc(REAL_2D, FAKE_2D, k=1, chunk=1) == got


def _prdc_brute(real, fake, k):
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=2)
    d_ff = np.linalg.norm(fake[:, None] - fake[None], axis=2)
    d_rf = np.linalg.norm(real[:, None] - fake[None], axis=2)
    rho = np.sort(d_rr, axis=1)[:, k]  # column 0 is the point itself
    sig = np.sort(d_ff, axis=1)[:, k]
    inside = d_rf <= rho[:, None]
    return {"precision": inside.any(axis=0).mean(), "recall": (d_rf <= sig[None]).any(axis=1).mean(),
            "density": inside.sum() / (k * len(fake)), "coverage": inside.any(axis=1).mean()}


def test_prdc_matches_a_brute_force_reference():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(70, 5)), rng.normal(0.3, 1.2, size=(90, 5))
    assert prdc(real, fake, k=3, chunk=16) == pytest.approx(_prdc_brute(real, fake, 3))


def test_recall_of_a_set_against_itself_is_one_and_a_collapsed_set_has_none():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(200, 16))
    same = prdc(real, real, k=3)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    collapsed = real[0] + 0.01 * rng.normal(size=(200, 16))  # one point, repeated with a little noise
    got = prdc(real, collapsed, k=3)
    assert got["recall"] < 0.02 and got["coverage"] < 0.05
    assert got["precision"] == 1.0  # every copy is a faithful real-looking sample: fidelity is blind to it
    spread_out = prdc(real, rng.normal(size=(200, 16)), k=3)
    assert spread_out["recall"] > 0.5 and spread_out["coverage"] > 0.5


# ---------------------------------------------------------------------------------------------
# Within-prompt spread.


def test_mean_pairwise_distance():
    assert mean_pairwise_distance(np.array([[0, 0], [3, 4], [0, 0]])) == pytest.approx(10 / 3)
    assert mean_pairwise_distance(np.ones((5, 7))) == 0.0
    with pytest.raises(ValueError):
        mean_pairwise_distance(np.ones((1, 3)))


def test_ratio_is_one_for_real_like_sets_and_zero_for_a_repeated_image():
    rng = np.random.default_rng(3)
    P, K, D = 40, 8, 32
    classes = np.arange(P) % 4
    real = {c: rng.normal(c, 1.0, size=(K, D)) for c in range(4)}
    like_real = np.stack([rng.normal(c, 1.0, size=(K, D)) for c in classes])
    ratios = within_prompt_ratios(like_real, classes, real)
    assert ratios.shape == (P,) and abs(ratios.mean() - 1) < 0.1
    repeated = np.repeat(rng.normal(size=(P, 1, D)), K, axis=1)
    assert (within_prompt_ratios(repeated, classes, real) == 0).all()
    half = within_prompt_ratios(0.5 * like_real, classes, real)
    assert half == pytest.approx(ratios / 2)
    # A class without two real rows gives NaN, left out of the spread.
    odd = within_prompt_ratios(like_real[:3], np.array([0, 1, 9]), {0: real[0], 1: real[1], 9: real[2][:1]})
    assert np.isfinite(odd[:2]).all() and np.isnan(odd[2])
    s = spread(odd)
    assert s["n"] == 2 and s["p10"] <= s["mean"] <= s["p90"]
    assert spread([])["n"] == 0 and np.isnan(spread([])["mean"])


def test_pixel_variant_on_uint8_images():
    rng = np.random.default_rng(4)
    P, K = 30, 8
    imgs = rng.integers(0, 256, size=(P, K, 8, 8, 3), dtype=np.uint8)
    real = {0: pixels(rng.integers(0, 256, size=(K, 8, 8, 3), dtype=np.uint8))}
    feats = pixels(imgs.reshape(P * K, 8, 8, 3))
    assert feats.shape == (P * K, 192) and 0 <= feats.min() and feats.max() <= 1
    ratios = within_prompt_ratios(feats.reshape(P, K, -1), np.zeros(P, int), real)
    assert abs(ratios.mean() - 1) < 0.05
    same = np.repeat(imgs[:, :1], K, axis=1)
    assert (within_prompt_ratios(pixels(same.reshape(P * K, 8, 8, 3)).reshape(P, K, -1), np.zeros(P, int), real)
            == 0).all()


def test_real_draws_are_fixed_per_class():
    labels = np.array([1, 1, 1, 1, 2, 2, 3, 1, 2])
    rows = np.arange(9)
    a = real_draws(labels, rows, [1, 2, 3], k=3, seed=0)
    assert set(a) == {1, 2}  # class 3 has one image: no pairs
    assert len(a[1]) == 3 and set(a[1]) <= {0, 1, 2, 3, 7} and list(a[2]) == [4, 5, 8]
    assert list(real_draws(labels, rows, [1], k=3, seed=0)[1]) == list(a[1])  # independent of other classes
    assert list(real_draws(labels, rows, [1, 2], k=3, seed=0)[1]) == list(a[1])  # and repeatable
    assert set(real_draws(labels, rows[:4], [1], k=3, seed=0)[1]) <= {0, 1, 2, 3}  # only the given rows
    assert len(real_draws(labels, rows, [1], k=9, seed=0)[1]) == 5  # fewer than k: all of them


# ---------------------------------------------------------------------------------------------
# Through evaluate() and the CLI.


class CollapsedGenerator(FakeGenerator):
    """Every seed of a caption gives the same image (the mode collapse users see)."""

    def images_from_vectors(self, vectors, seeds, batch_size: int = 64) -> np.ndarray:
        return super().images_from_vectors(vectors, [0] * len(seeds), batch_size)


def test_evaluate_reports_diversity(data, tiny_net):  # noqa: F811
    emb = make_embeddings(data)
    cfg = _cfg(data, tiny_net, n=24, n_other=0, colour_seeds=0, diversity_prompts=5, diversity_seeds=4)
    good = ev.evaluate(cfg, FakeGenerator(emb, meta=META), embeddings=emb)["diversity"]
    assert good["k"] == 3 and good["n_generated"] == 24 and good["n_real"] == 6
    for key in ("precision", "recall", "coverage"):
        assert 0 <= good[key] <= 1
    assert good["density"] >= 0
    # 6 real test images: halves of 3 have no 3rd neighbour, so the ceiling is reported as missing.
    assert good["ceiling"]["n_a"] == 3 and good["ceiling"]["precision"] is None
    wp = good["within_prompt"]
    assert (wp["prompts"], wp["seeds"], wp["classes"], wp["ceiling"]) == (5, 4, 1, 1.0)
    assert wp["real_per_class"] == {"min": 4, "max": 4}
    assert 0.3 < wp["pixels"]["mean"] < 3 and wp["features"]["mean"] > 0 and wp["features"]["n"] == 5
    assert wp["pixels"]["p10"] <= wp["pixels"]["mean"] <= wp["pixels"]["p90"]

    collapsed = ev.evaluate(cfg, CollapsedGenerator(emb, meta=META), embeddings=emb)["diversity"]
    assert collapsed["within_prompt"]["features"]["mean"] == 0 and collapsed["within_prompt"]["pixels"]["mean"] == 0

    train = ev.evaluate(_cfg(data, tiny_net, split="train", n=24, n_other=0, colour_seeds=0, diversity_prompts=0),
                        FakeGenerator(emb, meta=META), embeddings=emb)["diversity"]
    assert train["n_real"] == 18 and train["ceiling"]["n_a"] == 9
    for key in ("precision", "recall", "coverage"):
        assert 0 <= train["ceiling"][key] <= 1
    assert train["within_prompt"]["prompts"] == 0 and train["within_prompt"]["features"]["mean"] is None


def test_diversity_images_have_their_own_seeds(data, tiny_net):  # noqa: F811
    """The protocol's own images (and so FID) are the same with or without the diversity images."""
    emb = make_embeddings(data)
    seen = []

    class Recording(FakeGenerator):
        def images_from_vectors(self, vectors, seeds, batch_size: int = 64):
            seen.append(list(seeds))
            return super().images_from_vectors(vectors, seeds, batch_size)

    kw = dict(n=8, n_other=0, colour_seeds=0, diversity_seeds=3)
    with_div = ev.evaluate(_cfg(data, tiny_net, diversity_prompts=2, **kw), Recording(emb, meta=META), embeddings=emb)
    main_seeds, div_seeds = seen[:2]  # the protocol's images, then the diversity images
    assert div_seeds == [ev.SEED_OFFSETS["diversity"] + i for i in range(6)] and not set(main_seeds) & set(div_seeds)
    without = ev.evaluate(_cfg(data, tiny_net, diversity_prompts=0, **kw), FakeGenerator(emb, meta=META),
                          embeddings=emb)
    assert with_div["fid"] == without["fid"]


def test_bad_diversity_settings(data, tiny_net):  # noqa: F811
    emb = make_embeddings(data)
    for kw, match in ((dict(diversity_prompts=-1), "diversity_prompts"), (dict(diversity_seeds=1), "diversity_seeds"),
                      (dict(prdc_k=0), "prdc_k"), (dict(diversity_prompts=10_000, diversity_seeds=10), "at most")):
        with pytest.raises(InputError, match=match):
            ev.evaluate(_cfg(data, tiny_net, **kw), FakeGenerator(emb, meta=META), embeddings=emb)


def test_cli_table_shows_diversity(fake_cli, monkeypatch):  # noqa: F811
    import functools

    import flowercli.cli

    monkeypatch.setattr(flowercli.cli, "EvalConfig", functools.partial(flowercli.cli.EvalConfig,
                                                                       diversity_prompts=3, diversity_seeds=2))
    args = ["eval", "--run", "demo", "--runs-dir", str(fake_cli.runs), "-n", "16", "--batch-size", "8", "-q"]
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0, table.output
    for row in ("precision (k=3)", "recall (k=3)", "density (k=3)", "coverage (k=3)",
                "within-prompt (features)", "within-prompt (pixels)", "3x2"):
        assert row in table.stdout, table.stdout
    report = json.loads((fake_cli.run / "eval" / "report.json").read_text())
    assert report["diversity"]["within_prompt"]["prompts"] == 3
    assert Path(fake_cli.run / "eval" / "samples.png").is_file()
