"""The scale-invariant constraint of MSUN: pull the subnets' unified-size features of one image together.

Liu, Zhu & Liu 2024 (arXiv 2403.18294) add to the branches' cross-entropies the MSE between every pair of subnet
outputs resized to the unified size U, each term replaced by 0 below a truncation ``tau``, weight 1, gradients
into both sides (the authors' code, ``SmallPigPeppa/MSC``). Options here: the pair set (``all`` or only pairs with
the reference branch), detaching the reference branch, and two alternatives to MSE: cosine distance and 1 - linear
CKA over the batch (differentiable, from :mod:`cka_scale.functional`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scale_common.errors import ToolkitError

__all__ = ["SI_KINDS", "ScaleInvariantLoss"]


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a, b)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean()


def _cka(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from cka_scale.functional import linear_cka

    return (1.0 - linear_cka(a.flatten(1).float(), b.flatten(1).float())).to(a.dtype)


#: Registered distances between two branches' features: name -> function returning a scalar tensor.
SI_KINDS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": _mse, "cosine": _cosine, "cka": _cka}


class ScaleInvariantLoss(nn.Module):
    """Weighted sum of truncated pairwise distances between branch features.

    Args:
        weight: lambda, the weight of the summed terms (paper: 1).
        tau: A term below ``tau`` counts as 0 (paper: 0.01 for ResNet-50, 0.001 for the other backbones).
        pairs: ``all`` pairs of branches (paper) or only ``reference`` pairs (each branch with the largest scale).
        detach_reference: Stop gradients into the reference branch (paper: no).
        kind: ``mse`` (paper), ``cosine`` or ``cka`` (1 - linear CKA over the batch).
    """

    def __init__(self, weight: float = 1.0, tau: float = 0.01, pairs: str = "all", detach_reference: bool = False,
                 kind: str = "mse") -> None:
        super().__init__()
        if kind not in SI_KINDS:
            raise ToolkitError(f"unknown scale-invariant loss {kind!r}: use one of {', '.join(SI_KINDS)}")
        if pairs not in ("all", "reference"):
            raise ToolkitError(f"--si-pairs must be all or reference, got {pairs!r}")
        if weight < 0 or tau < 0:
            raise ToolkitError("--si-weight and --si-tau must be >= 0")
        self.weight, self.tau, self.pairs, self.detach_reference, self.kind = weight, tau, pairs, detach_reference, kind

    def forward(self, features: Sequence[torch.Tensor], scales: Sequence[int]) -> tuple[torch.Tensor, dict[str, float]]:
        """Total constraint and each raw term (logged as ``si_<a>_<b>``).

        Args:
            features: One ``(N, C, U, U)`` tensor per branch, in ``scales`` order.
            scales: The branches' input sizes; the largest is the reference.

        Returns:
            ``(weight * sum of kept terms, {term name: raw value})``.
        """
        if len(features) != len(scales) or len(features) < 2:
            raise ToolkitError("the scale-invariant loss needs one feature map per branch, at least two branches")
        ref = max(range(len(scales)), key=lambda i: scales[i])
        feats = [f.detach() if (self.detach_reference and i == ref) else f for i, f in enumerate(features)]
        pairs = [(i, j) for i in range(len(feats)) for j in range(i + 1, len(feats))
                 if self.pairs == "all" or ref in (i, j)]
        distance = SI_KINDS[self.kind]
        total = feats[0].new_zeros(())
        logs: dict[str, float] = {}
        for i, j in pairs:
            term = distance(feats[i], feats[j])
            logs[f"si_{scales[i]}_{scales[j]}"] = float(term.detach())
            if float(term.detach()) >= self.tau:
                total = total + term
        return self.weight * total, logs
