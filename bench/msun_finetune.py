"""Fine-tune vanilla, MST and MSUN from the real ImageNet weights of tf_efficientnet_lite0, then compare per size.

For each dataset the three methods get the same recipe and budget (epochs, images, batch, optimizer, schedule,
seed); MSUN's split is chosen by ``--auto-split`` from a CKA analysis of the training data. Each run is a real
``msun-build`` command and the comparison a real ``msun-eval`` (paper protocol and ``--native``), so this script
also exercises the command line end to end. Finished runs are skipped and killed ones resumed, so the script can
be rerun after an interruption.

    .venv/bin/python bench/msun_finetune.py            # full: about an hour on 2 CPU cores
    .venv/bin/python bench/msun_finetune.py --quick    # minutes: tiny budgets, to check the pipeline
    .venv/bin/python bench/msun_finetune.py --datasets fashion-mnist --ablation   # + two MSUN variants
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
MODEL = "tf_efficientnet_lite0"

# dataset -> (scales, test sizes, training flags shared by the three methods)
SETTINGS = {
    "fashion-mnist": ((16, 32, 64), "12:64:4",
                      ["--train-images", "4000", "--epochs", "2", "--batch-size", "64", "--test-images", "1000"]),
    "textures": ((24, 48, 96), "24:96:12",
                 ["--epochs", "5", "--batch-size", "32", "--test-images", "320"]),
}
QUICK = {"fashion-mnist": ["--train-images", "256", "--epochs", "1", "--batch-size", "32", "--test-images", "64"],
         "textures": ["--train-images", "128", "--epochs", "1", "--batch-size", "32", "--test-images", "64"]}


def _run(cmd: list[str]) -> float:
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


# MSUN variants trained with --ablation: name -> flags replacing --auto-split. "msun-stem" is the stem-only split
# (stride 2) that --auto-split chose here before its reach rule; "msun-stem-nosi" is that without the SI loss.
ABLATIONS = {"msun-stem": ["--split-reduction", "2"], "msun-stem-nosi": ["--split-reduction", "2", "--si-weight", "0"]}


def _train(name: str, data: str, out: Path, scales: tuple[int, ...], flags: list[str]) -> float:
    """Train one run unless it finished earlier; return its training seconds (the sum over its epochs)."""
    if (out / "model").is_dir() and any((out / "model").iterdir()):
        print(f"{out}: finished earlier, skipped")
    elif (out / "checkpoint.pt").is_file():
        _run([str(BIN / "msun-build"), "--resume", str(out), "--quiet"])
    else:
        method = "msun" if name.startswith("msun") else name
        split = ABLATIONS.get(name, ["--auto-split"]) if method == "msun" else []
        _run([str(BIN / "msun-build"), MODEL, *split, "--method", method, "--data", data, "--scales",
              ",".join(map(str, scales)), "--optimizer", "adamw", "--lr", "0.001", "--seed", "0", "--quiet",
              "--out", str(out), *flags])
    return sum(epoch["seconds"] for epoch in json.loads((out / "metrics.json").read_text()))


def _evaluate(runs: list[Path], data: str, sizes: str, out: Path, native: bool, images: int) -> None:
    """``msun-eval`` the runs into ``out`` unless it already holds an evaluation newer than every run."""
    done = out / "eval.json"
    if done.is_file() and done.stat().st_mtime > max((r / "metrics.json").stat().st_mtime for r in runs):
        print(f"{out}: evaluated after the last training, skipped", flush=True)
        return
    _run([str(BIN / "msun-eval"), *map(str, runs), "--data", data, "--sizes", sizes, "--out", str(out), "--quiet",
          *(["--native"] if native else []), "--images", str(images)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny budgets (checks the pipeline, not the method)")
    parser.add_argument("--datasets", default="fashion-mnist,textures")
    parser.add_argument("--out", default="bench/out/finetune")
    parser.add_argument("--eval-images", type=int, default=2000, help="test images per evaluation (the first N)")
    parser.add_argument("--ablation", action="store_true",
                        help="also train MSUN with a stem-only split (stride 2), with and without the "
                             "scale-invariant loss, and compare the three MSUNs (paper protocol)")
    args = parser.parse_args()
    root = Path(args.out + ("-quick" if args.quick else ""))
    images = 64 if args.quick else args.eval_images
    summary = {}
    for data in args.datasets.split(","):
        scales, sizes, flags = SETTINGS[data]
        flags = QUICK[data] if args.quick else flags
        names = ["vanilla", "mst", "msun"]
        seconds = {m: _train(m, data, root / data / m, scales, flags) for m in names}
        for mode in ("paper", "native"):
            _evaluate([root / data / m for m in names], data, sizes, root / data / f"eval-{mode}", mode == "native",
                      images)
        modes = ["paper", "native"]
        if args.ablation:
            seconds |= {m: _train(m, data, root / data / m, scales, flags) for m in ABLATIONS}
            _evaluate([root / data / m for m in ("msun", *ABLATIONS)], data, sizes, root / data / "eval-ablation",
                      False, images)
            modes.append("ablation")
        split = json.loads((root / data / "msun" / "run.json").read_text()).get("split", {})
        summary[data] = {"train_seconds": seconds, "split": split.get("reason"), "modes": modes}
    print("\n\n## Results\n")
    for data in summary:
        print(f"### {data}\n\nsplit: {summary[data]['split']}\n")
        seconds = ", ".join(f"{k} {v:.0f}" for k, v in summary[data]["train_seconds"].items())
        print(f"training seconds (sum over epochs): {seconds}")
        for mode in summary[data]["modes"]:
            print(f"\n#### {mode}\n")
            print((root / data / f"eval-{mode}" / "eval.md").read_text())


if __name__ == "__main__":
    main()
