"""Typed, frozen configuration for each stage, and the data-directory layout.

This is the only place defaults live; the CLI and the Python API both build these.
Standard library only: `flowercli --help` must not pay for importing torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "FLOWERCLI_DATA_DIR"
RUNS_DIR_ENV = "FLOWERCLI_RUNS_DIR"


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or "data")


def default_runs_dir() -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV) or "runs")


@dataclass(frozen=True)
class DataLayout:
    """Where every stage reads and writes under one data directory (see docs/DESIGN in shared)."""

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
class DownloadConfig:
    data_dir: Path
    # A folder or base URL holding the official file names; None = the official sources.
    mirror: str | None = None
    # A captions archive (tar/tgz/zip) path or URL; None = Reed et al. 2016 on Google Drive.
    captions: str | None = None
    timeout: float = 30.0
    retries: int = 5


@dataclass(frozen=True)
class EmbedConfig:
    data_dir: Path
    encoder: str = "roberta-large"
    pooling: str = "mean"  # mean | cls
    batch_size: int = 256
    device: str = "auto"  # auto | cpu | cuda
    max_length: int = 128
    dtype: str = "float16"  # storage precision of the vectors
