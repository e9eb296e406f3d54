"""Budgeted batch classification: proportions, thresholds against the official loop, sweeps, tables, and plots."""

import itertools
import math

import numpy as np
import pytest
import torch

from msun_builder.budget import (
    anytime_table,
    budget_sweep,
    budgeted_predict,
    exit_proportions,
    fit_thresholds,
    plot_budget,
)
from scale_common.errors import ToolkitError

K, C = 5, 10
FLOPS = [7e6, 14e6, 28e6, 42e6, 58e6]  # the shape of the authors' CIFAR-100 budgeted MSDNet


def _synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax outputs (K, n, C) where later exits are sharper and more often right, with hard and easy images."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, C, n)
    ease = rng.gamma(2.0, 1.0, n)  # per-image difficulty shared by all exits, as in real data
    logits = rng.normal(size=(K, n, C))
    strength = np.linspace(0.6, 2.0, K)[:, None] * ease[None]
    logits[:, np.arange(n), labels] += strength
    probs = np.exp(logits - logits.max(axis=2, keepdims=True))
    return probs / probs.sum(axis=2, keepdims=True), labels


VAL_PROBS, VAL_LABELS = _synthetic_split(3000, seed=1)
TEST_PROBS, TEST_LABELS = _synthetic_split(2000, seed=2)


def _official_thresholds(probs: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The port's dynamic_eval_find_threshold, transcribed as a plain per-sample loop (its 1e8 read as infinity)."""
    m, n, _ = probs.shape
    conf = probs.max(axis=2)
    order = np.argsort(-conf, axis=1, kind="stable")
    filtered = np.zeros(n)
    t = np.full(m, np.inf)
    for k in range(m - 1):
        out_n, count = math.floor(n * q[k] + 1e-9), 0
        for i in range(n):
            if filtered[order[k, i]] == 0:
                count += 1
                if count == out_n:
                    t[k] = conf[k, order[k, i]]
                    break
        filtered += conf[k] >= t[k]
    t[-1] = -np.inf
    return t


def _official_predict(probs: np.ndarray, t: np.ndarray) -> tuple[list[int], list[int]]:
    preds, exits = [], []
    for i in range(probs.shape[1]):
        for k in range(probs.shape[0]):
            if probs[k, i].max() >= t[k]:
                preds.append(int(probs[k, i].argmax()))
                exits.append(k)
                break
    return preds, exits


def test_synthetic_exits_get_better_with_depth() -> None:
    acc = [row["accuracy"] for row in anytime_table(VAL_PROBS, VAL_LABELS, FLOPS)]
    assert all(a < b for a, b in itertools.pairwise(acc)) and 0.3 < acc[0] and acc[-1] < 0.95, acc


def test_exit_proportions_are_geometric() -> None:
    q = exit_proportions(0.5, 4)
    np.testing.assert_allclose(q, np.array([8, 4, 2, 1]) / 15)
    powers = 1.95 ** np.arange(1, K + 1)
    np.testing.assert_allclose(exit_proportions(1.95, K), powers / powers.sum())
    np.testing.assert_allclose(exit_proportions(1.0, 3), [1 / 3] * 3)
    np.testing.assert_array_equal(exit_proportions(math.inf, 3), [0, 0, 1])
    np.testing.assert_allclose(exit_proportions(1e-3, 40).sum(), 1.0)
    for bad_p, bad_k in ((0.0, 3), (-1.0, 3), (0.5, 0)):
        with pytest.raises(ToolkitError):
            exit_proportions(bad_p, bad_k)


@pytest.mark.parametrize("p", [0.05, 0.4, 1.0, 1.5, 1.95])
def test_thresholds_reproduce_the_requested_proportions_on_validation(p: float) -> None:
    n = VAL_PROBS.shape[1]
    q = exit_proportions(p, K)
    thresholds = fit_thresholds(VAL_PROBS, q)
    _, exits = budgeted_predict(VAL_PROBS, thresholds)
    counts = np.bincount(exits, minlength=K)
    wanted = [math.floor(n * share) for share in q[:-1]]
    np.testing.assert_array_equal(counts[:-1], wanted)
    assert counts[-1] == n - sum(wanted)
    assert thresholds[-1] == -np.inf


@pytest.mark.parametrize("p", [0.3, 1.0, 1.7])
def test_thresholds_and_predictions_match_the_official_loops(p: float) -> None:
    q = exit_proportions(p, K)
    thresholds = fit_thresholds(torch.from_numpy(VAL_PROBS), q)
    np.testing.assert_array_equal(thresholds, _official_thresholds(VAL_PROBS, q))
    preds, exits = budgeted_predict(TEST_PROBS, thresholds)
    ref_preds, ref_exits = _official_predict(TEST_PROBS, thresholds)
    np.testing.assert_array_equal(preds, ref_preds)
    np.testing.assert_array_equal(exits, ref_exits)


def test_largest_budget_gives_the_last_exits_accuracy_exactly() -> None:
    thresholds = fit_thresholds(VAL_PROBS, np.eye(K)[-1])
    assert (thresholds[:-1] == np.inf).all()
    preds, exits = budgeted_predict(TEST_PROBS, thresholds)
    assert (exits == K - 1).all()
    np.testing.assert_array_equal(preds, TEST_PROBS[-1].argmax(axis=1))
    assert (preds == TEST_LABELS).mean() == anytime_table(TEST_PROBS, TEST_LABELS, FLOPS)[-1]["accuracy"]


def test_smallest_budget_sends_the_whole_fitting_split_out_first() -> None:
    preds, exits = budgeted_predict(VAL_PROBS, fit_thresholds(VAL_PROBS, np.eye(K)[0]))
    assert (exits == 0).all()
    assert (preds == VAL_LABELS).mean() == anytime_table(VAL_PROBS, VAL_LABELS, FLOPS)[0]["accuracy"]


def test_sweep_spans_the_exits_and_ends_at_the_last_exits_accuracy() -> None:
    table = anytime_table(TEST_PROBS, TEST_LABELS, FLOPS)
    rows = budget_sweep(VAL_PROBS, VAL_LABELS, TEST_PROBS, TEST_LABELS, FLOPS, ps=[*(j / 20 for j in range(1, 40)),
                                                                                    math.inf])
    assert [r["p"] for r in rows[:-1]] == [j / 20 for j in range(1, 40)]
    largest = rows[-1]
    assert largest["accuracy"] == table[-1]["accuracy"] and largest["flops"] == FLOPS[-1]
    assert largest["exit_fractions"] == [0.0] * (K - 1) + [1.0]
    for r in rows:
        assert FLOPS[0] <= r["flops"] <= FLOPS[-1]
        assert sum(r["exit_fractions"]) == pytest.approx(1.0)
    assert rows[-2]["accuracy"] > rows[0]["accuracy"] + 0.05  # more budget, more accuracy
    assert rows[0]["accuracy"] > table[0]["accuracy"]  # confident early exits beat exit 1 alone


def test_default_sweep_cost_rises_with_p_on_the_fitting_split() -> None:
    rows = budget_sweep(VAL_PROBS, VAL_LABELS, VAL_PROBS, VAL_LABELS, FLOPS)
    assert [r["p"] for r in rows] == [j / 20 for j in range(1, 40)]
    cost = [r["flops"] for r in rows]
    assert all(a < b for a, b in itertools.pairwise(cost)), cost
    assert all(r["accuracy"] == r["val_accuracy"] for r in rows)


def test_anytime_table_accepts_logits_and_checks_lengths() -> None:
    logits = torch.log(torch.from_numpy(TEST_PROBS)) * 3.0  # same argmax as the probabilities
    rows = anytime_table(logits, torch.from_numpy(TEST_LABELS), FLOPS)
    assert [r["exit"] for r in rows] == list(range(K)) and [r["flops"] for r in rows] == FLOPS
    expected = (TEST_PROBS.argmax(axis=2) == TEST_LABELS).mean(axis=1)
    assert [r["accuracy"] for r in rows] == pytest.approx(expected.tolist())
    with pytest.raises(ToolkitError, match="exit_flops"):
        anytime_table(TEST_PROBS, TEST_LABELS, FLOPS[:-1])
    with pytest.raises(ToolkitError, match="one label per sample"):
        anytime_table(TEST_PROBS, TEST_LABELS[:-1], FLOPS)
    with pytest.raises(ToolkitError, match="exits, samples, classes"):
        anytime_table(TEST_PROBS[0], TEST_LABELS, FLOPS)
    with pytest.raises(ToolkitError, match="one per exit"):
        fit_thresholds(VAL_PROBS, [0.5, 0.5])


def test_plot_writes_png_and_svg(tmp_path) -> None:
    rows = budget_sweep(VAL_PROBS, VAL_LABELS, TEST_PROBS, TEST_LABELS, FLOPS, ps=[0.2, 1.0, 1.9])
    table = anytime_table(TEST_PROBS, TEST_LABELS, FLOPS)
    paths = plot_budget(rows, table, tmp_path / "figs" / "budget", title="synthetic",
                        extra_curves={"vanilla model": [(50e6, 0.7)], "MSUN": [(20e6, 0.6), (40e6, 0.72)]})
    assert [p.name for p in paths] == ["budget.png", "budget.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = paths[1].read_text()
    assert "<svg" in svg and "MFLOPs" in svg
