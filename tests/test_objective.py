"""losses.Objective: D's and G's loss on a batch, each the weighted sum of the terms the config turns on."""

import copy

import pytest
import torch

from flowercli.losses import Objective
from flowercli.models import Discriminator, Generator
from flowercli.runconfig import make_config
from flowercli.traindata import Batch

TINY = dict(image_size=16, g_channels=8, d_channels=8, cond_dim=8, text_dim=12, n_classes=3)


def nets_and_batch(recipe, **kw):
    mcfg = make_config(recipe, **{**TINY, **kw}).model
    torch.manual_seed(0)
    G, D = Generator(mcfg), Discriminator(mcfg)
    g = torch.Generator().manual_seed(1)
    n = 6
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    b = Batch(x=torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, text=torch.randn(n, 12, generator=g), labels=labels,
              wrong=torch.tensor([1, 2, 3, 4, 5, 0]), wrong_mask=torch.ones(n, dtype=torch.bool),
              z=torch.randn(n, mcfg.noise_dim, generator=g),
              eps=torch.randn(n, mcfg.cond_dim, generator=g) if mcfg.cond_aug else None)
    return mcfg, G, D, b


def losses(mcfg, G, D, b, one_d_forward=True, seed=5):
    """(D's loss, its diagnostics, G's loss, its diagnostics) with the step generator seeded by `seed`.

    On copies of the networks: each forward in training mode moves spectral norm's power iteration."""
    G, D = copy.deepcopy(G), copy.deepcopy(D)
    objective, g = Objective(mcfg, one_d_forward), torch.Generator().manual_seed(seed)
    fake, mu, logvar = G(b.z, b.text, b.eps)
    loss_d, d_stats = objective.d_loss(D, b, fake, g)
    loss_g, g_stats = objective.g_loss(G, D, b, fake, mu, logvar, g)
    return loss_d, d_stats, loss_g, g_stats


@pytest.mark.parametrize("recipe,kw,d_keys,g_keys", [
    ("modern", {}, set(), set()),
    ("reference", {}, {"cls_acc_real", "cls_acc_fake"}, set()),
    ("modern", dict(contrastive=0.5, mode_seek=0.1, gan_int=1.0, ma_gp=1.0), {"contrastive_d"},
     {"contrastive_g", "mode_seek"}),
    ("modern", dict(mode_seek=0.1, mode_seek_pairs=2, d_head="both"), {"cls_acc_real", "cls_acc_fake"}, {"mode_seek"}),
])
def test_terms_that_are_on_and_repeatable(recipe, kw, d_keys, g_keys):
    mcfg, G, D, b = nets_and_batch(recipe, **kw)
    first = losses(mcfg, G, D, b)
    assert set(first[1]) == d_keys and set(first[3]) == g_keys
    assert all(torch.isfinite(t) for t in (first[0], first[2], *first[1].values(), *first[3].values()))
    again = losses(mcfg, G, D, b)  # the same draws from the same generator: the same numbers
    assert torch.equal(first[0], again[0]) and torch.equal(first[2], again[2])
    if mcfg.diffaug:  # the augmentations are drawn from the step's generator
        assert not torch.equal(first[0], losses(mcfg, G, D, b, seed=6)[0])


def test_a_term_adds_its_weight_times_its_value():
    mcfg, G, D, b = nets_and_batch("modern", mode_seek=0.1)
    without, _ = losses(make_config("modern", **TINY).model, G, D, b)[2:]
    with_ms, stats = losses(mcfg, G, D, b)[2:]
    # Mode seeking draws its noise after everything else, so the other terms see the same numbers.
    assert torch.allclose(with_ms, without + 0.1 * stats["mode_seek"], atol=1e-6)


def test_one_d_forward_is_three_forwards_without_batchnorm_in_d():
    mcfg, G, D, b = nets_and_batch("modern", contrastive=0.5)  # spectral norm: no BatchNorm in D
    one = losses(mcfg, G, D, b, one_d_forward=True)
    three = losses(mcfg, G, D, b, one_d_forward=False)
    assert torch.allclose(one[0], three[0], atol=1e-5)
    assert torch.allclose(one[1]["contrastive_d"], three[1]["contrastive_d"], atol=1e-5)
