"""Settings of a CKA analysis: one dataclass whose defaults the command line shows and never repeats.

Kept free of torch so ``cka-scale --help`` answers at once; validation that needs the kernels imports them lazily.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from scale_common.errors import ToolkitError

__all__ = ["RESIZE_MODES", "AnalyzeConfig"]

RESIZE_MODES = ("down-up", "native")


@dataclass(frozen=True)
class AnalyzeConfig:
    """Everything ``cka-scale analyze`` needs; the CLI fills it from its flags.

    Attributes:
        model: timm model name (a label when a model object is passed to :func:`analyze`).
        scales: Input sizes to compare.
        reference: The scale the others are compared with; the largest when None.
        resize: ``down-up`` (shrink to s, re-enlarge to the reference: the paper's) or ``native`` (feed s x s).
        spatial: ``flatten`` (C*H*W, the paper's), ``gap`` or ``pool:K``.
        kernel: ``linear`` or ``rbf``.
        threshold: RBF bandwidth as a fraction of the median distance.
        unbiased: Unbiased HSIC (minibatch CKA) when True, biased HSIC per batch otherwise.
        images: Images per repeat (a smaller source is used whole).
        batch_size: Images per forward pass and per HSIC minibatch, at most: smaller when ``images`` would give fewer
            than 8 minibatches, so that the jackknife interval exists (:func:`cka_scale.accumulate.minibatch_size`).
        repeats: Different draws of ``images`` images (disjoint when the source holds ``repeats x images``; mean,
            std and a combined 95% interval over them).
        seed: Seed of the draws (disjoint slices of one permutation; overlapping draws use ``seed + r``).
        data: ``samples``, ``stamps``, ``textures``, ``fashion-mnist``, ``fashion-mnist-subset`` or a directory.
        split: Data split to draw from.
        weights: ``auto``, ``none`` or a state-dict path.
        layers: ``stages``, ``blocks``, ``all`` or comma-separated globs.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        num_workers: DataLoader worker processes.
    """

    model: str
    scales: tuple[int, ...] = (64, 128, 224)
    reference: int | None = None
    resize: str = "down-up"
    spatial: str = "flatten"
    kernel: str = "linear"
    threshold: float = 1.0
    unbiased: bool = True
    images: int = 256
    batch_size: int = 64
    repeats: int = 1
    seed: int = 0
    data: str = "samples"
    split: str = "test"
    weights: str = "auto"
    layers: str = "stages"
    device: str = "auto"
    num_workers: int = 0

    def resolved(self) -> AnalyzeConfig:
        """Validate every field and fill the defaults (sorted unique scales, the reference).

        Raises:
            ToolkitError: A field is out of range; the message names the flag and the fix.
        """
        from cka_scale.functional import list_kernels
        from cka_scale.hooks import parse_spatial

        scales = tuple(sorted({int(s) for s in self.scales}))
        if not scales or any(s <= 0 for s in self.scales):
            raise ToolkitError(f"--scales must be positive integers, got {list(self.scales)}")
        if len(scales) < 2:
            raise ToolkitError(f"--scales needs at least two different sizes to compare, got {list(scales)}")
        reference = max(scales) if self.reference is None else int(self.reference)
        if reference not in scales:
            raise ToolkitError(f"--reference {reference} is not one of --scales {','.join(map(str, scales))}")
        if self.resize not in RESIZE_MODES:
            raise ToolkitError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.kernel not in list_kernels():
            raise ToolkitError(f"--kernel must be one of {', '.join(list_kernels())}, got {self.kernel!r}")
        parse_spatial(self.spatial)
        min_batch = 4 if self.unbiased else 2
        for flag, value, low in (("--images", self.images, min_batch), ("--batch-size", self.batch_size, min_batch),
                                 ("--repeats", self.repeats, 1), ("--num-workers", self.num_workers, 0)):
            if value < low:
                why = " (the unbiased HSIC estimator needs 4 samples per batch)" if low == 4 else ""
                raise ToolkitError(f"{flag} must be at least {low}{why}, got {value}")
        if self.threshold <= 0:
            raise ToolkitError(f"--threshold must be positive, got {self.threshold}")
        return dataclasses.replace(self, scales=scales, reference=reference)
