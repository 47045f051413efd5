"""`flowercli embed`: caption text -> sentence vectors with a Hugging Face encoder -> one HDF5 file.

The encoder itself (finding its weights, tokenizing, pooling) is `textencoder.TextEncoder`; this
module is the stage around it: read the dataset's captions, embed each distinct one once, write
the embeddings file atomically.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flowercli import __version__
from flowercli.config import DataLayout, EmbedConfig
from flowercli.errors import DataError, EncoderError, InputError
from flowercli.fsutil import check_writable_dir
from flowercli.report import Reporter
from flowercli.textencoder import POOLINGS, TextEncoder, resolve_encoder, unique_texts

DTYPES = ("float16", "float32")
_FLOAT16_MAX = 65504.0


# ---------------------------------------------------------------------------------------------
# The stage.


def _validate(cfg: EmbedConfig) -> None:
    if cfg.pooling not in POOLINGS:
        raise InputError(f"unknown pooling '{cfg.pooling}': use one of {', '.join(POOLINGS)}")
    if cfg.dtype not in DTYPES:
        raise InputError(f"unknown dtype '{cfg.dtype}': use one of {', '.join(DTYPES)}")
    if cfg.batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {cfg.batch_size}")
    from flowercli.device import resolve_device

    resolve_device(cfg.device)


def _stored(vectors: np.ndarray, normalise: bool, dtype: str, encoder: str) -> np.ndarray:
    """Encoder output (n, D) float32 as the file stores it: L2-normalised if asked (in place: the
    caption vectors of a large encoder are hundreds of MB), in `dtype`."""
    if normalise:
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
    if dtype == "float16" and np.abs(vectors).max(initial=0.0) > _FLOAT16_MAX:
        raise EncoderError(f"encoder '{encoder}' gives values beyond the float16 range: use --dtype float32")
    return vectors.astype(dtype)


def embed_names(encoder: TextEncoder, names: Sequence[str], batch_size: int, normalise: bool,
                dtype: str) -> tuple[list[list[str]], np.ndarray]:
    """The species-name captions (classes x NAME_TEMPLATES) and their (C, T, D) vectors, made
    exactly as the caption vectors are (same encoder, pooling, normalisation and dtype)."""
    from flowercli.data import name_captions

    captions = name_captions(names)
    flat = [c for row in captions for c in row]
    vectors = _stored(encoder.encode(flat, batch_size), normalise, dtype, encoder.name)
    return captions, vectors.reshape(len(captions), len(captions[0]), encoder.dim)


def _names_cover(names: list[str] | None, labels: np.ndarray) -> bool:
    return names is not None and len(names) >= int(np.max(labels))


def _class_name_vectors(layout: DataLayout, labels: np.ndarray, encoder: TextEncoder, batch_size: int,
                        normalise: bool, dtype: str, report: Reporter):
    """(name captions, name vectors) when classnames.txt names every class, else (None, None)."""
    from flowercli import data

    names = data.read_class_names(layout)
    if names is None:
        return None, None
    if not _names_cover(names, labels):
        # Optional extras: the captions are still worth writing; training with name_mix says what is wrong.
        report.warn(f"{layout.dataset / 'classnames.txt'} names {len(names)} classes, the labels go up to "
                    f"{int(np.max(labels))}: no species-name vectors written")
        return None, None
    captions, vectors = embed_names(encoder, names, batch_size, normalise, dtype)
    report.info(f"Embedded {vectors.shape[0] * vectors.shape[1]} species-name captions "
                f"({vectors.shape[0]} classes x {vectors.shape[1]} templates)")
    return captions, vectors


def embed(cfg: EmbedConfig, report: Reporter = Reporter()) -> Path:
    """Embed every caption of the dataset under `cfg.data_dir`; return the HDF5 file written."""
    from flowercli import data
    from flowercli.embeddings import Embeddings, write_embeddings

    _validate(cfg)
    layout = DataLayout(Path(cfg.data_dir))
    data.require_dataset(layout)
    out_path = layout.embeddings_file(cfg.encoder)
    # Before the minutes of embedding, not after: a folder we cannot write fails now.
    check_writable_dir(out_path.parent, f"the embeddings folder {out_path.parent}",
                       "move what is in the way or choose another --data-dir")
    encoder_path = resolve_encoder(cfg.encoder)  # fails in seconds when the weights are out of reach
    labels = data.read_labels(layout)
    image_ids = np.arange(1, len(labels) + 1, dtype=np.int64)
    split = data.image_splits(layout, len(labels))
    class_split = data.class_split_of(labels, data.read_class_splits(layout))
    raw = data.read_captions(layout, image_ids, labels)
    padded, n_real = zip(*(data.pad_captions(c) for c in raw))
    n_short = sum(1 for k in n_real if k < data.CAPTIONS_PER_IMAGE)
    report.info(f"Read {len(labels)} images with captions from {layout.dataset}"
                + (f" ({n_short} have fewer than {data.CAPTIONS_PER_IMAGE}, padded by repeating)" if n_short else ""))

    t0 = time.perf_counter()
    report.info(f"Loading encoder {cfg.encoder} ...")
    encoder = TextEncoder.load(cfg.encoder, pooling=cfg.pooling, max_length=cfg.max_length, device=cfg.device,
                               path=encoder_path)
    report.debug(f"Encoder folder {encoder.path}, dim {encoder.dim}, device {encoder.device}, "
                 f"max_length {encoder.max_length}")

    flat = [c for caps in padded for c in caps]
    uniq, inverse = unique_texts(flat)
    tokens = encoder.tokenize(uniq)
    n_truncated = int(tokens.truncated.sum())
    if n_truncated:
        report.warn(f"{n_truncated} captions are longer than {encoder.max_length} tokens and were cut")
    t1 = time.perf_counter()
    with report.task(f"Embedding {len(uniq)} distinct captions", total=len(uniq)) as task:
        vectors = encoder.encode_tokens(tokens, cfg.batch_size, progress=task.advance)
    seconds = time.perf_counter() - t1
    vectors = _stored(vectors, cfg.normalise, cfg.dtype, cfg.encoder)
    vectors = vectors[inverse].reshape(len(labels), data.CAPTIONS_PER_IMAGE, encoder.dim)
    name_caps, name_vecs = _class_name_vectors(layout, labels, encoder, cfg.batch_size, cfg.normalise, cfg.dtype,
                                               report)

    attrs = {**encoder.describe(), "normalised": bool(cfg.normalise), "dtype": cfg.dtype,
             "flowercli_version": __version__, "n_images": len(labels), "n_captions_total": len(flat),
             "n_distinct_captions": len(uniq), "n_truncated": n_truncated, "device": str(encoder.device),
             "embed_seconds": round(seconds, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             **data.read_caption_set(layout)}
    emb = Embeddings(path=None, captions=[list(c) for c in padded], vectors=vectors,
                     n_captions=np.array(n_real, dtype=np.int64), labels=labels, image_ids=image_ids,
                     split=split, class_split=class_split, attrs=attrs, name_captions=name_caps,
                     name_vectors=name_vecs)
    out = write_embeddings(out_path, emb)
    report.info(f"Wrote {out}: vectors {vectors.shape} {cfg.dtype}, {len(flat) / max(seconds, 1e-9):.0f} captions/s "
                f"({len(uniq)} distinct embedded in {seconds:.1f} s; total {time.perf_counter() - t0:.1f} s)")
    return out


def add_name_vectors(path: Path, names: Sequence[str], device: str = "auto", batch_size: int = 256,
                     report: Reporter = Reporter()) -> bool:
    """Give an existing embeddings file the species-name vectors `embed` now writes, without
    embedding its captions again; True when the file was rewritten, False when it already had them.

    The encoder, pooling, max_length, normalisation and dtype are those the file records, so the
    name vectors are what `embed` would have made. The rewrite is atomic (temp file, rename).
    """
    from flowercli import data
    from flowercli.embeddings import open_embeddings, write_embeddings

    path = Path(path)
    emb = open_embeddings(path)
    names = list(names)
    if not _names_cover(names, emb.labels):
        raise DataError(f"the class names name {len(names)} classes but {path} has labels up to "
                        f"{int(np.max(emb.labels))}: check classnames.txt (one name per class, in label order)")
    if emb.name_captions == data.name_captions(names):
        return False
    attrs = emb.attrs
    if not attrs.get("encoder"):
        raise DataError(f"embeddings file {path} does not record its encoder: run `flowercli embed` again")
    report.info(f"Adding species-name vectors ({len(names)} classes x {len(data.NAME_TEMPLATES)} templates) to "
                f"{path}, with its encoder {attrs['encoder']}")
    try:
        encoder = TextEncoder.load(str(attrs["encoder"]), pooling=str(attrs.get("pooling", "mean")),
                                   max_length=int(attrs.get("max_length", 128)), device=device)
    except EncoderError as e:
        why = str(e).split(";")[0]  # the loader's advice (--encoder ...) does not apply: the file fixes it
        raise EncoderError(f"cannot embed the class names for {path} with the encoder it was made with ({why}); "
                           f"make {attrs['encoder']} available again, or run `flowercli embed` again") from None
    if encoder.dim != emb.dim:
        raise EncoderError(f"encoder {attrs['encoder']} now gives {encoder.dim}-d vectors but {path} holds "
                           f"{emb.dim}-d ones: run `flowercli embed` again")
    emb.name_captions, emb.name_vectors = embed_names(encoder, names, batch_size, bool(attrs.get("normalised")),
                                                      str(emb.vectors.dtype))
    mtime = path.stat().st_mtime_ns
    write_embeddings(path, emb)
    # Same captions, same vectors: keep the file's age, which picks the default embeddings of `train`.
    os.utime(path, ns=(time.time_ns(), mtime))
    return True
