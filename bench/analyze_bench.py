"""Overhead of ``cka-scale analyze`` over the bare forward passes and over its floor, and its memory.

For every row (model x ``--layers``), at the reference size 224 and scales ``--scales``:

1. **time** (one subprocess, alternating): the bare forward passes (the same dataset, transform, DataLoader,
   rescaling and forward passes as ``analyze``, without hooks), ``analyze`` itself (scales in separate passes, the CPU
   default) and ``analyze`` with all scales fused into one pass, best of ``--repeats`` each. The **floor** is the
   forward time plus the Gram GEMMs alone: ``x @ x.T`` (IEEE float32) on random ``(batch, C*H*W)`` features of every
   measured layer's shape, timed in the same process, times the number of batches and scales. Targets: analyze <= 1.15x
   the floor on every row, <= 1.05x the forward for ``stages``.
2. **where the time goes** in analyze: the Gram kernels inside the hooks (shift + GEMM), the accumulator's updates
   (HSIC terms, the one finiteness test), and the rest (forward passes, loader, rescaling).
3. **memory** (fresh subprocesses, peak RSS): analyze over the bare forward passes (target <= 1.5), and analyze on
   ``--mem-images`` large over small image counts (target <= 1.05; the accumulator streams).

Rows are saved to ``--json`` as they finish; a rerun skips the rows already there (delete the file to start over).

    .venv/bin/python bench/analyze_bench.py --results bench/RESULTS.md          # all rows
    .venv/bin/python bench/analyze_bench.py --models tf_efficientnet_lite0 --layers stages --images 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
SECTION = "## Analysis overhead (bench/analyze_bench.py)"


def _setup(name: str, args: argparse.Namespace):
    import timm
    import torch

    from cka_scale.analyze import AnalyzeConfig

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()  # random weights: timing only
    data_config = timm.data.resolve_data_config(model=model)
    scales = tuple(int(s) for s in args.scales.split(","))
    cfg = AnalyzeConfig(model=name, weights="none", scales=scales, images=args.images, batch_size=args.batch_size,
                        data=args.data, split=args.split, layers=args.layer_spec, device="cpu")
    return model, data_config, cfg


def _forward(model, data_config, cfg) -> tuple[float, int]:
    import torch
    from torch.utils.data import DataLoader, Subset

    from cka_scale.analyze import plan_batches, rescale
    from cka_scale.data import eval_transform, open_dataset

    ref = max(cfg.scales)
    dataset = open_dataset(cfg.data, cfg.split, transform=eval_transform(data_config, ref), seed=cfg.seed)
    count = min(cfg.images, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))
    loader = DataLoader(Subset(dataset, order[:count].tolist()), batch_sampler=plan_batches(count, cfg.batch_size, 4))
    start = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            for s in cfg.scales:
                model(rescale(x, s, ref, cfg.resize))
    return time.perf_counter() - start, count


def _gemm_floor(model, cfg, count: int) -> tuple[float, int]:
    """Seconds of the bare Gram GEMMs of one analyze run, and the number of layers."""
    import torch

    from cka_scale.analyze import plan_batches
    from cka_scale.hooks import select_layers, trace_layers
    from cka_scale.kernels import true_float32

    layers = select_layers(model, cfg.layers, trace_layers(model, max(cfg.scales)))
    batches = plan_batches(count, cfg.batch_size, 4)
    total = 0.0
    for info in layers:
        for size in sorted({len(b) for b in batches}):
            x = torch.randn(size, math.prod(info.shape))
            times = []
            for _ in range(3):
                start = time.perf_counter()
                with true_float32():
                    x @ x.T
                times.append(time.perf_counter() - start)
            total += min(times) * sum(len(b) == size for b in batches) * len(cfg.scales)
    return total, len(layers)


def _analyze_timed(model, data_config, cfg, fuse: bool) -> dict[str, float]:
    """Wall time of analyze, with the time inside the Gram kernels and the accumulator's updates."""
    from cka_scale import kernels
    from cka_scale.accumulate import CKAAccumulator
    from cka_scale.analyze import analyze

    spent = {"grams": 0.0, "update": 0.0}
    kernel, update = kernels.KERNELS[cfg.kernel], CKAAccumulator.update_grams

    def timed_kernel(*a, **k):
        start = time.perf_counter()
        try:
            return kernel(*a, **k)
        finally:
            spent["grams"] += time.perf_counter() - start

    def timed_update(self, grams):
        start = time.perf_counter()
        try:
            return update(self, grams)
        finally:
            spent["update"] += time.perf_counter() - start

    kernels.KERNELS[cfg.kernel], CKAAccumulator.update_grams = timed_kernel, timed_update
    try:
        start = time.perf_counter()
        analyze(cfg, model=model, data_config=data_config, progress=False, fuse_scales=fuse)
        spent["total"] = time.perf_counter() - start
    finally:
        kernels.KERNELS[cfg.kernel], CKAAccumulator.update_grams = kernel, update
    return spent


def child_time(args: argparse.Namespace) -> dict:
    import warnings

    warnings.simplefilter("ignore")  # degenerate layers of random weights: irrelevant to timing
    model, data_config, cfg = _setup(args.model, args)
    _, count = _forward(model, data_config, cfg)  # warm up the loader, allocator and thread pools
    fw, an, fused = [], [], []
    for _ in range(args.repeats):  # alternate, so drift on a shared machine hits all alike
        fw.append(_forward(model, data_config, cfg)[0])
        an.append(_analyze_timed(model, data_config, cfg, fuse=False))
        fused.append(_analyze_timed(model, data_config, cfg, fuse=True)["total"])
    gemm, layers = _gemm_floor(model, cfg, count)
    best = min(an, key=lambda r: r["total"])
    return {"forward_s": min(fw), "analyze_s": best["total"], "fused_s": min(fused), "gemm_s": gemm,
            "grams_s": best["grams"], "update_s": best["update"], "layers_count": layers, "images_used": count,
            "forward_all_s": fw, "analyze_all_s": [r["total"] for r in an], "fused_all_s": fused}


def child_memory(args: argparse.Namespace) -> dict:
    import warnings

    warnings.simplefilter("ignore")
    model, data_config, cfg = _setup(args.model, args)
    if args.child == "mem-forward":
        _forward(model, data_config, cfg)
    else:
        from cka_scale.analyze import analyze

        analyze(cfg, model=model, data_config=data_config, progress=False)
    # VmHWM is this address space's peak; ru_maxrss would carry the parent's peak across execve
    with open("/proc/self/status") as f:
        peak_kib = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), None)
    if peak_kib is None:  # not Linux
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mb": peak_kib / 1024}


def _run(child: str, model: str, layers: str, images: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", child, "--model", model, "--layer-spec", layers,
           "--images", str(images), "--scales", args.scales, "--batch-size", str(args.batch_size), "--data", args.data,
           "--split", args.split, "--repeats", str(args.repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(model: str, layers: str, args: argparse.Namespace) -> dict:
    t = _run("time", model, layers, args.images, args)
    mem_fw = _run("mem-forward", model, layers, args.images, args)["peak_rss_mb"]
    mem_an = _run("mem-analyze", model, layers, args.images, args)["peak_rss_mb"]
    row = {"model": model, "layers": layers, **t, "rss_forward_mb": mem_fw, "rss_analyze_mb": mem_an}
    if args.mem_images:
        small, large = (int(v) for v in args.mem_images.split(","))
        row["rss_small_mb"] = _run("mem-analyze", model, layers, small, args)["peak_rss_mb"]
        row["rss_large_mb"] = _run("mem-analyze", model, layers, large, args)["peak_rss_mb"]
        row["mem_images"] = [small, large]
    row["load_avg"] = os.getloadavg()[0]
    return row


def table(rows: list[dict]) -> str:
    head = ["model", "--layers", "layers", "forward s", "Gram GEMMs s", "floor s", "analyze s", "fused s",
            "analyze / floor (<= 1.15)", "analyze / forward (stages <= 1.05)", "in Gram kernels s",
            "in accumulator s", "peak RSS analyze / forward (<= 1.5)", "RSS large / small images (<= 1.05)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        floor = r["forward_s"] + r["gemm_s"]
        mem = (f"{r['rss_large_mb'] / r['rss_small_mb']:.3f} ({r['mem_images'][1]}/{r['mem_images'][0]})"
               if "rss_large_mb" in r else "not run")
        out.append("| " + " | ".join([
            r["model"], r["layers"], str(r["layers_count"]),
            f"{r['forward_s']:.2f}", f"{r['gemm_s']:.2f}", f"{floor:.2f}", f"{r['analyze_s']:.2f}",
            f"{r['fused_s']:.2f}", f"**{r['analyze_s'] / floor:.3f}**", f"{r['analyze_s'] / r['forward_s']:.3f}",
            f"{r['grams_s']:.2f}", f"{r['update_s']:.2f}",
            f"{r['rss_analyze_mb']:.0f} / {r['rss_forward_mb']:.0f} MB = "
            f"{r['rss_analyze_mb'] / r['rss_forward_mb']:.3f}",
            mem]) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tf_efficientnet_lite0,resnet50")
    parser.add_argument("--layers", default="stages,all", help="--layers choices, one row each")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--scales", default="64,224")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--split", default="train")
    parser.add_argument("--repeats", type=int, default=2, help="timing repeats (best of)")
    parser.add_argument("--mem-images", default="128,1000", help="small,large image counts for the memory ratio; "
                        "empty to skip")
    parser.add_argument("--json", type=Path, default=HERE / "analyze_bench.json", help="finished rows (resumable)")
    parser.add_argument("--results", type=Path, help="write the table into this Markdown file's section")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--layer-spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        fn = child_time if args.child == "time" else child_memory
        print(json.dumps(fn(args)))
        return
    done = json.loads(args.json.read_text()) if args.json.exists() else {}
    settings = f"images={args.images} scales={args.scales} batch={args.batch_size} data={args.data}/{args.split}"
    rows = []
    for model in args.models.split(","):
        for layers in args.layers.split(","):
            key = f"{model}|{layers}|{settings}|mem={args.mem_images}"
            if key not in done:
                print(f"running {model} --layers {layers} ({settings})", file=sys.stderr, flush=True)
                done[key] = _row(model, layers, args)
                args.json.write_text(json.dumps(done, indent=1))
            rows.append(done[key])
    text = table(rows)
    print(text)
    if args.results:
        sys.path.insert(0, str(HERE))
        from cka_bench import _replace_section

        command = " ".join([".venv/bin/python", "bench/analyze_bench.py", *sys.argv[1:]])
        loads = ", ".join(f"{r['load_avg']:.1f}" for r in rows)
        body = (f"{SECTION}\n\nCommand: `{command}` ({settings}; random weights; CPU, {os.cpu_count()} cores "
                f"shared with other jobs, load average at the end of each row: {loads}).\n\n{text}\n")
        _replace_section(args.results, SECTION, body)


if __name__ == "__main__":
    main()
