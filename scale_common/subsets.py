"""Seeded, class-stratified subsets of a labelled set: image budgets and a validation split carved from training data.

Taking the first N images of a class-sorted set (an ImageFolder, the texture task) gives one class; a uniform random
draw gives the right classes only on average. Here every class gets its share: class ``c`` with ``n_c`` of ``n``
images gets ``floor(count * n_c / n)`` images, and the remaining slots go to the classes with the largest fractional
parts (largest-remainder rounding; ties broken by the seeded permutation), after first making sure that every class
has one image when ``count`` is at least the number of classes. Within a class the images are a seeded random draw.
So each class's count is within 1 of its exact proportional share (unless a class is so rare that giving it its one
image must take a slot from another), the result depends only on the labels, ``count``
and ``seed``, and the returned indices are sorted (the data keeps its on-disk order).

Pure numpy, no torch: the labels come from :attr:`cka_scale.data.ImageDataset.labels` without decoding an image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from scale_common.errors import ToolkitError

__all__ = ["stratified_split", "stratified_subset"]


def _labels_array(labels: Sequence[int]) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise ToolkitError(f"labels must be a flat sequence of integer class ids, got shape {array.shape} "
                           f"and dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _quotas(counts: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Per-class image numbers summing to ``count``: proportional, largest remainders, every class first."""
    total = int(counts.sum())
    exact = count * counts / total
    quota = np.floor(exact).astype(np.int64)
    if count >= len(counts):
        quota = np.maximum(quota, 1)  # every class present; the largest classes give the slots back below
    order = rng.permutation(len(counts))  # seeded tie-break, then stable sorts keep it among equals
    while quota.sum() > count:  # only after the every-class floor: take from the most over-served class with spare
        spare = np.where(quota > 1)[0]
        over = quota[spare] - exact[spare]
        quota[spare[np.argmax(over)]] -= 1
    remainder = exact - quota
    for cls in order[np.argsort(-remainder[order], kind="stable")]:
        if quota.sum() >= count:
            break
        if quota[cls] < counts[cls]:
            quota[cls] += 1
    return quota


def stratified_subset(labels: Sequence[int], count: int, seed: int) -> list[int]:
    """Indices of a seeded, class-stratified subset of ``count`` items.

    Args:
        labels: One integer class id per item (e.g. ``dataset.labels``).
        count: How many items to keep; ``count >= len(labels)`` keeps them all.
        seed: Seeds the draw: the same labels, count and seed always give the same subset.

    Returns:
        Sorted indices into ``labels``. Every class is present when ``count`` is at least the number of classes, and
        each class's number is within 1 of ``count * n_class / n`` unless that floor forces more (only when some
        classes hold under ``1 / count`` of the items: the slots they take come from the most over-served classes).

    Raises:
        ToolkitError: ``count`` is not positive, or the labels are not a flat integer sequence.

    Example:
        >>> stratified_subset([0] * 6 + [1] * 6, 4, seed=0)
        [3, 5, 6, 7]
    """
    array = _labels_array(labels)
    if count < 1:
        raise ToolkitError(f"a subset needs at least 1 item, got count={count}: pass a positive image count")
    if count >= len(array):
        return list(range(len(array)))
    rng = np.random.default_rng(seed)
    classes, inverse, counts = np.unique(array, return_inverse=True, return_counts=True)
    quota = _quotas(counts, count, rng)
    chosen: list[np.ndarray] = []
    for cls in range(len(classes)):
        members = np.flatnonzero(inverse == cls)
        chosen.append(rng.choice(members, size=int(quota[cls]), replace=False))
    return sorted(int(i) for i in np.concatenate(chosen))


def stratified_split(labels: Sequence[int], holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """Carve a seeded, class-stratified validation split of ``holdout`` items out of training data.

    Args:
        labels: One integer class id per training item.
        holdout: Number of items for validation (stratified as in :func:`stratified_subset`).
        seed: Seeds the draw.

    Returns:
        ``(train_indices, val_indices)``, both sorted, disjoint, together covering every index once.

    Raises:
        ToolkitError: ``holdout`` is not between 1 and ``len(labels) - 1``.
    """
    array = _labels_array(labels)
    if not 1 <= holdout < len(array):
        raise ToolkitError(f"a validation split of {holdout} from {len(array)} training items leaves no training or "
                           f"no validation data: choose between 1 and {len(array) - 1}")
    val = stratified_subset(array.tolist(), holdout, seed)
    taken = np.zeros(len(array), dtype=bool)
    taken[val] = True
    return np.flatnonzero(~taken).tolist(), val
