"""Figures from reports: per-layer sensitivity curves, layer-by-layer heatmaps, and two reports overlaid.

Drawn with matplotlib's object API (no pyplot state, works headless) and seaborn; every figure is saved as PNG and
SVG, each atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from cka_scale.report import Report
from scale_common.files import atomic_write_bytes

__all__ = ["plot_compare", "plot_heatmaps", "plot_report", "plot_sensitivity", "save_figure"]


def save_figure(fig: Figure, stem: str | Path) -> list[Path]:
    """Write ``fig`` to ``stem.png`` (150 dpi) and ``stem.svg``; returns both paths."""
    paths = []
    for suffix, kwargs in ((".png", {"dpi": 150}), (".svg", {})):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=suffix[1:], bbox_inches="tight", **kwargs)
        path = Path(f"{stem}{suffix}")
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths


def _palette(count: int) -> list[tuple[float, float, float]]:
    return sns.color_palette("viridis", max(count, 1))


def _title(report: Report) -> str:
    data = report.meta.get("data", "").split(":")[0]
    return f"{report.model} on {data} ({report.meta.get('estimator', '')}, {report.meta.get('images', '?')} images)"


def _layer_axis(ax: Axes, names: Sequence[str], reductions: Sequence[object]) -> None:
    labels = [f"{n} (/{r})" if r else n for n, r in zip(names, reductions, strict=True)]
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(labels, rotation=60 if len(names) > 6 else 30, ha="right", fontsize=7 if len(names) > 20 else 9)


def plot_sensitivity(report: Report, stem: str | Path) -> list[Path]:
    """One line per scale: CKA of each layer with itself at the reference scale, shaded ± std over repeats."""
    others = [s for s in report.scales if s != report.reference]
    fig = Figure(figsize=(max(6.0, 0.35 * len(report.layers) + 3), 4.2))
    ax = fig.add_subplot()
    x = np.arange(len(report.layers))
    for color, scale in zip(_palette(len(others)), others, strict=True):
        mean, std = report.sensitivity(scale)
        ax.plot(x, mean, marker="o", ms=3.5, color=color, label=f"{scale}px vs {report.reference}px")
        if std is not None:
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)
    _layer_axis(ax, report.layer_names, [layer.get("reduction") for layer in report.layers])
    ax.set_ylabel("CKA with the same layer at the reference")
    ax.set_ylim(min(0.0, float(np.nanmin(report.cka_mean))), 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="input scale", title_fontsize=8)
    ax.set_title(_title(report), fontsize=9)
    return save_figure(fig, stem)


def plot_heatmaps(report: Report, directory: str | Path) -> list[Path]:
    """For each non-reference scale, the L x L matrix CKA(layer i at the reference, layer j at that scale)."""
    r = report.scales.index(report.reference)
    mean = report.cka_mean
    paths: list[Path] = []
    names = report.layer_names
    side = max(4.5, 0.28 * len(names) + 2.5)
    for s, scale in enumerate(report.scales):
        if scale == report.reference:
            continue
        fig = Figure(figsize=(side + 1.2, side))
        ax = fig.add_subplot()
        sns.heatmap(mean[r, :, s, :], ax=ax, vmin=0.0, vmax=1.0, cmap="magma", square=True,
                    xticklabels=names, yticklabels=names, cbar_kws={"label": "CKA", "shrink": 0.8},
                    annot=len(names) <= 8, fmt=".2f", annot_kws={"fontsize": 7})
        ax.set_xlabel(f"layer at {scale}px")
        ax.set_ylabel(f"layer at the reference {report.reference}px")
        ax.tick_params(labelsize=7 if len(names) > 20 else 8)
        ax.set_title(f"{report.model}: {scale}px vs {report.reference}px", fontsize=9)
        paths += save_figure(fig, Path(directory) / f"heatmap_{scale}")
    return paths


def plot_report(report: Report, directory: str | Path) -> list[Path]:
    """All figures of one report into ``directory``: ``sensitivity.{png,svg}`` and ``heatmap_<scale>.{png,svg}``."""
    return plot_sensitivity(report, Path(directory) / "sensitivity") + plot_heatmaps(report, directory)


def plot_compare(reports: Sequence[Report], labels: Sequence[str], stem: str | Path) -> list[Path]:
    """Overlay the sensitivity curves of several reports (solid, dashed, ...), one colour per scale.

    Layers are matched by position; when the reports have different layer counts the x axis is relative depth.
    """
    styles = ["-", "--", ":", "-."]
    same = len({len(r.layers) for r in reports}) == 1
    fig = Figure(figsize=(max(6.5, 0.35 * max(len(r.layers) for r in reports) + 3), 4.4))
    ax = fig.add_subplot()
    scales = sorted({s for r in reports for s in r.scales if s != r.reference})
    colors = dict(zip(scales, _palette(len(scales)), strict=True))
    for i, (report, label) in enumerate(zip(reports, labels, strict=True)):
        n = len(report.layers)
        x = np.arange(n) if same else np.linspace(0.0, 1.0, n)
        for scale in (s for s in report.scales if s != report.reference):
            mean, std = report.sensitivity(scale)
            ax.plot(x, mean, styles[i % len(styles)], marker="o", ms=3, color=colors[scale],
                    label=f"{label}: {scale}px vs {report.reference}px")
            if std is not None:
                ax.fill_between(x, mean - std, mean + std, color=colors[scale], alpha=0.12, linewidth=0)
    if same:
        _layer_axis(ax, reports[0].layer_names, [layer.get("reduction") for layer in reports[0].layers])
    else:
        ax.set_xlabel("relative depth")
    ax.set_ylabel("CKA with the same layer at the reference")
    ax.set_ylim(None, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(" vs ".join(labels), fontsize=9)
    return save_figure(fig, stem)
