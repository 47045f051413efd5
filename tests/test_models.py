"""Networks and loss math: shapes, determinism, and the formulas against hand computations."""

import pytest
import torch

from flowercli.config import ModelConfig
from flowercli.losses import (
    contrastive,
    d_adversarial,
    diff_augment,
    ema_decay,
    ema_update,
    g_adversarial,
    kl_divergence,
    matching_aware_gp,
    mismatch,
    mode_seeking,
)
from flowercli.models import Discriminator, Generator, minibatch_std, noise_chunks, recalibrate_batchnorm


@pytest.mark.parametrize("size", [16, 32, 64])
@pytest.mark.parametrize("head", ["aux", "projection", "both", "none"])
def test_shapes(size, head):
    cfg = ModelConfig(text_dim=12, n_classes=5, image_size=size, g_channels=8, d_channels=8, cond_dim=6,
                      cond_aug=True, spectral_norm=head != "aux", d_head=head)
    G, D = Generator(cfg), Discriminator(cfg)
    z, t = torch.randn(3, cfg.noise_dim), torch.randn(3, 12)
    img, mu, logvar = G(z, t, torch.randn(3, 6))
    assert img.shape == (3, 3, size, size) and img.abs().max() <= 1
    assert mu.shape == logvar.shape == (3, 6)
    logit, cls = D(img, t, torch.tensor([0, 1, 4]))
    assert logit.shape == (3,)
    assert (cls is not None) == (head in ("aux", "both"))
    assert (D.embed is not None) == (head in ("projection", "both"))


def test_bad_image_size():
    with pytest.raises(ValueError):
        Generator(ModelConfig(image_size=48))


def test_cond_aug_uses_mean_without_noise():
    G = Generator(ModelConfig(text_dim=12, image_size=16, g_channels=8, cond_aug=True)).eval()
    z, t = torch.randn(2, 100), torch.randn(2, 12)
    a, b = G(z, t)[0], G(z, t)[0]
    c = G(z, t, torch.randn(2, 128))[0]
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_projection_depends_on_label():
    cfg = ModelConfig(text_dim=12, n_classes=4, image_size=16, d_channels=8, d_head="projection", spectral_norm=True)
    D = Discriminator(cfg).eval()
    with torch.no_grad():
        D.embed.weight.normal_()  # projection weights start random anyway; make the effect large
    x, t = torch.randn(2, 3, 16, 16), torch.randn(2, 12)
    assert not torch.allclose(D(x, t, torch.tensor([0, 0]))[0], D(x, t, torch.tensor([1, 1]))[0])


def test_cond_bn_starts_as_batchnorm_then_follows_the_condition():
    torch.manual_seed(0)
    base = ModelConfig(text_dim=12, image_size=16, g_channels=8, cond_aug=True)
    plain, cbn = Generator(base).eval(), Generator(ModelConfig(**{**base.__dict__, "cond_bn": True})).eval()
    # Same weights where the two share them: zero-initialised scale/shift make CBN plain BatchNorm.
    missing, unexpected = cbn.load_state_dict(plain.state_dict(), strict=False)
    assert all("to_affine" in k for k in missing)
    assert all(k.endswith((".weight", ".bias")) and "blocks" in k for k in unexpected)
    for m in plain.blocks:  # plain BN's affine is the identity at initialisation
        if isinstance(m, torch.nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    z, t = torch.randn(2, 100), torch.randn(2, 12)
    assert torch.allclose(plain(z, t)[0], cbn(z, t)[0], atol=1e-6)
    with torch.no_grad():
        for m in cbn.modules():
            if hasattr(m, "to_affine"):
                m.to_affine.weight.normal_()
    # With a learnt scale/shift the output now depends on the condition at every layer.
    assert not torch.allclose(cbn(z, t)[0], plain(z, t)[0], atol=1e-4)


def test_text_projection_adds_caption_feature_inner_product():
    cfg = ModelConfig(text_dim=12, n_classes=4, image_size=16, d_channels=8, d_head="none", spectral_norm=True,
                      text_proj=True)
    D = Discriminator(cfg).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.randn(2, 12)
    with torch.no_grad():
        h = D.features(x)
        tv = D.text(t)
        j = D.joint(torch.cat([h, tv[:, :, None, None].expand(-1, -1, 4, 4)], dim=1))
        expected = D.adv(j).flatten() + (D.text_embed(tv) * h.sum(dim=(2, 3))).sum(dim=1)
        assert torch.allclose(D(x, t)[0], expected, atol=1e-5)
        assert (D.text_embed(tv) * h.sum(dim=(2, 3))).sum(dim=1).abs().min() > 0


def test_losses_match_formulas():
    real, wrong, fake = torch.tensor([2.0, 0.5]), torch.tensor([-0.5, 0.2]), torch.tensor([-2.0, 3.0])
    hinge = d_adversarial(real, wrong, fake, "hinge")
    expected = (0 + 0.5) / 2 + 0.5 * ((0.5 + 1.2) / 2 + (0 + 4.0) / 2)
    assert hinge.item() == pytest.approx(expected)
    masked = d_adversarial(real, wrong, fake, "hinge", torch.tensor([True, False]))
    assert masked.item() == pytest.approx(0.25 + 0.5 * (0.5 + 2.0))
    assert g_adversarial(fake, "hinge").item() == pytest.approx(-0.5)
    sp = torch.nn.functional.softplus
    bce = d_adversarial(real, wrong, fake, "bce")
    assert bce.item() == pytest.approx((sp(-real).mean() + 0.5 * (sp(wrong).mean() + sp(fake).mean())).item(), rel=1e-6)
    assert g_adversarial(fake, "bce").item() == pytest.approx(sp(-fake).mean().item(), rel=1e-6)
    with pytest.raises(ValueError):
        g_adversarial(fake, "wgan")


def test_kl_zero_at_standard_normal():
    assert kl_divergence(torch.zeros(4, 3), torch.zeros(4, 3)).item() == 0
    assert kl_divergence(torch.ones(1, 2), torch.zeros(1, 2)).item() == pytest.approx(0.5)


def test_mode_seeking_formula_and_direction():
    z_a, z_b = torch.zeros(2, 4), torch.full((2, 4), 2.0)  # noise distance 2
    a = torch.zeros(2, 3, 4, 4)
    assert mode_seeking(a, a + 0.5, z_a, z_b).item() == pytest.approx(1 / (0.25 + 1e-5))
    assert mode_seeking(a, a.clone(), z_a, z_b).item() == pytest.approx(1e5)  # G ignoring z: large, finite
    # A step against its gradient moves the two images apart.
    b = (a + 0.1).requires_grad_(True)
    mode_seeking(a, b, z_a, z_b).backward()
    assert ((b - 0.01 * b.grad) - a).abs().mean() > (b - a).abs().mean()


def test_contrastive_formula_masking_and_direction():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    txt = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    cos = torch.nn.functional.normalize(img, dim=1) @ torch.nn.functional.normalize(txt, dim=1).T
    s = cos / 0.1

    def nce(m):  # -log softmax of the diagonal, rows of m
        return -(m.diag() - m.logsumexp(1)).mean()
    assert contrastive(img, txt).item() == pytest.approx(0.5 * (nce(s) + nce(s.T)).item(), rel=1e-5)
    # Images 0 and 2 share a class: their captions are not each other's negatives.
    masked = s.clone()
    masked[0, 2] = masked[2, 0] = float("-inf")
    got = contrastive(img, txt, torch.tensor([7, 1, 7])).item()
    assert got == pytest.approx(0.5 * (nce(masked) + nce(masked.T)).item(), rel=1e-5)
    assert contrastive(img, txt, torch.tensor([0, 1, 2])).item() == pytest.approx(contrastive(img, txt).item())
    # Only scale-free directions count, and a step against the gradient brings pairs together.
    assert contrastive(5 * img, txt).item() == pytest.approx(contrastive(img, txt).item(), rel=1e-5)
    x = img.clone().requires_grad_(True)
    before = contrastive(x, txt)
    before.backward()
    assert contrastive(x - 0.1 * x.grad, txt).item() < before.item()
    # Every caption of the batch of one class: nothing to contrast, loss 0 and finite gradients.
    same = contrastive(x, txt, torch.tensor([3, 3, 3]))
    assert same.item() == pytest.approx(0.0, abs=1e-6)


def test_discriminator_embeds_for_the_contrastive_term():
    cfg = ModelConfig(text_dim=12, n_classes=4, image_size=16, d_channels=8, cond_dim=6, spectral_norm=True,
                      d_head="projection", contrastive=1.0)
    D = Discriminator(cfg).eval()  # eval: spectral norm's power iteration would move between calls
    x, t = torch.randn(3, 3, 16, 16), torch.randn(3, 12)
    logit, cls, (ei, et) = D(x, t, torch.tensor([0, 1, 2]), embed=True)
    assert ei.shape == et.shape == (3, D.ctr_image.out_features) and logit.shape == (3,)
    # The extra heads do not change the logit.
    assert torch.allclose(D(x, t, torch.tensor([0, 1, 2]))[0], logit)
    plain = Discriminator(ModelConfig(text_dim=12, image_size=16, d_channels=8)).eval()
    assert plain.ctr_text is None
    # Asking a discriminator without the heads for their vectors names what is missing.
    with pytest.raises(ValueError, match="embed=True needs a discriminator built with contrastive"):
        plain(torch.randn(2, 3, 16, 16), torch.randn(2, 12), embed=True)


def test_ma_gp_matches_manual_gradient():
    w = torch.randn(5)
    x = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 2, requires_grad=True)
    out = (x * w).sum(1) + 3 * t.sum(1)
    gp = matching_aware_gp(out, x, t, k=2, p=6)
    norm = torch.cat([w.expand(3, 5), torch.full((3, 2), 3.0)], 1).norm(dim=1)
    assert gp.item() == pytest.approx((2 * norm.pow(6)).mean().item(), rel=1e-5)


def test_mismatch_never_pairs_with_itself():
    labels = torch.tensor([0, 0, 1, 2, 2, 3, 1, 0])
    for seed in range(20):
        idx, mask = mismatch(labels, torch.Generator().manual_seed(seed))
        assert sorted(idx.tolist()) == list(range(8))
        assert (idx != torch.arange(8)).all()
        assert torch.equal(mask, labels[idx] != labels)


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
def test_diffaug_deterministic_and_differentiable(policy):
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    a = diff_augment(x, policy, torch.Generator().manual_seed(1))
    b = diff_augment(x, policy, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    a.sum().backward()
    assert x.grad is not None
    assert diff_augment(x, "", torch.Generator()) is x


def test_ema_update_and_warmup():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    ema_update(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * before + 0.1 * b.weight)
    assert ema_decay(0, 0.999) == pytest.approx(0.1)
    assert ema_decay(10**6, 0.999) == 0.999


def test_recalibrate_batchnorm_sets_statistics_of_current_weights():
    cfg = ModelConfig(text_dim=4, image_size=16, g_channels=8)
    G = Generator(cfg)
    batches = [(torch.randn(16, 100), torch.randn(16, 4)) for _ in range(3)]
    recalibrate_batchnorm(G, batches)
    assert G.training  # mode is restored
    bn = G.fc_norm
    # Cumulative average of batch means over the three batches.
    means = []
    for z, t in batches:
        cond = G.cond(t)[0]
        h = G.fc(torch.cat([cond, z], 1)).view(-1, G.seed_channels, 4, 4)
        means.append(h.mean(dim=(0, 2, 3)))
    assert torch.allclose(bn.running_mean, torch.stack(means).mean(0), atol=1e-5)


# --- Switches that make G use its noise (noise_layers, mbstd_group): off by default -------------------

SMALL = dict(text_dim=12, n_classes=4, image_size=16, g_channels=8, d_channels=8, cond_dim=6, cond_aug=True,
             cond_bn=True, spectral_norm=True, d_head="projection", text_proj=True)


def test_default_networks_are_unchanged_by_the_switches():
    # Parameters, images and logits of the default networks, recorded before the switches existed:
    # with every switch off (the default) a seed gives the same networks and numbers as before.
    cfg = ModelConfig(**SMALL)
    assert (cfg.noise_layers, cfg.mbstd_group, cfg.mode_seek_pairs, cfg.sample_condition) == ("none", 0, 0, False)
    torch.manual_seed(0)
    G, D = Generator(cfg), Discriminator(cfg).eval()
    z, t, e = torch.randn(4, cfg.noise_dim), torch.randn(4, 12), torch.randn(4, 6)
    img = G(z, t, e)[0]
    logit = D(img, t, torch.tensor([0, 1, 2, 3]))[0]
    assert len(G.state_dict()) == 18 and len(D.state_dict()) == 27
    assert sum(p.double().sum().item() for p in G.parameters()) == pytest.approx(29.15173744758158, rel=1e-9)
    assert sum(p.double().sum().item() for p in D.parameters()) == pytest.approx(-1.5267143289293017, rel=1e-9)
    assert img.double().sum().item() == pytest.approx(117.77823356175213, rel=1e-5)
    assert img.double().abs().sum().item() == pytest.approx(714.2563406990084, rel=1e-5)
    assert logit.tolist() == pytest.approx([0.7938289046287537, 0.9504499435424805, 0.21970248222351074,
                                            0.2683908939361572], rel=1e-4, abs=1e-5)


def _affines(G):
    return [m.to_affine for m in G.modules() if hasattr(m, "to_affine")]


@pytest.mark.parametrize("size", [16, 32, 64])
@pytest.mark.parametrize("layers", ["concat", "chunks"])
def test_noise_layers_widths_shapes_and_determinism(size, layers):
    cfg = ModelConfig(**{**SMALL, "image_size": size, "noise_layers": layers})
    torch.manual_seed(0)
    G = Generator(cfg)
    n_bn = int(torch.log2(torch.tensor(size)).item()) - 3  # one conditional BatchNorm per G block
    if layers == "concat":
        assert G.fc.in_features == 6 + 100
        assert [a.in_features for a in _affines(G)] == [6 + 100] * n_bn
    else:
        assert len(G.chunks) == n_bn + 1 and sum(G.chunks) == 100 and max(G.chunks) - min(G.chunks) <= 1
        assert G.fc.in_features == 6 + G.chunks[0]
        assert [a.in_features for a in _affines(G)] == [6 + c for c in G.chunks[1:]]
    z, t, e = torch.randn(3, 100), torch.randn(3, 12), torch.randn(3, 6)
    img = G(z, t, e)[0]
    assert img.shape == (3, 3, size, size) and img.abs().max() <= 1
    torch.manual_seed(0)
    again = Generator(cfg)
    assert torch.equal(again(z, t, e)[0], img)


@pytest.mark.parametrize("layers", ["none", "concat", "chunks"])
def test_noise_reaches_the_later_layers(layers):
    cfg = ModelConfig(**{**SMALL, "noise_layers": layers})
    torch.manual_seed(0)
    G = Generator(cfg)
    z, t = torch.randn(4, 100), torch.randn(4, 12)
    # The conditional BatchNorms' maps start at zero; their gradient still shows what they read:
    # with noise_layers the columns that read z get a gradient (so training can use the noise there).
    G(z, t)[0].square().sum().backward()
    grads = [a.weight.grad for a in _affines(G)]
    assert all(g[:, :6].abs().sum() > 0 for g in grads)  # the condition's columns
    assert all((g[:, 6:].abs().sum() > 0) == (layers != "none") for g in grads)  # the noise's columns
    # Cut the noise out of the first layer: only with noise_layers do images still change with z.
    G.eval()
    with torch.no_grad():
        G.fc.weight[:, 6:] = 0
        for a in _affines(G):
            a.weight.normal_(0, 0.5)
    t1 = t[:1].repeat(4, 1)
    spread = G(z, t1)[0].std(dim=0).mean().item()
    assert (spread > 1e-3) == (layers != "none")
    if layers == "chunks":  # every chunk of a later layer is used
        for k in range(1, len(G.chunks)):
            z2 = z.clone()
            lo = sum(G.chunks[:k])
            z2[:, lo: lo + G.chunks[k]] += 1
            assert not torch.allclose(G(z2, t1)[0], G(z, t1)[0], atol=1e-4)


def test_noise_layers_need_cond_bn_and_enough_noise():
    with pytest.raises(ValueError, match="cond_bn"):
        Generator(ModelConfig(**{**SMALL, "cond_bn": False, "noise_layers": "concat"}))
    with pytest.raises(ValueError, match="noise_dim must be at least 4"):
        noise_chunks(ModelConfig(**{**SMALL, "image_size": 64, "noise_layers": "chunks", "noise_dim": 3}))
    assert noise_chunks(ModelConfig(image_size=64, noise_dim=4)) == [1, 1, 1, 1]
    assert noise_chunks(ModelConfig(image_size=64, noise_dim=102)) == [26, 26, 25, 25]
    with pytest.raises(ValueError, match="unknown noise_layers"):
        Generator(ModelConfig(**{**SMALL, "noise_layers": "everywhere"}))


def test_minibatch_std_matches_hand_computation():
    h = torch.randn(6, 2, 4, 4)
    # Group 2 over a batch of 6: images (0, 3), (1, 4), (2, 5), as StyleGAN's reshape groups them.
    out = minibatch_std(h, 2)
    assert out.shape == (6, 1, 4, 4)
    for i in range(6):
        pair = h[[i % 3, i % 3 + 3]]
        expected = (pair.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
        assert torch.allclose(out[i], expected.expand(1, 4, 4), atol=1e-6)
    # Group 4 does not divide 6: the largest divisor below it (3) is used.
    groups3 = minibatch_std(h, 3)
    assert torch.equal(minibatch_std(h, 4), groups3)
    # parts: each part on its own, as separate calls.
    assert torch.allclose(minibatch_std(h, 3, parts=2), torch.cat([minibatch_std(h[:3], 3), minibatch_std(h[3:], 3)]))
    with pytest.raises(ValueError):
        minibatch_std(h, 2, parts=4)
    # Copies of one image have no spread; a batch of one is well defined.
    assert minibatch_std(h[:1].repeat(4, 1, 1, 1), 4).max() < 1e-3
    assert torch.isfinite(minibatch_std(h[:1], 4)).all()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_mbstd_discriminator_any_batch(n):
    cfg = ModelConfig(**{**SMALL, "mbstd_group": 4})
    torch.manual_seed(0)
    D = Discriminator(cfg).eval()  # eval: spectral norm's power iteration stays put between calls
    assert D.joint[0].in_channels == Discriminator(ModelConfig(**SMALL)).joint[0].in_channels + 1
    x, t, y = torch.randn(n, 3, 16, 16, requires_grad=True), torch.randn(n, 12), torch.arange(n) % 4
    logit = D(x, t, y)[0]
    assert logit.shape == (n,) and torch.isfinite(logit).all()
    logit.sum().backward()
    assert torch.isfinite(x.grad).all()
    # One forward over [real; mismatched; fake] equals three calls: the groups never mix the parts.
    parts = [torch.randn(n, 3, 16, 16) for _ in range(3)]
    joint = D(torch.cat(parts), t.repeat(3, 1), y.repeat(3), parts=3)[0]
    assert torch.allclose(joint, torch.cat([D(p, t, y)[0] for p in parts]), atol=1e-5)
    # Image 0's logit depends on the other images of its group (here groups of 2 and 3; 5 and 7 are
    # prime, so their groups have one image and the feature is a constant).
    copies = x.detach()[:1].repeat(n, 1, 1, 1)
    moved = D(copies, t, y)[0][0].item() != D(x.detach(), t, y)[0][0].item()
    assert moved == (n in (2, 3))
