"""FLOPs measured by running a model under ``torch.utils.flop_counter`` (no hand-written counters).

Counted FLOPs are what :class:`torch.utils.flop_counter.FlopCounterMode` counts: 2 x the multiply-accumulates of
convolutions and matrix products (normalisation, activations, pooling and resizing are not counted). The MSUN and
MSDNet papers report multiply-accumulates under the name "FLOPs"; divide our numbers by 2 to compare.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "model_flops"]


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of everything ``fn()`` runs (under ``torch.no_grad``)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def model_flops(model: nn.Module | Callable[[torch.Tensor], Any], size: int | tuple[int, int], *,
                channels: int = 3, device: torch.device | str = "cpu") -> int:
    """FLOPs per image of ``model`` on one ``channels x size x size`` input.

    Args:
        model: A module or any callable taking an image batch.
        size: Input side (or ``(height, width)``) in pixels.
        channels: Input channels.
        device: Where to run the measuring pass.

    Returns:
        FLOPs for a single image (a batch of one is measured).
    """
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.zeros(1, channels, h, w, device=device)
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    try:
        return count_flops(lambda: model(x))
    finally:
        if isinstance(model, nn.Module) and was_training:
            model.train()
