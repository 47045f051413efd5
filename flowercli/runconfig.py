"""A run's TrainConfig: built from a recipe, checked, written to and read from JSON, compared on resume.

config.py holds the dataclasses and their defaults (standard library only); this module holds what
needs the models and losses to check a config, and what `train` and `generate` share to read one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from flowercli.config import NOISE_LAYERS, RECIPES, ModelConfig, TrainConfig
from flowercli.errors import CheckpointError, InputError
from flowercli.losses import DIFFAUG_NAMES
from flowercli.models import noise_chunks

# Settings that must not change when a run is resumed: they define the model or the data order.
FROZEN_FIELDS = ("recipe", "model", "split", "batch_size", "seed", "lr_g", "lr_d", "beta1", "beta2", "ema",
                 "embeddings")
# How the caption vectors were made, besides the caption set: another value gives other vectors for
# the same captions. The file's path, dtype and creation time can change without that.
ENCODER_IDENTITY = ("encoder", "model_type", "dim", "pooling", "max_length", "normalised")


def make_config(recipe: str = "modern", **overrides: Any) -> TrainConfig:
    """A TrainConfig from a named recipe; `overrides` (TrainConfig or ModelConfig field names) win."""
    if recipe not in RECIPES:
        raise InputError(f"unknown recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    model_kw = {**RECIPES[recipe]["model"], **{k: v for k, v in overrides.items() if k in model_fields}}
    train_kw = {**RECIPES[recipe]["train"], **{k: v for k, v in overrides.items() if k not in model_fields}}
    return TrainConfig(recipe=recipe, model=ModelConfig(**model_kw), **train_kw)


def build_config(recipe: str, data_dir: Path, runs_dir: Path, run: str | None, resume: bool,
                 embeddings: Path | None, overrides: dict[str, Any]) -> TrainConfig:
    """The config the CLI asks for. On --resume the run's own config is the base, so only what the
    user states again is compared (and a changed model or data setting is refused by `train`)."""
    stored = None
    if resume:
        if run is None:  # the run saved last, found as generate and eval find it
            from flowercli.checkpoint import resolve_run_checkpoint

            newest, _ = resolve_run_checkpoint(None, None, runs_dir, none_found=(
                f"--resume: no run with checkpoints under {runs_dir}; name one with --run"))
            assert newest is not None  # without a fallback it finds a run or raises
            run = newest.name
        path = Path(runs_dir) / run / "config.json"
        if path.is_file():
            try:
                stored = read_run_config(path)
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


def validate_config(cfg: TrainConfig) -> None:
    """Refuse impossible settings before anything is written (one line each, saying what to use)."""
    m = cfg.model
    if cfg.batch_size < 2 or cfg.epochs < 1:
        raise InputError("--batch-size must be at least 2 and --epochs at least 1")
    if m.loss not in ("bce", "hinge"):
        raise InputError(f"unknown model.loss {m.loss!r}; use bce or hinge")
    if m.d_head not in ("aux", "projection", "both", "none"):
        raise InputError(f"unknown model.d_head {m.d_head!r}; use aux, projection, both or none")
    if m.aux_weight < 0:
        raise InputError(f"model.aux_weight must be 0 or more, got {m.aux_weight}")
    if m.mode_seek < 0:
        raise InputError(f"model.mode_seek must be 0 or more, got {m.mode_seek}")
    if m.contrastive < 0:
        raise InputError(f"model.contrastive must be 0 or more, got {m.contrastive}")
    if m.noise_layers not in NOISE_LAYERS:
        raise InputError(f"unknown model.noise_layers {m.noise_layers!r}; use {', '.join(NOISE_LAYERS)}")
    if m.noise_layers != "none" and not m.cond_bn:
        raise InputError(f"model.noise_layers={m.noise_layers} needs conditional BatchNorm (model.cond_bn): the noise "
                         "joins the condition there")
    if m.mbstd_group < 0 or m.mode_seek_pairs < 0:
        raise InputError("model.mbstd_group and model.mode_seek_pairs must be 0 (off) or more")
    if m.mode_seek_pairs and not m.mode_seek:
        raise InputError("model.mode_seek_pairs sets where the mode-seeking term is computed; give it a weight "
                         "too (model.mode_seek, e.g. 0.1)")
    if m.mode_seek_pairs > cfg.batch_size:
        raise InputError(f"model.mode_seek_pairs ({m.mode_seek_pairs}) takes that many captions of the batch; "
                         f"use at most --batch-size ({cfg.batch_size})")
    if m.sample_condition and not m.cond_aug:
        raise InputError("model.sample_condition samples the conditioning-augmentation condition; "
                         "it needs model.cond_aug")
    unknown = [p for p in m.diffaug.split(",") if p.strip() and p.strip() not in DIFFAUG_NAMES]
    if unknown:
        raise InputError(f"unknown model.diffaug part {unknown[0]!r}; use a comma list of {', '.join(DIFFAUG_NAMES)} "
                         "or \"\"")
    if m.image_size < 16 or m.image_size & (m.image_size - 1):
        raise InputError(f"model.image_size must be a power of two of at least 16 (16, 32, 64, 128), "
                         f"got {m.image_size}")
    if m.noise_layers == "chunks":
        try:
            noise_chunks(m)
        except ValueError as e:
            raise InputError(f"{e}; raise model.noise_dim or use model.noise_layers=concat") from None
    if cfg.split not in ("auto", "classes", "images", "all"):
        raise InputError(f"unknown split {cfg.split!r}; choose auto, classes, images or all")
    if not 0 <= cfg.name_mix < 1:  # 1 would drop every human caption
        raise InputError(f"name_mix must be at least 0 and below 1 (a fraction of the captions), got {cfg.name_mix}")


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as JSON-ready data (paths as strings): what config.json and checkpoints store."""
    return json.loads(json.dumps(asdict(cfg), default=str))


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """The inverse of config_to_dict. Raises TypeError/KeyError on data of another shape."""
    d = dict(d)
    model = ModelConfig(**d.pop("model"))
    for key in ("data_dir", "runs_dir", "embeddings", "inception"):
        if d.get(key) is not None:
            d[key] = Path(d[key])
    return TrainConfig(model=model, **d)


def read_run_config(path: Path) -> TrainConfig:
    """The config a run's config.json records (raises OSError, ValueError, KeyError or TypeError)."""
    return config_from_dict(json.loads(Path(path).read_text())["config"])


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


def check_fresh_start(cfg: TrainConfig, run_dir: Path) -> None:
    """--resume on a run with no checkpoint: the config.json of an earlier start must agree with `cfg`."""
    path = run_dir / "config.json"
    if not path.is_file():
        return
    try:
        saved = read_run_config(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}); delete it to start the run afresh, "
                              "or pick another --run") from None
    diffs = config_differences(saved, cfg)
    if diffs:
        raise CheckpointError(f"--resume: {'; '.join(diffs)} (run's vs now); start the run with the settings in "
                              f"{path} or pick another --run")
