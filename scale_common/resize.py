"""The one image resize of the toolkit: bilinear, no antialias (the MSUN authors' protocol), and shrink-then-enlarge.

Used by the CKA analysis (``down-up`` mode), by MSUN to bring every subnet's features to the unified size, and by
training and evaluation to make the smaller scales of a batch. Keeping one function is what keeps the protocol one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["down_up", "resize"]


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a batch ``(N, C, H, W)`` to ``size`` x ``size``; a batch already that size is returned as is.

    Matches the MSUN authors' ``F.interpolate(..., mode="bilinear")``: ``align_corners=False`` and no antialias
    filter when shrinking (so small sizes alias, as in their evaluation).

    Args:
        x: Images or feature maps.
        size: The output side in pixels.

    Returns:
        The resized batch.
    """
    if x.shape[-2] == size and x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def down_up(x: torch.Tensor, size: int, reference: int | None = None) -> torch.Tensor:
    """The paper's test-size protocol: shrink to ``size``, then re-enlarge to ``reference`` (both bilinear).

    Args:
        x: Images at the reference size.
        size: The size the information is reduced to.
        reference: The side to re-enlarge to; the input's own side when None.

    Returns:
        The batch at the reference side, carrying only ``size`` x ``size`` worth of detail.
    """
    return resize(resize(x, size), x.shape[-1] if reference is None else reference)
