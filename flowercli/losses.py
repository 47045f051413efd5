"""The GAN objective: its terms as pure functions of tensors, and `Objective`, which evaluates D and G
on a batch and sums the terms a ModelConfig turns on; plus DiffAugment and the EMA update."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def d_adversarial(real: torch.Tensor, wrong: torch.Tensor, fake: torch.Tensor, kind: str,
                  wrong_mask: torch.Tensor | None = None) -> torch.Tensor:
    """D's loss: (real image, its caption) is real; (mismatched image, caption) and (fake, caption) are fake.

    The mismatched term is what teaches D, and through it G, that the caption matters (GAN-CLS).
    `wrong_mask` drops mismatched pairs that happen to share the caption's class.
    """
    if kind == "hinge":
        l_real = F.relu(1 - real).mean()
        l_wrong = F.relu(1 + wrong)
        l_fake = F.relu(1 + fake).mean()
    elif kind == "bce":
        l_real = F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
        l_wrong = F.binary_cross_entropy_with_logits(wrong, torch.zeros_like(wrong), reduction="none")
        l_fake = F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    else:
        raise ValueError(f"unknown loss {kind!r}")
    l_wrong = masked_mean(l_wrong, wrong_mask)
    # Both "fake" terms share the weight of the real term, as in GAN-CLS and DF-GAN.
    return l_real + 0.5 * (l_wrong + l_fake)


def g_adversarial(fake: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "hinge":
        return -fake.mean()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))
    raise ValueError(f"unknown loss {kind!r}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per dimension, averaged over dimensions and batch.

    The mean (as StackGAN and AttnGAN use it), not the sum over dimensions: summed, the term is
    cond_dim times stronger and pulls every caption's condition onto N(0, I), so G ignores the text.
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean()


def mode_seeking(fake_a: torch.Tensor, fake_b: torch.Tensor, z_a: torch.Tensor, z_b: torch.Tensor,
                 eps: float = 1e-5) -> torch.Tensor:
    """MSGAN's mode-seeking term (Mao et al. 2019): 1 / (image distance / noise distance).

    Minimising it pushes G to map different noise for the same caption to different images; the
    eps keeps it finite when G ignores its noise altogether, which is the case it is there for.
    """
    ratio = (fake_a - fake_b).abs().mean() / (z_a - z_b).abs().mean()
    return 1.0 / (ratio + eps)


def contrastive(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor | None = None,
                temperature: float = 0.1) -> torch.Tensor:
    """Image-caption InfoNCE over the batch (XMC-GAN, Zhang et al. 2021), symmetric.

    Each image must pick its own caption among the batch's captions, and each caption its image,
    by cosine similarity / temperature. A caption of another image of the same class is not a
    wrong answer (both may describe either image), so those pairs are left out when `labels` are given.
    """
    img = F.normalize(img.float(), dim=1)
    txt = F.normalize(txt.float(), dim=1)
    logits = img @ txt.T / temperature
    if labels is not None:
        same = labels[:, None] == labels[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def matching_aware_gp(out: torch.Tensor, images: torch.Tensor, text: torch.Tensor,
                      k: float = 2.0, p: float = 6.0) -> torch.Tensor:
    """DF-GAN's MA-GP: penalise D's gradient at real images with their matching text.

    Smooths D around the real, matching data points so that G gets useful gradients there.
    `images` and `text` must require grad and be the inputs that produced `out`.
    """
    gi, gt = torch.autograd.grad(out.sum(), (images, text), create_graph=True)
    norm = torch.cat([gi.flatten(1), gt.flatten(1)], dim=1).norm(2, dim=1)
    return k * norm.pow(p).mean()


def mismatch(labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices pairing each caption with another image of the batch, and a mask of pairs of other classes.

    A random cyclic shift of a random permutation never pairs an item with itself.
    """
    n = labels.shape[0]
    perm = torch.randperm(n, generator=generator, device=generator.device)
    shift = int(torch.randint(1, max(n, 2), (1,), generator=generator, device=generator.device))
    idx = torch.empty_like(perm)
    idx[perm] = perm.roll(shift)
    return idx, labels[idx] != labels


# DiffAugment (Zhao et al. 2020): the same differentiable augmentation on every image D sees, real
# or fake, so D cannot overfit a small dataset and G is not taught to produce the augmentations.
def diff_augment(x: torch.Tensor, policy: str, generator: torch.Generator) -> torch.Tensor:
    if not policy:
        return x
    for name in policy.split(","):
        x = _AUGMENTS[name.strip()](x, generator)
    return x


def _rand(x: torch.Tensor, g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.rand(x.shape[0], *shape, generator=g, device=g.device).to(x.device, x.dtype)


def _colour(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    x = x + (_rand(x, g, 1, 1, 1) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand(x, g, 1, 1, 1) * 2) + mean
    mean = x.mean(dim=[1, 2, 3], keepdim=True)
    return (x - mean) * (_rand(x, g, 1, 1, 1) + 0.5) + mean


def _translation(x: torch.Tensor, g: torch.Generator, ratio: float = 0.125) -> torch.Tensor:
    n, c, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    tx = torch.randint(-sh, sh + 1, (n, 1, 1), generator=g, device=g.device).to(x.device)
    ty = torch.randint(-sw, sw + 1, (n, 1, 1), generator=g, device=g.device).to(x.device)
    gy, gx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    gy = torch.clamp(gy[None] + tx + 1, 0, h + 1)
    gx = torch.clamp(gx[None] + ty + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1])
    # One gather over the flattened padded image (out-of-range pixels read the zero border): the
    # same values and gradients as advanced indexing, ~1.3x faster forward and backward on CPU.
    src_index = (gy * (w + 2) + gx).view(n, h * w)
    if _fmt(x) == torch.channels_last:  # gather along memory order: (n, h*w, c)
        src = padded.permute(0, 2, 3, 1).reshape(n, (h + 2) * (w + 2), c)
        return src.gather(1, src_index[:, :, None].expand(n, h * w, c)).view(n, h, w, c).permute(0, 3, 1, 2)
    src = padded.reshape(n, c, (h + 2) * (w + 2))
    return src.gather(2, src_index[:, None, :].expand(n, c, h * w)).view(n, c, h, w)


def _cutout(x: torch.Tensor, g: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ox = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), generator=g, device=g.device).to(x.device)
    oy = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), generator=g, device=g.device).to(x.device)
    gy, gx = torch.meshgrid(torch.arange(ch, device=x.device), torch.arange(cw, device=x.device), indexing="ij")
    gy = torch.clamp(gy[None] + ox - ch // 2, 0, h - 1)
    gx = torch.clamp(gx[None] + oy - cw // 2, 0, w - 1)
    mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
    mask[torch.arange(n, device=x.device)[:, None, None], gy, gx] = 0
    return x * mask[:, None]


def _fmt(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


_AUGMENTS = {"color": _colour, "colour": _colour, "translation": _translation, "cutout": _cutout}
DIFFAUG_NAMES = tuple(_AUGMENTS)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model for parameters; buffers are copied."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def ema_decay(step: int, decay: float) -> float:
    """Ramp the decay up from 0 so early EMA samples are not stuck at the initialisation."""
    return min(decay, (1.0 + step) / (10.0 + step))


# ---------------------------------------------------------------------------------------------
# The objective: the terms above, weighted and summed as one ModelConfig asks.


class Objective:
    """D's loss and G's loss on one batch, each the weighted sum of its terms (as stylegan2-ada's loss).

    D: the adversarial loss on (real image, caption) vs (other image, caption) and (G's image,
    caption), plus the contrastive term, the class head's cross-entropy and MA-GP when they are on.
    G: the adversarial loss on its images, plus the contrastive term, the class head, the KL term of
    conditioning augmentation, GAN-INT and mode seeking when they are on.

    Every random draw comes from the step's generator `g`, always in the same order, so a step
    repeats exactly. Each method returns (loss, diagnostics): the detached values the training log
    records besides the two losses.
    """

    def __init__(self, cfg, one_d_forward: bool = True):
        self.cfg = cfg  # a ModelConfig
        # One D forward over [real; mismatched; fake] instead of three: the same numbers when D has
        # no BatchNorm (which would mix the statistics of the three parts), and faster.
        self.one_d_forward = one_d_forward

    def d_loss(self, D, b, fake: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """D's loss on batch `b` (a traindata.Batch) and G's images `fake` of its captions."""
        m, x, text, labels = self.cfg, b.x, b.text, b.labels
        real_in = diff_augment(x, m.diffaug, g)
        wrong_in = diff_augment(x[b.wrong], m.diffaug, g)
        fake_in = diff_augment(fake.detach(), m.diffaug, g)  # D's step does not reach G
        if m.ma_gp:  # the penalty is D's gradient with respect to these inputs
            real_in = real_in.detach().requires_grad_(True)
            text_d = text.detach().requires_grad_(True)
        else:
            text_d = text
        ctr = bool(m.contrastive)
        outs, classes, emb_real = self._d_three(D, real_in, wrong_in, fake_in, text_d, text, labels, ctr)
        out_real, out_wrong, out_fake = outs
        cls_real, cls_wrong, cls_fake = classes
        loss = d_adversarial(out_real.float(), out_wrong.float(), out_fake.float(), m.loss, b.wrong_mask)
        stats = {}
        if ctr:
            # Real images only: D learns which caption goes with which image, G is then held to it.
            img_vec, txt_vec = emb_real
            c = contrastive(img_vec, txt_vec, labels)
            stats["contrastive_d"] = c.detach()
            loss = loss + m.contrastive * c
        if cls_real is not None:
            # A head that only ever learns the real images, or one that G satisfies long before its
            # images look real, is how the aux head collapses: both accuracies are logged.
            stats["cls_acc_real"] = (cls_real.detach().argmax(1) == labels).float().mean()
            stats["cls_acc_fake"] = (cls_fake.detach().argmax(1) == labels).float().mean()
            # Every image D sees is of a known class: its own, or the caption's for G's.
            loss = loss + m.aux_weight * (
                F.cross_entropy(cls_real.float(), labels)
                + 0.5 * F.cross_entropy(cls_wrong.float(), labels[b.wrong])
                + 0.5 * F.cross_entropy(cls_fake.float(), labels))
        if m.ma_gp:
            loss = loss + m.ma_gp * matching_aware_gp(out_real.float(), real_in, text_d)
        return loss, stats

    def _d_three(self, D, real_in, wrong_in, fake_in, text_d, text, labels, ctr: bool):
        """D's (logits, class logits, real images' contrastive vectors) for the real, mismatched and fake parts."""
        if self.one_d_forward:
            out, cls, *emb = D(torch.cat([real_in, wrong_in, fake_in]), torch.cat([text_d, text, text]),
                               labels.repeat(3), embed=ctr, parts=3)
            classes = cls.float().chunk(3) if cls is not None else (None, None, None)
            return out.float().chunk(3), classes, tuple(e[:len(real_in)] for e in emb[0]) if ctr else None
        # One spectral-norm weight (one power iteration) for the three calls, as in one forward.
        with torch.nn.utils.parametrize.cached():
            out_real, cls_real, *emb = D(real_in, text_d, labels, embed=ctr)
            (out_wrong, cls_wrong), (out_fake, cls_fake) = D(wrong_in, text, labels), D(fake_in, text, labels)
        return (out_real, out_wrong, out_fake), (cls_real, cls_wrong, cls_fake), emb[0] if ctr else None

    def g_loss(self, G, D, b, fake: torch.Tensor, mu: torch.Tensor | None, logvar: torch.Tensor | None,
               g: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """G's loss: D must call its images `fake` real (and of the caption's class). `mu`, `logvar`:
        the condition distribution G's forward returned (None without conditioning augmentation)."""
        m, text, labels = self.cfg, b.text, b.labels
        ctr = bool(m.contrastive)
        out_fake, cls_fake, *emb = D(diff_augment(fake, m.diffaug, g), text, labels, embed=ctr)
        loss = g_adversarial(out_fake.float(), m.loss)
        stats = {}
        if ctr:
            img_vec, txt_vec = emb[0]
            c = contrastive(img_vec, txt_vec, labels)
            stats["contrastive_g"] = c.detach()
            loss = loss + m.contrastive * c
        if cls_fake is not None:
            loss = loss + m.aux_weight * F.cross_entropy(cls_fake.float(), labels)
        if mu is not None and logvar is not None:  # both or neither: conditioning augmentation
            loss = loss + m.kl_weight * kl_divergence(mu.float(), logvar.float())
        if m.gan_int:
            loss = loss + m.gan_int * self._gan_int(G, D, b, g)
        if m.mode_seek:
            ms = self._mode_seek(G, b, fake, g)
            stats["mode_seek"] = ms.detach()
            loss = loss + m.mode_seek * ms
        return loss, stats

    def _gan_int(self, G, D, b, g: torch.Generator) -> torch.Tensor:
        """GAN-INT: captions halfway between two others must still give real-looking images."""
        text_int = 0.5 * (b.text + b.text.roll(1, 0))
        z2 = torch.randn(b.z.shape, generator=g, device=g.device).to(b.z.device)
        eps2 = torch.randn(b.eps.shape, generator=g, device=g.device).to(b.eps.device) if b.eps is not None else None
        fake_int = G(z2, text_int, eps2)[0]
        out_int = D(diff_augment(fake_int, self.cfg.diffaug, g), text_int)[0]
        return g_adversarial(out_int.float(), self.cfg.loss)

    def _mode_seek(self, G, b, fake: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The mode-seeking term on pairs of images of one caption that differ by G's noise alone."""
        pairs = self.cfg.mode_seek_pairs
        if pairs:
            # The first `pairs` captions, each with two fresh noise vectors (same condition noise),
            # in one G forward: both images of a pair share its BatchNorm statistics, so they
            # differ by the noise alone, at 2 x pairs images of G forward per step.
            p = min(pairs, len(b.z))
            zp = torch.randn((2 * p, b.z.shape[1]), generator=g, device=g.device).to(b.z.device)
            eps_p = b.eps[:p].repeat(2, 1) if b.eps is not None else None
            fake_p = G(zp, b.text[:p].repeat(2, 1), eps_p)[0].float()
            return mode_seeking(fake_p[:p], fake_p[p:], zp[:p], zp[p:])
        # Half the batch again with new noise (same captions, same condition noise): half a G
        # forward more per step instead of a whole one.
        h = max(1, len(b.z) // 2)
        z2 = torch.randn((h, b.z.shape[1]), generator=g, device=g.device).to(b.z.device)
        fake2 = G(z2, b.text[:h], b.eps[:h] if b.eps is not None else None)[0]
        return mode_seeking(fake[:h].float(), fake2.float(), b.z[:h], z2)
