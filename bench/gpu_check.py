"""The performance checks of issue 11 on a CUDA GPU, as one short script: JSON and Markdown into ``--out``.

On a machine without CUDA it says so and exits 0 (nothing is measured). On CUDA, with random weights:

1. **engine**: ``cka_matrix`` (linear, unbiased) over 16 float32 feature sets of 1024 images (widths
   256/1024/4096/2048, four times each) over the 16 bare Gram GEMMs (best of 3; target <= 1.3).
2. **analyze**, for ``tf_efficientnet_lite0`` and ``resnet50`` x ``--layers stages|all`` at 224 px (scales 64,224):
   throughput (images/s), analyze over the bare forward passes and over its floor (forward + bare Gram GEMMs, same
   process), scales in separate passes and fused into one, peak GPU memory of analyze over that of the forward passes.
3. **syncs per batch**: ``torch.cuda.set_sync_debug_mode("warn")`` counts every host-device synchronisation of two
   analyze runs of different lengths; their difference per batch (target <= 1, whatever the layer count).
4. **TF32**: the largest CKA change when the model's own layers may use TF32 (the Gram GEMMs never do).

    python bench/gpu_check.py --out gpu-results          # about 5 minutes on one recent GPU
    python bench/gpu_check.py --out gpu-results --quick  # 2 batches per row
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
MODELS = ("tf_efficientnet_lite0", "resnet50")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan")


def _config(name: str, layers: str, images: int, args: argparse.Namespace):
    from cka_scale.analyze import AnalyzeConfig

    return AnalyzeConfig(model=name, weights="none", scales=(64, 224), images=images, batch_size=args.batch_size,
                         data=args.data, split=args.split, layers=layers, device=args.device)


def _forward(model, data_config, cfg) -> tuple[float, int]:
    import torch
    from torch.utils.data import DataLoader, Subset

    from cka_scale.analyze import plan_batches, rescale
    from cka_scale.data import eval_transform, open_dataset

    ref = max(cfg.scales)
    dataset = open_dataset(cfg.data, cfg.split, transform=eval_transform(data_config, ref), seed=cfg.seed)
    count = min(cfg.images, len(dataset))
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed))
    loader = DataLoader(Subset(dataset, order[:count].tolist()), batch_sampler=plan_batches(count, cfg.batch_size, 4),
                        pin_memory=cfg.device.startswith("cuda"))
    _sync(cfg.device)
    start = time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            x = x.to(cfg.device, non_blocking=True)
            for s in cfg.scales:
                model(rescale(x, s, ref, cfg.resize))
    _sync(cfg.device)
    return time.perf_counter() - start, count


def _gemm_floor(model, cfg, count: int) -> tuple[float, int]:
    import torch

    from cka_scale.analyze import plan_batches
    from cka_scale.hooks import select_layers, trace_layers
    from cka_scale.kernels import true_float32

    layers = select_layers(model, cfg.layers, trace_layers(model, max(cfg.scales), device=cfg.device))
    batches = plan_batches(count, cfg.batch_size, 4)
    total = 0.0
    for info in layers:
        for size in sorted({len(b) for b in batches}):
            x = torch.randn(size, math.prod(info.shape), device=cfg.device)
            best = math.inf
            for _ in range(3):
                _sync(cfg.device)
                start = time.perf_counter()
                with true_float32():
                    x @ x.T
                _sync(cfg.device)
                best = min(best, time.perf_counter() - start)
            total += best * sum(len(b) == size for b in batches) * len(cfg.scales)
            del x
    return total, len(layers)


def _analyze(model, data_config, cfg, fuse: bool):
    from cka_scale.analyze import analyze

    _sync(cfg.device)
    start = time.perf_counter()
    report = analyze(cfg, model=model, data_config=data_config, progress=False, fuse_scales=fuse)
    _sync(cfg.device)
    return time.perf_counter() - start, report


def _syncs(model, data_config, cfg, batches: int) -> int:
    """Host-device synchronisations of one analyze run of ``batches`` batches (CUDA's sync debug mode)."""
    import dataclasses

    import torch

    from cka_scale.analyze import analyze

    run = dataclasses.replace(cfg, images=batches * cfg.batch_size)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            analyze(run, model=model, data_config=data_config, progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def row(name: str, layers: str, args: argparse.Namespace) -> dict:
    """All measurements of one model x layer selection."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval().to(args.device)
    data_config = timm.data.resolve_data_config(model=model)
    cfg = _config(name, layers, args.images, args)
    warnings.simplefilter("ignore")  # degenerate layers of random weights do not matter for timing
    _forward(model, data_config, cfg)  # warm up cuDNN, the allocator, the loader
    _analyze(model, data_config, cfg, fuse=False)
    fw, an, fused = [], [], []
    for _ in range(args.repeats):
        fw.append(_forward(model, data_config, cfg)[0])
        an.append(_analyze(model, data_config, cfg, fuse=False)[0])
        fused.append(_analyze(model, data_config, cfg, fuse=True)[0])
    count = _forward(model, data_config, cfg)[1]
    gemm, n_layers = _gemm_floor(model, cfg, count)
    _peak_reset(args.device)
    _forward(model, data_config, cfg)
    peak_fw = _peak_mb(args.device)
    _peak_reset(args.device)
    _, report = _analyze(model, data_config, cfg, fuse=False)
    peak_an = _peak_mb(args.device)
    _peak_reset(args.device)
    _analyze(model, data_config, cfg, fuse=True)
    peak_fused = _peak_mb(args.device)
    out = {"model": name, "layers": layers, "layers_count": n_layers, "images": count, "forward_s": min(fw),
           "analyze_s": min(an), "fused_s": min(fused), "gemm_s": gemm, "peak_forward_mb": peak_fw,
           "peak_analyze_mb": peak_an, "peak_fused_mb": peak_fused, "meta": {k: report.meta.get(k) for k in (
               "device", "device_name", "dtypes", "float32_matmul_precision", "cuda_matmul_allow_tf32",
               "cudnn_allow_tf32")}}
    out["floor_s"] = out["forward_s"] + gemm
    out["images_per_s"] = count * len(cfg.scales) / out["analyze_s"]
    if args.device.startswith("cuda"):
        warnings.simplefilter("default")
        few, many = _syncs(model, data_config, cfg, 2), _syncs(model, data_config, cfg, 4)
        out["syncs_2_batches"], out["syncs_4_batches"], out["syncs_per_batch"] = few, many, (many - few) / 2
        tf32 = {}
        for allow in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allow
            tf32[allow] = _analyze(model, data_config, cfg, fuse=False)[1].cka_runs
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        out["tf32_max_cka_change"] = float(abs(tf32[True] - tf32[False])[~(tf32[False] != tf32[False])].max())
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def markdown(result: dict) -> str:
    eng = result["engine"]
    lines = [f"GPU check: {result['device_name']}, torch {result['torch']}, {result['when']}.", "",
             f"Engine shape: cka_matrix {eng['engine_s'] * 1e3:.1f} ms, 16 Gram GEMMs {eng['floor_s'] * 1e3:.1f} ms, "
             f"ratio **{eng['ratio']:.2f}** (target <= 1.3).", "",
             "| model | --layers | layers | images | images/s | forward s | floor s | analyze s | fused s | "
             "analyze / floor (<= 1.15) | analyze / forward (stages <= 1.05) | peak GPU MB analyze / forward "
             "(<= 1.5) | fused peak MB | syncs per batch (<= 1) | TF32 max CKA change |",
             "|" + "---|" * 15]
    for r in result["rows"]:
        lines.append("| " + " | ".join([
            r["model"], r["layers"], str(r["layers_count"]), str(r["images"]), f"{r['images_per_s']:.0f}",
            f"{r['forward_s']:.3f}", f"{r['floor_s']:.3f}", f"{r['analyze_s']:.3f}", f"{r['fused_s']:.3f}",
            f"**{r['analyze_s'] / r['floor_s']:.3f}**", f"{r['analyze_s'] / r['forward_s']:.3f}",
            f"{r['peak_analyze_mb']:.0f} / {r['peak_forward_mb']:.0f} = "
            f"{r['peak_analyze_mb'] / r['peak_forward_mb']:.2f}", f"{r['peak_fused_mb']:.0f}",
            str(r.get("syncs_per_batch", "n/a")), f"{r.get('tf32_max_cka_change', float('nan')):.1e}"]) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--quick", action="store_true", help="2 batches per row, 1 repeat")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--split", default="train")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--layers", default="stages,all")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke test of this script
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible on this machine; nothing was measured.")
        return 0
    if args.quick:
        args.images, args.repeats = 2 * args.batch_size, 1
    sys.path.insert(0, str(HERE))
    from cka_bench import engine_shape

    from scale_common.device import describe_device

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    info = describe_device(torch.device(args.device))
    result = {"device_name": info["device_name"], "torch": torch.__version__,
              "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "settings": vars(args) | {"out": None},
              "engine": engine_shape(args.device), "rows": []}
    for name in args.models.split(","):
        for layers in args.layers.split(","):
            print(f"gpu_check: {name} --layers {layers}", file=sys.stderr, flush=True)
            result["rows"].append(row(name, layers, args))
    args.out.mkdir(parents=True, exist_ok=True)
    from scale_common.files import atomic_write_text

    atomic_write_text(args.out / "gpu_check.json", json.dumps(result, indent=1, default=str))
    atomic_write_text(args.out / "gpu_check.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
