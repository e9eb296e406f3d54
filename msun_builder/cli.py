"""``msun-build`` (build an MSUN, optionally fine-tune it or a baseline) and ``msun-eval`` (compare trained runs).

Thin by design: argparse -> configs -> :func:`~msun_builder.create_msun`, :func:`~msun_builder.train.train`,
:func:`~msun_builder.evaluate.evaluate_runs`. Bad input ends in one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cka_scale.cli import parse_scales
from scale_common.errors import ToolkitError, run_cli
from scale_common.files import atomic_write_json

__all__ = ["build_main", "build_parser", "eval_main", "eval_parser"]

BUILD_EPILOG = """examples:
  msun-build tf_efficientnet_lite0 --auto-split --scales 32,64,128,224 --out runs/lite0-msun
  msun-build resnet50 --weights resnet50.safetensors --split-reduction 4 --scales 32,128,224 --out runs/r50-msun
  msun-build tf_efficientnet_lite0 --auto-split --scales 16,32,64 --data fashion-mnist --epochs 3 --out runs/fm-msun
  msun-build tf_efficientnet_lite0 --method mst --scales 16,32,64 --data fashion-mnist --epochs 3 --out runs/fm-mst
  msun-build --method msdnet --msdnet-preset small --scales 32 --data fashion-mnist --epochs 3 \\
      --holdout-images 5000 --out runs/fm-msdnet
  msun-build --resume runs/fm-msun            # continue a killed run where it stopped
  torchrun --nproc_per_node 2 -m msun_builder.cli build tf_efficientnet_lite0 ... (multi-process training)
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``msun-build`` argument parser."""
    p = argparse.ArgumentParser(
        prog="msun-build", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=BUILD_EPILOG,
        description="Turn a timm CNN into a Multi-scale Unified Network (per-scale subnets for the shallow layers, "
                    "one shared network for the deep ones), choosing the split from CKA measurements; with --data "
                    "and --epochs, fine-tune it (or the vanilla, multi-scale-training or MSDNet baseline).")
    p.add_argument("model", nargs="?", default=None, help="timm model name (not needed for --method msdnet/--resume)")
    g = p.add_argument_group("building")
    g.add_argument("--scales", type=parse_scales, default=(32, 128, 224),
                   help="subnet input sizes; the largest is the reference (default 32,128,224)")
    g.add_argument("--auto-split", action="store_true", help="choose the split from a CKA report (runs one if needed)")
    g.add_argument("--report", default=None, help="report folder of `cka-scale analyze` for --auto-split")
    g.add_argument("--split-reduction", type=int, default=None, help="cut after the feature_info tap of this stride")
    g.add_argument("--split-threshold", type=float, default=0.8, help="auto-split: CKA a tap must reach")
    g.add_argument("--weights", default="auto", help="auto (bundled or hub), none, or a state-dict path")
    g.add_argument("--num-classes", type=int, default=None, help="classifier size when only building")
    g.add_argument("--out", required=False, default=None, help="output folder (model, tables, run)")
    t = p.add_argument_group("fine-tuning (with --data and --epochs)")
    t.add_argument("--method", choices=("msun", "vanilla", "mst", "msdnet"), default="msun",
                   help="msun; vanilla (reference scale only); mst (multi-scale training); msdnet")
    t.add_argument("--data", default=None, help="fashion-mnist, fashion-mnist-subset, textures, samples or a folder")
    t.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (none: only build)")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="adamw suits fine-tuning; sgd (momentum 0.9) is the paper's from-scratch recipe")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--warmup-epochs", type=float, default=0.5)
    t.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip (0: off)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--si-weight", type=float, default=1.0, help="lambda of the scale-invariant constraint")
    t.add_argument("--si-tau", type=float, default=0.01, help="truncation of each constraint term")
    t.add_argument("--si-pairs", choices=("all", "reference"), default="all")
    t.add_argument("--si-detach-reference", action="store_true", help="no gradient into the reference branch")
    t.add_argument("--si-kind", choices=("mse", "cosine", "cka"), default="mse")
    t.add_argument("--train-images", type=int, default=None, help="train on a fixed random subset of this size")
    t.add_argument("--test-images", type=int, default=1000, help="test images evaluated after each epoch")
    t.add_argument("--holdout-images", type=int, default=None, help="held-out training images (MSDNet thresholds)")
    t.add_argument("--msdnet-preset", default="small", help="small, cifar-anytime, cifar-budgeted or imagenet")
    t.add_argument("--amp", choices=("auto", "on", "off"), default="auto", help="mixed precision (auto: on CUDA)")
    t.add_argument("--resume", default=None, metavar="RUN", help="continue the killed run in this folder")
    o = p.add_argument_group("general")
    o.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    o.add_argument("--num-workers", type=int, default=0)
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    o.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _choose_split(args: argparse.Namespace, model: torch.nn.Module, data_config: dict[str, Any],
                  out: Path) -> dict[str, Any]:
    from msun_builder.autosplit import auto_split
    from msun_builder.split import splittable_taps

    if args.report:
        report: Any = args.report
    else:
        from cka_scale.analyze import AnalyzeConfig, analyze

        cfg = AnalyzeConfig(model=args.model, scales=args.scales, data=args.data or "samples", layers="stages",
                            device=args.device, weights=args.weights)
        print(f"no --report given: measuring CKA first ({cfg.data}, scales {list(cfg.scales)}, stages)")
        report = analyze(cfg, model=model, data_config=data_config, progress=not args.quiet)
        report.save(out / "analysis")
    cuttable = [t.module for t in splittable_taps(model)]
    choice = auto_split(report, threshold=args.split_threshold, num_subnets=len(args.scales), cuttable=cuttable)
    return {"module": choice.module, "reduction": choice.reduction, "cka": choice.cka, "reason": choice.reason,
            "auto": True, "candidates": choice.candidates}


def _tables(msun: Any, vanilla: torch.nn.Module) -> dict[str, Any]:
    from msun_builder.flops import count_flops, model_flops

    ref = max(msun.scales)
    vanilla_flops = model_flops(vanilla, ref)
    rows = []
    for s in msun.scales:
        probe = torch.zeros(1, 3, s, s)
        flops = count_flops(lambda probe=probe, s=s: msun.forward_branch(probe, s))
        rows.append({"branch": s, "input": s, "flops": flops, "vs_vanilla": flops / vanilla_flops})
    return {"params_vanilla": _count(vanilla), "params_msun": _count(msun), "flops_vanilla": vanilla_flops,
            "reference": ref, "branches": rows}


def _print_tables(t: dict[str, Any]) -> None:
    extra = t["params_msun"] - t["params_vanilla"]
    print(f"\nparameters: vanilla {t['params_vanilla'] / 1e6:.3f}M -> MSUN {t['params_msun'] / 1e6:.3f}M "
          f"(+{extra / 1e6:.3f}M, +{100 * extra / t['params_vanilla']:.1f}%)")
    print(f"\n{'model':<16}{'input':>7}{'GFLOPs':>10}{'vs vanilla':>12}")
    for r in t["branches"]:
        print(f"{'MSUN branch ' + str(r['branch']):<16}{r['input']:>7}{r['flops'] / 1e9:>10.4f}"
              f"{100 * r['vs_vanilla']:>11.1f}%")
    print(f"{'vanilla':<16}{t['reference']:>7}{t['flops_vanilla'] / 1e9:>10.4f}{100.0:>11.1f}%")
    print("(FLOPs = 2 x multiply-accumulates of convolutions and matmuls, measured with torch.utils.flop_counter)")


def _build(args: argparse.Namespace) -> int:
    from cka_scale.models import load_model
    from msun_builder.msun import create_msun, save_msun
    from msun_builder.train import TrainConfig, train

    training = args.epochs is not None
    if args.resume:
        cfg = TrainConfig(device=args.device, num_workers=args.num_workers)
        row = train(cfg, args.resume, resume=True, progress=not args.quiet)
        print(f"run {args.resume} complete: " + json.dumps({k: v for k, v in row.items() if "acc" in k}))
        return 0
    if training and not args.data:
        raise ToolkitError("--epochs needs --data (e.g. --data fashion-mnist)")
    if args.method != "msun" and not training:
        raise ToolkitError(f"--method {args.method} only trains: add --data DATA --epochs E")
    if args.method != "msdnet" and not args.model:
        raise ToolkitError("give a timm model name, e.g. msun-build tf_efficientnet_lite0 --auto-split ...")
    out = Path(args.out or f"runs/{args.method}-{args.model or args.msdnet_preset}")
    run_info: dict[str, Any] = {}
    if args.method == "msun":
        if args.auto_split == (args.split_reduction is not None):
            raise ToolkitError("give exactly one of --auto-split and --split-reduction R")
        num_classes = args.num_classes
        if training:
            from cka_scale.data import open_dataset

            num_classes = len(open_dataset(args.data, "train").classes)
        loaded = load_model(args.model, args.weights, num_classes=num_classes)
        split = _choose_split(args, loaded.model, loaded.data_config, out) if args.auto_split else {
            "reduction": args.split_reduction, "auto": False}
        msun = create_msun(loaded, args.scales, split_reduction=split["reduction"])
        split["module"] = msun.config["split"]["module"]
        reason = split.get("reason") or f"after {split['module']} (stride {split['reduction']}), as given"
        print(f"split: {reason}")
        tables = _tables(msun, loaded.model)
        _print_tables(tables)
        run_info = {"split": split, "build": tables}
        if not training:
            save_msun(msun, out)
            atomic_write_json(out / "build.json", {"model": args.model, "weights": loaded.weights, **run_info})
            print(f"\nMSUN written to {out} (msun.json, msun.safetensors, build.json)")
            return 0
    cfg = TrainConfig(model=args.model or "", method=args.method, scales=args.scales, data=args.data,
                      epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                      weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs,
                      clip_grad=args.clip_grad or None, seed=args.seed, weights=args.weights,
                      split_reduction=run_info.get("split", {}).get("reduction"), si_weight=args.si_weight,
                      si_tau=args.si_tau, si_pairs=args.si_pairs, si_detach_reference=args.si_detach_reference,
                      si_kind=args.si_kind, amp=args.amp, device=args.device, num_workers=args.num_workers,
                      train_images=args.train_images, test_images=args.test_images,
                      holdout_images=args.holdout_images, msdnet_preset=args.msdnet_preset)
    row = train(cfg, out, progress=not args.quiet, run_info=run_info)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run written to {out}: " + json.dumps({k: round(v, 4) for k, v in row.items() if "acc" in k}))
    return 0


def eval_parser() -> argparse.ArgumentParser:
    """The ``msun-eval`` argument parser."""
    p = argparse.ArgumentParser(
        prog="msun-eval", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Accuracy and FLOPs per test size for trained runs side by side (MSUN routed and best branch, "
                    "vanilla, MST, MSDNet): CSV, Markdown table and plot. MSDNet runs also get the anytime table "
                    "and the budgeted-batch curve.")
    p.add_argument("runs", nargs="+", help="run folders written by msun-build --epochs")
    p.add_argument("--data", required=True, help="data whose test split is used (the one the runs trained on)")
    p.add_argument("--sizes", default="32:224:16", help="start:stop:step (inclusive) or a comma list")
    p.add_argument("--native", action="store_true",
                   help="feed each size as is (default: shrink to the size and re-enlarge, the paper's protocol)")
    p.add_argument("--images", type=int, default=None, help="evaluate the first N test images only")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default="runs/eval", help="output folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p


def _evaluate(args: argparse.Namespace) -> int:
    from msun_builder.evaluate import evaluate_runs, parse_sizes

    rows = evaluate_runs(args.runs, data=args.data, sizes=parse_sizes(args.sizes), out=args.out, native=args.native,
                         batch_size=args.batch_size, device=args.device, images=args.images,
                         progress=not args.quiet)
    if not args.quiet:
        print(Path(args.out, "eval.md").read_text())
        print(f"{len(rows)} rows in {args.out}/eval.csv; plot: {args.out}/accuracy_by_size.png")
    return 0


def build_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``msun-build``."""
    return run_cli(lambda a: _build(build_parser().parse_args(a)), argv)


def eval_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``msun-eval``."""
    return run_cli(lambda a: _evaluate(eval_parser().parse_args(a)), argv)


if __name__ == "__main__":  # `torchrun -m msun_builder.cli build ...` / `python -m msun_builder.cli eval ...`
    import sys

    command, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command not in ("build", "eval"):
        sys.exit("usage: python -m msun_builder.cli build|eval ARGS...")
    sys.exit(build_main(rest) if command == "build" else eval_main(rest))
