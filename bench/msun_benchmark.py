"""The MSUN benchmark on Fashion-MNIST where small means lossy: two regimes, three seeds, intervals on every number.

Protocol (issue 12). Reference size 32 px (Fashion-MNIST images are 28 px), MSUN scales 8/16/32, test sizes 8 to
32 px every 4 px on all 10 000 test images; sizes below the native 28 px are the lossy ones. Two regimes, the same
budget (training images, epochs, batch, optimizer, schedule) for every method of a regime:

- ``finetune``: tf_efficientnet_lite0 from its real ImageNet weights (AdamW, 10 000 training images, 3 epochs);
- ``scratch``: timm's resnet10t from a random initialisation (SGD, 20 000 training images, 5 epochs), the paper's
  regime, plus MSDNet (its ``small`` preset) on the same images and epochs.

Methods per regime and seed: ``vanilla`` (trained at 32 px), ``vanilla-eq`` (vanilla with 3x the epochs: as many
forward passes as the three-branch MSUN, i.e. equal training compute), ``mst`` (multi-scale training at 8/16/32),
``msun`` (``--auto-split --split-rule cost``: the split is chosen from a CKA analysis of training images by the rule
that was the default when this benchmark ran; ``bench/split_study.py`` compares it with rule deep). Seeds 0, 1, 2.
Every run holds out a seeded, class-stratified validation split of its training images (``msun-build``'s default);
the MSUN's fitted routing, MSDNet's thresholds and the split are decided on training/validation data only. Then one
``msun-eval --native`` scores every run of a regime on the test set: each model fed the small image as is and
enlarged to the reference (the enlarged input is exactly the paper protocol's shrunk-and-re-enlarged image, so this
one evaluation holds both tables), with 95% intervals (paired bootstrap over test images, seeds averaged per image).
MSDNet runs are evaluated beside the MSUN runs in the paper protocol (``eval-msdnet``: its anytime and
budgeted-batch tables).

Finished runs are skipped, killed runs resumed, evaluations newer than every run they read skipped: rerun the same
command after an interruption. ``--phase train`` trains only (the evaluation can follow later).

    .venv/bin/python bench/msun_benchmark.py                    # both regimes, about 3.7 hours on 2 CPU cores
    .venv/bin/python bench/msun_benchmark.py --regimes scratch  # one regime
    .venv/bin/python bench/msun_benchmark.py --quick            # minutes: tiny budgets, one seed, checks the pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BIN = Path(sys.executable).parent
SCALES = "8,16,32"
SIZES = "8:32:4"
DATA = "fashion-mnist"

#: regime -> (model, weights, flags shared by every method of the regime)
REGIMES: dict[str, tuple[str, str, list[str]]] = {
    "finetune": ("tf_efficientnet_lite0", "auto",
                 ["--optimizer", "adamw", "--lr", "0.001", "--train-images", "10000", "--epochs", "3",
                  "--batch-size", "64", "--test-images", "1000"]),
    "scratch": ("resnet10t", "none",
                ["--optimizer", "sgd", "--lr", "0.1", "--weight-decay", "5e-5", "--train-images", "20000", "--epochs",
                 "5", "--batch-size", "64", "--test-images", "1000"]),
}
QUICK = ["--train-images", "256", "--epochs", "1", "--batch-size", "32", "--test-images", "64"]


def _flag(flags: list[str], name: str) -> str:
    return flags[flags.index(name) + 1]


def _with(flags: list[str], name: str, value: str) -> list[str]:
    out = list(flags)
    out[out.index(name) + 1] = value
    return out


def _methods(regime: str, flags: list[str]) -> dict[str, list[str]]:
    """Method name -> ``msun-build`` flags beyond the regime's."""
    epochs = int(_flag(flags, "--epochs"))
    methods = {"vanilla": ["--method", "vanilla"],
               "vanilla-eq": ["--method", "vanilla", "--epochs", str(3 * epochs)],
               "mst": ["--method", "mst"],
               "msun": ["--method", "msun", "--auto-split", "--split-rule", "cost"]}
    if regime == "scratch":
        methods["msdnet"] = ["--method", "msdnet", "--msdnet-preset", "small"]
    return methods


def _run(cmd: list[str]) -> float:
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def _train(out: Path, model: str, weights: str, flags: list[str], extra: list[str], seed: int) -> None:
    """Train one run unless it finished earlier (resume it when a checkpoint is there).

    An MSUN run is finished once its record holds the validation routing: a run killed after saving its model but
    before fitting the routing is resumed, which fits it.
    """
    if (out / "model").is_dir() and any((out / "model").iterdir()):
        record = json.loads((out / "run.json").read_text())
        unrouted = record.get("method") == "msun" and record.get("validation") is None
        if not (unrouted and (out / "checkpoint.pt").is_file()):  # a finished model is never trained again
            print(f"{out}: finished earlier, skipped", flush=True)
            return
    if (out / "checkpoint.pt").is_file():
        _run([str(BIN / "msun-build"), "--resume", str(out), "--quiet"])
        return
    method = extra[extra.index("--method") + 1]
    flags = list(flags)
    if "--epochs" in extra:
        flags = _with(flags, "--epochs", extra[extra.index("--epochs") + 1])
        extra = [v for i, v in enumerate(extra) if v != "--epochs" and (i == 0 or extra[i - 1] != "--epochs")]
    scales = "32" if method == "msdnet" else SCALES
    head = [] if method == "msdnet" else [model, "--weights", weights]
    _run([str(BIN / "msun-build"), *head, *extra, "--data", DATA, "--scales", scales, "--seed", str(seed),
          "--quiet", "--out", str(out), *flags])


def _evaluate(runs: list[Path], out: Path, native: bool, images: int | None) -> None:
    """``msun-eval`` the runs into ``out`` unless it already holds an evaluation newer than every run."""
    done = out / "eval.json"
    if done.is_file() and done.stat().st_mtime > max((r / "run.json").stat().st_mtime for r in runs):
        print(f"{out}: evaluated after the last training, skipped", flush=True)
        return
    _run([str(BIN / "msun-eval"), *map(str, runs), "--data", DATA, "--sizes", SIZES, "--out", str(out), "--quiet",
          *(["--native"] if native else []), *(["--images", str(images)] if images else [])])


def _cell(row: dict, signed: bool = False) -> str:
    from msun_builder.evaluate import format_interval

    text = format_interval(row, signed)
    return f"**{text}**" if signed and row["excludes_zero"] else text


def summary(folder: Path, kind: str, columns: tuple[str, ...] = ("8", "12", "16", "24", "32", "avg<28", "avg")) -> str:
    """A compact Markdown table of one native evaluation: accuracy [95% interval] per method for one input kind.

    Args:
        folder: An ``eval-native`` folder.
        kind: ``enlarged`` (the paper protocol) or ``as is`` (native sizes).
        columns: Sizes and spans shown.

    Returns:
        The accuracy table, then the MSUN-minus-baseline differences for the same kind, then GFLOPs per image.
    """
    result = json.loads((folder / "eval.json").read_text())
    keep = lambda label: label.endswith(f"{kind})") and "branch " not in label.replace("best branch", "")  # noqa: E731
    cells: dict[str, dict[str, str]] = {}
    flops: dict[str, dict[str, str]] = {}
    for r in result["rows"]:
        if keep(r["view"]):
            cells.setdefault(r["label"], {})[str(r["size"])] = _cell(r)
            flops.setdefault(r["label"], {})[str(r["size"])] = f"{r['flops'] / 1e9:.4f}"
    for a in result["averages"]:
        if keep(a["view"]):
            cells[a["label"]][a["span"]] = _cell(a)
    head = "| model | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 1) + "\n"
    text = head + "".join(f"| {label} | " + " | ".join(row.get(c, "") for c in columns) + " |\n"
                          for label, row in cells.items())
    diffs: dict[str, dict[str, str]] = {}
    for d in result["differences"]:
        if d["a"].endswith(f"{kind})") and (kind == "as is" or d["b"].endswith(f"{kind})")):  # native: both baselines
            diffs.setdefault(f"{d['a']} − {d['b']}", {})[d["size"]] = _cell(d, signed=True)
    text += "\n" + head.replace("| model |", "| difference (points) |") + "".join(
        f"| {pair} | " + " | ".join(row.get(c, "") for c in columns) + " |\n" for pair, row in diffs.items())
    sizes = [c for c in columns if c.isdigit()]
    text += "\n| GFLOPs per image | " + " | ".join(sizes) + " |\n|" + "---|" * (len(sizes) + 1) + "\n" + "".join(
        f"| {label} | " + " | ".join(row.get(c, "") for c in sizes) + " |\n" for label, row in flops.items())
    return text


def main() -> None:
    """Train and evaluate every regime, method and seed; print the evaluation tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regimes", default="finetune,scratch", help="comma list of " + ", ".join(REGIMES))
    parser.add_argument("--seeds", default="0,1,2", help="training seeds")
    parser.add_argument("--phase", choices=("train", "eval", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="tiny budgets and 500 test images (pipeline check)")
    parser.add_argument("--out", default="bench/out/msun-benchmark")
    parser.add_argument("--summary", action="store_true",
                        help="print compact tables of the finished evaluations (paper protocol and native) and stop")
    args = parser.parse_args()
    root = Path(args.out + ("-quick" if args.quick else ""))
    seeds = [int(s) for s in args.seeds.split(",")]
    regimes = args.regimes.split(",")
    unknown = sorted(set(regimes) - set(REGIMES))
    if unknown:
        parser.error(f"unknown regimes {unknown}: choose from {', '.join(REGIMES)}")
    if args.summary:
        for regime in regimes:
            folder = root / regime / "eval-native"
            for kind, title in (("enlarged", "paper protocol (shrunk, re-enlarged)"), ("as is", "native sizes")):
                print(f"### {regime}, {title}\n\n{summary(folder, kind)}")
        return
    timings: dict[str, float] = {}
    for regime in regimes:
        model, weights, flags = REGIMES[regime]
        flags = QUICK if args.quick else flags
        runs = []
        for seed in seeds:
            for name, extra in _methods(regime, flags).items():
                out = root / regime / f"{name}-s{seed}"
                runs.append(out)
                if args.phase in ("train", "all"):
                    start = time.perf_counter()
                    _train(out, model, weights, flags, extra, seed)
                    timings[str(out)] = time.perf_counter() - start
        if args.phase == "train":
            continue
        images = 500 if args.quick else None
        _evaluate([r for r in runs if "msdnet" not in r.name], root / regime / "eval-native", True, images)
        if any("msdnet" in r.name for r in runs):
            _evaluate([r for r in runs if r.name.startswith(("msdnet", "msun"))], root / regime / "eval-msdnet", False,
                      images)
    json.dump(timings, sys.stdout, indent=1)
    if args.phase == "train":
        return
    print("\n\n## Results\n")
    for regime in regimes:
        for part in ("native", "msdnet"):
            if (root / regime / f"eval-{part}" / "eval.md").is_file():
                print(f"### {regime}, {part}\n")
                print((root / regime / f"eval-{part}" / "eval.md").read_text())


if __name__ == "__main__":
    main()
