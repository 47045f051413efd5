"""Training: the whole loop, top to bottom, in `train()`.

Randomness is derived from (seed, step, rank) at every step rather than carried in one stream, so
a run resumed from any checkpoint continues exactly as if it had never stopped (on CPU, bit for bit).
Data parallel runs start under torchrun: every rank computes gradients on its own slice of the
batch and the gradients are averaged across ranks before each optimiser step. That is what
DistributedDataParallel does; it is done by hand because DDP's reducer does not support the double
backward of the matching-aware gradient penalty.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flowercli import __version__
from flowercli.checkpoint import list_checkpoints, load_latest, save_checkpoint
from flowercli.config import NOISE_LAYERS, RECIPES, DataLayout, ModelConfig, TrainConfig
from flowercli.errors import CheckpointError, DataError, FlowerError, InputError, Interrupted
from flowercli.fsutil import atomic_write, nearest_existing
from flowercli.losses import (
    DIFFAUG_NAMES,
    contrastive,
    d_adversarial,
    diff_augment,
    ema_decay,
    ema_update,
    g_adversarial,
    kl_divergence,
    masked_mean,
    matching_aware_gp,
    mismatch,
    mode_seeking,
)
from flowercli.models import Discriminator, Generator, count_parameters, noise_chunks, recalibrate_batchnorm
from flowercli.report import Reporter

# Settings that must not change when a run is resumed: they define the model or the data order.
FROZEN_FIELDS = ("recipe", "model", "split", "batch_size", "seed", "lr_g", "lr_d", "beta1", "beta2", "ema", "embeddings")
SAMPLE_PROMPTS = 8  # rows of the sample grid
SAMPLE_NOISE = 8  # columns


# ---------------------------------------------------------------------------------------------
# Configuration


def make_config(recipe: str = "modern", **overrides: Any) -> TrainConfig:
    """A TrainConfig from a named recipe; `overrides` (TrainConfig or ModelConfig field names) win."""
    if recipe not in RECIPES:
        raise InputError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model_kw = {**RECIPES[recipe]["model"], **{k: v for k, v in overrides.items() if k in model_fields}}
    train_kw = {**RECIPES[recipe]["train"], **{k: v for k, v in overrides.items() if k not in model_fields}}
    return TrainConfig(recipe=recipe, model=ModelConfig(**model_kw), **train_kw)


def config_differences(saved: TrainConfig, cfg: TrainConfig) -> list[str]:
    """Frozen settings that differ, as "name differs: a vs b" (text_dim/n_classes come from the data)."""
    out = []
    for name in FROZEN_FIELDS:
        a, b = getattr(saved, name), getattr(cfg, name)
        if name == "model":
            for f in dataclasses.fields(ModelConfig):
                if f.name not in ("text_dim", "n_classes") and getattr(a, f.name) != getattr(b, f.name):
                    out.append(f"model.{f.name} differs: {getattr(a, f.name)} vs {getattr(b, f.name)}")
        elif str(a) != str(b):
            out.append(f"{name} differs: {a} vs {b}")
    return out


# How the caption vectors were made, besides the caption set: another value gives other vectors for
# the same captions. The file's path, dtype and creation time can change without that.
ENCODER_IDENTITY = ("encoder", "model_type", "dim", "pooling", "max_length", "normalised")


def data_differences(started: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """How the embeddings a run resumes on differ from those it started on (both: embeddings attrs).

    Each entry names both sides, "what a vs b". A fact one side lacks (a file written before it was
    recorded; HDF5 stores a missing value as "") is not compared.
    """
    def known(v: Any) -> bool:
        return v is not None and v != ""

    out = []
    sha_a, sha_b = started.get("captions_sha256"), now.get("captions_sha256")
    if known(sha_a) and known(sha_b) and sha_a != sha_b:
        out.append(f"captions {started.get('captions_archive') or '?'} (sha256 {str(sha_a)[:12]}) vs "
                   f"{now.get('captions_archive') or '?'} (sha256 {str(sha_b)[:12]})")
    for key in ENCODER_IDENTITY:
        a, b = started.get(key), now.get(key)
        if known(a) and known(b) and str(a) != str(b):
            out.append(f"{key} {a} vs {b}")
    return out


def _check_fresh_start(cfg: TrainConfig, run_dir: Path) -> None:
    """--resume on a run with no checkpoint: the config.json of an earlier start must agree with `cfg`."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    try:
        saved = config_from_dict(json.loads(path.read_text())["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}); delete it to start the run afresh, "
                              "or pick another --run") from None
    diffs = config_differences(saved, cfg)
    if diffs:
        raise CheckpointError(f"--resume: {'; '.join(diffs)} (run's vs now); start the run with the settings in "
                              f"{path} or pick another --run")


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(cfg), default=str))


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    d = dict(d)
    model = ModelConfig(**d.pop("model"))
    for key in ("data_dir", "runs_dir", "embeddings"):
        if d.get(key) is not None:
            d[key] = Path(d[key])
    return TrainConfig(model=model, **d)


# ---------------------------------------------------------------------------------------------
# Data


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
    files = sorted(layout.embeddings_dir.glob("*.h5"), key=lambda p: p.stat().st_mtime) if layout.embeddings_dir.is_dir() else []
    if not files:
        raise DataError(f"no embeddings under {layout.embeddings_dir}; run `flowercli embed --data-dir {layout.root}` first")
    return files[-1]


def load_train_data(cfg: TrainConfig, emb_path: Path, report: Reporter = Reporter()) -> TrainData:
    from flowercli.data import open_embeddings, select_split
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
        encoder={**{k: v for k, v in emb.attrs.items() if isinstance(v, (str, int, float, bool))}, "path": str(emb_path)},
        split=split,
        name_vectors=names,
        name_mix=cfg.name_mix,
    )


def _with_name_vectors(emb, emb_path: Path, layout: DataLayout, device: str, report: Reporter):
    """`emb` with the species-name vectors of classnames.txt: embedded into its file first when it
    predates them (or holds those of other names or templates), so it need not be embedded again."""
    from flowercli.data import name_captions, open_embeddings, read_class_names
    from flowercli.embed import add_name_vectors

    names = read_class_names(layout)
    if names is None and emb.name_vectors is not None:
        return emb  # made from the class names of the dataset it was embedded from
    if names is None:
        raise DataError(f"name_mix needs the species names and {layout.dataset / 'classnames.txt'} is missing: "
                        "download captions that include classnames.txt, or train with name_mix 0")
    if emb.name_vectors is not None and emb.name_captions == name_captions(names):
        return emb
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if rank == 0:
        add_name_vectors(emb_path, names, device=device, report=report)
    if world > 1:  # the other ranks read the file once rank 0 has rewritten it
        import torch.distributed as dist

        dist.barrier()
    return open_embeddings(emb_path)


# ---------------------------------------------------------------------------------------------
# Small helpers the loop uses


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise InputError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. `auto`: bf16 on CUDA and on CPUs with native bf16."""
    if name == "fp32":
        return None
    if name == "bf16":
        return torch.bfloat16
    if name != "auto":
        raise InputError(f"unknown precision {name!r}; choose auto, fp32 or bf16")
    if device.type == "cuda":
        return torch.bfloat16
    cap = torch.backends.cpu.get_cpu_capability()
    return torch.bfloat16 if "AVX512" in cap and _cpu_has("avx512_bf16") else None


def resolve_adam(name: str, device: torch.device) -> str:
    """The Adam implementation; `auto`: fused (one kernel per parameter, on CPU and CUDA alike).

    On the 2-core AVX2 CPU, both optimisers' steps took 8 ms fused vs 16 ms for-loop or foreach
    (2 threads, quiet machine), 16 vs 73 ms at 1 thread (bench/train_speed.py "parts").
    """
    if name == "auto":
        return "fused"
    adam_flags(name)  # validates
    return name


def resolve_threads(n: int) -> int:
    """torch intra-op threads for the run; 0 keeps torch's default (one per physical core).

    Not chosen from the machine's load: the thread count changes float rounding (CPU results are
    bit-exact only for the same count), and a seed must repeat a run. On a machine whose cores are
    busy with other work, fewer threads than cores is faster (bench/train_speed.py measures it).
    """
    if n < 0:
        raise InputError(f"--threads must be 0 (torch's default) or more, got {n}")
    return n or torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to `n` for the block, and restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)


def _cpu_has(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def derived_seed(*key: int) -> int:
    """A well-mixed 63-bit seed from integers (Python's hash() of strings varies between processes)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derived_seed(seed, 1, step, rank))
    return g


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(derived_seed(seed, 2, epoch))
    return torch.randperm(n, generator=g)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def batch_images(images_u8: torch.Tensor, g: torch.Generator, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 -> [-1, 1] float on `device`, each image flipped left-right with probability 1/2."""
    x = images_u8.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    flip = torch.rand(x.shape[0], generator=g, device=g.device).to(device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def all_reduce_grads(module: torch.nn.Module, world: int) -> None:
    """Average gradients over ranks (one flattened all-reduce per model)."""
    if world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def rng_states() -> dict[str, Any]:
    # The loop itself draws from per-step generators; the global states are saved so that any
    # code outside it that uses them (and a resumed run) sees the same numbers.
    return {"torch": torch.get_rng_state(), "numpy": _np_state(), "python": list(_py_state())}


def _np_state():
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss, "name": name}


def _py_state():
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def set_rng_states(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, state, gauss = s["python"]
    random.setstate((version, tuple(state), gauss))


class RunLock:
    """An exclusive lock on a run folder; the OS drops it if the process dies, even by SIGKILL."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self.fd: int | None = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise FlowerError(f"run {self.path.parent} is in use by another flowercli process; wait for it or pick another --run") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits."""

    def __init__(self):
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:  # a second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def write_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


@torch.no_grad()
def sample_grid(G_ema: Generator, data: TrainData, cfg: TrainConfig, device: torch.device) -> np.ndarray:
    """Fixed prompts (rows) x fixed noise (columns) from the EMA generator, as one uint8 image."""
    from flowercli.images import make_grid, to_uint8

    g = torch.Generator().manual_seed(1234)
    z = torch.randn(SAMPLE_NOISE, cfg.model.noise_dim, generator=g)
    text = data.sample_vectors.repeat_interleave(SAMPLE_NOISE, dim=0)
    G_ema.eval()
    imgs = G_ema(z.repeat(SAMPLE_PROMPTS, 1).to(device), text.to(device))[0]
    return make_grid(to_uint8(imgs), ncol=SAMPLE_NOISE)


def calibration_batches(data: TrainData, cfg: TrainConfig, device: torch.device, n_batches: int = 8):
    """Fixed (noise, text) batches from the training captions for recalibrating G_ema's BatchNorm."""
    g = torch.Generator().manual_seed(4321)
    for _ in range(n_batches):
        idx = torch.randint(len(data.labels), (cfg.batch_size,), generator=g)
        cap = (torch.rand(len(idx), generator=g) * data.n_captions[idx]).long()
        z = torch.randn(len(idx), cfg.model.noise_dim, generator=g)
        yield z.to(device), data.vectors[idx, cap].to(device)


# ---------------------------------------------------------------------------------------------
# One training step: the loop below and bench/train_speed.py both run exactly this code.


@dataclass
class Nets:
    """What a step updates."""

    G: Generator
    D: Discriminator
    G_ema: Generator
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer


@dataclass(frozen=True)
class StepOptions:
    """How a step is executed. None of these change what it computes beyond float rounding."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    # One D forward over [real; mismatched; fake] instead of three. Only valid without BatchNorm in D
    # (BatchNorm would mix the statistics of the three parts).
    one_d_forward: bool = True
    world: int = 1


@dataclass
class Batch:
    x: torch.Tensor  # real images in [-1, 1]
    text: torch.Tensor  # one standardised caption vector per image
    labels: torch.Tensor
    wrong: torch.Tensor  # index of the mismatched image for each caption
    wrong_mask: torch.Tensor  # mismatched pairs of another class (the others are not counted)
    z: torch.Tensor
    eps: torch.Tensor | None  # conditioning-augmentation noise


def build_nets(mcfg: ModelConfig, cfg: TrainConfig, device: torch.device, channels_last: bool,
               adam: str = "forloop") -> Nets:
    """Fresh G, D, G_ema (= G) and their Adam optimisers, from the current global torch seed.

    `adam` picks the optimiser's implementation (forloop | foreach | fused): the same update,
    computed in a different order of float operations.
    """
    G, D = Generator(mcfg).to(device), Discriminator(mcfg).to(device)
    G_ema = Generator(mcfg).to(device)
    G_ema.load_state_dict(G.state_dict())
    G_ema.requires_grad_(False)
    if channels_last:
        G, D, G_ema = (m.to(memory_format=torch.channels_last) for m in (G, D, G_ema))
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2), **adam_flags(adam))
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2), **adam_flags(adam))
    return Nets(G, D, G_ema, opt_G, opt_D)


def adam_flags(adam: str) -> dict[str, bool]:
    if adam not in ("forloop", "foreach", "fused"):
        raise InputError(f"unknown Adam implementation {adam!r}; choose forloop, foreach or fused")
    return {"foreach": adam == "foreach", "fused": adam == "fused"}


def set_adam_impl(opt: torch.optim.Optimizer, adam: str) -> None:
    """A loaded optimiser state brings the saving run's implementation flags; use ours."""
    for group in opt.param_groups:
        group.update(adam_flags(adam))


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
        named = torch.rand(len(idx), generator=gc) < data.name_mix
        template = torch.randint(data.name_vectors.shape[1], (len(idx),), generator=gc)
        text = torch.where(named[:, None], data.name_vectors[data.labels[idx], template], text)
    text = text.to(device)
    labels = data.labels[idx].to(device)
    wrong, wrong_mask = mismatch(labels, g)
    z = torch.randn(len(idx), mcfg.noise_dim, generator=g, device=device)
    eps = torch.randn(len(idx), mcfg.cond_dim, generator=g, device=device) if mcfg.cond_aug else None
    return Batch(x, text, labels, wrong, wrong_mask, z, eps)


def train_step(nets: Nets, b: Batch, g: torch.Generator, mcfg: ModelConfig,
               opts: StepOptions) -> dict[str, torch.Tensor]:
    """One D update then one G update; returns detached scalars (loss_d, loss_g, ...). No host sync.

    With a class head (`aux`) the stats also hold its top-1 accuracy on real images and on G's
    images of the caption's class: a head that only ever learns the real images, or one that G
    satisfies long before its images look real, is how the aux head collapses.
    """
    G, D, opt_G, opt_D = nets.G, nets.D, nets.opt_G, nets.opt_D
    device, x, text, labels, wrong = opts.device, b.x, b.text, b.labels, b.wrong

    # --- Discriminator step: (real, caption) real; (other image, caption) and (G's image, caption) fake.
    D.requires_grad_(True)
    with autocast(device, opts.autocast_dtype):
        fake, mu, logvar = G(b.z, text, b.eps)
        real_in = diff_augment(x, mcfg.diffaug, g)
        wrong_in = diff_augment(x[wrong], mcfg.diffaug, g)
        fake_in = diff_augment(fake.detach(), mcfg.diffaug, g)
        if mcfg.ma_gp:
            real_in = real_in.detach().requires_grad_(True)
            text_d = text.detach().requires_grad_(True)
        else:
            text_d = text
        ctr = bool(mcfg.contrastive)
        if opts.one_d_forward:
            out, cls, *emb = D(torch.cat([real_in, wrong_in, fake_in]), torch.cat([text_d, text, text]),
                               labels.repeat(3), embed=ctr, parts=3)
            out_real, out_wrong, out_fake = out.float().chunk(3)
            cls_real, cls_wrong, cls_fake = cls.float().chunk(3) if cls is not None else (None, None, None)
            emb_real = tuple(e[:len(x)] for e in emb[0]) if ctr else None
        else:
            # One spectral-norm weight (one power iteration) for the three calls, as in one forward.
            with torch.nn.utils.parametrize.cached():
                out_real, cls_real, *emb = D(real_in, text_d, labels, embed=ctr)
                (out_wrong, cls_wrong), (out_fake, cls_fake) = D(wrong_in, text, labels), D(fake_in, text, labels)
            emb_real = emb[0] if ctr else None
        loss_d = d_adversarial(out_real.float(), out_wrong.float(), out_fake.float(), mcfg.loss, b.wrong_mask)
        stats = {}
        if ctr:
            # Real images only: D learns which caption goes with which image, G is then held to it.
            c = contrastive(*emb_real, labels)
            stats["contrastive_d"] = c.detach()
            loss_d = loss_d + mcfg.contrastive * c
        if cls_real is not None:
            stats["cls_acc_real"] = (cls_real.detach().argmax(1) == labels).float().mean()
            stats["cls_acc_fake"] = (cls_fake.detach().argmax(1) == labels).float().mean()
            # Every image D sees is of a known class: its own, or the caption's for G's.
            loss_d = loss_d + mcfg.aux_weight * (
                F.cross_entropy(cls_real.float(), labels)
                + 0.5 * F.cross_entropy(cls_wrong.float(), labels[wrong])
                + 0.5 * F.cross_entropy(cls_fake.float(), labels))
        if mcfg.ma_gp:
            loss_d = loss_d + mcfg.ma_gp * matching_aware_gp(out_real.float(), real_in, text_d)
    opt_D.zero_grad(set_to_none=True)
    loss_d.backward()
    loss_d = loss_d.detach()
    all_reduce_grads(D, opts.world)
    opt_D.step()

    # --- Generator step: make D call its image real (and of the caption's class).
    D.requires_grad_(False)
    with autocast(device, opts.autocast_dtype):
        out_fake, cls_fake, *emb = D(diff_augment(fake, mcfg.diffaug, g), text, labels, embed=ctr)
        loss_g = g_adversarial(out_fake.float(), mcfg.loss)
        if ctr:
            c = contrastive(*emb[0], labels)
            stats["contrastive_g"] = c.detach()
            loss_g = loss_g + mcfg.contrastive * c
        if cls_fake is not None:
            loss_g = loss_g + mcfg.aux_weight * F.cross_entropy(cls_fake.float(), labels)
        if mu is not None:
            loss_g = loss_g + mcfg.kl_weight * kl_divergence(mu.float(), logvar.float())
        if mcfg.gan_int:
            # GAN-INT: captions halfway between two others must still give real-looking images.
            text_int = 0.5 * (text + text.roll(1, 0))
            z2 = torch.randn(b.z.shape, generator=g, device=g.device).to(b.z.device)
            eps2 = torch.randn(b.eps.shape, generator=g, device=g.device).to(b.eps.device) if b.eps is not None else None
            fake_int = G(z2, text_int, eps2)[0]
            out_int = D(diff_augment(fake_int, mcfg.diffaug, g), text_int)[0]
            loss_g = loss_g + mcfg.gan_int * g_adversarial(out_int.float(), mcfg.loss)
        if mcfg.mode_seek:
            if mcfg.mode_seek_pairs:
                # The first `mode_seek_pairs` captions, each with two fresh noise vectors (same condition
                # noise), in one G forward: both images of a pair share its BatchNorm statistics, so
                # they differ by the noise alone, at 2 x pairs images of G forward per step.
                p = min(mcfg.mode_seek_pairs, len(b.z))
                zp = torch.randn((2 * p, b.z.shape[1]), generator=g, device=g.device).to(b.z.device)
                eps_p = b.eps[:p].repeat(2, 1) if b.eps is not None else None
                fake_p = G(zp, text[:p].repeat(2, 1), eps_p)[0].float()
                img_a, img_b, z_a, z_b = fake_p[:p], fake_p[p:], zp[:p], zp[p:]
            else:
                # Half the batch again with new noise (same captions, same condition noise): half a
                # G forward more per step instead of a whole one.
                h = max(1, len(b.z) // 2)
                z2 = torch.randn((h, b.z.shape[1]), generator=g, device=g.device).to(b.z.device)
                fake2 = G(z2, text[:h], b.eps[:h] if b.eps is not None else None)[0]
                img_a, img_b, z_a, z_b = fake[:h].float(), fake2.float(), b.z[:h], z2
            ms = mode_seeking(img_a, img_b, z_a, z_b)
            stats["mode_seek"] = ms.detach()
            loss_g = loss_g + mcfg.mode_seek * ms
    opt_G.zero_grad(set_to_none=True)
    loss_g.backward()
    loss_g = loss_g.detach()
    all_reduce_grads(G, opts.world)
    opt_G.step()
    return {"loss_d": loss_d, "loss_g": loss_g, **stats}


def run_step(nets: Nets, data: TrainData, idx: torch.Tensor, step: int, cfg: TrainConfig, opts: StepOptions,
             rank: int = 0) -> dict[str, torch.Tensor]:
    """Everything the loop does for one step: draw the batch, update D and G, update the EMA."""
    g = step_generator(cfg.seed, step, rank, opts.device)
    gc = step_generator(cfg.seed, step, rank, torch.device("cpu"))
    batch = make_batch(data, idx, g, gc, cfg.model, opts)
    stats = train_step(nets, batch, g, cfg.model, opts)
    ema_update(nets.G_ema, nets.G, ema_decay(step, cfg.ema) if cfg.ema else 0.0)
    return stats


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    epoch: int
    checkpoint: Path | None
    seconds: float
    images_per_second: float
    is_main: bool = True  # False on the other ranks of a distributed run: they report nothing


def train(cfg: TrainConfig, report: Reporter = Reporter()) -> TrainResult:
    # Distributed set-up: torchrun sets these; a plain run is a world of one.
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    owns_group = False
    device = resolve_device(cfg.device)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **_attempt_store(rank, world))
            owns_group = True
    is_main = rank == 0
    autocast_dtype = resolve_precision(cfg.precision, device)
    adam = resolve_adam(cfg.adam, device)
    threads = resolve_threads(cfg.threads)

    # Where the run lives.
    layout = DataLayout(cfg.data_dir)
    from flowercli.data import check_data_dir

    check_data_dir(layout.root)
    run_name = cfg.run or time.strftime("run-%Y%m%d-%H%M%S")
    run_dir = Path(cfg.runs_dir) / run_name
    ckpt_dir = run_dir / "checkpoints"
    emb_path = Path(cfg.embeddings) if cfg.embeddings else find_embeddings(layout)
    if not emb_path.is_file():
        raise DataError(f"embeddings file {emb_path} does not exist; run `flowercli embed` first")
    cfg = replace(cfg, run=run_name, embeddings=emb_path)
    validate_config(cfg)
    # --resume on a run without a checkpoint starts it (see _train): no check here.
    # The topmost folder this call creates (the runs dir too, if new), so a failure can remove it all.
    absolute = Path(os.path.abspath(run_dir))
    existing = nearest_existing(absolute)
    created = None if existing == absolute else existing / absolute.relative_to(existing).parts[0]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from flowercli.fsutil import write_error_text

        raise FlowerError(f"cannot create run folder {run_dir}: {write_error_text(e)}; choose another --runs-dir") from None
    try:
        result = _train(cfg, report, world, rank, device, is_main, autocast_dtype, adam, threads, layout,
                        run_name, run_dir, ckpt_dir, emb_path)
        if owns_group:
            import torch.distributed as dist

            dist.barrier()  # no rank leaves while rank 0 still writes its checkpoint
        return result
    except OSError as e:  # a full disk or a vanished folder while writing the log, config or samples
        from flowercli.fsutil import os_error_text

        _discard_if_empty(is_main, created, run_dir, ckpt_dir)
        raise FlowerError(f"I/O error while training in {run_dir}: {os_error_text(e)}; checkpoints written so far "
                          "are intact, continue with --resume") from None
    except BaseException:
        _discard_if_empty(is_main, created, run_dir, ckpt_dir)
        raise
    finally:
        if owns_group:
            # Gloo's threads outliving the interpreter abort the process at exit ("terminate called
            # without an active exception"): close the group we opened.
            import torch.distributed as dist

            dist.destroy_process_group()


def _attempt_store(rank: int, world: int) -> dict[str, Any]:
    """init_process_group arguments that keep the attempts of a torchrun job apart.

    torchrun's workers rendezvous through its agent's key-value store, and every restart
    (--max-restarts) reuses that store without a prefix per attempt: a restarted worker can read
    the address a dead worker of the previous attempt published and fail to connect to it ("Gloo
    connectFullMesh failed ... Connection refused"; NCCL's id is kept the same way). Under the
    agent's store, the keys of each attempt go under its restart count; otherwise env:// as usual.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
    return {"store": dist.PrefixStore(f"flowercli/attempt-{attempt}", store), "rank": rank, "world_size": world}


def _discard_if_empty(is_main: bool, created: Path | None, run_dir: Path, ckpt_dir: Path) -> None:
    # A run that failed before its first checkpoint leaves nothing behind to trip over later.
    if is_main and created is not None and not any(ckpt_dir.glob("step-*.pt")):
        shutil.rmtree(created, ignore_errors=True)


def validate_config(cfg: TrainConfig) -> None:
    """Refuse impossible settings before anything is written (one line each, saying what to use)."""
    m = cfg.model
    if cfg.batch_size < 2 or cfg.epochs < 1:
        raise InputError("--batch-size must be at least 2 and --epochs at least 1")
    if m.loss not in ("bce", "hinge"):
        raise InputError(f"unknown --loss {m.loss!r}; use bce or hinge")
    if m.d_head not in ("aux", "projection", "both", "none"):
        raise InputError(f"unknown --d-head {m.d_head!r}; use aux, projection, both or none")
    if m.aux_weight < 0:
        raise InputError(f"--aux-weight must be 0 or more, got {m.aux_weight}")
    if m.mode_seek < 0:
        raise InputError(f"--mode-seek must be 0 or more, got {m.mode_seek}")
    if m.contrastive < 0:
        raise InputError(f"--contrastive must be 0 or more, got {m.contrastive}")
    if m.noise_layers not in NOISE_LAYERS:
        raise InputError(f"unknown model.noise_layers {m.noise_layers!r}; use {', '.join(NOISE_LAYERS)}")
    if m.noise_layers != "none" and not m.cond_bn:
        raise InputError(f"model.noise_layers={m.noise_layers} needs conditional BatchNorm (--cond-bn): the noise "
                         "joins the condition there")
    if m.mbstd_group < 0 or m.mode_seek_pairs < 0:
        raise InputError("model.mbstd_group and model.mode_seek_pairs must be 0 (off) or more")
    if m.mode_seek_pairs and not m.mode_seek:
        raise InputError("model.mode_seek_pairs sets where the mode-seeking term is computed; give it a weight "
                         "too (--mode-seek, e.g. 0.1)")
    if m.mode_seek_pairs > cfg.batch_size:
        raise InputError(f"model.mode_seek_pairs ({m.mode_seek_pairs}) takes that many captions of the batch; "
                         f"use at most --batch-size ({cfg.batch_size})")
    if m.sample_condition and not m.cond_aug:
        raise InputError("model.sample_condition samples the conditioning-augmentation condition; it needs --cond-aug")
    unknown = [p for p in m.diffaug.split(",") if p.strip() and p.strip() not in DIFFAUG_NAMES]
    if unknown:
        raise InputError(f"unknown --diffaug part {unknown[0]!r}; use a comma list of {', '.join(DIFFAUG_NAMES)} or \"\"")
    if m.image_size < 16 or m.image_size & (m.image_size - 1):
        raise InputError(f"--image-size must be a power of two of at least 16 (16, 32, 64, 128), got {m.image_size}")
    if m.noise_layers == "chunks":
        try:
            noise_chunks(m)
        except ValueError as e:
            raise InputError(f"{e}; raise model.noise_dim or use model.noise_layers=concat") from None
    if cfg.split not in ("auto", "classes", "images", "all"):
        raise InputError(f"unknown split {cfg.split!r}; choose auto, classes, images or all")
    if not 0 <= cfg.name_mix < 1:  # 1 would drop every human caption
        raise InputError(f"name_mix must be at least 0 and below 1 (a fraction of the captions), got {cfg.name_mix}")


def _train(cfg, report, world, rank, device, is_main, autocast_dtype, adam, threads, layout, run_name, run_dir,
           ckpt_dir, emb_path) -> TrainResult:
    with RunLock(run_dir) if is_main else contextlib.nullcontext(), StopFlag() as stop, torch_threads(threads):
        # Resume: the newest readable checkpoint, with a config that agrees on everything frozen.
        state = None
        if cfg.resume and not list_checkpoints(ckpt_dir):
            # Start-or-continue: a job script, a cluster requeue or torchrun's restarts run one command
            # line for the first start and every restart, so --resume with nothing to resume starts the
            # run. Checked under the lock; every rank sees the same folder (rank 0 writes no checkpoint
            # before the first step, which needs all ranks).
            _check_fresh_start(cfg, run_dir)
            if is_main:
                report.warn(f"run {run_dir} has no checkpoint yet: starting it from step 0")
            cfg = replace(cfg, resume=False)
        if cfg.resume:
            state = load_latest(ckpt_dir, warn=report.warn)
            if state is None:
                raise CheckpointError(f"--resume: run {run_dir} has no readable checkpoint; start it without --resume")
            diffs = config_differences(config_from_dict(state["config"]), cfg)
            if diffs:
                raise CheckpointError(f"--resume: {'; '.join(diffs)} (run's vs now); resume with the run's settings "
                                      "or start a new --run")
        elif ckpt_dir.is_dir() and any(ckpt_dir.glob("step-*.pt")):
            raise FlowerError(f"run {run_dir} already has checkpoints; add --resume to continue it or pick another --run")

        data = load_train_data(cfg, emb_path, report)
        if state is not None:
            diffs = data_differences(state["encoder"], data.encoder)
            if diffs:
                raise CheckpointError(f"--resume: the run was trained on other data than {emb_path}: {'; '.join(diffs)} "
                                      "(run's vs now); resume with the embeddings it started on or start a new --run")
        mcfg = replace(cfg.model, text_dim=data.vectors.shape[-1], n_classes=len(data.classes))
        cfg = replace(cfg, model=mcfg)

        # Models and optimisers. Same seed on every rank, so the replicas start identical.
        torch.manual_seed(cfg.seed)
        nets = build_nets(mcfg, cfg, device, cfg.channels_last, adam)
        G, D, G_ema, opt_G, opt_D = nets.G, nets.D, nets.G_ema, nets.opt_G, nets.opt_D
        for m in (G, G_ema):
            m.text_mean.copy_(data.text_mean)
            m.text_std.copy_(data.text_std)
        step = 0
        if state is not None:
            for module, key in ((G, "G"), (D, "D"), (G_ema, "G_ema")):
                module.load_state_dict(state[key])
            opt_G.load_state_dict(state["opt_G"])
            opt_D.load_state_dict(state["opt_D"])
            set_adam_impl(opt_G, adam)
            set_adam_impl(opt_D, adam)
            set_rng_states(state["rng"])
            step = int(state["step"])
            report.info(f"Resuming {run_dir} from step {step} ({state['_path']})")

        n_train = len(data.labels)
        steps_per_epoch = n_train // (cfg.batch_size * world)
        if steps_per_epoch == 0:
            raise InputError(f"--batch-size {cfg.batch_size} is larger than the {n_train} training images; "
                             f"use --batch-size {n_train} or less")
        total_steps = steps_per_epoch * cfg.epochs
        if cfg.max_steps:
            total_steps = min(total_steps, cfg.max_steps)
        # BatchNorm in D mixes statistics across a batch: real, mismatched and fake must then go
        # through D separately. Without it one concatenated forward computes the same thing faster.
        opts = StepOptions(device, autocast_dtype, cfg.channels_last, one_d_forward=mcfg.spectral_norm, world=world)

        if is_main:
            atomic_write(run_dir / "config.json", lambda f: f.write(json.dumps(
                {"flowercli_version": __version__, "config": config_to_dict(cfg), "encoder": data.encoder,
                 "split": data.split, "classes": data.classes, "world_size": world,
                 "device": str(device), "precision": str(autocast_dtype or "fp32"), "adam": adam, "threads": threads,
                 "parameters": {"G": count_parameters(G), "D": count_parameters(D)}}, indent=2).encode()))
            (run_dir / "samples").mkdir(exist_ok=True)
            (run_dir / "samples" / "prompts.txt").write_text("\n".join(data.sample_captions) + "\n")
            report.info(f"Training {run_dir}: {n_train} images, {len(data.classes)} classes, split {data.split}, "
                        f"{steps_per_epoch} steps/epoch, device {device}, precision {autocast_dtype or 'fp32'}, "
                        f"{threads} threads")

        def make_state(epoch: int) -> dict[str, Any]:
            # G_ema's BatchNorm statistics are recomputed for its own weights before it is saved.
            recalibrate_batchnorm(G_ema, calibration_batches(data, cfg, device))
            return {"config": config_to_dict(cfg), "step": step, "epoch": epoch, "G": G.state_dict(),
                    "D": D.state_dict(), "G_ema": G_ema.state_dict(), "opt_G": opt_G.state_dict(),
                    "opt_D": opt_D.state_dict(), "rng": rng_states(), "encoder": data.encoder,
                    "data": {"split": data.split, "classes": data.classes, "data_dir": str(cfg.data_dir),
                             "embeddings": str(emb_path)}}

        last_ckpt = None
        t0, step0, t_log = time.time(), step, time.time()
        order_epoch, order = -1, None
        G.train()
        D.train()
        with report.task(f"Training {run_name}", total=total_steps) as task:
            task.advance(step)
            while step < total_steps:
                epoch, i = divmod(step, steps_per_epoch)
                if epoch != order_epoch:
                    order_epoch, order = epoch, epoch_order(cfg.seed, epoch, n_train)
                start = (i * world + rank) * cfg.batch_size
                idx = order[start: start + cfg.batch_size]
                stats = run_step(nets, data, idx, step, cfg, opts, rank)
                step += 1
                task.advance()

                # Stop on request, in step with the other ranks.
                stop_now = stop.signum
                if world > 1:
                    import torch.distributed as dist

                    flag = torch.tensor([stop_now], device=device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stop_now = int(flag.item())

                # Logging, samples, checkpoints.
                end_of_epoch = step % steps_per_epoch == 0
                if is_main and (step % cfg.log_every == 0 or step == total_steps):
                    rate = (step - step0) * cfg.batch_size * world / max(time.time() - t0, 1e-9)
                    values = {k: round(v.item(), 5) for k, v in stats.items()}
                    record = {"step": step, "epoch": step / steps_per_epoch, **values, "img_per_s": round(rate, 1),
                              "time": round(time.time() - t0, 2)}
                    write_jsonl(run_dir / "log.jsonl", record)
                    task.update(loss_d=values["loss_d"], loss_g=values["loss_g"], img_s=round(rate, 1))
                    if time.time() - t_log > 30 or step == total_steps:
                        report.debug(json.dumps(record))
                        t_log = time.time()
                if is_main and end_of_epoch and ((step // steps_per_epoch) % cfg.sample_every == 0 or step == total_steps):
                    from flowercli.images import save_png

                    recalibrate_batchnorm(G_ema, calibration_batches(data, cfg, device))
                    save_png(sample_grid(G_ema, data, cfg, device), run_dir / "samples" / f"epoch-{step // steps_per_epoch:04d}.png")
                if is_main and (end_of_epoch or step % cfg.checkpoint_every == 0 or step == total_steps or stop_now):
                    last_ckpt = save_checkpoint(make_state(step // steps_per_epoch), ckpt_dir, cfg.keep)
                if stop_now:
                    name = signal.Signals(stop_now).name
                    raise Interrupted(f"stopped by {name} at step {step}; checkpoint saved, continue with --resume --run {run_name}",
                                      stop_now)

        seconds = time.time() - t0
        rate = (step - step0) * cfg.batch_size * world / max(seconds, 1e-9)
        if is_main:
            report.info(f"Done: {step} steps in {seconds:.0f} s ({rate:.0f} img/s); checkpoint {last_ckpt}")
        return TrainResult(run_dir, step, step // steps_per_epoch, last_ckpt, seconds, rate, is_main)


def build_config(recipe: str, data_dir: Path, runs_dir: Path, run: str | None, resume: bool,
                 embeddings: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """The config the CLI asks for. On --resume the run's own config is the base, so only what the
    user states again is compared (and a changed model or data setting is refused by `train`)."""
    stored = None
    if resume:
        if run is None:
            from flowercli.checkpoint import find_newest_run

            newest = find_newest_run(runs_dir)
            if newest is None:
                raise CheckpointError(f"--resume: no run with checkpoints under {runs_dir}; name one with --run")
            run = newest.name
        path = Path(runs_dir) / run / "config.json"
        if path.is_file():
            try:
                stored = config_from_dict(json.loads(path.read_text())["config"])
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path} is corrupt ({e}); resume needs the run's config") from None
    if stored is None:
        cfg = make_config(recipe, **overrides)
    else:
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        model = replace(stored.model, **{k: v for k, v in overrides.items() if k in model_fields})
        cfg = replace(stored, model=model, **{k: v for k, v in overrides.items() if k not in model_fields})
    return replace(cfg, data_dir=Path(data_dir), runs_dir=Path(runs_dir), run=run, resume=resume,
                   embeddings=Path(embeddings) if embeddings else cfg.embeddings if stored else None)
