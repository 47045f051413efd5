"""Keyed `.npz` cache files for expensive evaluation results (real-image features, statistics,
the real-image classifier), written atomically so an interrupted run never leaves half a file.

A file's name carries a readable part and a hash of its full key; the key is also stored inside
(`__key__`, JSON) and compared on load, so a changed network, image size or dataset never reuses a
stale file. Arrays only, loaded with allow_pickle=False.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flowercli.report import Reporter


def key_hash(key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_file(cache_dir: Path, kind: str, readable: str, key: Mapping[str, Any]) -> Path:
    return Path(cache_dir) / "eval" / f"{kind}-{readable}-{key_hash(key)}.npz"


def load(path: Path, key: Mapping[str, Any], reporter: Reporter = Reporter()) -> dict[str, np.ndarray] | None:
    """The arrays stored under `key`, or None when absent, unreadable or made for another key."""
    if not Path(path).is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = json.loads(str(data["__key__"]))
            arrays = {k: data[k] for k in data.files if k != "__key__"}
    except Exception as e:  # truncated zip, foreign file: recompute rather than fail
        reporter.warn(f"ignoring unreadable cache file {path} ({type(e).__name__}); recomputing")
        return None
    if stored != json.loads(json.dumps(key, sort_keys=True, default=str)):
        reporter.debug(f"cache file {path} was made for another key; recomputing")
        return None
    reporter.debug(f"cache hit {path}")
    return arrays


def save(path: Path, key: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Path:
    from flowercli.fsutil import atomic_write

    buf = io.BytesIO()
    # One dict of every array to store: numpy's stub would read a bare **arrays as possibly
    # holding savez's own allow_pickle keyword.
    payload: dict[str, Any] = {"__key__": np.array(json.dumps(key, sort_keys=True, default=str)), **arrays}
    np.savez(buf, **payload)
    atomic_write(Path(path), lambda f: f.write(buf.getvalue()))
    return Path(path)
