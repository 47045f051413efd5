"""Typed, frozen configuration for each stage, and the data-directory layout.

This is the only place defaults live; the CLI and the Python API both build these.
Standard library only: `flowercli --help` must not pay for importing torch.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "FLOWERCLI_DATA_DIR"
RUNS_DIR_ENV = "FLOWERCLI_RUNS_DIR"


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or "data")


def default_runs_dir() -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV) or "runs")


@dataclass(frozen=True)
class DataLayout:
    """Where every stage reads and writes under one data directory (docs/ARCHITECTURE.md)."""

    root: Path

    @property
    def dataset(self) -> Path:
        return self.root / "oxford102"

    @property
    def jpg(self) -> Path:
        return self.dataset / "jpg"

    @property
    def labels_mat(self) -> Path:
        return self.dataset / "imagelabels.mat"

    @property
    def setid_mat(self) -> Path:
        return self.dataset / "setid.mat"

    @property
    def text_c10(self) -> Path:
        return self.dataset / "text_c10"

    @property
    def manifest(self) -> Path:
        return self.dataset / "manifest.json"

    @property
    def downloads(self) -> Path:
        return self.root / ".downloads"

    @property
    def embeddings_dir(self) -> Path:
        return self.root / "embeddings"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def split_file(self, name: str) -> Path:
        """`name` is one of all, trainval, test, train, val."""
        return self.dataset / f"{name}classes.txt"

    def embeddings_file(self, encoder: str) -> Path:
        return self.embeddings_dir / f"{encoder_slug(encoder)}.h5"


SPLIT_FILES = ("all", "trainval", "test", "train", "val")


def missing_split_files(found: list[str] | set[str]) -> list[str]:
    """What a set of split names lacks for `--split classes`: testclasses.txt and the training classes.

    The official archive has all five files; copies with only trainvalclasses.txt + testclasses.txt
    exist and are enough (all is derived; train/val are used only when both are there).
    """
    found = set(found)
    missing = [] if "test" in found else ["testclasses.txt"]
    if "trainval" not in found and not {"train", "val"} <= found:
        missing.append("trainvalclasses.txt (or trainclasses.txt + valclasses.txt)")
    return missing

# Encoder shortcuts users can type instead of a Hugging Face id or folder.
ENCODER_ALIASES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}


def encoder_slug(encoder: str) -> str:
    """A file-name-safe name for an encoder: `minilm`, `roberta-large`, `my-local-model`."""
    if encoder in ENCODER_ALIASES:
        return encoder
    name = encoder.rstrip("/\\")
    if os.sep in name or "/" in name:
        # A local folder or an `org/model` id: its last component names it.
        name = re.split(r"[/\\]", name)[-1]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")
    return slug or "encoder"


@dataclass(frozen=True)
class ArchiveLimits:
    """What one archive may unpack to. Checked from its headers before anything is written (zip:
    the central directory; tar: each header as it is read) and again on the bytes actually written."""

    total_bytes: int  # all extracted files together
    members: int  # entries of any kind, counted whether extracted or not
    member_bytes: int  # one extracted file
    ratio: float  # extracted bytes per byte of the archive file (a small file that unpacks huge is a bomb)


# A caption file holds ten short sentences (< 2 KB); anything near this size is not one. Also the
# cap `download` validation and `read_captions` read caption files with.
CAPTION_FILE_MAX_BYTES = 2**20
# Reed et al.'s captions archive: 1.2 MB packed, 8,189 files of < 2 KB, ~5 MB unpacked (ratio ~4).
# Room for ten times the files and twelve times the size; text compresses well, but not 100:1.
CAPTIONS_LIMITS = ArchiveLimits(total_bytes=64 * 2**20, members=100_000, member_bytes=CAPTION_FILE_MAX_BYTES,
                                ratio=100.0)
# 102flowers.tgz: ~330 MB of JPEGs, 8,190 members, the largest image < 1 MB; JPEGs do not compress
# (ratio ~1). Room for higher-resolution copies of the 8,189 images, not for another data set.
IMAGES_LIMITS = ArchiveLimits(total_bytes=4 * 2**30, members=20_000, member_bytes=50 * 2**20, ratio=20.0)


@dataclass(frozen=True)
class DownloadConfig:
    data_dir: Path
    # A folder or base URL holding the official file names; None = the official sources.
    mirror: str | None = None
    # A captions archive (tar/tgz/zip) path or URL; None = Reed et al. 2016 on Google Drive.
    captions: str | None = None
    timeout: float = 30.0  # seconds without data before a request is abandoned and retried
    retries: int = 5
    retry_wait: float = 1.0  # first back-off in seconds; doubles per failed attempt (capped at 60 s)
    force: bool = False  # re-extract even when the dataset is complete and verified
    # What each archive may extract (see the limits above): beyond them it is a mistake or an archive bomb.
    captions_limits: ArchiveLimits = CAPTIONS_LIMITS
    images_limits: ArchiveLimits = IMAGES_LIMITS


@dataclass(frozen=True)
class EmbedConfig:
    data_dir: Path
    encoder: str = "roberta-large"
    pooling: str = "mean"  # mean | cls
    batch_size: int = 256
    device: str = "auto"  # auto | cpu | cuda
    max_length: int = 128  # tokens; cut to what the model accepts
    dtype: str = "float16"  # storage precision of the vectors: float16 | float32
    normalise: bool = False  # L2-normalise each caption vector before storing


NOISE_LAYERS = ("none", "concat", "chunks")  # values of ModelConfig.noise_layers


@dataclass(frozen=True)
class ModelConfig:
    """The networks and the GAN objective. `recipe_defaults` gives the two named starting points."""

    text_dim: int = 384  # set from the embeddings file
    n_classes: int = 102  # classes the class head / projection knows (the training classes)
    image_size: int = 64
    noise_dim: int = 100
    cond_dim: int = 128  # every working peer compresses the sentence vector to ~128-d first
    g_channels: int = 64
    d_channels: int = 64
    cond_aug: bool = False  # conditioning augmentation: sample the condition, KL term towards N(0, I)
    kl_weight: float = 1.0
    loss: str = "bce"  # bce | hinge
    spectral_norm: bool = False  # in D; replaces BatchNorm there
    d_head: str = "aux"  # aux (class head + cross-entropy) | projection | both | none
    aux_weight: float = 1.0  # weight of the class head's cross-entropy (aux, both)
    ma_gp: float = 0.0  # weight of DF-GAN's matching-aware gradient penalty (0 = off)
    diffaug: str = ""  # DiffAugment policy, e.g. "color,translation,cutout"
    gan_int: float = 0.0  # weight of the G term on interpolated caption vectors (GAN-INT)
    # Weight of MSGAN's mode-seeking term: G is penalised when two noise vectors give the same
    # image for one caption (every run so far drew near-identical columns from different noise).
    mode_seek: float = 0.0
    # Weight of the image-caption contrastive term (XMC-GAN): D's pooled image features must pick
    # their own caption out of the batch, on real images in D's step and on G's images in G's step.
    contrastive: float = 0.0
    # Text at every generator layer: BatchNorm's scale and shift predicted from the condition
    # (conditional BatchNorm, as the affine text fusion of DF-GAN); off = text enters the first layer only.
    cond_bn: bool = False
    # D's logit also gets <projected caption, pooled image features> (Miyato & Koyama's projection
    # with the caption instead of the class label): the one conditioning that exists for unseen classes.
    text_proj: bool = False
    # Switches that make G use its noise; all off by default. With the caption setting every cond_bn
    # scale and shift and the noise entering the first layer only, images of one prompt are near-copies.
    # noise_layers (needs cond_bn): "concat" feeds [condition || z] to every conditional BatchNorm
    # (DF-GAN); "chunks" splits z into one chunk for the first layer and one per G block (BigGAN).
    noise_layers: str = "none"  # none | concat | chunks
    # Minibatch standard deviation (ProGAN/StyleGAN): one feature map in D, before its last layers,
    # holding the spread of the image features over groups of this many images (0 = off): a batch of
    # near-copies gives itself away.
    mbstd_group: int = 0
    # The mode-seeking term on this many captions with two fresh noise vectors each, in one G forward
    # of 2 x pairs images (0 = the first half of the batch against one more noise vector each).
    mode_seek_pairs: int = 0
    # How `generate` and `eval` use a cond_aug generator by default: sample each image's condition
    # from its seed (True) or use the caption's mean condition (False). Training is unaffected.
    sample_condition: bool = False


@dataclass(frozen=True)
class TrainConfig:
    data_dir: Path = Path("data")
    runs_dir: Path = Path("runs")
    run: str | None = None  # run name; default: a timestamp
    embeddings: Path | None = None  # an HDF5 file; default: the only/newest one under <data>/embeddings
    split: str = "auto"  # auto | classes | images | all
    epochs: int = 1
    max_steps: int = 0  # stop after this many steps in total (0 = no limit); for tests and benchmarks
    batch_size: int = 64
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    ema: float = 0.999  # decay of the EMA generator used for samples and generation (0 = copy G)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16 (autocast)
    channels_last: bool = True
    adam: str = "auto"  # Adam implementation: auto | forloop | foreach | fused (same update, other rounding)
    threads: int = 0  # torch intra-op threads; 0 = torch's default (one per core)
    checkpoint_every: int = 500  # steps; a checkpoint is also written at the end of every epoch
    keep: int = 3  # step checkpoints to keep (latest.pt is extra)
    sample_every: int = 1  # epochs between sample grids
    log_every: int = 50  # steps between log.jsonl lines
    # Fraction of training captions replaced by a species-name caption of the image's own class
    # ("a sunflower", data.NAME_TEMPLATES): human captions rarely name the species, users do (0 = off).
    name_mix: float = 0.0
    # Quick FID of the EMA generator every this many steps and at the end, on quick_eval_n images from
    # the evaluated split's captions; the best step is kept as checkpoints/best.pt (0 = off; quickeval.py).
    eval_every: int = 0
    quick_eval_n: int = 512
    inception: Path | None = None  # the FID network, found as `flowercli eval --inception` finds it
    tensorboard: bool = False  # also write <run>/tensorboard/ (needs the tensorboard extra)
    resume: bool = False
    recipe: str = "modern"
    model: ModelConfig = ModelConfig()


# Named starting points. `reference` is the design this project started from and stays the
# baseline improvements are measured against; `modern` adds what makes small text GANs converge.
RECIPES: dict[str, dict[str, dict]] = {
    "reference": {
        "model": dict(cond_aug=False, loss="bce", spectral_norm=False, d_head="aux", ma_gp=0.0, diffaug="",
                      gan_int=0.0),
        "train": dict(lr_g=2e-4, lr_d=2e-4, beta1=0.5, beta2=0.999, ema=0.0),
    },
    # Each choice below won an equal-CPU-budget comparison (docs/BENCHMARKS.md, "Choosing the default
    # recipe"): 32 channels, not 64 (3.3x the steps beat width); the caption at every G layer and in
    # D's projection; and learning rates 4x the usual 1e-4/4e-4 (FID fell with each step up to 4x).
    "modern": {
        "model": dict(cond_aug=True, loss="hinge", spectral_norm=True, d_head="projection", ma_gp=0.0,
                      diffaug="color,translation", gan_int=0.0, g_channels=32, d_channels=32,
                      cond_bn=True, text_proj=True),
        "train": dict(lr_g=4e-4, lr_d=1.6e-3, beta1=0.0, beta2=0.9, ema=0.999),
    },
}


# `flowercli train --set FIELD=VALUE`: any TrainConfig field by name and any ModelConfig field as
# model.NAME (or NAME alone), each parsed by its field's type, so a new field is reachable without a new flag.
# Not settable (with what sets them instead): the run's identity and folders, and what the data decides.
SET_EXCLUDED = {
    "recipe": "use --recipe", "model": "set its fields as model.NAME", "run": "use --run", "resume": "use --resume",
    "data_dir": "use --data-dir", "runs_dir": "use --runs-dir", "embeddings": "use --embeddings",
    "model.text_dim": "it comes from the embeddings file", "model.n_classes": "it comes from the training classes",
}
# Fields with a fixed set of values, refused when parsed rather than when the run starts.
SET_CHOICES = {
    "model.noise_layers": NOISE_LAYERS, "model.loss": ("bce", "hinge"),
    "model.d_head": ("aux", "projection", "both", "none"), "split": ("auto", "classes", "images", "all"),
    "precision": ("auto", "fp32", "bf16"), "adam": ("auto", "forloop", "foreach", "fused"),
}  # not device: cuda:N has no fixed list; device.resolve_device checks it when the run starts
# Smallest sensible integers (the flags' own limits): below them the loop divides by zero or loops forever.
SET_MINIMUM = {
    "epochs": 1, "max_steps": 0, "batch_size": 2, "seed": 0, "threads": 0, "checkpoint_every": 1, "keep": 1,
    "sample_every": 1, "log_every": 1, "model.image_size": 16, "model.noise_dim": 1, "model.cond_dim": 1,
    "model.g_channels": 4, "model.d_channels": 4, "model.mbstd_group": 0, "model.mode_seek_pairs": 0,
    "eval_every": 0, "quick_eval_n": 4,  # quickeval.MIN_N: recall's k-th neighbour needs k + 1 images
}


def settable_fields() -> dict[str, Any]:
    """The names `--set` accepts, with their types: TrainConfig fields, then ModelConfig's as model.NAME."""
    out: dict[str, Any] = {}
    for prefix, cls in (("", TrainConfig), ("model.", ModelConfig)):
        for name, hint in typing.get_type_hints(cls).items():
            if prefix + name not in SET_EXCLUDED:
                out[prefix + name] = hint
    return out


def parse_set(items: Iterable[str]) -> dict[str, Any]:
    """`FIELD=VALUE` strings -> {field name: typed value}, the overrides `make_config` takes (a later one wins).

    Raises ValueError with a one-line message naming the field and what it accepts.
    """
    fields = settable_fields()
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{item!r} is not FIELD=VALUE, e.g. model.noise_layers=concat or beta1=0.5")
        if key not in fields and f"model.{key}" in fields.keys() | SET_EXCLUDED.keys():
            key = f"model.{key}"  # the names do not overlap, so model. may be left out
        if key in SET_EXCLUDED:
            raise ValueError(f"{key} cannot be changed with --set: {SET_EXCLUDED[key]}")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            raise ValueError(f"unknown field {key!r}; {hint}settable: {', '.join(fields)}")
        out[key.removeprefix("model.")] = _parse_value(key, raw.strip(), fields[key])
    return out


def _parse_value(key: str, raw: str, hint: Any) -> Any:
    args = typing.get_args(hint)
    if type(None) in args:  # an optional field: "none" clears it
        if raw.lower() == "none":
            return None
        hint = next(a for a in args if a is not type(None))
    if key in SET_CHOICES:
        if raw not in SET_CHOICES[key]:
            raise ValueError(f"{key}={raw!r}: expected one of {', '.join(SET_CHOICES[key])}")
        return raw
    if hint is bool:
        if raw.lower() in ("true", "1"):
            return True
        if raw.lower() in ("false", "0"):
            return False
        raise ValueError(f"{key}={raw!r}: expected a bool: true, false, 1 or 0")
    if hint is int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{key}={raw!r}: expected an integer") from None
        if value < SET_MINIMUM.get(key, value):
            raise ValueError(f"{key}={raw!r}: expected an integer of at least {SET_MINIMUM[key]}")
        return value
    if hint is float:
        try:
            number = float(raw)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            raise ValueError(f"{key}={raw!r}: expected a finite number, e.g. 0.5 or 1e-4")
        return number
    if hint is Path:
        if not raw:
            raise ValueError(f"{key}: expected a path")
        return Path(raw)
    return raw


@dataclass(frozen=True)
class GenerateConfig:
    prompts: tuple[str, ...] = ()
    checkpoint: Path | None = None  # default: newest checkpoint of the newest run, else the packaged model
    runs_dir: Path = Path("runs")
    out: Path = Path("out")
    n: int = 16
    seed: int = 0
    device: str = "auto"
    interpolate: tuple[str, str] | None = None
    steps: int = 8
    # Sample the conditioning-augmentation condition per image (True) or use the mean (False);
    # None: what the checkpoint's model.sample_condition says.
    sample_condition: bool | None = None
    # The seeds of each prompt's images, instead of `n` images from `seed` on (generate.parse_seeds).
    seeds: tuple[int, ...] | None = None
    # Every noise vector of an image times this (the truncation trick; 0 < psi <= 1, 1 = off).
    truncation: float = 1.0


@dataclass(frozen=True)
class ReportConfig:
    """`flowercli report`: a run's summary and one PNG, from the files training writes."""

    run: str  # a run name under runs_dir, or the path of a run folder
    runs_dir: Path = Path("runs")
    # None: <run>/report.png, skipped with a warning where matplotlib (the `plots` extra) is missing;
    # a path given here is a request, and without matplotlib an error.
    out: Path | None = None


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation protocol of docs/EVALUATION.md; the defaults ARE the protocol."""

    data_dir: Path | None = None  # None: the data directory the run trained on
    out_dir: Path | None = None  # where report.json and samples.png go (<run>/eval); None: write nothing
    n: int = 2048  # generated images from the evaluated split's captions (FID, class accuracy)
    n_other: int = 256  # generated images from the other side's captions (their class accuracy only)
    seed: int = 0
    split: str = "test"  # test | train: which side of the run's split is evaluated
    batch_size: int = 64
    device: str = "auto"  # auto (cuda when there is one) | cpu | cuda
    inception: Path | None = None  # None: $FLOWERCLI_INCEPTION, the offline wheel, then NVIDIA's download
    precision: str = "fp32"  # fp32 | bf16 | auto (bf16 where native) for the Inception pass; fp32 = comparable FID
    allow_download: bool = True
    colour_seeds: int = 8  # images per (colour, phrasing) prompt
    # Diversity: k of the k-NN balls of precision/recall/density/coverage (Kynkäänniemi et al. use 3),
    # and within-prompt diversity from `diversity_seeds` images of each of `diversity_prompts` captions:
    # 64 x 8 = 512 more generated images and Inception passes; 0 prompts skips that part.
    prdc_k: int = 3
    diversity_prompts: int = 64
    diversity_seeds: int = 8
    # Images per (species name, template) prompt, every class: 102 x 4 x 2 = 816 Inception passes
    # (~1.5 min on an idle 2-core CPU); 0 skips the species-name section.
    name_seeds: int = 2
    classifier_holdout: float = 0.2  # fraction of each class's real images held out from the probe
    classifier_seed: int = 0
    sheet: int = 32  # generated images on samples.png
