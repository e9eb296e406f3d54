"""``msun-build`` (build an MSUN, optionally fine-tune it or a baseline) and ``msun-eval`` (compare trained runs).

Thin by design: argparse (flags default to None) -> :class:`~msun_builder.config.TrainConfig` /
:class:`~msun_builder.config.EvalConfig` -> build the model once -> :func:`~msun_builder.train.train` or
:func:`~msun_builder.evaluate.evaluate_runs`. torch and timm are imported only when work starts, so ``--help``,
``--version`` and usage errors answer at once. Bad input ends in one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from msun_builder.config import DEFAULT_SPLIT_RULE, SPLIT_RULES, EvalConfig, TrainConfig, parse_sizes
from scale_common.cli import add_common, config_from_args, defaults_formatter, parse_scales
from scale_common.errors import ToolkitError, run_cli

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

methods: msun (per-scale subnets + shared deep network + scale-invariant loss), vanilla (reference scale only),
mst (multi-scale training: every scale, shrunk and re-enlarged), msdnet (early-exit network, Huang et al. 2018)
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``msun-build`` argument parser (defaults shown from :class:`TrainConfig`)."""
    p = argparse.ArgumentParser(
        prog="msun-build", formatter_class=defaults_formatter(TrainConfig), epilog=BUILD_EPILOG,
        description="Turn a timm CNN into a Multi-scale Unified Network (per-scale subnets for the shallow layers, "
                    "one shared network for the deep ones), choosing the split from CKA measurements; with --data "
                    "and --epochs, fine-tune it (or the vanilla, multi-scale-training or MSDNet baseline).")
    p.add_argument("model", nargs="?", default=None, help="timm model name (not needed for --method msdnet/--resume)")
    g = p.add_argument_group("building")
    g.add_argument("--scales", type=parse_scales, default=None,
                   help="subnet input sizes; the largest is the reference")
    g.add_argument("--auto-split", action="store_true", help="choose the split from a CKA report (runs one if needed)")
    g.add_argument("--report", default=None, help="report folder of `cka-scale analyze` for --auto-split")
    g.add_argument("--split-reduction", type=int, default=None, help="cut after the feature_info tap of this stride")
    g.add_argument("--split-module", default=None,
                   help="cut after this feature_info tap, named by module (an unknown name is refused with the list of "
                        "the taps the surgery can cut)")
    g.add_argument("--split-threshold", type=float, default=None,
                   help="auto-split with --split-rule cost: CKA a tap must reach (default: auto_split's, 0.8)")
    g.add_argument("--split-rule", choices=SPLIT_RULES, default=None,
                   help="auto-split: 'deep' takes the deepest candidate tap up to stride 16, whatever its CKA (more "
                        "per-scale parameters, and at wide scale ranges more FLOPs in the small branches; it beat "
                        "'cost' by about 2 points on the small-size average of two fine-tuned models and tied from "
                        "scratch: bench/RESULTS.md, 'The split study'); 'cost' the most scale-robust tap for its "
                        f"duplicated parameters (the cheap cut) (default: {DEFAULT_SPLIT_RULE})")
    g.add_argument("--preset", choices=("paper",), default=None,
                   help="paper: the MSUN authors' own design for resnet50, densenet121, vgg16_bn or mobilenetv2_100 "
                        "(their split point and replaced small/mid stems) instead of --auto-split/--split-reduction")
    g.add_argument("--stem-init", choices=("crop", "random"), default=None,
                   help="--preset paper: new stems from the centre of the pretrained kernel, or random")
    g.add_argument("--weights", default=None, help="auto (bundled or hub), none, or a state-dict path")
    g.add_argument("--num-classes", type=int, default=None, help="classifier size when only building")
    g.add_argument("--out", default=None, help="output folder (default: runs/METHOD-MODEL)")
    t = p.add_argument_group("fine-tuning (with --data and --epochs)")
    t.add_argument("--method", default=None, help="msun, vanilla, mst or msdnet (see below)")
    t.add_argument("--data", default=None, help="fashion-mnist, fashion-mnist-subset, textures, samples or a folder")
    t.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (none: only build)")
    t.add_argument("--batch-size", type=int, default=None, help="images per step, over all processes")
    t.add_argument("--optimizer", choices=("adamw", "sgd"), default=None,
                   help="adamw suits fine-tuning; sgd (momentum 0.9) is the paper's from-scratch recipe")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate")
    t.add_argument("--weight-decay", type=float, default=None, help="on weights of rank >= 2")
    t.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up length")
    t.add_argument("--clip-grad", type=float, default=None, help="gradient-norm clip (0: off)")
    t.add_argument("--seed", type=int, default=None, help="seeds data order, augmentation and initialisation")
    t.add_argument("--si-weight", type=float, default=None, help="lambda of the scale-invariant constraint")
    t.add_argument("--si-tau", type=float, default=None, help="truncation of each constraint term")
    t.add_argument("--si-pairs", choices=("all", "reference"), default=None, help="which branch pairs to pull")
    t.add_argument("--si-detach-reference", action="store_true", default=None,
                   help="no gradient into the reference branch")
    t.add_argument("--si-kind", choices=("mse", "cosine", "cka"), default=None, help="the constraint's distance")
    t.add_argument("--train-images", type=int, default=None,
                   help="train on a seeded, class-stratified subset of this size")
    t.add_argument("--test-images", type=int, default=None,
                   help="test images watched after each epoch (class-stratified, the same for every run)")
    t.add_argument("--holdout-images", type=int, default=None,
                   help="validation split carved from the training data for every decision (MSUN routing, MSDNet "
                        "thresholds); default: a fifth of the training images used, 2 per class to 2000; 0: none")
    t.add_argument("--msdnet-preset", default=None, help="small, cifar-anytime, cifar-budgeted or imagenet")
    t.add_argument("--amp", choices=("auto", "on", "off"), default=None, help="mixed precision (auto: on CUDA)")
    t.add_argument("--resume", default=None, metavar="RUN", help="continue the killed run in this folder")
    o = p.add_argument_group("general")
    o.add_argument("--num-workers", type=int, default=None, help="DataLoader worker processes")
    add_common(o, device=True)
    return p


def _choose_split(args: argparse.Namespace, cfg: TrainConfig, loaded: Any, out: Path) -> dict[str, Any]:
    """The MSUN split: given (``--split-reduction``) or chosen from CKA (``--auto-split``), with its reason."""
    if not args.auto_split:
        from msun_builder.split import require_splittable

        require_splittable(loaded.model)  # a model no cut can serve (a ViT) is refused in one line naming why
        return {"reduction": cfg.split_reduction, "module": cfg.split_module, "auto": False}
    from cka_scale.report import load_report
    from msun_builder.autosplit import auto_split
    from msun_builder.split import require_splittable, split_candidates

    cuttable = require_splittable(loaded.model, nearest=True)  # before measuring: a ViT is refused, saying why
    if args.report:
        report = load_report(args.report)
    else:
        from cka_scale.analyze import analyze
        from cka_scale.config import AnalyzeConfig

        # the split is a decision: measured on training images, never on the test split
        layers = ",".join(split_candidates(loaded.model, cuttable))  # taps, and boundaries standing in for some
        acfg = AnalyzeConfig(model=cfg.model, scales=cfg.scales, data=cfg.data if args.data else "samples",
                             split="train" if args.data else "test", layers=layers, device=cfg.device,
                             weights=cfg.weights, seed=cfg.seed)
        print(f"no --report given: measuring CKA first ({acfg.data} {acfg.split} split, scales "
              f"{list(acfg.scales)}, the taps a cut can use)")
        report = analyze(acfg, model=loaded.model, data_config=loaded.data_config, progress=not args.quiet)
        report.save(out / "analysis")
    rule = args.split_rule or DEFAULT_SPLIT_RULE
    options: dict[str, Any] = {"rule": rule}
    if args.split_threshold is not None:
        options["threshold"] = args.split_threshold
    choice = auto_split(report, num_subnets=len(cfg.scales), cuttable=cuttable, **options)
    return {"module": choice.module, "reduction": choice.reduction, "cka": choice.cka, "reason": choice.reason,
            "auto": True, "rule": rule, "candidates": choice.candidates}


def _build(args: argparse.Namespace) -> int:
    if args.resume:
        from msun_builder.train import resume

        row = resume(args.resume, device=args.device, num_workers=args.num_workers, progress=not args.quiet)
        print(f"run {args.resume} complete: " + json.dumps({k: v for k, v in row.items() if "acc" in k}))
        return 0
    cfg = config_from_args(TrainConfig, args)
    if args.clip_grad == 0:
        cfg = dataclasses.replace(cfg, clip_grad=None)
    training = args.epochs is not None
    if training and not args.data:
        raise ToolkitError("--epochs needs --data (e.g. --data fashion-mnist)")
    cfg = cfg.resolved()

    from msun_builder.methods import check_method

    method = check_method(cfg)
    if not method.needs_split and not training:
        raise ToolkitError(f"--method {cfg.method} only trains: add --data DATA --epochs E")
    if method.needs_model and not args.model:
        raise ToolkitError("give a timm model name, e.g. msun-build tf_efficientnet_lite0 --auto-split ...")
    given = args.auto_split + (args.split_reduction is not None) + (args.split_module is not None)
    if method.needs_split and given + (cfg.preset is not None) != 1:
        raise ToolkitError("give exactly one of --auto-split, --split-reduction R, --split-module NAME and "
                           "--preset paper")
    if (args.split_rule or args.split_threshold is not None) and not args.auto_split:
        raise ToolkitError("--split-rule and --split-threshold choose how --auto-split picks the split: add "
                           "--auto-split, or drop them")
    if args.split_threshold is not None and (args.split_rule or DEFAULT_SPLIT_RULE) != "cost":
        raise ToolkitError(f"--split-threshold is the cost rule's; rule {args.split_rule or DEFAULT_SPLIT_RULE!r} "
                           "takes the deepest candidate whatever its CKA: add --split-rule cost, or drop "
                           "--split-threshold")
    if cfg.preset is not None and not method.needs_split:
        raise ToolkitError(f"--preset paper builds an MSUN: drop it for --method {cfg.method}")
    out = Path(args.out or f"runs/{cfg.method}-{args.model or cfg.msdnet_preset}")
    num_classes = args.num_classes
    if training:
        from cka_scale.data import open_dataset

        num_classes = len(open_dataset(cfg.data, "train").classes)
    from msun_builder.train import build_model, train

    split, table, base = None, None, None
    if method.needs_split:
        from cka_scale.models import load_model
        from msun_builder.flops import format_cost_table, msun_cost_table
        from scale_common.seeds import seed_everything

        seed_everything(cfg.seed, -1)  # a random initialisation (--weights none) follows --seed
        base = load_model(cfg.model, cfg.weights, num_classes=num_classes)
        if cfg.preset is None:
            split = _choose_split(args, cfg, base, out)
            # the exact tap: a stride alone may name several cuttable taps
            cfg = dataclasses.replace(cfg, split_reduction=split["reduction"], split_module=split["module"])
        else:
            split = {"reduction": None, "auto": False, "preset": cfg.preset}
    built = build_model(cfg, num_classes or 1000, base=base)
    if method.needs_split:
        split["module"] = built.facts["split"]["module"]
        split["reduction"] = built.facts["split"]["reduction"]
        reason = split.get("reason") or (f"after {split['module']}, the MSUN authors' design for {cfg.model}"
                                         if cfg.preset else f"after {split['module']} (stride {split['reduction']}), "
                                         "as given")
        print(f"split: {reason}")
        table = msun_cost_table(built.model, base.model)
        print("\n" + format_cost_table(table))
        if not training:
            from scale_common.files import atomic_write_json

            method.save(built.model, out)
            atomic_write_json(out / "build.json", {"model": cfg.model, "weights": built.facts["weights"],
                                                   "split": split, "build": table})
            print(f"\nMSUN written to {out} (msun.json, msun.safetensors, build.json)")
            return 0
    row = train(cfg, out, built, progress=not args.quiet, split=split, build=table)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run written to {out}: " + json.dumps({k: round(v, 4) for k, v in row.items() if "acc" in k}))
    return 0


def eval_parser() -> argparse.ArgumentParser:
    """The ``msun-eval`` argument parser (defaults shown from :class:`EvalConfig`)."""
    p = argparse.ArgumentParser(
        prog="msun-eval", formatter_class=defaults_formatter(EvalConfig),
        description="Accuracy and FLOPs per test size for trained runs side by side (MSUN rule-routed, "
                    "validation-routed and oracle best branch; vanilla, MST, MSDNet), every accuracy and every "
                    "MSUN-minus-baseline difference with a 95% interval (paired bootstrap over test images). Runs "
                    "that differ only in --seed are grouped into one row. CSV, JSON, Markdown, per-image "
                    "correctness (correct.npz) and plots. MSDNet runs also get the anytime table and the "
                    "budgeted-batch curve.")
    p.add_argument("runs", nargs="+", help="run folders written by msun-build --epochs")
    p.add_argument("--data", required=True, help="data whose test split is used (the one the runs trained on)")
    p.add_argument("--sizes", default=None, help="start:stop:step (inclusive) or a comma list")
    p.add_argument("--native", action="store_true", default=None,
                   help="feed each size as is (default: shrink to the size and re-enlarge, the paper's protocol)")
    p.add_argument("--images", type=int, default=None,
                   help="evaluate a class-stratified subset of N test images, the same for every run (default: all)")
    p.add_argument("--lossy-below", type=int, default=None,
                   help="average the sizes below this separately (default: the data's native size, 28 for "
                        "Fashion-MNIST)")
    p.add_argument("--batch-size", type=int, default=None, help="test batch size")
    p.add_argument("--out", default=None, help="output folder")
    add_common(p, device=True)
    return p


def _evaluate(args: argparse.Namespace) -> int:
    cfg = config_from_args(EvalConfig, args)
    sizes = parse_sizes(cfg.sizes)
    from msun_builder.evaluate import evaluate_runs

    rows = evaluate_runs(args.runs, data=cfg.data, sizes=sizes, out=cfg.out, native=cfg.native,
                         batch_size=cfg.batch_size, device=cfg.device, images=cfg.images,
                         lossy_below=cfg.lossy_below, progress=not args.quiet)
    if not args.quiet:
        print(Path(cfg.out, "eval.md").read_text())
        print(f"{len(rows)} rows in {cfg.out}/eval.csv; plot: {cfg.out}/accuracy_by_size.png")
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
