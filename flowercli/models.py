"""Generator and discriminator. Networks only: no I/O, no training logic.

Both follow DCGAN at 64x64 (a 4x4 seed doubled by stride-2 (transposed) convolutions), with the
text joined the way the reference design does it: a learned projection of the sentence vector,
concatenated to the noise in G and replicated over D's 4x4 feature map. Two options carry the
caption further (`cond_bn`: into every BatchNorm of G; `text_proj`: a caption projection term in
D's logit); the `modern` recipe uses both. Off by default, `noise_layers` carries the noise to every
conditional BatchNorm too and `mbstd_group` shows D the spread of a batch, against near-identical images.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from flowercli.config import NOISE_LAYERS, ModelConfig


def _n_doublings(image_size: int) -> int:
    n = int(math.log2(image_size)) - 2
    if image_size < 16 or 4 * 2**n != image_size:
        raise ValueError(f"image size must be a power of two >= 16, got {image_size}")
    return n


class TextProjection(nn.Module):
    """Sentence vector -> cond_dim, LeakyReLU. `eps` is ignored; the same call shape as CondAugment."""

    def __init__(self, text_dim: int, cond_dim: int):
        super().__init__()
        self.fc = nn.Linear(text_dim, cond_dim)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, text: torch.Tensor, eps: torch.Tensor | None = None):
        return self.act(self.fc(text)), None, None


class CondAugment(nn.Module):
    """Conditioning augmentation (StackGAN): condition ~ N(mu(t), sigma(t)^2).

    Sampling smooths the sparse caption manifold; the KL term keeps it near N(0, I). The noise
    `eps` comes from the caller so the module stays deterministic; without it, the mean is used.
    """

    def __init__(self, text_dim: int, cond_dim: int):
        super().__init__()
        self.fc = nn.Linear(text_dim, cond_dim * 2)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, text: torch.Tensor, eps: torch.Tensor | None = None):
        mu, logvar = self.act(self.fc(text)).chunk(2, dim=1)
        cond = mu if eps is None else mu + eps * torch.exp(0.5 * logvar)
        return cond, mu, logvar


def noise_chunks(cfg: ModelConfig) -> list[int]:
    """How z is split with `noise_layers="chunks"`: one chunk for the first layer and one per G block.

    As even as possible (the first chunks one wider), so any noise_dim >= the number of chunks works.
    """
    k = _n_doublings(cfg.image_size)  # the first layer + the (n_doublings - 1) blocks with a BatchNorm
    if cfg.noise_dim < k:
        raise ValueError(f"noise_layers=chunks splits the noise into {k} chunks at {cfg.image_size}x{cfg.image_size}; "
                         f"noise_dim must be at least {k}, got {cfg.noise_dim}")
    return [cfg.noise_dim // k + (i < cfg.noise_dim % k) for i in range(k)]


class CondBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose scale and shift come from the condition: x_hat * (1 + gamma(c)) + beta(c).

    The linear map starts at zero, so at initialisation it is plain BatchNorm.
    """

    def __init__(self, channels: int, cond_dim: int):
        super().__init__(channels, affine=False)
        self.to_affine = nn.Linear(cond_dim, channels * 2)
        nn.init.zeros_(self.to_affine.weight)
        nn.init.zeros_(self.to_affine.bias)

    # The condition is the point of this BatchNorm: its forward takes one more argument than
    # BatchNorm2d's, so it does not stand in for one (nothing calls it as a plain BatchNorm).
    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = super().forward(x)
        gamma, beta = self.to_affine(cond)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + gamma) + beta


class Generator(nn.Module):
    """[projected text || noise] -> 4x4 tensor -> transposed convolutions -> image in [-1, 1]."""

    # Buffers, registered in __init__ (nn.Module's attribute lookup is typed as Tensor | Module).
    text_mean: torch.Tensor
    text_std: torch.Tensor

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # Per-dimension standardisation of the raw encoder vectors (set from the training set).
        # Unit-norm sentence vectors vary ~0.04 per dimension: next to N(0, 1) noise G ignores them.
        self.register_buffer("text_mean", torch.zeros(cfg.text_dim))
        self.register_buffer("text_std", torch.ones(cfg.text_dim))
        self.cond = (CondAugment if cfg.cond_aug else TextProjection)(cfg.text_dim, cfg.cond_dim)
        n = _n_doublings(cfg.image_size)
        ch = cfg.g_channels * 2 ** (n - 1)
        self.seed_channels = ch
        if cfg.noise_layers not in NOISE_LAYERS:
            raise ValueError(f"unknown noise_layers {cfg.noise_layers!r}; use {', '.join(NOISE_LAYERS)}")
        if cfg.noise_layers != "none" and not cfg.cond_bn:
            raise ValueError(f"noise_layers={cfg.noise_layers} needs cond_bn (the noise joins the condition there)")
        # Width of the noise each layer sees: the first layer, then each conditional BatchNorm.
        self.n_bn = n_bn = n - 1
        if cfg.noise_layers == "chunks":
            self.chunks: list[int] | None = noise_chunks(cfg)
            z_first, z_bn = self.chunks[0], self.chunks[1:]
        else:
            self.chunks = None
            z_first, z_bn = cfg.noise_dim, [cfg.noise_dim if cfg.noise_layers == "concat" else 0] * n_bn
        self.fc = nn.Linear(z_first + cfg.cond_dim, ch * 16, bias=False)
        self.fc_norm = nn.BatchNorm2d(ch)
        blocks: list[nn.Module] = []
        for i in range(n_bn):
            blocks += [
                nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False),
                CondBatchNorm(ch // 2, cfg.cond_dim + z_bn[i]) if cfg.cond_bn else nn.BatchNorm2d(ch // 2),
                nn.LeakyReLU(0.2),
            ]
            ch //= 2
        blocks += [nn.ConvTranspose2d(ch, 3, 4, 2, 1), nn.Tanh()]
        self.blocks = nn.Sequential(*blocks)
        self.act = nn.LeakyReLU(0.2)

    def normalise_text(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.text_mean) / self.text_std

    def forward(self, z: torch.Tensor, text: torch.Tensor, eps: torch.Tensor | None = None):
        """`text` is already standardised. Returns (images, mu, logvar); mu/logvar are None without CA."""
        cond, mu, logvar = self.cond(text, eps)
        # What each conditional BatchNorm reads: the condition, and with noise_layers the noise too.
        if self.chunks is not None:
            z, *z_bn = torch.split(z, self.chunks, dim=1)  # z is now the first layer's chunk
            bn_inputs = [torch.cat([cond, zi], dim=1) for zi in z_bn]
        else:
            bn_inputs = [torch.cat([cond, z], dim=1) if self.cfg.noise_layers == "concat" else cond] * self.n_bn
        h = self.fc(torch.cat([cond, z], dim=1)).view(-1, self.seed_channels, 4, 4)
        h = self.act(self.fc_norm(h))
        i = 0
        for block in self.blocks:
            if isinstance(block, CondBatchNorm):
                h, i = block(h, bn_inputs[i]), i + 1
            else:
                h = block(h)
        return h, mu, logvar


class Discriminator(nn.Module):
    """Image -> strided convolutions -> 4x4 features joined with the projected text -> heads.

    Heads: a real/fake logit for the (image, text) pair, and for `d_head="aux"` class logits from
    the image features alone (so it cannot read the class off the caption); `d_head="projection"`
    instead adds <embed(class), pooled image features> to the logit (Miyato & Koyama 2018);
    `d_head="both"` has the two (the head's cross-entropy, weighted by `aux_weight`, pushes G's images
    to be recognisable as the class on top of the projection's real/fake pressure).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        sn = spectral_norm if cfg.spectral_norm else (lambda m: m)
        n = _n_doublings(cfg.image_size)
        ch = cfg.d_channels
        layers: list[nn.Module] = [sn(nn.Conv2d(3, ch, 4, 2, 1)), nn.LeakyReLU(0.2)]
        for _ in range(n - 1):
            layers.append(sn(nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=cfg.spectral_norm)))
            if not cfg.spectral_norm:
                layers.append(nn.BatchNorm2d(ch * 2))
            layers.append(nn.LeakyReLU(0.2))
            ch *= 2
        self.features = nn.Sequential(*layers)
        self.text = nn.Sequential(sn(nn.Linear(cfg.text_dim, cfg.cond_dim)), nn.LeakyReLU(0.2))
        # With mbstd_group the joint layer also reads the minibatch-std feature map (one channel).
        n_std = 1 if cfg.mbstd_group else 0
        self.joint = nn.Sequential(sn(nn.Conv2d(ch + n_std + cfg.cond_dim, ch, 1)), nn.LeakyReLU(0.2))
        self.adv = sn(nn.Conv2d(ch, 1, 4))
        self.aux = sn(nn.Linear(ch * 16, cfg.n_classes)) if cfg.d_head in ("aux", "both") else None
        self.embed = sn(nn.Embedding(cfg.n_classes, ch)) if cfg.d_head in ("projection", "both") else None
        self.text_embed = sn(nn.Linear(cfg.cond_dim, ch)) if cfg.text_proj else None
        # Heads into the shared space of the contrastive term; plain linear layers, since the
        # term compares directions only.
        if cfg.contrastive:
            self.ctr_image: nn.Linear | None = nn.Linear(ch, ch)
            self.ctr_text: nn.Linear | None = nn.Linear(cfg.cond_dim, ch)
        else:
            self.ctr_image = self.ctr_text = None

    def forward(self, images: torch.Tensor, text: torch.Tensor, labels: torch.Tensor | None = None,
                embed: bool = False, parts: int = 1):
        """Returns (logit (N,), class_logits (N, C) or None). `labels` (0-based) feed the projection.

        With `embed` (needs `contrastive`) a third item: (image, caption) vectors for the contrastive term.
        `parts`: the batch is this many equal batches concatenated (real; mismatched; fake), whose
        minibatch-std groups must not mix (the same result as one call per part).
        """
        h = self.features(images)
        t_vec = self.text(text)
        t = t_vec[:, :, None, None].expand(-1, -1, h.shape[2], h.shape[3])
        if self.cfg.mbstd_group:
            j = self.joint(torch.cat([h, minibatch_std(h, self.cfg.mbstd_group, parts), t], dim=1))
        else:
            j = self.joint(torch.cat([h, t], dim=1))
        logit = self.adv(j).flatten()
        class_logits = None
        if self.aux is not None:
            class_logits = self.aux(h.flatten(1))
        pooled = h.sum(dim=(2, 3))
        if self.embed is not None and labels is not None:
            logit = logit + (self.embed(labels) * pooled).sum(dim=1)
        if self.text_embed is not None:
            logit = logit + (self.text_embed(t_vec) * pooled).sum(dim=1)
        if embed:
            if self.ctr_image is None or self.ctr_text is None:
                raise ValueError("embed=True needs a discriminator built with contrastive")
            return logit, class_logits, (self.ctr_image(pooled), self.ctr_text(t_vec))
        return logit, class_logits


def minibatch_std(h: torch.Tensor, group: int, parts: int = 1) -> torch.Tensor:
    """ProGAN/StyleGAN's minibatch standard deviation: (N, C, H, W) -> (N, 1, H, W).

    Image i of each part shares a group with images i + m, i + 2m, ... (m = part size / group, as
    StyleGAN reshapes); the feature is the group's standard deviation per feature and position,
    averaged to one number. Groups cross captions: the batch's images each have their own caption,
    and a group of one caption's images would reward making them alike. The group shrinks to the
    largest divisor of the part size (StyleGAN2), so any batch works; at size 1 the feature is constant.
    """
    n, c, hh, ww = h.shape
    if n % parts:
        raise ValueError(f"a batch of {n} does not split into {parts} equal parts")
    size = n // parts
    g = next(d for d in range(max(1, min(group, size)), 0, -1) if size % d == 0)
    m = size // g
    y = h.float().reshape(parts, g, m, c, hh, ww)
    std = (y.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=(2, 3, 4))  # (parts, m)
    out = std[:, None, :].expand(parts, g, m).reshape(n, 1, 1, 1).expand(n, 1, hh, ww)
    return out.to(h.dtype)


@torch.no_grad()
def recalibrate_batchnorm(G: Generator, batches) -> None:
    """Recompute G's BatchNorm running statistics for its current weights.

    EMA weights with running statistics copied from the live generator give visibly worse images
    (FID 261 vs 225 in the calibration run); a cumulative average over a few batches fixes it.
    `batches` yields (z, text) pairs.
    """
    bns = [m for m in G.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches seen
        m.train()
    for z, text in batches:
        G(z, text)
    for m, (momentum, training) in zip(bns, saved):
        m.momentum = momentum
        m.train(training)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
