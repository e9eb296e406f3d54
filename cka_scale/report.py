"""Analysis results on disk: ``report.json`` (per-layer CKA by scale, provenance, config) and ``cka.npz``.

Both files are written atomically, the JSON last, so a directory either holds a complete report or none.
``cka.npz`` holds the full (scale, layer) x (scale, layer) matrices: ``cka_mean``, ``cka_std``, ``cka_low`` and
``cka_high`` (the 95% interval) of shape (S, L, S, L), ``cka_runs`` and ``cka_se_runs`` (jackknife standard errors)
of shape (R, S, L, S, L) and ``dof`` (R,), with ``scales`` and ``layers`` naming the axes.

Intervals: each repeat's CKA has a delete-one-bucket jackknife standard error ``se_r`` with ``dof_r`` degrees of
freedom (:mod:`cka_scale.accumulate`). One repeat: ``cka +- t_{dof} se``. R repeats on disjoint draws of images
(``meta["draws"] == "disjoint"``) are independent, so their mean has ``se = sqrt(sum_r se_r^2) / R`` with
``sum_r dof_r`` degrees of freedom. Overlapping draws (a source smaller than R x images) are not independent; their
mean keeps the conservative ``se = sqrt(mean_r se_r^2)`` of a single draw, with ``min_r dof_r``. Reports written before
intervals existed load with NaN intervals.
"""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cka_scale._stats import t_quantile
from scale_common.errors import ToolkitError
from scale_common.files import atomic_write_bytes, atomic_write_json, read_json

__all__ = ["REPORT_FORMAT", "Report", "load_report"]

REPORT_FORMAT = "cka-scale-report/1"


@dataclass
class Report:
    """The outcome of one ``cka-scale analyze`` run.

    Attributes:
        model: Model name (or label).
        weights: Where the weights came from.
        scales: Input sizes, ascending.
        reference: The scale every other scale is compared with.
        layers: Per layer, in forward order: ``name``, ``kind``, ``shape``, ``reduction``, ``tap``, ``cum_params``.
        cka_runs: (R, S, L, S, L) CKA of every repeat.
        config: The resolved analysis config.
        meta: Provenance: data, image and batch counts, estimator id, timings, versions, feature_info, params.
        cka_se_runs: (R, S, L, S, L) jackknife standard error of every repeat (None: no interval known).
        dof: Degrees of freedom of each repeat's standard error.
    """

    model: str
    weights: str
    scales: list[int]
    reference: int
    layers: list[dict[str, Any]]
    cka_runs: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    cka_se_runs: np.ndarray | None = None
    dof: list[int] | None = None

    @property
    def cka_mean(self) -> np.ndarray:
        """(S, L, S, L) mean over repeats."""
        return self.cka_runs.mean(axis=0)

    @property
    def cka_std(self) -> np.ndarray | None:
        """(S, L, S, L) sample standard deviation over repeats (None with a single repeat)."""
        return self.cka_runs.std(axis=0, ddof=1) if self.cka_runs.shape[0] > 1 else None

    def _se(self) -> tuple[np.ndarray, float]:
        """Standard error of :attr:`cka_mean` and its degrees of freedom (see the module docstring)."""
        if self.cka_se_runs is None or not self.dof:
            return np.full(self.cka_runs.shape[1:], np.nan), math.nan
        se, dof, runs = self.cka_se_runs, [int(d) for d in self.dof], self.cka_runs.shape[0]
        if runs == 1:
            return se[0], dof[0]
        if self.meta.get("draws") == "disjoint":
            return np.sqrt((se**2).sum(axis=0)) / runs, sum(dof)
        return np.sqrt((se**2).mean(axis=0)), min(dof)

    @property
    def cka_interval(self) -> tuple[np.ndarray, np.ndarray]:
        """(S, L, S, L) lower and upper ends of the 95% interval of :attr:`cka_mean` (NaN where unknown)."""
        se, dof = self._se()
        half = t_quantile(0.95, dof) * se
        return self.cka_mean - half, self.cka_mean + half

    def interval(self, scale: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-layer 95% interval of :meth:`sensitivity` at ``scale`` (lower, upper; NaN where unknown)."""
        s, r = self.scales.index(scale), self.scales.index(self.reference)
        diag = np.arange(len(self.layers))
        low, high = self.cka_interval
        return low[r, diag, s, diag], high[r, diag, s, diag]

    @property
    def layer_names(self) -> list[str]:
        """Layer ids in forward order."""
        return [layer["name"] for layer in self.layers]

    def sensitivity(self, scale: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-layer CKA between ``scale`` and the reference (same layer), mean and std over repeats."""
        s, r = self.scales.index(scale), self.scales.index(self.reference)
        diag = np.arange(len(self.layers))
        runs = self.cka_runs[:, r, diag, s, diag]
        return runs.mean(axis=0), (runs.std(axis=0, ddof=1) if runs.shape[0] > 1 else None)

    def to_json(self) -> dict[str, Any]:
        """The ``report.json`` content."""
        rows = []
        per_scale = {s: self.sensitivity(s) for s in self.scales}
        bands = {s: self.interval(s) for s in self.scales}
        for i, layer in enumerate(self.layers):
            rows.append({**layer,
                         "cka": {str(s): _num(per_scale[s][0][i]) for s in self.scales},
                         "ci95": {str(s): _pair(bands[s][0][i], bands[s][1][i]) for s in self.scales},
                         "cka_std": {str(s): None if per_scale[s][1] is None else _num(per_scale[s][1][i])
                                     for s in self.scales}})
        return {"format": REPORT_FORMAT, "model": self.model, "weights": self.weights, "scales": self.scales,
                "reference": self.reference, "config": self.config, **self.meta, "layers": rows}

    def save(self, directory: str | Path) -> Path:
        """Write ``cka.npz`` then ``report.json`` into ``directory`` (atomically); returns the JSON path."""
        out = Path(directory)
        buffer = io.BytesIO()
        std = self.cka_std
        low, high = self.cka_interval
        se = self.cka_se_runs if self.cka_se_runs is not None else np.full_like(self.cka_runs, np.nan)
        dof = np.asarray(self.dof if self.dof else [-1] * self.cka_runs.shape[0], dtype=np.int64)
        np.savez_compressed(buffer, cka_mean=self.cka_mean, cka_std=std if std is not None else np.full_like(
            self.cka_mean, np.nan), cka_low=low, cka_high=high, cka_runs=self.cka_runs, cka_se_runs=se, dof=dof,
            scales=np.asarray(self.scales), layers=np.asarray(self.layer_names))
        atomic_write_bytes(out / "cka.npz", buffer.getvalue())
        atomic_write_json(out / "report.json", self.to_json())
        return out / "report.json"

    def summary_table(self) -> str:
        """A plain-text table: one row per layer, one column per scale: CKA and its 95% interval in brackets."""
        others = [s for s in self.scales if s != self.reference]
        head = f"{'layer':<28} {'red.':>4} " + " ".join(f"{f'{s}px':>20}" for s in others)
        minibatches = self.meta.get("minibatches")
        basis = (f"{self.meta.get('images', '?')} images" + (f", {minibatches} HSIC minibatches" if minibatches else "")
                 + (f", mean of {self.cka_runs.shape[0]} draws" if self.cka_runs.shape[0] > 1 else ""))
        lines = [f"CKA of each layer vs itself at the reference {self.reference}px ({self.meta.get('estimator', '')})",
                 f"[low, high]: 95% interval (jackknife over minibatches; {basis})", head, "-" * len(head)]
        stats = {s: (self.sensitivity(s)[0], *self.interval(s)) for s in others}
        for i, layer in enumerate(self.layers):
            cells = []
            for s in others:
                mean, low, high = stats[s]
                cell = f"{mean[i]:.3f}" + ("" if np.isnan(low[i]) else f" [{low[i]:.3f},{high[i]:.3f}]")
                cells.append(f"{cell:>20}")
            red = layer.get("reduction")
            lines.append(f"{layer['name'][:28]:<28} {'' if red is None else red:>4} " + " ".join(cells))
        return "\n".join(lines)


def _num(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else round(value, 6)


def _pair(low: float, high: float) -> list[float] | None:
    low, high = _num(low), _num(high)
    return None if low is None or high is None else [low, high]


def load_report(directory: str | Path) -> Report:
    """Read a report written by :meth:`Report.save` (a directory, or its ``report.json``).

    Raises:
        ToolkitError: The directory holds no complete report.
    """
    path = Path(directory)
    folder = path.parent if path.name == "report.json" else path
    json_path, npz_path = folder / "report.json", folder / "cka.npz"
    if not json_path.is_file() or not npz_path.is_file():
        raise ToolkitError(f"{str(folder)!r} holds no cka-scale report (report.json and cka.npz): run "
                           "`cka-scale analyze MODEL --out DIR` first")
    fix = "run `cka-scale analyze` again into this folder"
    data = read_json(json_path, what="CKA report", fix=fix, format=REPORT_FORMAT)
    try:
        with np.load(npz_path) as npz:
            runs = npz["cka_runs"]
            se = npz["cka_se_runs"] if "cka_se_runs" in npz.files else None
            dof = [int(d) for d in npz["dof"]] if "dof" in npz.files else None
    except (ValueError, OSError, KeyError, zipfile.BadZipFile, EOFError) as err:
        raise ToolkitError(f"{str(npz_path)!r} is not a readable CKA array file ({err}): {fix}") from None
    missing = [k for k in ("model", "weights", "scales", "reference", "layers") if k not in data]
    if missing:
        raise ToolkitError(f"{str(json_path)!r} is not a readable CKA report (missing {', '.join(missing)}): {fix}")
    standard = {"format", "model", "weights", "scales", "reference", "config", "layers"}
    if se is not None and (se.shape != runs.shape or dof is None or len(dof) != runs.shape[0] or min(dof) < 0):
        se, dof = None, None  # no usable interval (e.g. saved without one)
    layers = [{k: v for k, v in layer.items() if k not in ("cka", "cka_std", "ci95")} for layer in data["layers"]]
    meta = {k: v for k, v in data.items() if k not in standard}
    return Report(data["model"], data["weights"], list(data["scales"]), int(data["reference"]), layers, runs,
                  data.get("config", {}), meta, se, dof)
