"""Small helpers on ``nn.Module``: parameter counts and a scoped eval mode without gradients."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["count_params", "eval_no_grad"]


def count_params(model: nn.Module) -> int:
    """The number of parameters of ``model`` (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


@contextmanager
def eval_no_grad(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode without gradients for the block; its train/eval mode is restored after.

    Yields:
        The model itself.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)
