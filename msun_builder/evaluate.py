"""Accuracy and FLOPs per test size for trained runs side by side: the MSUN paper's comparison, plus native sizes.

Paper protocol (authors' ``val/msc_val_*.py``): every test image, preprocessed at the reference size, is shrunk
to size s and re-enlarged to the reference (bilinear, no antialias); vanilla and MST models classify that image;
an MSUN sends it to the subnet its routing table picks for s (``msun (routed)``). The authors' figures report, for
each size, the best of the branches' dataset-level accuracies; that oracle is reported beside the routed figure,
labelled ``msun (best branch)``. ``native=True`` feeds the s-sized image itself (no re-enlargement): the realistic
case where a small image is simply small, and the one where MSUN can save FLOPs. FLOPs per image are measured with
``torch.utils.flop_counter`` at every size (2 x multiply-accumulates; the papers' "FLOPs" are MACs).

For an MSDNet run the anytime table (accuracy of each exit vs its cumulative FLOPs) and the budgeted-batch sweep
(thresholds fitted on the run's held-out training images) are written too.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from cka_scale.data import open_dataset
from cka_scale.plot import save_figure
from msun_builder.config import EvalConfig, parse_sizes
from msun_builder.flops import count_flops
from msun_builder.methods import get_method
from msun_builder.runs import RunRecord, data_split, test_subset
from msun_builder.transforms import test_transform
from scale_common.device import resolve_device
from scale_common.errors import ToolkitError
from scale_common.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from scale_common.resize import down_up, resize

__all__ = ["evaluate_runs", "markdown_table"]


@torch.no_grad()
def _evaluate_run(run_dir: Path, data: str, sizes: Sequence[int], native: bool, batch_size: int,
                  device: torch.device, images: int | None, progress: bool) -> tuple[list[dict[str, Any]], dict]:
    record = RunRecord.load(run_dir)
    method = record.method
    entry = get_method(method)
    reference = record.reference
    model = entry.load(run_dir / "model").to(device).eval()
    test = open_dataset(data, "test", transform=test_transform(data, reference, record.data_config))
    if len(test.classes) != len(record.classes):
        raise ToolkitError(f"{run_dir} was trained on {len(record.classes)} classes but --data {data} has "
                           f"{len(test.classes)}: evaluate on the data it was trained on")
    test = Subset(test, test_subset(test.labels, images))
    views = entry.views(model)
    correct = {(label, s): 0 for label in views for s in sizes}
    seen = 0
    loader = DataLoader(test, batch_size=batch_size)
    for x, y in tqdm(loader, desc=f"eval {run_dir.name}", unit="batch", disable=not progress, leave=False):
        x, y = x.to(device), y.to(device)
        for s in sizes:
            xs = resize(x, s) if native else (x if s == reference else down_up(x, s))
            for label, view in views.items():
                correct[(label, s)] += int((view(xs, s).argmax(-1) == y).sum())
        seen += len(y)
    rows = []
    for s in sizes:
        fed = s if native else reference
        probe = torch.zeros(1, 3, fed, fed, device=device)
        for label, view in views.items():
            acc = correct[(label, s)] / max(1, seen)
            flops = count_flops(lambda view=view, probe=probe, s=s: view(probe, s))
            rows.append({"run": run_dir.name, "method": method, "label": label, "size": s, "accuracy": acc,
                         "flops": flops})
        if hasattr(model, "route"):  # a routed multi-branch model (MSUN): its routed and best-branch rows
            branch = [r for r in rows if r["size"] == s and r["label"].startswith("msun branch")]
            routed = next(r for r in branch if r["label"] == f"msun branch {model.route(s)}")
            best = max(branch, key=lambda r: (r["accuracy"], r is routed))  # ties: the routed branch
            for label, row in (("msun (routed)", routed), ("msun (best branch)", best)):
                rows.append({"run": run_dir.name, "method": method, "label": label, "size": s,
                             "accuracy": row["accuracy"], "flops": row["flops"], "branch": row["label"].split()[-1]})
    extra = _msdnet_tables(run_dir, record, model, data, device, images) if record.exit_flops else {}
    return rows, extra


def _probs(model: nn.Module, dataset: Any, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    chunks, labels = [], []
    for x, y in DataLoader(dataset, batch_size=128):
        chunks.append(torch.stack(model(x.to(device))).softmax(-1).cpu())
        labels.append(y)
    return torch.cat(chunks, dim=1).numpy(), torch.cat(labels).numpy()


def _msdnet_tables(run_dir: Path, record: RunRecord, model: nn.Module, data: str, device: torch.device,
                   images: int | None) -> dict[str, Any]:
    from msun_builder.budget import anytime_table, budget_sweep

    reference = record.reference
    holdout = record.holdout_images
    if holdout < 10:
        raise ToolkitError(f"{run_dir} holds out no validation images for threshold fitting: train MSDNet with "
                           "--holdout-images N (e.g. 5000)")
    transform = test_transform(data, reference, record.data_config)
    train = open_dataset(data, "train", transform=transform)
    _, val_idx = data_split(train.labels, holdout=holdout, train=record.config.train_images, seed=record.config.seed)
    test = open_dataset(data, "test", transform=transform)
    test = Subset(test, test_subset(test.labels, images))
    val_probs, val_labels = _probs(model, Subset(train, val_idx), device)
    test_probs, test_labels = _probs(model, test, device)
    flops = record.exit_flops
    return {"anytime": anytime_table(test_probs, test_labels, flops),
            "budget": budget_sweep(val_probs, val_labels, test_probs, test_labels, flops)}


def markdown_table(rows: Sequence[dict[str, Any]], *, key: str = "accuracy", scale: float = 100.0,
                   digits: int = 1) -> str:
    """One row per (run, label), one column per size, plus the unweighted average over sizes."""
    sizes = sorted({r["size"] for r in rows})
    labels = list(dict.fromkeys((r["run"], r["label"]) for r in rows))
    head = "| run | model | " + " | ".join(str(s) for s in sizes) + " | avg |"
    lines = [head, "|" + "---|" * (len(sizes) + 3)]
    for run, label in labels:
        values = {r["size"]: r[key] * scale for r in rows if (r["run"], r["label"]) == (run, label)}
        cells = [f"{values[s]:.{digits}f}" if s in values else "" for s in sizes]
        avg = float(np.mean(list(values.values())))
        lines.append(f"| {run} | {label} | " + " | ".join(cells) + f" | {avg:.{digits}f} |")
    return "\n".join(lines)


def _legend(run: str, label: str) -> str:
    """A legend entry: the label alone when it already starts with the run's name ("msun (routed)")."""
    return label if label.split(" ")[0] == run else f"{run}: {label}"


def _plot(rows: Sequence[dict[str, Any]], stem: Path, native: bool) -> list[Path]:
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    acc_ax, flop_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for run, label in dict.fromkeys((r["run"], r["label"]) for r in rows):
        if "branch " in label and "best" not in label:
            continue
        pts = sorted((r["size"], r["accuracy"], r["flops"]) for r in rows if (r["run"], r["label"]) == (run, label))
        style = "--" if "best" in label else "-"
        acc_ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, marker="o", ms=3, label=_legend(run, label))
        flop_ax.plot([p[0] for p in pts], [p[2] / 1e9 for p in pts], style, marker="o", ms=3, label=_legend(run, label))
    mode = "native size" if native else "shrunk to size, re-enlarged"
    acc_ax.set(xlabel=f"test size (px, {mode})", ylabel="top-1 accuracy (%)", title="accuracy by test size")
    flop_ax.set(xlabel="test size (px)", ylabel="GFLOPs per image (2 x MACs)", title="cost by test size")
    for ax in (acc_ax, flop_ax):
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=7)
    return save_figure(fig, stem)


def evaluate_runs(run_dirs: Sequence[str | Path], *, data: str, sizes: Sequence[int] | str = EvalConfig.sizes,
                  out: str | Path = EvalConfig.out, native: bool = EvalConfig.native,
                  batch_size: int = EvalConfig.batch_size, device: str = EvalConfig.device,
                  images: int | None = EvalConfig.images, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate every run at every size and write ``eval.csv``, ``eval.md``, ``eval.json`` and the plot.

    Args:
        run_dirs: Run folders written by training.
        data: ``--data`` source whose test split is used.
        sizes: Test sizes in pixels.
        out: Output folder.
        native: Feed each size as is instead of re-enlarging it to the reference.
        batch_size: Test batch size.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        images: Evaluate the first ``images`` test images only.
        progress: Progress bars.

    Returns:
        One row per (run, model view, size): accuracy in [0, 1] and FLOPs per image.
    """
    if isinstance(sizes, str):
        sizes = parse_sizes(sizes)
    dev = resolve_device(device)
    rows: list[dict[str, Any]] = []
    extras: dict[str, Any] = {}
    for run_dir in run_dirs:
        run_rows, extra = _evaluate_run(Path(run_dir), data, sizes, native, batch_size, dev, images, progress)
        rows += run_rows
        if extra:
            extras[Path(run_dir).name] = extra
    folder = Path(out)
    shown = [r for r in rows if "branch " not in r["label"] or "best" in r["label"]]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["run", "method", "label", "size", "accuracy", "flops", "branch"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(folder / "eval.csv", buffer.getvalue().encode())
    mode = "native sizes" if native else "paper protocol: shrunk to the size, re-enlarged to the reference"
    md = (f"# Accuracy (%) by test size ({mode})\n\n{markdown_table(shown)}\n\n"
          f"# GFLOPs per image (2 x MACs, torch.utils.flop_counter)\n\n"
          f"{markdown_table(shown, key='flops', scale=1e-9, digits=3)}\n")
    for name, extra in extras.items():
        md += "\n# " + name + ": MSDNet anytime prediction\n\n| exit | GFLOPs | accuracy (%) |\n|---|---|---|\n"
        md += "\n".join(f"| {r['exit']} | {r['flops'] / 1e9:.4f} | {100 * r['accuracy']:.1f} |"
                        for r in extra["anytime"]) + "\n"
    atomic_write_text(folder / "eval.md", md)
    atomic_write_json(folder / "eval.json", {"mode": mode, "data": data, "rows": rows, "msdnet": extras})
    _plot(shown, folder / "accuracy_by_size", native)
    for name, extra in extras.items():
        from msun_builder.budget import plot_budget

        others: dict[str, list[tuple[float, float]]] = {}
        for r in shown:  # every other model as a cost-accuracy curve over the test sizes
            if r["run"] != name:
                others.setdefault(_legend(r["run"], r["label"]), []).append((r["flops"], r["accuracy"]))
        plot_budget(extra["budget"], extra["anytime"], folder / f"budget_{name}", title=f"{name}: budgeted batch",
                    extra_curves=others)
    return rows
