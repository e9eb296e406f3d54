"""Overhead of ``cka-scale analyze``: wall time vs the bare forward passes, and peak memory vs the image count.

Two measurements, each in fresh subprocesses so that peak RSS belongs to one run:

1. **time**: ``analyze`` with its defaults (stages, batch 64, scales 64/128/224, hooks, Grams, unbiased-HSIC
   accumulation) against the same pipeline without any of it: the same dataset, transform, DataLoader, rescaling
   and forward passes at every scale. Ratio target <= 1.15.
2. **memory**: peak RSS of ``analyze`` on 4096 images divided by that on 512 images (target <= 1.1: the
   accumulator streams, so memory must not grow with the number of images).

    .venv/bin/python bench/analyze_bench.py                 # full (about 10 minutes on 2 CPU cores)
    .venv/bin/python bench/analyze_bench.py --quick         # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "tf_efficientnet_lite0"


def _child(mode: str, images: int, scales: tuple[int, ...], batch: int, data: str, layers: str) -> dict:
    import torch
    from torch.utils.data import DataLoader, Subset

    from cka_scale import eval_transform, load_model, open_dataset
    from cka_scale.analyze import AnalyzeConfig, analyze, plan_batches, rescale

    loaded = load_model(MODEL)
    cfg = AnalyzeConfig(model=MODEL, scales=scales, images=images, batch_size=batch, data=data, layers=layers,
                        device="cpu")
    start = time.perf_counter()
    if mode == "analyze":
        report = analyze(cfg, model=loaded.model, data_config=loaded.data_config, progress=False)
        layers_n = len(report.layers)
    else:
        ref = max(scales)
        model = loaded.model.eval()
        dataset = open_dataset(data, "test", transform=eval_transform(loaded.data_config, ref), seed=0)
        count = min(images, len(dataset))
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
        loader = DataLoader(Subset(dataset, order[:count].tolist()), batch_sampler=plan_batches(count, batch, 4))
        with torch.no_grad():
            for x, _ in loader:
                for s in scales:
                    model(rescale(x, s, ref, "down-up"))
        layers_n = 0
    seconds = time.perf_counter() - start
    return {"mode": mode, "images": images, "seconds": seconds, "layers": layers_n,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _run(mode: str, images: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--images", str(images), "--scales", args.scales,
           "--batch-size", str(args.batch_size), "--data", args.data, "--layers", args.layers]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--scales", default="64,128,224")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--layers", default="stages")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    scales = tuple(int(s) for s in args.scales.split(","))
    if args.child:
        print(json.dumps(_child(args.child, args.images, scales, args.batch_size, args.data, args.layers)))
        return
    small, large, repeats = (64, 256, 1) if args.quick else (512, 4096, args.repeats)
    rows = []
    for _ in range(repeats):  # alternate, so drift on a shared machine hits both alike
        rows.append((_run("analyze", small, args), _run("forward", small, args)))
    t_an = statistics.median(r[0]["seconds"] for r in rows)
    t_fw = statistics.median(r[1]["seconds"] for r in rows)
    big = _run("analyze", large, args)
    mem_small = statistics.median(r[0]["peak_rss_mb"] for r in rows)
    print(f"model {MODEL}, data {args.data}, scales {args.scales}, --layers {args.layers} "
          f"({rows[0][0]['layers']} layers), batch {args.batch_size}, CPU threads {os.cpu_count()}, "
          f"median of {repeats}\n")
    print("| measurement | value | target |")
    print("|---|---|---|")
    print(f"| analyze wall time, {small} images | {t_an:.1f} s | |")
    print(f"| bare forward passes, same images and scales | {t_fw:.1f} s | |")
    print(f"| **time ratio** analyze / forward | **{t_an / t_fw:.3f}** | <= 1.15 |")
    print(f"| peak RSS, analyze on {small} images | {mem_small:.0f} MB | |")
    print(f"| peak RSS, analyze on {large} images | {big['peak_rss_mb']:.0f} MB | |")
    print(f"| **memory ratio** {large} / {small} images | **{big['peak_rss_mb'] / mem_small:.3f}** | <= 1.1 |")


if __name__ == "__main__":
    main()
