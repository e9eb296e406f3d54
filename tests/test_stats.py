"""Bootstrap intervals for accuracies and paired differences, on cases with a known answer."""

import numpy as np
import pytest
from scipy import stats as sps

from msun_builder.stats import (
    accuracy_ci,
    average_accuracy_ci,
    average_difference_ci,
    bootstrap_mean_ci,
    difference_ci,
)
from scale_common.errors import ToolkitError


def test_binomial_interval_covers_the_true_accuracy_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(0)
    p, n, trials = 0.85, 200, 300
    hits = 0
    for t in range(trials):
        correct = rng.random(n) < p
        est, low, high = accuracy_ci(correct, resamples=1000, seed=t)
        assert low <= est <= high and est == correct.mean()
        hits += low <= p <= high
    assert 0.90 <= hits / trials <= 0.99, hits / trials


def test_width_matches_the_binomial_standard_error() -> None:
    correct = np.r_[np.ones(850), np.zeros(150)]
    _, low, high = accuracy_ci(correct)
    se = np.sqrt(0.85 * 0.15 / 1000)
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_agrees_with_scipy_for_the_image_only_bootstrap() -> None:
    rng = np.random.default_rng(1)
    x = (rng.random(400) < 0.7).astype(float)
    ours = bootstrap_mean_ci(x, resamples=4000)
    for method in ("percentile", "BCa"):
        ref = sps.bootstrap((x,), np.mean, n_resamples=4000, method=method, rng=np.random.default_rng(2))
        assert ours.low == pytest.approx(ref.confidence_interval.low, abs=0.01)
        assert ours.high == pytest.approx(ref.confidence_interval.high, abs=0.01)


def test_identical_inputs_give_a_zero_width_difference_and_a_shift_the_right_sign() -> None:
    rng = np.random.default_rng(3)
    a = (rng.random((3, 500)) < 0.8).astype(float)
    assert difference_ci(a, a) == (0.0, 0.0, 0.0)
    better = a.copy()
    better[:, :60] = 1.0  # A right on 60 more images than B... at most
    flipped = a.copy()
    flipped[:, 60:120] = 0.0
    est, low, high = difference_ci(better, flipped)
    assert est > 0 and low > 0
    est, low, high = difference_ci(flipped, better)
    assert est < 0 and high < 0


def test_pairing_narrows_the_difference_interval() -> None:
    rng = np.random.default_rng(4)
    hard = rng.random(2000) < 0.3  # images both methods get wrong
    a = (~hard & (rng.random(2000) < 0.97)).astype(float)
    b = (~hard & (rng.random(2000) < 0.95)).astype(float)
    paired = difference_ci(a, b)
    la, ha = accuracy_ci(a)[1:]
    lb, hb = accuracy_ci(b)[1:]
    unpaired = np.hypot(ha - la, hb - lb)  # the width if A and B were scored on independent image samples
    assert paired.high - paired.low < 0.6 * unpaired


def test_seeds_average_per_image_and_resampling_them_widens_the_interval() -> None:
    rng = np.random.default_rng(5)
    seeds = np.stack([(rng.random(1000) < p).astype(float) for p in (0.6, 0.7, 0.8)])
    fixed = accuracy_ci(seeds)
    assert fixed.estimate == pytest.approx(seeds.mean())
    two_way = accuracy_ci(seeds, resample_seeds=True)
    assert two_way.estimate == fixed.estimate and two_way.high - two_way.low > 1.5 * (fixed.high - fixed.low)


def test_average_over_sizes_is_the_mean_of_per_size_accuracies() -> None:
    rng = np.random.default_rng(6)
    correct = (rng.random((4, 2, 300)) < np.array([0.2, 0.5, 0.8, 0.9])[:, None, None]).astype(float)
    avg = average_accuracy_ci(correct)
    assert avg.estimate == pytest.approx(np.mean([correct[s].mean() for s in range(4)]))
    assert avg.low < avg.estimate < avg.high
    assert average_difference_ci(correct, correct) == (0.0, 0.0, 0.0)
    d = average_difference_ci(correct, correct[:, :1])  # different seed counts: seed-averaged first
    assert d.estimate == pytest.approx(correct.mean() - correct[:, :1].mean())
    assert average_accuracy_ci(correct[:, 0]).estimate == pytest.approx(correct[:, 0].mean())  # (sizes, images)


def test_deterministic_per_seed_and_bad_input_refused() -> None:
    x = np.random.default_rng(7).random(100) < 0.5
    assert accuracy_ci(x, seed=1) == accuracy_ci(x, seed=1) != accuracy_ci(x, seed=2)
    with pytest.raises(ToolkitError, match="same test images"):
        difference_ci(np.ones(10), np.ones(11))
    with pytest.raises(ToolkitError, match="NaN"):
        accuracy_ci([1.0, np.nan])
    with pytest.raises(ToolkitError, match=r"\(seeds, images\)"):
        accuracy_ci(np.ones((2, 2, 2)))
