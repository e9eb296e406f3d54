"""Seeded, class-stratified subsets and validation splits (issue 12: the first N images of a sorted set)."""

import numpy as np
import pytest

from cka_scale.data import open_dataset
from scale_common.errors import ToolkitError
from scale_common.subsets import stratified_split, stratified_subset


def test_a_class_sorted_set_gives_every_class() -> None:
    labels = open_dataset("textures", "test").labels  # 64 crops of one class, then the next: the trap
    assert labels[:32] == [0] * 32
    picked = stratified_subset(labels, 32, seed=0)
    counts = np.bincount([labels[i] for i in picked], minlength=5)
    assert len(picked) == 32 and (counts >= 6).all() and (counts <= 7).all()
    assert picked == sorted(picked) and len(set(picked)) == 32
    assert sorted({labels[i] for i in stratified_subset(labels, 5, seed=3)}) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("count", [7, 50, 333])
def test_each_class_is_within_one_of_its_exact_share(seed: int, count: int) -> None:
    rng = np.random.default_rng(100 + seed)
    labels = np.repeat(np.arange(6), rng.integers(20, 200, size=6))
    rng.shuffle(labels)
    picked = stratified_subset(labels.tolist(), count, seed=seed)
    got = np.bincount(labels[picked], minlength=6)
    exact = count * np.bincount(labels, minlength=6) / len(labels)
    assert got.sum() == count and np.abs(got - exact).max() < 1
    if count >= 6:
        assert (got >= 1).all()


def test_a_rare_class_still_gets_one() -> None:
    labels = [0] * 991 + list(range(1, 10))  # nine classes of one item each
    picked = stratified_subset(labels, 10, seed=0)
    assert sorted(labels[i] for i in picked) == list(range(10))


def test_the_seed_decides_and_only_the_seed() -> None:
    labels = np.repeat(np.arange(10), 100).tolist()
    assert stratified_subset(labels, 100, seed=1) == stratified_subset(labels, 100, seed=1)
    assert stratified_subset(labels, 100, seed=1) != stratified_subset(labels, 100, seed=2)
    assert stratified_subset(labels, 5000, seed=1) == list(range(1000))  # more than there is: all of it


def test_split_is_disjoint_covering_and_stratified() -> None:
    labels = np.repeat(np.arange(4), [100, 50, 30, 20]).tolist()
    train, val = stratified_split(labels, 40, seed=7)
    assert sorted(train + val) == list(range(200)) and not set(train) & set(val)
    assert np.bincount([labels[i] for i in val], minlength=4).tolist() == [20, 10, 6, 4]
    assert stratified_split(labels, 40, seed=8)[1] != val
    with pytest.raises(ToolkitError, match="choose between 1 and 199"):
        stratified_split(labels, 200, seed=0)
    with pytest.raises(ToolkitError, match="at least 1 item"):
        stratified_subset(labels, 0, seed=0)
    with pytest.raises(ToolkitError, match="integer class ids"):
        stratified_subset([0.5, 1.5], 1, seed=0)
