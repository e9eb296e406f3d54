"""Honest sample sizes: different draws for ``--repeats``, and notes when the images cannot carry the numbers.

Minibatch CKA of a few dozen images moves by tenths when one image is left out; a 95% interval wider than 0.1 cannot
tell layers apart; and the biased HSIC estimator drifts to 1 when features per image far exceed the images (Murphy,
Zylberberg & Fyshe 2024, "Correcting Biased Centered Kernel Alignment Measures in Biological and Artificial Neural
Networks", arXiv 2405.01012). :func:`sample_notes` turns each into a sentence that names the fix.
"""

from __future__ import annotations

import numpy as np
import torch

from cka_scale.config import AnalyzeConfig
from cka_scale.report import Report
from scale_common.errors import ToolkitError

__all__ = ["BIASED_RATIO", "MAX_WIDTH", "MIN_IMAGES", "draw_subsets", "sample_notes"]

#: Fewer images than this add a note: minibatch CKA of so few images is too noisy to compare layers.
MIN_IMAGES = 64
#: A 95% interval wider than this adds a note.
MAX_WIDTH = 0.1
#: The biased estimator warns when features per image exceed this many times the images per minibatch.
BIASED_RATIO = 10
_BIGGER = ("more --images, or a bigger --data source (--data stamps after `make data`, --data textures, "
           "or a folder of your own images)")


def draw_subsets(size: int, count: int, repeats: int, seed: int,
                 what: str = "the source") -> tuple[list[list[int]], str]:
    """Index lists of ``repeats`` different draws of ``count`` among ``size`` images, and how they relate.

    Disjoint slices of one permutation (seeded by ``seed``) when ``size >= repeats * count``; else one permutation per
    repeat (seeds ``seed + r``), checked to differ. Repeat 0 is the same draw either way.

    Args:
        size: Images in the source.
        count: Images per draw.
        repeats: Draws wanted.
        seed: Seed of the first draw.
        what: The source in words, for the error.

    Returns:
        The draws and ``"disjoint"`` or ``"overlapping"``.

    Raises:
        ToolkitError: ``repeats > 1`` and the draws cannot all differ (``count`` covers the whole source).
    """
    if size >= repeats * count:
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
        return [order[r * count:(r + 1) * count] for r in range(repeats)], "disjoint"
    draws = [torch.randperm(size, generator=torch.Generator().manual_seed(seed + r))[:count].tolist()
             for r in range(repeats)]
    if count >= size or len({tuple(sorted(d)) for d in draws}) < repeats:
        raise ToolkitError(f"--repeats {repeats} needs {repeats} different draws of {count} images, but {what} has "
                           f"only {size}: every repeat would measure the same images and show a zero spread. Use "
                           f"--images {max(1, size // repeats)} (disjoint draws), --repeats 1 (the report carries a "
                           f"95% interval anyway), or {_BIGGER.split(', or ', 1)[1]}")
    return draws, "overlapping"


def sample_notes(report: Report, cfg: AnalyzeConfig, minibatch: int) -> list[str]:
    """Notes on what the sample size allows: few images, wide or missing intervals, biased CKA of many features.

    Args:
        report: A finished report (with intervals and ``meta["images"]``, ``meta["minibatches"]``).
        cfg: The resolved analysis settings.
        minibatch: Images per HSIC minibatch.

    Returns:
        One sentence per problem, each naming the fix.
    """
    notes = []
    images = report.meta["images"]
    if images < MIN_IMAGES:
        notes.append(f"only {images} images: minibatch CKA of fewer than {MIN_IMAGES} images is too noisy to compare "
                     f"layers; use {_BIGGER}")
    widths = [(float(hi - lo), name, s) for s in report.scales if s != report.reference
              for lo, hi, name in zip(*report.interval(s), report.layer_names, strict=True)]
    finite = [w for w in widths if np.isfinite(w[0])]
    if len(finite) < len(widths):
        notes.append(f"no 95% interval for {len(widths) - len(finite)} of {len(widths)} CKA values "
                     f"({report.meta['minibatches']} HSIC minibatches; the jackknife needs 3 or more): use {_BIGGER}")
    if finite and max(finite)[0] > MAX_WIDTH:
        width, name, scale = max(finite)
        notes.append(f"the widest 95% interval is {width:.2f} ({name} at {scale}px), wider than {MAX_WIDTH}: "
                     f"differences smaller than that are not supported; use {_BIGGER}")
    if not cfg.unbiased:
        widest = max((_features(layer["shape"], cfg.spatial), layer["name"]) for layer in report.layers)
        if widest[0] > BIASED_RATIO * minibatch:
            notes.append(f"biased HSIC with {widest[0]} features per image ({widest[1]}) and {minibatch} images per "
                         "minibatch: biased CKA of many features tends to 1 even for unrelated representations "
                         "(Murphy, Zylberberg & Fyshe 2024, arXiv 2405.01012); drop --no-unbiased, or use "
                         "--spatial gap")
    return notes


def _features(shape: list[int], spatial: str) -> int:
    """Features per image of a layer output ``shape`` (without the batch axis) after the ``--spatial`` reduction."""
    if len(shape) < 3 or spatial == "flatten":
        return int(np.prod(shape))
    if spatial == "gap":
        return int(shape[0])
    side = int(spatial.split(":", 1)[1])
    return int(shape[0]) * side * side
