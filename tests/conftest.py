"""Synthetic, offline fixtures in the official formats.

`make_sources(dir)` writes what the official download gives, in miniature:
`102flowers.tgz` (tiny JPEGs under `jpg/`), `imagelabels.mat`, `setid.mat`, and a captions
archive `captions.tgz` laid out like Reed et al.'s `cvpr2016_flowers.tar.gz`
(`<top>/text_c10/class_XXXXX/image_XXXXX.txt` plus the class split files).
Each class has its own colour so that tiny models can learn something checkable.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

N_CLASSES = 4
PER_CLASS = 6
N_IMAGES = N_CLASSES * PER_CLASS
IMAGE_SIZE = 32
COLOURS = {1: ("red", (220, 30, 30)), 2: ("yellow", (230, 220, 40)), 3: ("blue", (40, 60, 220)), 4: ("white", (240, 240, 240))}
# Class split in the Reed layout: 1,2 train, 3 val, 4 test.
SPLITS = {"train": [1, 2], "val": [3], "test": [4], "trainval": [1, 2, 3], "all": [1, 2, 3, 4]}


def image_label(image_id: int) -> int:
    """Images are interleaved across classes, as in the real dataset (ids are not sorted by class)."""
    return (image_id - 1) % N_CLASSES + 1


def captions_for(image_id: int) -> list[str]:
    name = COLOURS[image_label(image_id)][0]
    forms = ["this flower has {c} petals", "a {c} flower with round petals", "the petals are {c}",
             "a flower with {c} petals and a small centre", "this {c} flower is small",
             "{c} petals surround a dark centre", "a small {c} bloom", "the flower is {c}",
             "a {c} flower", "petals of {c} colour"]
    return [f.format(c=name) for f in forms]


def _jpeg_bytes(image_id: int, size: int = IMAGE_SIZE) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(image_id)
    colour = np.array(COLOURS[image_label(image_id)][1], dtype=np.float32)
    img = np.full((size, size, 3), 60.0, dtype=np.float32)  # dark background
    yy, xx = np.mgrid[:size, :size]
    r = size * (0.3 + 0.1 * rng.random())
    mask = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r
    img[mask] = colour
    img += rng.normal(0, 8, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_sources(root: Path, captions_top: str = "cvpr2016_flowers", short_captions: int = 0) -> Path:
    """Write the miniature official files into `root`; return `root`.

    `short_captions`: how many images get only 5 captions instead of 10 (real data has a few).
    Also writes `SHA256SUMS` as a mirror would.
    """
    import scipy.io

    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "102flowers.tgz", "w:gz") as tar:
        _add_dir(tar, "jpg")
        for i in range(1, N_IMAGES + 1):
            _add_bytes(tar, f"jpg/image_{i:05d}.jpg", _jpeg_bytes(i))
    labels = np.array([[image_label(i) for i in range(1, N_IMAGES + 1)]], dtype=np.uint8)
    scipy.io.savemat(root / "imagelabels.mat", {"labels": labels})
    ids = np.arange(1, N_IMAGES + 1)
    scipy.io.savemat(
        root / "setid.mat",
        {"trnid": ids[0::3][None].astype(np.uint16), "valid": ids[1::3][None].astype(np.uint16),
         "tstid": ids[2::3][None].astype(np.uint16)},
    )
    with tarfile.open(root / "captions.tgz", "w:gz") as tar:
        top = f"{captions_top}/" if captions_top else ""
        _add_dir(tar, f"{top}text_c10")
        for c in range(1, N_CLASSES + 1):
            _add_dir(tar, f"{top}text_c10/class_{c:05d}")
        for i in range(1, N_IMAGES + 1):
            lines = captions_for(i)
            if i <= short_captions:
                lines = lines[:5]
            _add_bytes(tar, f"{top}text_c10/class_{image_label(i):05d}/image_{i:05d}.txt",
                       ("\n".join(lines) + "\n").encode())
        for split, classes in SPLITS.items():
            _add_bytes(tar, f"{top}{split}classes.txt", "".join(f"class_{c:05d}\n" for c in classes).encode())
    names = ["102flowers.tgz", "imagelabels.mat", "setid.mat", "captions.tgz"]
    (root / "SHA256SUMS").write_text("".join(f"{sha256(root / n)}  {n}\n" for n in names))
    return root


@pytest.fixture(scope="session")
def sources_dir(tmp_path_factory) -> Path:
    """Miniature official files (read-only by convention: copy before corrupting)."""
    return make_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    """A tiny randomly initialised RoBERTa with a byte-level BPE tokenizer, saved as a HF folder."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-roberta")
    corpus = [c for i in range(1, N_IMAGES + 1) for c in captions_for(i)] * 4
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    raw = folder / "bpe"
    raw.mkdir()
    bpe.save_model(str(raw))
    # transformers 5 ignores vocab_file= arguments of fast tokenizers: load the folder instead.
    tok = RobertaTokenizerFast.from_pretrained(raw, model_max_length=64)
    tok.save_pretrained(folder)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=80, pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    import torch

    torch.manual_seed(0)
    RobertaModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def embedded_dir(dataset_dir, tiny_roberta, tmp_path_factory) -> Path:
    """A data dir with the miniature dataset and its tiny-RoBERTa embeddings (read-only by convention)."""
    import shutil

    from flowercli.config import EmbedConfig
    from flowercli.embed import embed

    root = tmp_path_factory.mktemp("embedded")
    shutil.copytree(dataset_dir / "oxford102", root / "oxford102")
    embed(EmbedConfig(data_dir=root, encoder=str(tiny_roberta), batch_size=64, device="cpu"))
    return root


def make_dataset(sources: Path, root: Path) -> Path:
    """Lay out `<root>/oxford102/` as `flowercli download` leaves it, from `make_sources` files."""
    import json
    import shutil

    d = root / "oxford102"
    d.mkdir(parents=True)
    with tarfile.open(sources / "102flowers.tgz") as t:
        t.extractall(d, filter="data")
    for name in ("imagelabels.mat", "setid.mat"):
        shutil.copy(sources / name, d / name)
    unpacked = root / ".captions"
    with tarfile.open(sources / "captions.tgz") as t:
        t.extractall(unpacked, filter="data")
    text_c10 = next(unpacked.rglob("text_c10"))
    shutil.move(str(text_c10), d / "text_c10")
    for f in text_c10.parent.glob("*classes.txt"):
        shutil.move(str(f), d / f.name)
    shutil.rmtree(unpacked)
    (d / "classnames.txt").write_text("".join(f"{COLOURS[c][0]} flower\n" for c in range(1, N_CLASSES + 1)))
    (d / "manifest.json").write_text(json.dumps({"images": N_IMAGES, "classes": N_CLASSES, "synthetic": True}))
    return root


@pytest.fixture(scope="session")
def dataset_dir(sources_dir, tmp_path_factory) -> Path:
    """A data dir whose `oxford102/` holds the miniature dataset as `download` writes it
    (jpg/, .mat files, text_c10/, *classes.txt, classnames.txt, manifest.json).
    Read-only by convention: copy it (shutil.copytree) before changing anything."""
    return make_dataset(sources_dir, tmp_path_factory.mktemp("dataset"))
