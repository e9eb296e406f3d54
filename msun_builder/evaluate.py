"""Accuracy and FLOPs per test size for trained runs side by side, each number with its 95% interval and seeds.

Paper protocol (authors' ``val/msc_val_*.py``): every test image, preprocessed at the reference size, is shrunk
to size s and re-enlarged to the reference (bilinear, no antialias); vanilla and MST models classify that image.
``native=True`` feeds the s-sized image itself: the realistic case where a small image is simply small, and the one
where an MSUN saves FLOPs. There every model gets two rows: the image as is (``(as is)``) and enlarged to the
reference first (``(enlarged)``: exactly the paper protocol's input, at the reference's cost). So one native
evaluation holds the paper-protocol table as well, and the MSUN's native cost is compared with the fair baseline.
FLOPs per image come from ``torch.utils.flop_counter`` at every size (2 x multiply-accumulates; the papers'
"FLOPs" are MACs).

An MSUN's branches are all scored at every size; three labelled rows are derived from them per size:

- ``msun (rule)``: the branch its routing table picks (default: the smallest subnet at least as large as the
  input, :func:`msun_builder._routing.default_routing`), the deployable default;
- ``msun (validation)``: the branch the table fitted on the run's validation split after training picks
  (``run.json``'s ``validation.routing``), also deployable;
- ``msun (best branch, oracle)``: per size and run, the branch with the best accuracy *on these test images*:
  the authors' figures report this; it is chosen on the test set, so it is an upper bound, not a result.

In native mode each of them is qualified by the input, e.g. ``msun (rule, as is)`` and ``msun (rule, enlarged)``.

**Seeds.** Runs whose records agree in everything but the training seed (method, data, model, weights and every
other setting) form one group; each table row is a group. **Intervals**: per image, correctness is averaged over
the group's seeds; the 95% interval is the percentile bootstrap over test images (:mod:`msun_builder.stats`, 2000
resamples, seeded): it holds the trained runs fixed, so it answers "how accurate are these runs on images like
these"; the per-seed accuracies are reported beside it as the training-noise spread. Differences (every MSUN row
minus every vanilla/MST row) are paired: the same resampled images for both, per size, averaged over all sizes and
over the lossy sizes (below ``lossy_below``, the data's native size: nothing is lost above it).

Outputs in ``out``: ``eval.csv`` (one row per group, label and size), ``differences.csv``, ``eval.json`` (both,
the averages, the groups, the protocol), ``eval.md``, ``correct.npz`` (per-run, per-image correctness: every
statistic can be recomputed), and ``accuracy_by_size.png/.svg`` (accuracy with interval bands, cost by size, and
accuracy against GFLOPs). For an MSDNet run the anytime table and the budgeted-batch sweep (thresholds fitted on
the run's validation split) are written too.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
from msun_builder._routing import check_routing, route
from msun_builder.config import EvalConfig, parse_sizes
from msun_builder.flops import count_flops
from msun_builder.methods import get_method
from msun_builder.runs import RunRecord, data_split, test_subset
from msun_builder.stats import (
    RESAMPLES,
    Interval,
    accuracy_ci,
    average_accuracy_ci,
    average_difference_ci,
    difference_ci,
)
from msun_builder.transforms import test_transform
from scale_common.device import resolve_device
from scale_common.errors import ToolkitError
from scale_common.files import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from scale_common.resize import down_up, resize

__all__ = ["NATIVE_SIZES", "evaluate_runs", "format_interval", "group_runs", "markdown_table"]

#: The native image side of a ``--data`` source whose images all have one size: sizes below it lose information.
NATIVE_SIZES = {"fashion-mnist": 28, "fashion-mnist-subset": 28}
RULE, VALIDATION, ORACLE = "msun (rule)", "msun (validation)", "msun (best branch, oracle)"
_BASELINES = ("vanilla", "mst")  # methods an MSUN row is compared with


@dataclass
class _RunScores:
    """One run's per-image correctness at every size, by label, and the FLOPs per image."""

    name: str
    record: RunRecord
    images: list[int]
    path: str = ""  # the resolved run folder: a saved evaluation is reused only for the same folder
    correct: dict[str, np.ndarray] = field(default_factory=dict)  # label -> (sizes, images) bool
    flops: dict[str, list[int]] = field(default_factory=dict)  # label -> per size
    branch: dict[str, list[int]] = field(default_factory=dict)  # derived MSUN label -> branch per size
    extra: dict[str, Any] = field(default_factory=dict)


_KINDS = ("as is", "enlarged")


def _qualify(label: str, kind: str) -> str:
    """``label`` for one native input kind: ``vanilla (as is)``, ``msun (rule, as is)``, ``msun branch 8 (as is)``."""
    if not kind:
        return label
    return f"{label[:-1]}, {kind})" if label.endswith(")") else f"{label} ({kind})"


def _views(entry: Any, model: nn.Module, native: bool, reference: int) -> dict[str, Callable]:
    """Label -> ``(x, size) -> logits``: the method's views; native mode has each fed as is and enlarged."""
    views = entry.views(model)
    if not native:
        return views
    out = {}
    for label, view in views.items():
        out[_qualify(label, "as is")] = view
        out[_qualify(label, "enlarged")] = lambda x, s, view=view: view(resize(x, reference), reference)
    return out


def _load_cache(path: Path) -> dict[str, Any] | None:
    """A previous evaluation's ``correct.npz`` in the output folder (None when absent or unreadable)."""
    try:
        with np.load(path) as saved:
            return {"rows": list(map(str, saved["rows"])), "correct": saved["correct"], "sizes": list(saved["sizes"]),
                    "images": list(saved["images"]), "mtime": path.stat().st_mtime,
                    "paths": dict(zip(map(str, saved["names"]), map(str, saved["paths"]), strict=True))
                    if "paths" in saved else {}}
    except (OSError, ValueError, KeyError):
        return None


def _cached(cache: dict[str, Any] | None, run_dir: Path, name: str, labels: Sequence[str], sizes: Sequence[int],
            indices: Sequence[int]) -> dict[str, np.ndarray] | None:
    """This run's per-image correctness from a previous evaluation, or None to score it.

    Used when ``cache`` holds every label of the same run folder at the same sizes and test images and is newer than
    the run's record (a retrained run, or another folder of the same name, is scored again).
    """
    if cache is None or cache["sizes"] != list(sizes) or cache["images"] != list(indices):
        return None
    if cache["paths"].get(name) != str(run_dir.resolve()):
        return None
    if (run_dir / "run.json").stat().st_mtime >= cache["mtime"]:
        return None
    where = {row: i for i, row in enumerate(cache["rows"])}
    keys = [f"{name}|{label}" for label in labels]
    if not all(k in where for k in keys):
        return None
    return {label: cache["correct"][where[k]] for label, k in zip(labels, keys, strict=True)}


@torch.no_grad()
def _evaluate_run(run_dir: Path, name: str, data: str, sizes: Sequence[int], native: bool, batch_size: int,
                  device: torch.device, images: int | None, progress: bool,
                  cache: dict[str, Any] | None = None) -> _RunScores:
    record = RunRecord.load(run_dir)
    entry = get_method(record.method)
    reference = record.reference
    model = entry.load(run_dir / "model").to(device).eval()
    test = open_dataset(data, "test", transform=test_transform(data, reference, record.data_config))
    if len(test.classes) != len(record.classes):
        raise ToolkitError(f"{run_dir} was trained on {len(record.classes)} classes but --data {data} has "
                           f"{len(test.classes)}: evaluate on the data it was trained on")
    indices = test_subset(test.labels, images)
    views = _views(entry, model, native, reference)
    scores = _RunScores(name, record, indices, str(run_dir.resolve()))
    known = _cached(cache, run_dir, name, list(views), sizes, indices)
    if known is None:
        hits: dict[str, list[list[torch.Tensor]]] = {label: [[] for _ in sizes] for label in views}
        loader = DataLoader(Subset(test, indices), batch_size=batch_size)
        for x, y in tqdm(loader, desc=f"eval {name}", unit="batch", disable=not progress, leave=False):
            x, y = x.to(device), y.to(device)
            for i, s in enumerate(sizes):
                xs = resize(x, s) if native else (x if s == reference else down_up(x, s))
                for label, view in views.items():
                    hits[label][i].append((view(xs, s).argmax(-1) == y).cpu())
        known = {label: np.stack([torch.cat(h).numpy() for h in hits[label]]) for label in views}
    for label, view in views.items():
        scores.correct[label] = known[label]
        scores.flops[label] = []
        for s in sizes:
            probe = torch.zeros(1, 3, s if native else reference, s if native else reference, device=device)
            scores.flops[label].append(count_flops(lambda view=view, probe=probe, s=s: view(probe, s)))
    if hasattr(model, "route"):
        for kind in _KINDS if native else ("",):
            _derive_msun_rows(scores, model, sizes, kind)
    if record.exit_flops:
        scores.extra = _msdnet_tables(run_dir, record, model, data, device, images)
    return scores


def _derive_msun_rows(scores: _RunScores, model: nn.Module, sizes: Sequence[int], kind: str) -> None:
    """Add the rule-routed, validation-routed and oracle rows of an MSUN from its branches' correctness."""
    branches = {b: _qualify(f"msun branch {b}", kind) for b in model.scales}
    rule = [model.route(s) for s in sizes]
    tables = {RULE: rule}
    fitted = (scores.record.validation or {}).get("routing")
    if fitted:
        table = check_routing(fitted, sorted(branches))
        tables[VALIDATION] = [route(table, s) for s in sizes]
    accuracy = {b: scores.correct[label].mean(axis=1) for b, label in branches.items()}
    tables[ORACLE] = [max(branches, key=lambda b, i=i: (accuracy[b][i], b == rule[i])) for i in range(len(sizes))]
    for name, picks in tables.items():
        label = _qualify(name, kind)
        scores.correct[label] = np.stack([scores.correct[branches[b]][i] for i, b in enumerate(picks)])
        scores.flops[label] = [scores.flops[branches[b]][i] for i, b in enumerate(picks)]
        scores.branch[label] = picks


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


# ------------------------------------------------------------------------------------------------ seed groups

_SEED_SUFFIX = re.compile(r"[-_.]?s(?:eed)?[-_]?\d+$")
_NOT_SETTINGS = ("seed", "device", "num_workers", "amp")


def _setting_key(record: RunRecord) -> str:
    """Everything a run was asked to do except its seed (and where it ran): equal keys form one seed group.

    The MSUN split counts as the cut that was built (module and stride), not as the flags that asked for it: an
    ``--auto-split`` run records ``split_module`` since that flag existed, an older one only the stride.
    """
    config = {k: v for k, v in record.config.to_json().items()
              if k not in _NOT_SETTINGS and k not in ("split_reduction", "split_module")}
    split = record.split or {}
    facts = {"method": record.method, "data": record.data, "architecture": record.architecture,
             "weights": record.weights, "train_images": record.train_images, "holdout": record.holdout_images,
             "split": [split.get("module"), split.get("reduction")] if split else
             [record.config.split_module, record.config.split_reduction]}
    return json.dumps({"config": config, **facts}, sort_keys=True, default=str)


def group_runs(names: Sequence[str], records: Sequence[RunRecord]) -> dict[str, list[int]]:
    """Group runs that differ only in their training seed.

    Args:
        names: Run names (folder names), in order.
        records: Their run records.

    Returns:
        Group name -> indices into ``names``, in order of first appearance. A group of several runs is named by
        their common name without a seed suffix (``msun-s0``, ``msun-s1`` -> ``msun``), else by its first run.

    Raises:
        ToolkitError: Two runs of one group were trained with the same seed (the same run evaluated twice).
    """
    keys: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        keys.setdefault(_setting_key(record), []).append(i)
    groups: dict[str, list[int]] = {}
    for members in keys.values():
        seeds = [records[i].config.seed for i in members]
        if len(set(seeds)) != len(seeds):
            twice = [names[i] for i in members if seeds.count(records[i].config.seed) > 1]
            raise ToolkitError(f"runs {twice} were trained with the same settings and seed: pass each run once")
        stems = {_SEED_SUFFIX.sub("", names[i]) for i in members}
        name = stems.pop() if len(members) > 1 and len(stems) == 1 and "" not in stems else names[members[0]]
        while name in groups:
            name += "'"
        groups[name] = members
    return groups


def _display(group: str, method: str, label: str) -> str:
    """A row's name: the group's name with the view's qualifier (``vanilla-eq`` + ``vanilla (enlarged)``)."""
    if label == method:
        return group
    if label.startswith(method + " "):
        return group + label[len(method):]
    return f"{group}: {label}"


def format_interval(row: Interval | dict[str, Any], signed: bool = False) -> str:
    """``"85.3 [84.6, 86.0]"`` in percent: an :class:`Interval`, or an evaluation row with ``ci95`` and its value.

    Args:
        row: An interval, or a row of ``eval.json`` (``accuracy`` or ``difference``, and ``ci95``).
        signed: Print signs (for differences).

    Returns:
        The estimate and its interval, one decimal.
    """
    if isinstance(row, Interval):
        est, low, high = row
    else:
        est, (low, high) = row.get("accuracy", row.get("difference")), row["ci95"]
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return f"{fmt.format(100 * est)} [{fmt.format(100 * low)}, {fmt.format(100 * high)}]"


def _summarise(scores: list[_RunScores], sizes: list[int], lossy_below: int | None, resamples: int
               ) -> tuple[list[dict], list[dict], list[dict], dict[str, Any]]:
    """Per-group rows, averages and paired differences, with intervals."""
    groups = group_runs([s.name for s in scores], [s.record for s in scores])
    lossy = [i for i, s in enumerate(sizes) if lossy_below is not None and s < lossy_below]
    spans = {"avg": list(range(len(sizes))), **({f"avg<{lossy_below}": lossy} if lossy else {})}
    rows, averages = [], []
    tables: dict[tuple[str, str], np.ndarray] = {}  # (group, label) -> (sizes, seeds, images)
    methods = {}
    for group, members in groups.items():
        runs = [scores[i] for i in members]
        method = runs[0].record.method
        methods[group] = method
        seeds = [r.record.config.seed for r in runs]
        for label in runs[0].correct:
            missing = [r.name for r in runs if label not in r.correct]
            if missing:
                continue  # e.g. a validation-routed row when one seed has no validation split
            table = np.stack([r.correct[label] for r in runs], axis=1).astype(np.float64)
            tables[(group, label)] = table
            shown = _display(group, method, label)
            for i, size in enumerate(sizes):
                iv = accuracy_ci(table[i], resamples=resamples)
                flops = [r.flops[label][i] for r in runs]
                branch = sorted({r.branch[label][i] for r in runs}) if label in runs[0].branch else []
                rows.append({"group": group, "label": shown, "view": label, "method": method,
                             "runs": [r.name for r in runs], "seeds": seeds, "size": size,
                             "images": table.shape[-1], "accuracy": iv.estimate, "ci95": [iv.low, iv.high],
                             "seed_accuracies": table[i].mean(axis=1).tolist(),
                             "flops": float(np.mean(flops)), "flops_vary": len(set(flops)) > 1,
                             "branch": "/".join(map(str, branch))})
            for span, idx in spans.items():
                iv = average_accuracy_ci(table[idx], resamples=resamples)
                averages.append({"group": group, "label": shown, "view": label, "method": method, "span": span,
                                 "sizes": [sizes[i] for i in idx], "accuracy": iv.estimate, "ci95": [iv.low, iv.high],
                                 "seed_accuracies": table[idx].mean(axis=(0, 2)).tolist()})
    differences = []
    deployable = {_qualify(lab, kind) for lab in (RULE, VALIDATION) for kind in ("", *_KINDS)}
    ours = [(g, lab) for g, lab in tables if methods[g] == "msun" and lab in deployable]
    theirs = [(g, lab) for g, lab in tables if methods[g] in _BASELINES]
    for g_a, lab_a in ours:
        for g_b, lab_b in theirs:
            if "enlarged" in lab_a and "enlarged" not in lab_b:
                continue  # an enlarged MSUN is compared with enlarged baselines (the paper protocol) only
            a, b = tables[(g_a, lab_a)], tables[(g_b, lab_b)]
            name_a, name_b = _display(g_a, "msun", lab_a), _display(g_b, methods[g_b], lab_b)
            cells = [(str(size), difference_ci(a[i], b[i], resamples=resamples)) for i, size in enumerate(sizes)]
            cells += [(span, average_difference_ci(a[idx], b[idx], resamples=resamples)) for span, idx in spans.items()]
            for where, iv in cells:
                differences.append({"a": name_a, "b": name_b, "size": where, "difference": iv.estimate,
                                    "ci95": [iv.low, iv.high],
                                    "excludes_zero": bool(iv.low > 0 or iv.high < 0)})
    info = {"groups": {g: [scores[i].name for i in m] for g, m in groups.items()}, "spans": list(spans)}
    return rows, averages, differences, info


# ---------------------------------------------------------------------------------------------------- output

def markdown_table(rows: Sequence[dict[str, Any]], *, key: str = "accuracy", scale: float = 100.0,
                   digits: int = 1, averages: Sequence[dict[str, Any]] = (), average: bool = True) -> str:
    """One row per label, one column per size, then the averages (given, with intervals, or the plain mean).

    Args:
        rows: Rows with ``label``, ``size`` and ``key`` (and ``ci95`` when intervals are printed).
        key: The value shown.
        scale: Multiplier (100 for percent).
        digits: Decimals.
        averages: Rows with ``label``, ``span``, ``accuracy`` and ``ci95``: one column per span. Without them an
            unweighted average over the sizes is added (unless ``average`` is False).
        average: Add the plain average column when no ``averages`` are given.

    Returns:
        A Markdown table; a cell reads ``value [low, high]`` when its row has ``ci95`` and ``key`` is accuracy.
    """
    sizes = sorted({r["size"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    spans = list(dict.fromkeys(a["span"] for a in averages)) or (["avg"] if average else [])
    lines = ["| model | " + " | ".join(str(s) for s in [*sizes, *spans]) + " |",
             "|" + "---|" * (len(sizes) + 1 + len(spans))]

    def cell(row: dict[str, Any]) -> str:
        if key == "accuracy" and "ci95" in row:
            return format_interval(row)
        return f"{row[key] * scale:.{digits}f}"

    for label in labels:
        mine = {r["size"]: r for r in rows if r["label"] == label}
        cells = [cell(mine[s]) if s in mine else "" for s in sizes]
        if averages:
            avg = {a["span"]: a for a in averages if a["label"] == label}
            cells += [format_interval(avg[s]) if s in avg else "" for s in spans]
        elif average:
            cells.append(f"{np.mean([r[key] * scale for r in mine.values()]):.{digits}f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _difference_table(differences: Sequence[dict[str, Any]]) -> str:
    wheres = list(dict.fromkeys(d["size"] for d in differences))
    pairs = list(dict.fromkeys((d["a"], d["b"]) for d in differences))
    lines = ["| A − B | " + " | ".join(wheres) + " |", "|" + "---|" * (len(wheres) + 1)]
    for a, b in pairs:
        mine = {d["size"]: d for d in differences if (d["a"], d["b"]) == (a, b)}
        cells = []
        for w in wheres:
            d = mine[w]
            text = format_interval(d, signed=True)
            cells.append(f"**{text}**" if d["excludes_zero"] else text)
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(rows: Sequence[dict[str, Any]], stem: Path, native: bool) -> list[Path]:
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    acc_ax, flop_ax, front_ax = (fig.add_subplot(1, 3, i) for i in (1, 2, 3))
    for label in dict.fromkeys(r["label"] for r in rows):
        pts = sorted((r["size"], 100 * r["accuracy"], 100 * r["ci95"][0], 100 * r["ci95"][1], r["flops"] / 1e9)
                     for r in rows if r["label"] == label)
        size, acc, low, high, gflops = (np.array(c) for c in zip(*pts, strict=True))
        style = ":" if "oracle" in label else ("--" if "enlarged" in label else "-")
        line, = acc_ax.plot(size, acc, style, marker="o", ms=3, label=label)
        acc_ax.fill_between(size, low, high, color=line.get_color(), alpha=0.18, lw=0)
        flop_ax.plot(size, gflops, style, marker="o", ms=3, color=line.get_color(), label=label)
        order = np.argsort(gflops)
        front_ax.plot(gflops[order], acc[order], style, marker="o", ms=3, color=line.get_color(), label=label)
    mode = "native size" if native else "shrunk to size, re-enlarged"
    acc_ax.set(xlabel=f"test size (px, {mode})", ylabel="top-1 accuracy (%)",
               title="accuracy by test size (bands: 95% interval)")
    flop_ax.set(xlabel="test size (px)", ylabel="GFLOPs per image (2 x MACs)", title="cost by test size")
    front_ax.set(xlabel="GFLOPs per image (log)", ylabel="top-1 accuracy (%)", xscale="log",
                 title="accuracy against cost (one point per size)")
    for ax in (acc_ax, flop_ax, front_ax):
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=7)
    return save_figure(fig, stem)


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], fields: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        flat = dict(row)
        if "ci95" in flat:
            flat["ci_low"], flat["ci_high"] = flat.pop("ci95")
        for key, value in flat.items():
            if isinstance(value, list):
                flat[key] = ";".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in value)
        writer.writerow(flat)
    atomic_write_bytes(path, buffer.getvalue().encode())


def _save_correct(path: Path, scores: Sequence[_RunScores], sizes: Sequence[int]) -> None:
    names = [f"{s.name}|{label}" for s in scores for label in s.correct]
    correct = np.stack([s.correct[label] for s in scores for label in s.correct])
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, correct=correct, rows=np.array(names), sizes=np.array(sizes),
                            images=np.array(scores[0].images), names=np.array([s.name for s in scores]),
                            paths=np.array([s.path for s in scores]))


def evaluate_runs(run_dirs: Sequence[str | Path], *, data: str, sizes: Sequence[int] | str = EvalConfig.sizes,
                  out: str | Path = EvalConfig.out, native: bool = EvalConfig.native,
                  batch_size: int = EvalConfig.batch_size, device: str = EvalConfig.device,
                  images: int | None = EvalConfig.images, lossy_below: int | None = EvalConfig.lossy_below,
                  resamples: int = RESAMPLES, progress: bool = True) -> list[dict[str, Any]]:
    """Evaluate every run at every size; write the tables with intervals, the per-image correctness and the plot.

    Args:
        run_dirs: Run folders written by training. Runs differing only in their seed are grouped (one row each).
        data: ``--data`` source whose test split is used.
        sizes: Test sizes in pixels.
        out: Output folder.
        native: Feed each size as is (vanilla and MST also enlarged to the reference) instead of re-enlarging.
        batch_size: Test batch size.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        images: Evaluate a class-stratified subset of this many test images (the same for every run); all when None.
        lossy_below: Sizes below this are averaged separately (the lossy ones); None: the native image size of
            ``data`` when it has one (:data:`NATIVE_SIZES`), else no such average.
        resamples: Bootstrap resamples per interval.
        progress: Progress bars.

    Returns:
        One row per (seed group, label, size): ``accuracy`` in [0, 1], ``ci95``, ``seed_accuracies``, ``flops``.

    Raises:
        ToolkitError: A folder that is not a finished run, data with other classes, or the same run twice.
    """
    if isinstance(sizes, str):
        sizes = parse_sizes(sizes)
    sizes = sorted(set(sizes))
    if lossy_below is None:
        lossy_below = NATIVE_SIZES.get(data)
    dev = resolve_device(device)
    names = [Path(r).name for r in run_dirs]
    names = [n if names.count(n) == 1 else f"{Path(r).parent.name}/{n}" for n, r in zip(names, run_dirs, strict=True)]
    if len(set(names)) != len(names):
        raise ToolkitError(f"runs {sorted(n for n in names if names.count(n) > 1)} were given twice: pass each once")
    folder = Path(out)
    cache = _load_cache(folder / "correct.npz")  # runs scored there before, and not retrained since, are reused
    scores = [_evaluate_run(Path(r), n, data, sizes, native, batch_size, dev, images, progress, cache)
              for r, n in zip(run_dirs, names, strict=True)]
    rows, averages, differences, info = _summarise(scores, sizes, lossy_below, resamples)
    count = len(scores[0].images)
    _save_correct(folder / "correct.npz", scores, sizes)
    _write_csv(folder / "eval.csv", rows, ["group", "label", "method", "runs", "seeds", "size", "images", "accuracy",
                                           "ci_low", "ci_high", "seed_accuracies", "flops", "branch"])
    _write_csv(folder / "differences.csv", differences, ["a", "b", "size", "difference", "ci_low", "ci_high",
                                                         "excludes_zero"])
    mode = "native sizes" if native else "paper protocol: shrunk to the size, re-enlarged to the reference"
    shown = [r for r in rows if not r["view"].startswith("msun branch ")]
    shown_avg = [a for a in averages if not a["view"].startswith("msun branch ")]
    seeds = "; ".join(f"{g}: {len(m)}" for g, m in info["groups"].items())
    how = (f"{count} test images (class-stratified, the same for every run); seeds per row: {seeds}. "
           f"Cells: accuracy [95% interval], paired percentile bootstrap over the test images ({resamples} "
           "resamples), correctness averaged over a row's seeds per image; it holds the trained runs fixed "
           "(per-seed accuracies in eval.json/csv). `msun (best branch, oracle)` picks the branch on these test "
           "images: an upper bound, not a deployable result.")
    md = (f"# Accuracy (%) by test size ({mode})\n\n{how}\n\n{markdown_table(shown, averages=shown_avg)}\n\n")
    if differences:
        md += ("# Differences in accuracy (points), MSUN minus baseline\n\nPaired bootstrap over the same test "
               "images; **bold**: the 95% interval excludes 0.\n\n" + _difference_table(differences) + "\n\n")
    md += ("# GFLOPs per image (2 x MACs, torch.utils.flop_counter)\n\n"
           + markdown_table(shown, key="flops", scale=1e-9, digits=3, average=False) + "\n")
    extras = {s.name: s.extra for s in scores if s.extra}
    for name, extra in extras.items():
        md += ("\n# " + name + f": MSDNet anytime prediction ({count} test images)\n\n| exit | GFLOPs | accuracy (%) |"
               "\n|---|---|---|\n")
        md += "\n".join(f"| {r['exit']} | {r['flops'] / 1e9:.4f} | {100 * r['accuracy']:.1f} |"
                        for r in extra["anytime"]) + "\n"
    atomic_write_text(folder / "eval.md", md)
    atomic_write_json(folder / "eval.json", {
        "mode": mode, "native": native, "data": data, "images": count, "sizes": sizes, "lossy_below": lossy_below,
        "interval": {"level": 0.95, "method": "paired percentile bootstrap over test images, seeds averaged per "
                     "image", "resamples": resamples},
        "groups": info["groups"], "rows": rows, "averages": averages, "differences": differences,
        "msdnet": extras})
    _plot(shown, folder / "accuracy_by_size", native)
    for name, extra in extras.items():
        from msun_builder.budget import plot_budget

        others: dict[str, list[tuple[float, float]]] = {}
        for r in shown:  # every other model as a cost-accuracy curve over the test sizes
            if name not in r["runs"]:
                others.setdefault(r["label"], []).append((r["flops"], r["accuracy"]))
        plot_budget(extra["budget"], extra["anytime"], folder / f"budget_{name}", title=f"{name}: budgeted batch",
                    extra_curves=others)
    return rows
