"""MSDNet on Fashion-MNIST: anytime table and budgeted-batch curve, next to vanilla and MSUN at matching FLOPs.

The vanilla and MSUN runs of ``bench/msun_finetune.py`` are evaluated at native sizes, where their cost falls with
the size, so their accuracy-vs-FLOPs curves sit next to MSDNet's budgeted curve.

    .venv/bin/python bench/msun_finetune.py --datasets fashion-mnist   # first, for the vanilla and MSUN runs
    .venv/bin/python bench/msdnet_budget.py                            # about 10 minutes on 2 CPU cores
    .venv/bin/python bench/msdnet_budget.py --quick                    # a smoke run
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


def _run(cmd: list[str]) -> float:
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="bench/out/msdnet")
    parser.add_argument("--finetune", default=None,
                        help="folder with the vanilla and msun runs of bench/msun_finetune.py "
                             "(default: bench/out/finetune[-quick]/fashion-mnist)")
    args = parser.parse_args()
    out = Path(args.out + ("-quick" if args.quick else ""))
    run = out / "msdnet-small"
    flags = (["--train-images", "1024", "--holdout-images", "256", "--epochs", "1", "--test-images", "64"]
             if args.quick else
             ["--train-images", "20000", "--holdout-images", "5000", "--epochs", "8", "--test-images", "1000"])
    seconds = 0.0
    if not (run / "model" / "msdnet.safetensors").is_file():
        cmd = [str(BIN / "msun-build"), "--method", "msdnet", "--msdnet-preset", "small", "--scales", "32",
               "--data", "fashion-mnist", "--batch-size", "64", "--optimizer", "sgd", "--lr", "0.1",
               "--weight-decay", "1e-4", "--seed", "0", "--quiet", "--out", str(run), *flags]
        seconds = _run([str(BIN / "msun-build"), "--resume", str(run), "--quiet"]
                       if (run / "checkpoint.pt").is_file() else cmd)
    finetune = Path(args.finetune or f"bench/out/finetune{'-quick' if args.quick else ''}/fashion-mnist")
    others = [str(finetune / m) for m in ("vanilla", "msun") if (finetune / m / "model").is_dir()]
    if not others:
        print(f"note: no vanilla/msun runs in {finetune}; run bench/msun_finetune.py first for the comparison")
    images = ["--images", "64"] if args.quick else []
    _run([str(BIN / "msun-eval"), str(run), *others, "--data", "fashion-mnist", "--sizes", "16:64:8", "--native",
          "--out", str(out / "eval"), "--quiet", *images])
    result = json.loads((out / "eval" / "eval.json").read_text())
    extra = result["msdnet"][run.name]
    print(f"\nMSDNet small preset, Fashion-MNIST at 32 px; training took {seconds:.0f} s\n")
    print("| exit | cumulative MFLOPs | top-1 (%) |\n|---|---|---|")
    for r in extra["anytime"]:
        print(f"| {r['exit'] + 1} | {r['flops'] / 1e6:.2f} | {100 * r['accuracy']:.1f} |")
    print("\n| budget p | average MFLOPs per image | top-1 (%) | exit fractions |\n|---|---|---|---|")
    for r in extra["budget"][::4]:
        fractions = " / ".join(f"{f:.2f}" for f in r["exit_fractions"])
        print(f"| {r['p']:.2f} | {r['flops'] / 1e6:.2f} | {100 * r['accuracy']:.1f} | {fractions} |")
    print("\nThe other models at native test sizes (MFLOPs per image, top-1 %):\n")
    print("| run | model | size | MFLOPs | top-1 (%) |\n|---|---|---|---|---|")
    for r in result["rows"]:
        if r["method"] != "msdnet" and "branch " not in r["label"]:
            print(f"| {r['run']} | {r['label']} | {r['size']} | {r['flops'] / 1e6:.1f} | {100 * r['accuracy']:.1f} |")
    print(f"\nplot: {out / 'eval' / ('budget_' + run.name + '.png')}")


if __name__ == "__main__":
    main()
