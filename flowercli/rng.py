"""Randomness that repeats: seeds derived from (seed, purpose, step, rank), and the global RNG states.

Training draws each step's random numbers from a generator seeded by (seed, step, rank) rather
than from one stream carried along, so a run resumed at any step draws what it would have drawn.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def derived_seed(*key: int) -> int:
    """A well-mixed 63-bit seed from integers (Python's hash() of strings varies between processes)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The generator of one training step on one rank (on `device`)."""
    g = torch.Generator(device=device)
    g.manual_seed(derived_seed(seed, 1, step, rank))
    return g


def rng_states() -> dict[str, Any]:
    """torch's, numpy's and Python's global RNG states, as plain data a checkpoint can hold."""
    # The loop itself draws from per-step generators; the global states are saved so that any
    # code outside it that uses them (and a resumed run) sees the same numbers.
    return {"torch": torch.get_rng_state(), "numpy": _np_state(), "python": list(_py_state())}


def _np_state():
    # The global RandomState is MT19937, whose legacy state is this tuple (numpy's stub types the
    # call without arguments as the dict form, which only legacy=False returns).
    state = np.random.get_state(legacy=True)
    assert isinstance(state, tuple)
    name, keys, pos, has_gauss, gauss = state
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss,
            "name": name}


def _py_state():
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def set_rng_states(s: dict[str, Any]) -> None:
    """Restore what rng_states() returned."""
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, state, gauss = s["python"]
    random.setstate((version, tuple(state), gauss))
