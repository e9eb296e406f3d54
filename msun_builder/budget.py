"""Anytime and budgeted-batch evaluation of early-exit networks (MSDNet, Huang et al., ICLR 2018, arXiv 1703.09844).

Pure functions on stored per-exit predictions, no model needed. They follow the dynamic evaluation of the PyTorch
port (``kalviny/MSDNet-PyTorch``, ``adaptive_inference.py``): for a budget parameter ``p`` the exits should take
shares ``q_k ∝ p^k`` of the images (the paper's geometric distribution); on a held-out validation split, exit ``k``'s
threshold is the confidence (max softmax) of the ``floor(N * q_k)``-th most confident image still in the network;
a test image leaves at the first exit whose confidence reaches its threshold. Each ``p`` gives one point (average
FLOPs per image, accuracy) of the budget curve.

Accuracies are fractions in [0, 1]; FLOPs are whatever the caller measured (``exit_flops``: 2 x MACs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from scale_common.errors import ToolkitError

__all__ = ["anytime_table", "budget_sweep", "budgeted_predict", "exit_proportions", "fit_thresholds", "plot_budget"]

DEFAULT_PS = tuple(j / 20 for j in range(1, 40))


def _as_array(probs: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """Per-exit scores as a float64 ``(K, N, C)`` array."""
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().cpu().double().numpy()
    arr = np.asarray(probs, dtype=np.float64)
    if arr.ndim != 3 or 0 in arr.shape:
        raise ToolkitError(f"{name} must have shape (exits, samples, classes), got {arr.shape}: stack the per-exit "
                           "softmax outputs, e.g. torch.stack([z.softmax(1) for z in model(x)])")
    return arr


def _labels(labels: np.ndarray | torch.Tensor | Sequence[int], n: int, name: str) -> np.ndarray:
    arr = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if arr.shape[0] != n:
        raise ToolkitError(f"{name} has {arr.shape[0]} labels for {n} samples: pass one label per sample")
    return arr


def _flops(flops: Sequence[float], k: int) -> np.ndarray:
    arr = np.asarray(flops, dtype=np.float64).reshape(-1)
    if arr.shape[0] != k:
        raise ToolkitError(f"got {arr.shape[0]} FLOPs values for {k} exits: pass exit_flops(model, size)")
    return arr


def exit_proportions(p: float, num_exits: int) -> np.ndarray:
    """Shares of images per exit for budget parameter ``p``: ``q_k ∝ p^k``, ``k = 1..num_exits``, normalised.

    ``p < 1`` favours early exits, ``p > 1`` late ones, ``p = 1`` is uniform and ``p = inf`` sends every image to
    the last exit (the largest budget).

    Args:
        p: Ratio of consecutive shares, > 0 (may be ``math.inf``).
        num_exits: Number of exits, >= 1.

    Returns:
        A float64 array of ``num_exits`` shares summing to 1.
    """
    if num_exits < 1:
        raise ToolkitError(f"num_exits must be >= 1, got {num_exits}")
    if not p > 0:
        raise ToolkitError(f"budget parameter p must be > 0, got {p}: use e.g. j / 20 for j = 1..39")
    if math.isinf(p):
        return np.eye(num_exits)[-1]
    logs = np.arange(1, num_exits + 1) * math.log(p)
    shares = np.exp(logs - logs.max())
    return shares / shares.sum()


def fit_thresholds(val_probs: np.ndarray | torch.Tensor, proportions: Sequence[float] | np.ndarray) -> np.ndarray:
    """Confidence thresholds that make the validation images leave the exits in the given proportions.

    For ``k < K``, among the images that have not left yet, ``T_k`` is the max-probability at exit ``k`` of the
    ``floor(N * q_k)``-th most confident one (``+inf`` when that count is 0, so nobody leaves); ``T_K = -inf``.
    Ties at a threshold all leave, so exit counts can exceed ``floor(N * q_k)`` only for tied confidences.

    Args:
        val_probs: Softmax outputs ``(K, N, C)`` of every exit on the validation split.
        proportions: ``K`` non-negative shares (normalised here), e.g. :func:`exit_proportions`.

    Returns:
        ``K`` float64 thresholds.
    """
    probs = _as_array(val_probs, "val_probs")
    k_exits, n = probs.shape[:2]
    q = np.asarray(proportions, dtype=np.float64).reshape(-1)
    if q.shape[0] != k_exits or (q < 0).any() or not q.sum() > 0:
        raise ToolkitError(f"proportions must be {k_exits} non-negative shares (one per exit), got {q.tolist()}: "
                           f"use exit_proportions(p, {k_exits})")
    q = q / q.sum()
    conf = probs.max(axis=2)
    thresholds = np.full(k_exits, -np.inf)
    remaining = np.ones(n, dtype=bool)
    for k in range(k_exits - 1):
        count = min(math.floor(n * q[k] + 1e-9), int(remaining.sum()))  # 1e-9: N * q exact up to rounding
        if count == 0:
            thresholds[k] = np.inf
            continue
        candidates = np.sort(conf[k, remaining])[::-1]
        thresholds[k] = candidates[count - 1]
        remaining &= conf[k] < thresholds[k]
    return thresholds


def budgeted_predict(test_probs: np.ndarray | torch.Tensor,
                     thresholds: Sequence[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Early-exit classification: each image leaves at the first exit whose max-probability reaches its threshold.

    Args:
        test_probs: Softmax outputs ``(K, N, C)`` of every exit.
        thresholds: ``K`` thresholds from :func:`fit_thresholds` (the last exit takes every image that reaches it).

    Returns:
        ``(predictions, exit_index)``: the predicted class and the 0-based exit of each image, both ``(N,)`` int64.
    """
    probs = _as_array(test_probs, "test_probs")
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if t.shape[0] != probs.shape[0]:
        raise ToolkitError(f"got {t.shape[0]} thresholds for {probs.shape[0]} exits: fit them on the same model")
    leaves = probs.max(axis=2) >= t[:, None]
    leaves[-1] = True
    exit_index = leaves.argmax(axis=0)
    predictions = probs.argmax(axis=2)[exit_index, np.arange(probs.shape[1])]
    return predictions.astype(np.int64), exit_index.astype(np.int64)


def anytime_table(probs_or_logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | Sequence[int],
                  flops: Sequence[float]) -> list[dict[str, Any]]:
    """Anytime prediction: top-1 accuracy of every exit against its cumulative FLOPs.

    Args:
        probs_or_logits: ``(K, N, C)`` scores of every exit (softmax or logits: only the argmax is used).
        labels: ``N`` class indices.
        flops: ``K`` cumulative FLOPs per image, e.g. :func:`msun_builder.msdnet.exit_flops`.

    Returns:
        One row per exit: ``{"exit", "flops", "accuracy"}``.
    """
    scores = _as_array(probs_or_logits, "probs_or_logits")
    y = _labels(labels, scores.shape[1], "labels")
    cost = _flops(flops, scores.shape[0])
    correct = scores.argmax(axis=2) == y[None]
    return [{"exit": k, "flops": float(cost[k]), "accuracy": float(correct[k].mean())} for k in range(len(cost))]


def budget_sweep(val_probs: np.ndarray | torch.Tensor, val_labels: np.ndarray | torch.Tensor | Sequence[int],
                 test_probs: np.ndarray | torch.Tensor, test_labels: np.ndarray | torch.Tensor | Sequence[int],
                 flops: Sequence[float], ps: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Budgeted batch classification over a sweep of budgets: thresholds from validation, results on test.

    Args:
        val_probs: Softmax outputs ``(K, N_val, C)`` on a held-out validation split (never the test set).
        val_labels: Validation labels.
        test_probs: Softmax outputs ``(K, N_test, C)`` on the test set.
        test_labels: Test labels.
        flops: ``K`` cumulative FLOPs per image of the exits.
        ps: Budget parameters (see :func:`exit_proportions`); the official ``j / 20, j = 1..39`` when None.

    Returns:
        One row per ``p``: ``p``; ``flops`` (expected FLOPs per test image, ``sum_k frac_k * C_k``);
        ``accuracy`` (test); ``val_accuracy``; ``exit_fractions`` (test, per exit); ``thresholds``.
    """
    val, test = _as_array(val_probs, "val_probs"), _as_array(test_probs, "test_probs")
    if val.shape[0] != test.shape[0] or val.shape[2] != test.shape[2]:
        raise ToolkitError(f"val_probs {val.shape} and test_probs {test.shape} must come from the same model "
                           "(same exits and classes)")
    y_val, y_test = _labels(val_labels, val.shape[1], "val_labels"), _labels(test_labels, test.shape[1], "test_labels")
    cost = _flops(flops, val.shape[0])
    rows = []
    for p in DEFAULT_PS if ps is None else ps:
        thresholds = fit_thresholds(val, exit_proportions(p, val.shape[0]))
        val_pred, _ = budgeted_predict(val, thresholds)
        pred, exits = budgeted_predict(test, thresholds)
        fractions = np.bincount(exits, minlength=len(cost)) / len(exits)
        rows.append({"p": float(p), "flops": float(fractions @ cost), "accuracy": float((pred == y_test).mean()),
                     "val_accuracy": float((val_pred == y_val).mean()), "exit_fractions": fractions.tolist(),
                     "thresholds": thresholds.tolist()})
    return rows


def _flops_unit(max_flops: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "GFLOPs"), (1e6, "MFLOPs"), (1e3, "kFLOPs")):
        if max_flops >= scale:
            return scale, unit
    return 1.0, "FLOPs"


def plot_budget(rows: Sequence[Mapping[str, Any]], anytime_rows: Sequence[Mapping[str, Any]],
                path_without_suffix: str | Path, *, title: str | None = None,
                extra_curves: Mapping[str, Sequence[tuple[float, float]]] | None = None) -> list[Path]:
    """Plot accuracy against average FLOPs per image: the budget curve, the exits, and optional other models.

    Args:
        rows: :func:`budget_sweep` rows.
        anytime_rows: :func:`anytime_table` rows (each exit is marked, numbered from 1 as in the paper).
        path_without_suffix: Output path; ``.png`` and ``.svg`` are added.
        title: Figure title.
        extra_curves: Named ``(flops, accuracy)`` points in the same units (accuracy in [0, 1]), e.g. MSUN or
            vanilla models at their FLOPs; one point is drawn as a marker, several as a line.

    Returns:
        The PNG and SVG paths.
    """
    extra = dict(extra_curves or {})
    all_flops = [r["flops"] for r in [*rows, *anytime_rows]] + [f for pts in extra.values() for f, _ in pts]
    if not all_flops:
        raise ToolkitError("plot_budget got nothing to plot: pass budget_sweep and/or anytime_table rows")
    scale, unit = _flops_unit(max(all_flops))
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    if rows:
        pts = sorted((r["flops"] / scale, 100 * r["accuracy"]) for r in rows)
        ax.plot(*zip(*pts, strict=True), "-", color="C0", lw=2, label="MSDNet, budgeted batch")
    if anytime_rows:
        xs, ys = [r["flops"] / scale for r in anytime_rows], [100 * r["accuracy"] for r in anytime_rows]
        ax.plot(xs, ys, "o", color="C1", mfc="white", mew=1.5, label="MSDNet exits (anytime)")
        for r, x, y in zip(anytime_rows, xs, ys, strict=True):
            ax.annotate(str(r["exit"] + 1), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    for i, (name, pts) in enumerate(extra.items(), start=2):
        xs, ys = [f / scale for f, _ in pts], [100 * a for _, a in pts]
        ax.plot(xs, ys, "s" if len(pts) == 1 else "s-", color=f"C{i}", label=name)
    ax.set_xlabel(f"average {unit} per image")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title)
    base = Path(path_without_suffix)
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = [base.with_name(base.name + ".png"), base.with_name(base.name + ".svg")]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths
