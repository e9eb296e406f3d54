"""Analysis results on disk: ``report.json`` (per-layer CKA by scale, provenance, config) and ``cka.npz``.

Both files are written atomically, the JSON last, so a directory either holds a complete report or none.
``cka.npz`` holds the full (scale, layer) x (scale, layer) matrices: ``cka_mean`` and ``cka_std`` of shape
(S, L, S, L) and ``cka_runs`` of shape (R, S, L, S, L), with ``scales`` and ``layers`` naming the axes.
"""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
    """

    model: str
    weights: str
    scales: list[int]
    reference: int
    layers: list[dict[str, Any]]
    cka_runs: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def cka_mean(self) -> np.ndarray:
        """(S, L, S, L) mean over repeats."""
        return self.cka_runs.mean(axis=0)

    @property
    def cka_std(self) -> np.ndarray | None:
        """(S, L, S, L) sample standard deviation over repeats (None with a single repeat)."""
        return self.cka_runs.std(axis=0, ddof=1) if self.cka_runs.shape[0] > 1 else None

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
        for i, layer in enumerate(self.layers):
            rows.append({**layer,
                         "cka": {str(s): _num(per_scale[s][0][i]) for s in self.scales},
                         "cka_std": {str(s): None if per_scale[s][1] is None else _num(per_scale[s][1][i])
                                     for s in self.scales}})
        return {"format": REPORT_FORMAT, "model": self.model, "weights": self.weights, "scales": self.scales,
                "reference": self.reference, "config": self.config, **self.meta, "layers": rows}

    def save(self, directory: str | Path) -> Path:
        """Write ``cka.npz`` then ``report.json`` into ``directory`` (atomically); returns the JSON path."""
        out = Path(directory)
        buffer = io.BytesIO()
        std = self.cka_std
        np.savez_compressed(buffer, cka_mean=self.cka_mean, cka_std=std if std is not None else np.full_like(
            self.cka_mean, np.nan), cka_runs=self.cka_runs, scales=np.asarray(self.scales),
            layers=np.asarray(self.layer_names))
        atomic_write_bytes(out / "cka.npz", buffer.getvalue())
        atomic_write_json(out / "report.json", self.to_json())
        return out / "report.json"

    def summary_table(self) -> str:
        """A plain-text table: one row per layer, one column per scale (mean, ± std when repeated)."""
        others = [s for s in self.scales if s != self.reference]
        head = f"{'layer':<28} {'red.':>4} " + " ".join(f"{f'{s}px':>13}" for s in others)
        lines = [f"CKA of each layer vs itself at the reference {self.reference}px ({self.meta.get('estimator', '')})",
                 head, "-" * len(head)]
        stats = {s: self.sensitivity(s) for s in others}
        for i, layer in enumerate(self.layers):
            cells = []
            for s in others:
                mean, std = stats[s]
                cell = f"{mean[i]:.3f}" + (f" ±{std[i]:.3f}" if std is not None else "")
                cells.append(f"{cell:>13}")
            red = layer.get("reduction")
            lines.append(f"{layer['name'][:28]:<28} {'' if red is None else red:>4} " + " ".join(cells))
        return "\n".join(lines)


def _num(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else round(value, 6)


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
    except (ValueError, OSError, KeyError, zipfile.BadZipFile, EOFError) as err:
        raise ToolkitError(f"{str(npz_path)!r} is not a readable CKA array file ({err}): {fix}") from None
    missing = [k for k in ("model", "weights", "scales", "reference", "layers") if k not in data]
    if missing:
        raise ToolkitError(f"{str(json_path)!r} is not a readable CKA report (missing {', '.join(missing)}): {fix}")
    standard = {"format", "model", "weights", "scales", "reference", "config", "layers"}
    layers = [{k: v for k, v in layer.items() if k not in ("cka", "cka_std")} for layer in data["layers"]]
    meta = {k: v for k, v in data.items() if k not in standard}
    return Report(data["model"], data["weights"], list(data["scales"]), int(data["reference"]), layers, runs,
                  data.get("config", {}), meta)
