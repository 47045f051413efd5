"""What training reads: the training side of the split in memory, and each step's batch drawn from it.

The images (uint8) and the standardised caption vectors are loaded once; a batch is indexed out of
them with the step's own generators (flowercli.rng), so the same step always draws the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowercli.config import DataLayout, ModelConfig, TrainConfig
from flowercli.device import StepOptions
from flowercli.distributed import barrier, world_and_rank
from flowercli.errors import DataError
from flowercli.losses import mismatch
from flowercli.report import Reporter
from flowercli.rng import derived_seed

SAMPLE_PROMPTS = 8  # rows of the sample grid


@dataclass
class TrainData:
    images: torch.Tensor  # uint8 (N, 3, S, S)
    vectors: torch.Tensor  # float32 (N, 10, D), standardised
    n_captions: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,) 0-based index into `classes`
    classes: list[int]  # dataset class numbers (1..102) known to the model
    text_mean: torch.Tensor
    text_std: torch.Tensor
    sample_vectors: torch.Tensor  # (SAMPLE_PROMPTS, D) standardised, fixed prompts for the grids
    sample_captions: list[str]
    encoder: dict[str, Any]
    split: str
    # Species-name captions (`name_mix` > 0 only): (n classes, templates, D) standardised like
    # `vectors`, row k for class `classes[k]`; `name_mix` of the captions are drawn from them.
    name_vectors: torch.Tensor | None = None
    name_mix: float = 0.0


def find_embeddings(layout: DataLayout) -> Path:
    """The newest embeddings file under the data folder."""
    folder = layout.embeddings_dir
    files = sorted(folder.glob("*.h5"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not files:
        raise DataError(f"no embeddings under {folder}; run `flowercli embed --data-dir {layout.root}` first")
    return files[-1]


def load_train_data(cfg: TrainConfig, emb_path: Path, report: Reporter = Reporter()) -> TrainData:
    from flowercli.embeddings import open_embeddings, select_split
    from flowercli.images import load_images

    layout = DataLayout(cfg.data_dir)
    emb = open_embeddings(emb_path)
    if cfg.name_mix > 0:
        emb = _with_name_vectors(emb, emb_path, layout, cfg.device, report)
    split, train, held = select_split(emb, cfg.split)
    classes = sorted(set(int(c) for c in emb.labels[train]))
    index = {c: i for i, c in enumerate(classes)}
    ids = emb.image_ids[train]
    vectors = torch.from_numpy(np.asarray(emb.vectors[train], dtype=np.float32))
    n_captions = torch.from_numpy(np.asarray(emb.n_captions[train], dtype=np.int64))
    # Standardise each dimension with statistics of the real training captions only.
    valid = torch.arange(vectors.shape[1])[None, :] < n_captions[:, None]
    flat = vectors[valid]
    mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
    # Fixed prompts for the sample grids: half from training classes, half held out when there are any.
    rng = np.random.default_rng(0)
    pool_train, pool_held = np.flatnonzero(train), np.flatnonzero(held)
    n_held = min(len(pool_held), SAMPLE_PROMPTS // 2)
    picks = list(rng.choice(pool_train, SAMPLE_PROMPTS - n_held, replace=len(pool_train) < SAMPLE_PROMPTS - n_held))
    picks += list(rng.choice(pool_held, n_held, replace=False)) if n_held else []
    sample_raw = torch.from_numpy(np.asarray(np.stack([emb.vectors[i, 0] for i in picks]), dtype=np.float32))
    names = None
    if cfg.name_mix > 0:
        assert emb.name_vectors is not None  # _with_name_vectors found or embedded them, or raised
        names = torch.from_numpy(np.asarray(emb.name_vectors[np.array(classes) - 1], dtype=np.float32))
        names = (names - mean) / std
    return TrainData(
        images=torch.from_numpy(load_images(layout.jpg, ids, cfg.model.image_size)),
        vectors=(vectors - mean) / std,
        n_captions=n_captions,
        labels=torch.tensor([index[int(c)] for c in emb.labels[train]], dtype=torch.int64),
        classes=classes,
        text_mean=mean,
        text_std=std,
        sample_vectors=(sample_raw - mean) / std,
        sample_captions=[emb.captions[i][0] for i in picks],
        encoder={**{k: v for k, v in emb.attrs.items() if isinstance(v, (str, int, float, bool))},
                 "path": str(emb_path)},
        split=split,
        name_vectors=names,
        name_mix=cfg.name_mix,
    )


def _with_name_vectors(emb, emb_path: Path, layout: DataLayout, device: str, report: Reporter):
    """`emb` with the species-name vectors of classnames.txt: embedded into its file first when it
    predates them (or holds those of other names or templates), so it need not be embedded again."""
    from flowercli.data import name_captions, read_class_names
    from flowercli.embed import add_name_vectors
    from flowercli.embeddings import open_embeddings

    names = read_class_names(layout)
    if names is None and emb.name_vectors is not None:
        return emb  # made from the class names of the dataset it was embedded from
    if names is None:
        raise DataError(f"name_mix needs the species names and {layout.dataset / 'classnames.txt'} is missing: "
                        "download captions that include classnames.txt, or train with name_mix 0")
    if emb.name_vectors is not None and emb.name_captions == name_captions(names):
        return emb
    world, rank = world_and_rank()
    if rank == 0:
        add_name_vectors(emb_path, names, device=device, report=report)
    if world > 1:  # the other ranks read the file once rank 0 has rewritten it
        barrier()
    return open_embeddings(emb_path)


# ---------------------------------------------------------------------------------------------
# Batches


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order of the training images in one epoch (the same on every rank)."""
    g = torch.Generator().manual_seed(derived_seed(seed, 2, epoch))
    return torch.randperm(n, generator=g)


def batch_images(images_u8: torch.Tensor, g: torch.Generator, device: torch.device,
                 channels_last: bool) -> torch.Tensor:
    """uint8 -> [-1, 1] float on `device`, each image flipped left-right with probability 1/2."""
    x = images_u8.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    flip = torch.rand(x.shape[0], generator=g, device=g.device).to(device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass
class Batch:
    x: torch.Tensor  # real images in [-1, 1]
    text: torch.Tensor  # one standardised caption vector per image
    labels: torch.Tensor
    wrong: torch.Tensor  # index of the mismatched image for each caption
    wrong_mask: torch.Tensor  # mismatched pairs of another class (the others are not counted)
    z: torch.Tensor
    eps: torch.Tensor | None  # conditioning-augmentation noise


def make_batch(data: TrainData, idx: torch.Tensor, g: torch.Generator, gc: torch.Generator,
               mcfg: ModelConfig, opts: StepOptions) -> Batch:
    """One batch: images (flipped at random), one of each image's captions, classes, noise.

    `g` (on the device) and `gc` (on the CPU) are the step's generators; `g` goes on to the step.
    """
    device = opts.device
    x = batch_images(data.images[idx], g, device, opts.channels_last)
    cap = (torch.rand(len(idx), generator=gc) * data.n_captions[idx]).long()
    text = data.vectors[idx, cap]
    if data.name_mix > 0:
        # After the caption draw and from `gc` only: name_mix 0 draws nothing, so runs without it
        # are unchanged. The mismatch term pairs this (name) caption with an image of another class.
        assert data.name_vectors is not None  # load_train_data sets them whenever name_mix > 0
        named = torch.rand(len(idx), generator=gc) < data.name_mix
        template = torch.randint(data.name_vectors.shape[1], (len(idx),), generator=gc)
        text = torch.where(named[:, None], data.name_vectors[data.labels[idx], template], text)
    text = text.to(device)
    labels = data.labels[idx].to(device)
    wrong, wrong_mask = mismatch(labels, g)
    z = torch.randn(len(idx), mcfg.noise_dim, generator=g, device=device)
    eps = torch.randn(len(idx), mcfg.cond_dim, generator=g, device=device) if mcfg.cond_aug else None
    return Batch(x, text, labels, wrong, wrong_mask, z, eps)


def calibration_batches(data: TrainData, cfg: TrainConfig, device: torch.device, n_batches: int = 8):
    """Fixed (noise, text) batches from the training captions for recalibrating G_ema's BatchNorm."""
    g = torch.Generator().manual_seed(4321)
    for _ in range(n_batches):
        idx = torch.randint(len(data.labels), (cfg.batch_size,), generator=g)
        cap = (torch.rand(len(idx), generator=g) * data.n_captions[idx]).long()
        z = torch.randn(len(idx), cfg.model.noise_dim, generator=g)
        yield z.to(device), data.vectors[idx, cap].to(device)
