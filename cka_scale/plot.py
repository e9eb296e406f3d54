"""Figures from reports: per-layer sensitivity curves, layer-by-layer heatmaps, and two reports overlaid.

Drawn with matplotlib's object API (no pyplot state, works headless) and seaborn; every figure is saved as PNG and
SVG, each atomically. Figures stay bounded whatever the layer count: the canvas is capped at 16 x 12 inches (2400 px
wide at 150 dpi), at most 40 layer names are written (stage boundaries first, the rest evenly spaced), stage
boundaries (a change of reduction) are drawn as lines, large heatmaps are rasterised inside the SVG, and cells carry
numbers only up to 8 layers. Curves show the 95% interval as a band; heatmaps show the CKA itself and say how many
images it rests on.
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

__all__ = ["MAX_FIGURE_INCHES", "plot_compare", "plot_heatmaps", "plot_report", "plot_sensitivity", "save_figure"]

#: Largest figure (width, height) in inches; at 150 dpi the PNG is at most 2400 x 1800 px plus tight-box margins.
MAX_FIGURE_INCHES = (16.0, 12.0)
_MAX_LABELS = 40
_ANNOTATE_UP_TO = 8


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


def _width(count: int) -> float:
    return min(MAX_FIGURE_INCHES[0], max(6.0, 0.35 * count + 3))


def _boundaries(reductions: Sequence[object]) -> list[int]:
    """Indices where a new stage starts: the first layer whose reduction exceeds every reduction before it.

    A running maximum, so a block whose shortcut branch runs ahead of its main branch marks one boundary, not three.
    """
    starts, most = [], None
    for i, r in enumerate(reductions):
        if isinstance(r, int | float):
            if most is not None and r > most:
                starts.append(i)
            most = r if most is None else max(most, r)
    return starts


def _tick_indices(count: int, boundaries: Sequence[int], limit: int = _MAX_LABELS) -> list[int]:
    """At most ``limit`` layer indices to label: every one if few, else stage starts plus evenly spaced ones.

    Labels closer than 3/4 of the even spacing to one already chosen are skipped, so names never overlap.
    """
    if count <= limit:
        return list(range(count))
    step = max(1, round(count / limit))
    chosen: list[int] = []
    for i in [0, *boundaries, count - 1, *range(0, count, step)]:
        if len(chosen) < limit and all(abs(i - j) >= max(1, round(0.75 * step)) for j in chosen):
            chosen.append(i)
    return sorted(chosen)


def _labels(names: Sequence[str], reductions: Sequence[object]) -> list[str]:
    return [f"{n} (/{r})" if r else n for n, r in zip(names, reductions, strict=True)]


def _layer_axis(ax: Axes, names: Sequence[str], reductions: Sequence[object]) -> None:
    labels = _labels(names, reductions)
    bounds = _boundaries(list(reductions))
    ticks = _tick_indices(len(names), bounds)
    ax.set_xticks(ticks)
    ax.set_xticklabels([labels[i] for i in ticks], rotation=60 if len(ticks) > 6 else 30, ha="right",
                       fontsize=7 if len(ticks) > 20 else 9)
    for i in bounds:
        ax.axvline(i - 0.5, color="0.5", linewidth=0.6, linestyle=":", zorder=0)
    if len(ticks) < len(names):
        ax.set_xlabel(f"{len(names)} layers in forward order ({len(ticks)} named; dotted: a new stage)")


def plot_sensitivity(report: Report, stem: str | Path) -> list[Path]:
    """One line per scale: CKA of each layer with itself at the reference scale, shaded by its 95% interval."""
    others = [s for s in report.scales if s != report.reference]
    fig = Figure(figsize=(_width(len(report.layers)), 4.2))
    ax = fig.add_subplot()
    x = np.arange(len(report.layers))
    marker = "o" if len(report.layers) <= 60 else None
    bottom = 0.0
    for color, scale in zip(_palette(len(others)), others, strict=True):
        mean, _ = report.sensitivity(scale)
        low, high = report.interval(scale)
        bottom = min(bottom, float(np.nanmin(np.concatenate([mean, low]))))
        ax.plot(x, mean, marker=marker, ms=3.5, color=color, label=f"{scale}px vs {report.reference}px")
        if np.isfinite(low).any():
            ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
    _layer_axis(ax, report.layer_names, [layer.get("reduction") for layer in report.layers])
    ax.set_ylabel("CKA with the same layer at the reference")
    ax.set_ylim(bottom, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="input scale (band: 95% interval)", title_fontsize=8)
    ax.set_title(_title(report), fontsize=9)
    return save_figure(fig, stem)


def plot_heatmaps(report: Report, directory: str | Path) -> list[Path]:
    """For each non-reference scale, the L x L matrix CKA(layer i at the reference, layer j at that scale)."""
    r = report.scales.index(report.reference)
    mean = report.cka_mean
    paths: list[Path] = []
    names = report.layer_names
    count = len(names)
    reductions = [layer.get("reduction") for layer in report.layers]
    bounds = _boundaries(reductions)
    ticks = _tick_indices(count, bounds)
    labels = _labels(names, reductions) if count > _ANNOTATE_UP_TO else list(names)
    side = min(MAX_FIGURE_INCHES[1], max(4.5, 0.28 * count + 2.5))
    images = report.meta.get("images", "?")
    for s, scale in enumerate(report.scales):
        if scale == report.reference:
            continue
        fig = Figure(figsize=(min(MAX_FIGURE_INCHES[0], side + 1.2), side))
        ax = fig.add_subplot()
        sns.heatmap(mean[r, :, s, :], ax=ax, vmin=0.0, vmax=1.0, cmap="magma", square=True,
                    xticklabels=False, yticklabels=False, rasterized=count > 60,
                    cbar_kws={"label": f"CKA ({images} images; 95% intervals in report.json)", "shrink": 0.8},
                    annot=count <= _ANNOTATE_UP_TO, fmt=".2f", annot_kws={"fontsize": 7})
        ax.set_xticks([i + 0.5 for i in ticks])
        ax.set_xticklabels([labels[i] for i in ticks], rotation=90)
        ax.set_yticks([i + 0.5 for i in ticks])
        ax.set_yticklabels([labels[i] for i in ticks], rotation=0)
        for i in bounds:
            ax.axhline(i, color="white", linewidth=0.8)
            ax.axvline(i, color="white", linewidth=0.8)
        shown = "" if len(ticks) == count else f", {len(ticks)} of {count} named; lines: stage boundaries"
        ax.set_xlabel(f"layer at {scale}px{shown}")
        ax.set_ylabel(f"layer at the reference {report.reference}px")
        ax.tick_params(labelsize=7 if len(ticks) > 20 else 8)
        ax.set_title(f"{report.model}: {scale}px vs {report.reference}px, {images} images", fontsize=9)
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
    fig = Figure(figsize=(min(MAX_FIGURE_INCHES[0], max(6.5, 0.35 * max(len(r.layers) for r in reports) + 3)), 4.4))
    ax = fig.add_subplot()
    scales = sorted({s for r in reports for s in r.scales if s != r.reference})
    colors = dict(zip(scales, _palette(len(scales)), strict=True))
    for i, (report, label) in enumerate(zip(reports, labels, strict=True)):
        n = len(report.layers)
        x = np.arange(n) if same else np.linspace(0.0, 1.0, n)
        for scale in (s for s in report.scales if s != report.reference):
            mean, _ = report.sensitivity(scale)
            low, high = report.interval(scale)
            ax.plot(x, mean, styles[i % len(styles)], marker="o" if n <= 60 else None, ms=3, color=colors[scale],
                    label=f"{label}: {scale}px vs {report.reference}px")
            if np.isfinite(low).any():
                ax.fill_between(x, low, high, color=colors[scale], alpha=0.12, linewidth=0)
    if same:
        _layer_axis(ax, reports[0].layer_names, [layer.get("reduction") for layer in reports[0].layers])
    else:
        ax.set_xlabel("relative depth")
    ax.set_ylabel("CKA with the same layer at the reference")
    ax.set_ylim(None, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(" vs ".join(labels) + " (bands: 95% intervals)", fontsize=9)
    return save_figure(fig, stem)
