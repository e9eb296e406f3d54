"""``cka-scale``: analyze a model across input scales, list its layers, redraw or compare saved reports.

Thin by design: argparse -> :class:`~cka_scale.analyze.AnalyzeConfig` -> :func:`~cka_scale.analyze.analyze` ->
files. Bad input ends in one ``error: ...`` line and exit status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cka_scale.config import AnalyzeConfig
from scale_common.cli import add_common, config_from_args, defaults_formatter, parse_scales, positive_int
from scale_common.errors import ToolkitError, run_cli

__all__ = ["build_parser", "main"]

EPILOG = """examples:
  cka-scale analyze tf_efficientnet_lite0 --scales 32,64,128,224 --out runs/lite0
  cka-scale analyze resnet50 --weights resnet50.safetensors --data ~/imagenet/val --images 1280 --repeats 10
  torchrun --nproc_per_node 2 -m cka_scale analyze tf_efficientnet_lite0 --data textures --images 512
  cka-scale list-layers convnext_tiny --layers blocks
  cka-scale compare runs/vanilla runs/msun --labels vanilla,msun --out runs/compare
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``cka-scale`` argument parser (subcommands ``analyze``, ``list-layers``, ``plot``, ``compare``)."""
    parser = argparse.ArgumentParser(
        prog="cka-scale", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Which layers of a CNN change when the input image is smaller or larger than in training? "
                    "Feeds the same images at several scales and reports, layer by layer, the CKA similarity "
                    "with the reference scale (1 = unchanged, 0 = unrelated).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("analyze", help="measure per-layer CKA across input scales",
                       formatter_class=defaults_formatter(AnalyzeConfig),
                       description="Feed the same images at every scale, capture the chosen layers, and write "
                                   "report.json, cka.npz and figures to --out.")
    a.add_argument("model", help="timm model name, e.g. tf_efficientnet_lite0 (bundled ImageNet weights) or resnet50")
    a.add_argument("--scales", type=parse_scales, default=None, help="input sizes in pixels, comma-separated")
    a.add_argument("--reference", type=positive_int, default=None, help="scale to compare with (default: the largest)")
    a.add_argument("--resize", choices=("down-up", "native"), default=None,
                   help="down-up: shrink to the scale and re-enlarge to the reference (bilinear, the paper's); "
                        "native: feed the scale-sized image")
    a.add_argument("--spatial", default=None, help="flatten (C*H*W), gap (global average pool) or pool:K")
    a.add_argument("--kernel", default=None, help="CKA kernel: linear or rbf")
    a.add_argument("--threshold", type=float, default=None, help="RBF bandwidth as a fraction of the median distance")
    a.add_argument("--unbiased", action=argparse.BooleanOptionalAction, default=None,
                   help="unbiased HSIC (minibatch CKA, the default); --no-unbiased uses the biased estimator")
    a.add_argument("--images", type=positive_int, default=None, help="images per repeat (all if the source has fewer)")
    a.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per batch and HSIC minibatch (at most: smaller when --images gives fewer "
                        "than 8 minibatches, so that the 95%% interval exists)")
    a.add_argument("--repeats", type=positive_int, default=None,
                   help="different draws of --images images (disjoint when the source is big enough; mean, "
                        "std and a combined 95%% interval)")
    a.add_argument("--seed", type=int, default=None, help="seed of the draws of images")
    a.add_argument("--data", default=None,
                   help="samples (14 embedded photos), stamps (212 photo cut-outs, `make data`), textures, "
                        "fashion-mnist, fashion-mnist-subset, or an image folder")
    a.add_argument("--split", choices=("train", "test", "all"), default=None, help="data split")
    a.add_argument("--weights", default=None, help="auto (bundled or hub), none (random) or a state-dict path")
    a.add_argument("--layers", default=None,
                   help="stages (feature_info), blocks, all, or comma-separated globs on module paths")
    a.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    a.add_argument("--num-workers", type=int, default=None, help="DataLoader worker processes")
    a.add_argument("--out", default=None, help="output folder (default: runs/cka-MODEL-LAYERS)")
    a.add_argument("--json", action="store_true", help="print report.json to stdout (implies --quiet)")
    a.add_argument("--no-plots", action="store_true", help="skip the figures")
    add_common(a)

    ll = sub.add_parser("list-layers", help="show what each --layers choice selects",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ll.add_argument("model", help="timm model name")
    ll.add_argument("--layers", default=None, help="show this selection in full (default: stages, plus counts)")
    ll.add_argument("--size", type=positive_int, default=224, help="input size for the dry forward pass")
    add_common(ll)

    pl = sub.add_parser("plot", help="redraw the figures of a saved report")
    pl.add_argument("report", help="folder written by `cka-scale analyze`")
    pl.add_argument("--out", default=None, help="where to write the figures (default: the report folder)")
    add_common(pl)

    cp = sub.add_parser("compare", help="overlay the curves of two or more reports (e.g. vanilla vs MSUN)")
    cp.add_argument("reports", nargs="+", help="report folders")
    cp.add_argument("--labels", default=None, help="comma-separated labels (default: the folder names)")
    cp.add_argument("--out", default="runs/compare", help="output folder for compare.{png,svg}")
    add_common(cp)
    return parser


def _analyze(args: argparse.Namespace) -> int:
    from cka_scale.analyze import analyze
    from cka_scale.plot import plot_report

    cfg = config_from_args(AnalyzeConfig, args)
    quiet = args.quiet or args.json
    report = analyze(cfg, progress=not quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes
        return 0
    out = Path(args.out or f"runs/cka-{cfg.model}-{cfg.layers.replace(',', '_').replace('*', 'x')}")
    if not args.no_plots:
        plot_report(report, out)
    path = report.save(out)
    for note in report.meta.get("notes", []):  # on stderr even with --quiet or --json: they say what to trust
        print(f"warning: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0
    if not quiet:
        print(report.summary_table())
        print(f"\nreport: {path}  (figures and cka.npz beside it)")
    return 0


def _list_layers(args: argparse.Namespace) -> int:
    from cka_scale.hooks import select_layers, trace_layers
    from cka_scale.models import load_model

    model = load_model(args.model, weights="none").model
    infos = trace_layers(model, args.size)
    counts = {}
    for spec in ("stages", "blocks", "all"):
        try:
            counts[spec] = len(select_layers(model, spec, infos))
        except ToolkitError as err:
            counts[spec] = f"n/a ({err})"
    spec = args.layers or "stages"
    chosen = select_layers(model, spec, infos)
    print(f"{args.model}: " + ", ".join(f"--layers {k}: {v}" for k, v in counts.items()))
    print(f"\n--layers {spec} ({len(chosen)} layers, output shapes at {args.size}px):")
    print(f"{'#':>3}  {'module':<40} {'type':<22} {'shape':<18} {'red.':>4} {'params so far':>14}")
    for i, info in enumerate(chosen):
        shape = "x".join(map(str, info.shape))
        print(f"{i:>3}  {info.name:<40} {info.kind[:22]:<22} {shape:<18} {info.reduction or '':>4} "
              f"{info.cum_params:>14,}")
    if any("[" in info.name for info in chosen):
        print("\nMODULE[k] is output k of a module that returns several tensors (parallel branches); each output "
              "is measured as its own layer.")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from cka_scale.plot import plot_report
    from cka_scale.report import load_report

    report = load_report(args.report)
    paths = plot_report(report, args.out or args.report)
    if not args.quiet:
        print("\n".join(str(p) for p in paths))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from cka_scale.plot import plot_compare
    from cka_scale.report import load_report

    reports = [load_report(r) for r in args.reports]
    labels = args.labels.split(",") if args.labels else [Path(r).name for r in args.reports]
    if len(labels) != len(reports):
        raise ToolkitError(f"--labels has {len(labels)} names for {len(reports)} reports")
    paths = plot_compare(reports, labels, Path(args.out) / "compare")
    if not args.quiet:
        for label, report in zip(labels, reports, strict=True):
            print(f"[{label}]")
            print(report.summary_table(), end="\n\n")
        print("\n".join(str(p) for p in paths))
    return 0


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"analyze": _analyze, "list-layers": _list_layers, "plot": _plot, "compare": _compare}
    return handlers[args.command](args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cka-scale`` console script; returns the exit code."""
    return run_cli(_main, argv)
