"""Seeds and random-number-generator states: one seed per (run, epoch), and states a checkpoint can carry."""

from __future__ import annotations

import json
import random
from typing import Any

import numpy as np
import torch

__all__ = ["rng_state", "seed_everything", "set_rng_state"]


def seed_everything(seed: int, epoch: int = -1) -> None:
    """Seed Python, NumPy and torch from ``(seed, epoch)``; epoch -1 is the model's initialisation."""
    value = seed * 1_000_003 + epoch
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def rng_state() -> dict[str, Any]:
    """The current Python, NumPy, torch (and CUDA) generator states, as tensors and plain values."""
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    state = {"python": json.dumps(random.getstate()), "numpy": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": int(pos), "numpy_gauss": [int(has_gauss), float(cached)], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by :func:`rng_state`."""
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
