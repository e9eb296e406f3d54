"""Fine-tune vanilla, MST and MSUN from the real ImageNet weights of tf_efficientnet_lite0, then compare per size.

For each dataset the three methods get the same recipe and budget (epochs, images, batch, optimizer, schedule,
seed); MSUN's split is chosen by ``--auto-split`` from a CKA analysis of the training data. Each run is a real
``msun-build`` command and the comparison a real ``msun-eval`` (paper protocol and ``--native``), so this script
also exercises the command line end to end. Finished runs are skipped and killed ones resumed, so the script can
be rerun after an interruption.

    .venv/bin/python bench/msun_finetune.py            # full: about an hour on 2 CPU cores
    .venv/bin/python bench/msun_finetune.py --quick    # minutes: tiny budgets, to check the pipeline
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


def _train(method: str, data: str, out: Path, scales: tuple[int, ...], flags: list[str]) -> float:
    """Train one run unless it finished earlier; return its training seconds (the sum over its epochs)."""
    if (out / "model").is_dir() and any((out / "model").iterdir()):
        print(f"{out}: finished earlier, skipped")
    elif (out / "checkpoint.pt").is_file():
        _run([str(BIN / "msun-build"), "--resume", str(out), "--quiet"])
    else:
        _run(_command(method, data, out, scales, flags))
    return sum(epoch["seconds"] for epoch in json.loads((out / "metrics.json").read_text()))


def _command(method: str, data: str, out: Path, scales: tuple[int, ...], flags: list[str]) -> list[str]:
    cmd = [str(BIN / "msun-build"), MODEL, "--method", method, "--data", data, "--scales",
           ",".join(map(str, scales)), "--optimizer", "adamw", "--lr", "0.001", "--seed", "0", "--quiet", "--out",
           str(out), *flags]
    if method == "msun":
        cmd.insert(2, "--auto-split")
    return cmd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny budgets (checks the pipeline, not the method)")
    parser.add_argument("--datasets", default="fashion-mnist,textures")
    parser.add_argument("--out", default="bench/out/finetune")
    parser.add_argument("--eval-images", type=int, default=2000, help="test images per evaluation (the first N)")
    args = parser.parse_args()
    root = Path(args.out + ("-quick" if args.quick else ""))
    summary = {}
    for data in args.datasets.split(","):
        scales, sizes, flags = SETTINGS[data]
        flags = QUICK[data] if args.quick else flags
        seconds = {m: _train(m, data, root / data / m, scales, flags) for m in ("vanilla", "mst", "msun")}
        runs = [str(root / data / m) for m in ("vanilla", "mst", "msun")]
        extra = ["--images", str(64 if args.quick else args.eval_images)]
        for mode in ("paper", "native"):
            done = root / data / f"eval-{mode}" / "eval.json"
            newest = max((Path(r) / "metrics.json").stat().st_mtime for r in runs)
            if done.is_file() and done.stat().st_mtime > newest:
                print(f"{done.parent}: evaluated after the last training, skipped", flush=True)
                continue
            _run([str(BIN / "msun-eval"), *runs, "--data", data, "--sizes", sizes, "--out",
                  str(root / data / f"eval-{mode}"), "--quiet", *(["--native"] if mode == "native" else []), *extra])
        split = json.loads((root / data / "msun" / "run.json").read_text()).get("split", {})
        summary[data] = {"train_seconds": seconds, "split": split.get("reason")}
    print("\n\n## Results\n")
    for data in summary:
        print(f"### {data}\n\nsplit: {summary[data]['split']}\n")
        seconds = ", ".join(f"{k} {v:.0f}" for k, v in summary[data]["train_seconds"].items())
        print(f"training seconds (sum over epochs): {seconds}")
        for mode in ("paper", "native"):
            print(f"\n#### {mode}\n")
            print((root / data / f"eval-{mode}" / "eval.md").read_text())


if __name__ == "__main__":
    main()
