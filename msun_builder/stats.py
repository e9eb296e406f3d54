"""95% intervals for accuracies and paired accuracy differences: a paired bootstrap over test images, over seeds.

Input is per-image correctness, one row per training seed: ``correct[seed, image]`` is 1 when the run trained with
that seed classifies that test image correctly (0/1, or a fraction). Every statistic here is a mean over images of a
per-image value, so one bootstrap serves all of them:

- **accuracy** of a configuration: per image, the correctness averaged over seeds; the estimate is its mean;
- **difference** A - B (e.g. MSUN - MST): per image, A's seed-averaged correctness minus B's. Resampling these
  differences resamples the *same* images for both methods (a paired bootstrap): the shared difficulty of an image
  cancels, which makes a difference far better determined than the two accuracies' intervals suggest;
- **average over sizes**: per image, the correctness averaged over the test sizes (and seeds) first, then as above.

The interval is the percentile bootstrap (Efron & Tibshirani 1993, ch. 13): ``resamples`` = 2000 draws of the images
with replacement (seeded, so a table is reproducible), the 2.5th and 97.5th percentiles of the resampled means. It
is computed here in numpy rather than with ``scipy.stats.bootstrap`` because the per-image design above needs a custom
resampling (and, optionally, seeds); for the image-only case the two agree (tests). Percentile rather than BCa: for a
mean of bounded per-image values over thousands of images the two agree to well under the Monte Carlo error, BCa's
jackknife costs one pass per image, and BCa is undefined for the two-way resampling and for an all-correct column.

What the interval covers: with ``resample_seeds=False`` (the default) the trained runs are held fixed and only the
test sample varies: "how accurate are these runs on images like these". With ``resample_seeds=True`` each resample
also draws the seeds with replacement (a two-way bootstrap of the seed x image table, Owen 2007), so training noise
widens the interval too. It is conservative (it counts the seed x image noise twice: for 3 seeds that agree on average
it is about 1.7x wider than the image-only interval, which then is the right one), and its between-seed part rests on
3 values when there are 3 seeds; report the seeds' spread beside it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from scale_common.errors import ToolkitError

__all__ = ["Interval", "accuracy_ci", "average_accuracy_ci", "average_difference_ci", "bootstrap_mean_ci",
           "difference_ci"]

RESAMPLES = 2000
LEVEL = 0.95
_CHUNK_ELEMENTS = 4_000_000  # resampled values held at once


class Interval(NamedTuple):
    """A point estimate and its confidence interval (fractions, e.g. 0.853, when the input is 0/1 correctness).

    Attributes:
        estimate: The statistic on the full data.
        low: Lower end of the interval.
        high: Upper end of the interval.
    """

    estimate: float
    low: float
    high: float


def _table(values: ArrayLike, name: str, ndim: int) -> np.ndarray:
    """``values`` as float64 with ``ndim`` dimensions, the seed axis (second to last) added when missing."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == ndim - 1:
        array = np.expand_dims(array, -2)  # one seed
    if array.ndim != ndim or array.shape[-1] == 0 or 0 in array.shape:
        want = "(seeds, images)" if ndim == 2 else "(sizes, seeds, images)"
        raise ToolkitError(f"{name} must be a {want} array of per-image correctness, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ToolkitError(f"{name} holds NaN or infinite values: pass 0/1 correctness per image")
    return array


def bootstrap_mean_ci(values: ArrayLike, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0,
                      resample_seeds: bool = False) -> Interval:
    """Percentile-bootstrap interval of the mean of a ``(seeds, images)`` table, resampling images (and seeds).

    Args:
        values: Per-image values, shape ``(seeds, images)`` or ``(images,)`` for one seed.
        resamples: Bootstrap resamples.
        level: Confidence level.
        seed: Seeds the resampling.
        resample_seeds: Also draw the seeds (rows) with replacement in each resample.

    Returns:
        The mean over all entries and its interval.

    Raises:
        ToolkitError: A malformed table, or ``level`` outside (0, 1), or fewer than 100 resamples.
    """
    table = _table(values, "values", 2)
    if not 0 < level < 1 or resamples < 100:
        raise ToolkitError(f"need 0 < level < 1 and at least 100 resamples, got level={level}, resamples={resamples}")
    rng = np.random.default_rng(seed)
    seeds, images = table.shape
    per_image = table.mean(axis=0)
    chunk = max(1, _CHUNK_ELEMENTS // (images * (seeds if resample_seeds else 1)))
    means = []
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        picks = rng.integers(0, images, size=(b, images))
        if resample_seeds:
            rows = rng.integers(0, seeds, size=(b, seeds))
            means.append(table[rows[:, :, None], picks[:, None, :]].mean(axis=(1, 2)))
        else:
            means.append(per_image[picks].mean(axis=1))
    low, high = np.quantile(np.concatenate(means), [(1 - level) / 2, (1 + level) / 2])
    estimate = float(per_image.mean())
    return Interval(estimate, min(float(low), estimate), max(float(high), estimate))


def accuracy_ci(correct: ArrayLike, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0,
                resample_seeds: bool = False) -> Interval:
    """Accuracy and its interval from per-image correctness over seeds.

    Args:
        correct: 0/1 correctness, shape ``(seeds, images)`` or ``(images,)``.
        resamples: Bootstrap resamples.
        level: Confidence level.
        seed: Seeds the resampling.
        resample_seeds: Also resample the seeds (see the module docstring).

    Returns:
        Accuracy (a fraction) with its interval.

    Example:
        >>> accuracy_ci([[1, 1, 0, 1], [1, 0, 0, 1]]).estimate
        0.625
    """
    return bootstrap_mean_ci(_table(correct, "correct", 2),
                             resamples=resamples, level=level, seed=seed, resample_seeds=resample_seeds)


def _paired(a: ArrayLike, b: ArrayLike, ndim: int) -> np.ndarray:
    ta, tb = _table(a, "a", ndim), _table(b, "b", ndim)
    if ta.shape[-1] != tb.shape[-1] or ta.shape[:-2] != tb.shape[:-2]:
        raise ToolkitError(f"a and b must score the same test images (and sizes): shapes {ta.shape} vs {tb.shape}")
    if ta.shape[-2] != tb.shape[-2]:  # different seed counts: pair the seed-averaged correctness per image
        return ta.mean(axis=-2, keepdims=True) - tb.mean(axis=-2, keepdims=True)
    return ta - tb


def difference_ci(a: ArrayLike, b: ArrayLike, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0,
                  resample_seeds: bool = False) -> Interval:
    """Accuracy difference A - B and its paired interval (the same resampled images for both).

    Args:
        a: Correctness of method A, ``(seeds, images)`` or ``(images,)``.
        b: Correctness of method B on the same images in the same order. With the same number of seeds, seed
            ``i`` of A is paired with seed ``i`` of B (this matters only with ``resample_seeds``); otherwise
            each method is averaged over its own seeds first.
        resamples: Bootstrap resamples.
        level: Confidence level.
        seed: Seeds the resampling.
        resample_seeds: Also resample the seeds (see the module docstring).

    Returns:
        The difference (a fraction; positive when A is more accurate) with its interval.

    Raises:
        ToolkitError: The two do not cover the same images.
    """
    return bootstrap_mean_ci(_paired(a, b, 2),
                             resamples=resamples, level=level, seed=seed, resample_seeds=resample_seeds)


def average_accuracy_ci(correct: ArrayLike, *, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0,
                        resample_seeds: bool = False) -> Interval:
    """Accuracy averaged over test sizes, with its interval (per image: the mean over sizes, then the bootstrap).

    Args:
        correct: 0/1 correctness, shape ``(sizes, seeds, images)`` (or ``(sizes, images)`` for one seed), the same
            images at every size.
        resamples: Bootstrap resamples.
        level: Confidence level.
        seed: Seeds the resampling.
        resample_seeds: Also resample the seeds (see the module docstring).

    Returns:
        The unweighted mean over sizes of the accuracy, with its interval.
    """
    return bootstrap_mean_ci(_table(correct, "correct", 3).mean(axis=0),
                             resamples=resamples, level=level, seed=seed, resample_seeds=resample_seeds)


def average_difference_ci(a: ArrayLike, b: ArrayLike, *, resamples: int = RESAMPLES, level: float = LEVEL,
                          seed: int = 0, resample_seeds: bool = False) -> Interval:
    """Difference A - B of the accuracies averaged over sizes, with its paired interval.

    Args:
        a: Correctness of method A, ``(sizes, seeds, images)`` or ``(sizes, images)``.
        b: Correctness of method B at the same sizes, on the same images.
        resamples: Bootstrap resamples.
        level: Confidence level.
        seed: Seeds the resampling.
        resample_seeds: Also resample the seeds (see the module docstring).

    Returns:
        The difference of the size-averaged accuracies, with its interval.
    """
    return bootstrap_mean_ci(_paired(a, b, 3).mean(axis=0),
                             resamples=resamples, level=level, seed=seed, resample_seeds=resample_seeds)
