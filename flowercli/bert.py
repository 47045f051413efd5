"""BERT and RoBERTa encoders in plain PyTorch, for inference: a prompt is embedded without
importing transformers, which is most of a cold `flowercli generate` on a small CPU (about 2 s of
5-6 s on the 2-core machine of docs/BENCHMARKS.md).

The arithmetic is that of transformers' BertModel / RobertaModel in eval mode (absolute position
embeddings, post-LayerNorm blocks, exact GELU); tests/test_embed.py checks the hidden states against
transformers on random models and on the packaged MiniLM. Anything else (other architectures,
relative positions, weights without a safetensors file) goes through transformers instead: see
`supported`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODEL_TYPES = ("bert", "roberta")


def supported(folder: Path) -> bool:
    """Whether `folder` holds a model this module reproduces exactly (else: use transformers)."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (cfg.get("model_type") in MODEL_TYPES
            and cfg.get("position_embedding_type", "absolute") == "absolute"
            and cfg.get("hidden_act", "gelu") == "gelu"
            and not cfg.get("is_decoder", False)
            and (folder / "tokenizer.json").is_file()
            and (folder / "model.safetensors").is_file())


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, inner: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(hidden, hidden), nn.Linear(hidden, hidden),
                                            nn.Linear(hidden, hidden))
        self.attn_out, self.attn_norm = nn.Linear(hidden, hidden), nn.LayerNorm(hidden, eps=eps)
        self.inner, self.out = nn.Linear(hidden, inner), nn.Linear(inner, hidden)
        self.out_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape

        def split(x):
            return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(split(self.query(h)), split(self.key(h)), split(self.value(h)),
                                           attn_mask=bias)
        h = self.attn_norm(self.attn_out(a.transpose(1, 2).reshape(b, t, d)) + h)
        return self.out_norm(self.out(F.gelu(self.inner(h))) + h)


class Encoder(nn.Module):
    """Token ids + attention mask -> last hidden states (B, T, hidden)."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.config = SimpleNamespace(**cfg)
        hidden, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-12)
        self.roberta = cfg["model_type"] == "roberta"
        self.pad = cfg.get("pad_token_id") or 0
        self.word = nn.Embedding(cfg["vocab_size"], hidden)
        self.position = nn.Embedding(cfg["max_position_embeddings"], hidden)
        self.token_type = nn.Embedding(cfg.get("type_vocab_size", 2), hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.layers = nn.ModuleList(_Layer(hidden, cfg["num_attention_heads"], cfg["intermediate_size"], eps)
                                    for _ in range(cfg["num_hidden_layers"]))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        t = input_ids.shape[1]
        if self.roberta:
            # RoBERTa numbers positions after the padding index, skipping pads (fairseq's convention).
            real = input_ids.ne(self.pad).long()
            positions = torch.cumsum(real, 1) * real + self.pad
        else:
            positions = torch.arange(t, device=input_ids.device).expand_as(input_ids)
        h = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
        h = self.norm(h)
        # Additive mask: pads get the most negative float, so they receive no attention weight.
        bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        for layer in self.layers:
            h = layer(h, bias)
        return SimpleNamespace(last_hidden_state=h)


# transformers' parameter names -> ours (after any "bert." / "roberta." prefix is removed).
_RENAMES = (
    ("embeddings.word_embeddings.", "word."),
    ("embeddings.position_embeddings.", "position."),
    ("embeddings.token_type_embeddings.", "token_type."),
    ("embeddings.LayerNorm.", "norm."),
    ("attention.self.query.", "query."),
    ("attention.self.key.", "key."),
    ("attention.self.value.", "value."),
    ("attention.output.dense.", "attn_out."),
    ("attention.output.LayerNorm.", "attn_norm."),
    ("intermediate.dense.", "inner."),
    ("output.dense.", "out."),
    ("output.LayerNorm.", "out_norm."),
    ("encoder.layer.", "layers."),
)


def _rename(key: str) -> str | None:
    for prefix in ("bert.", "roberta.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.startswith("pooler.") or key.endswith("position_ids") or key.startswith(("lm_head.", "cls.")):
        return None  # not part of the last hidden layer
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def load_encoder(folder: Path) -> Encoder:
    """The encoder in `folder` (config.json + model.safetensors), weights checked key for key."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    model = Encoder(cfg)
    state = {}
    for key, value in load_file(str(folder / "model.safetensors")).items():
        name = _rename(key)
        if name is not None:
            state[name] = value.float()
    model.load_state_dict(state, strict=True)  # a missing or unexpected weight is an error, not a silent zero
    return model.eval()


class Tokenizer:
    """The folder's tokenizer.json through the `tokenizers` library, with the slice of the
    transformers tokenizer API that flowercli.textencoder uses."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as _Tokenizer

        folder = Path(folder)
        self._tok = _Tokenizer.from_file(str(folder / "tokenizer.json"))
        self._tok.no_padding()
        try:
            extra = json.loads((folder / "tokenizer_config.json").read_text())
        except (OSError, ValueError):
            extra = {}
        limit = extra.get("model_max_length")
        self.model_max_length = int(limit) if isinstance(limit, (int, float)) and math.isfinite(limit) else int(1e30)
        pad = extra.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        self.pad_token_id = self._tok.token_to_id(pad) if isinstance(pad, str) else None

    def __call__(self, texts: list[str], truncation: bool = True, max_length: int = 512, **_: Any) -> dict[str, list]:
        if truncation:
            self._tok.enable_truncation(max_length=max_length)
        else:
            self._tok.no_truncation()
        return {"input_ids": [e.ids for e in self._tok.encode_batch(list(texts))]}
