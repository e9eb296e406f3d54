"""Build, save and load an MSUN (Multi-scale Unified Network, Liu, Zhu & Liu 2024, arXiv 2403.18294) for a timm CNN.

:func:`create_msun` cuts a timm CNN at a ``feature_info`` tap (:mod:`msun_builder.split`), copies the shallow part
once per input scale with its first stride steps removed for the smaller scales (:mod:`msun_builder._destride`),
and shares the deep part as the unified net (:class:`MSUN`). :func:`save_msun` writes ``msun.safetensors`` and
``msun.json``; :func:`load_msun` rebuilds the same architecture from the JSON and loads the weights strictly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from cka_scale.models import LoadedModel, load_model
from cka_scale.report import Report
from msun_builder._destride import SubnetPlan
from msun_builder._network import MSUN, BranchOutputs, assemble
from msun_builder._routing import check_routing, check_scales
from msun_builder.split import choose_tap, input_channels, require_splittable
from scale_common.errors import ToolkitError
from scale_common.files import atomic_path, atomic_write_json, read_json, read_safetensors

__all__ = ["MSUN", "BranchOutputs", "create_msun", "load_msun", "save_msun"]

FORMAT_VERSION = 1
WEIGHTS_FILE = "msun.safetensors"
CONFIG_FILE = "msun.json"


def _verify(msun: MSUN, base: nn.Module, size: int, channels: int) -> None:
    """Check that ``msun`` reproduces ``base`` at the reference scale (eval mode, one random image)."""
    modes = (msun.training, base.training)
    msun.eval()
    base.eval()
    try:
        param = next(base.parameters())
        x = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0)).to(param.device)
        with torch.no_grad():
            expected = base(x)
            try:
                got = msun(x)
            except (RuntimeError, ValueError, AssertionError) as err:
                raise ToolkitError(f"the built MSUN does not run at the reference scale {size} ({type(err).__name__}: "
                                   f"{(str(err).splitlines() or [''])[0][:160]}): the subnets' features do not fit "
                                   "the unified net; please report this model; a different split_reduction may "
                                   "work") from None
    finally:
        msun.train(modes[0])
        base.train(modes[1])
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        raise ToolkitError(f"the built MSUN returns {tuple(getattr(got, 'shape', ()))} where the original model "
                           f"returns {tuple(expected.shape)} at the reference scale {size}: please report this model; "
                           "verify=False skips the check")
    err = float((got - expected).abs().max())
    if not err <= 1e-5 * max(1.0, float(expected.abs().max())):
        raise ToolkitError(f"the built MSUN differs from the original model at the reference scale {size} by "
                           f"{err:.3g} (it must reproduce it): please report this model; verify=False skips the check")


def _check_args(scales: Sequence[int], split_reduction: int | None, split_module: str | None, report: object,
                routing: Sequence[Sequence[int]] | None) -> tuple[int, ...]:
    """Validate the arguments of :func:`create_msun` before any work; returns the distinct ascending scales."""
    distinct = check_scales(scales)
    if routing is not None:
        check_routing(routing, distinct)
    if (split_reduction is not None) + (split_module is not None) + (report is not None) != 1:
        raise ToolkitError("give exactly one of split_reduction= (a feature_info reduction such as 4 or 8), "
                           "split_module= (a cuttable tap's module name) or report= (an analysis report, or its "
                           "folder, to choose the split from)")
    return distinct


def create_msun(model: str | nn.Module | LoadedModel, scales: Sequence[int] = (32, 128, 224), *,
                split_reduction: int | None = None, split_module: str | None = None,
                report: Report | str | os.PathLike[str] | None = None,
                weights: str = "none", num_classes: int | None = None, routing: Sequence[tuple[int, int]] | None = None,
                verify: bool = True, split_rule: str | None = None) -> MSUN:
    """Build an MSUN from a timm CNN, shaped like ``timm.create_model``.

    Args:
        model: A timm model name (loaded with :func:`cka_scale.load_model`), the :class:`cka_scale.LoadedModel` it
            returns (its weights' provenance is recorded), or a timm model instance (copied, not modified).
        scales: Subnet input sides; the largest is the reference scale, whose subnet is the model's own shallow
            part. Each smaller scale's subnet is a copy of it with the same kernels, padding and weights, whose
            first stride steps are set to stride 1, as many as bring its output nearest to U (in log scale).
        split_reduction: Cut after the ``feature_info`` tap with this total stride (the last such tap that can be
            cut; a tap nested inside a block is replaced by the nearest boundary at its stride, recorded as
            ``config["split"]["stands_for"]``).
        split_module: Cut after this tap instead: a module name that
            :func:`msun_builder.split.splittable_taps` lists (or the nested tap a boundary stands for).
        report: A :class:`cka_scale.Report`, or the path to a report folder or ``report.json``, from which
            ``msun_builder.autosplit.auto_split`` chooses the split. Give exactly one of the three.
        weights: ``"none"``, ``"auto"`` or a state-dict path, as in :func:`cka_scale.load_model` (names only).
        num_classes: Classifier size for a model name (None keeps the model's); for a module it must match.
        routing: Custom ``(max_size_inclusive, scale)`` pairs (default: the smallest scale at least the input size).
        verify: Check on one random image that the MSUN reproduces the model at the reference scale.
        split_rule: With ``report``: ``auto_split``'s rule, ``"cost"`` or ``"deep"`` (None: its default).

    Returns:
        The MSUN, in the base model's train/eval mode.

    Raises:
        ToolkitError: Bad scales, split or routing; an unknown model name; a model with no tap that can be cut (a
            vision transformer, a channels-last or multi-branch network: the message says which); a split that
            cannot be made; a scale too small for the shallow part; subnets whose features do not fit the unified
            net.

    Example:
        >>> msun = create_msun("test_resnet", scales=(16, 32, 64), split_reduction=4)
        >>> msun.unified_size, msun.route(20), msun.config["subnets"]["16"]["removed_steps"]
        (16, 32, 2)
    """
    scales = _check_args(scales, split_reduction, split_module, report, routing)
    if isinstance(model, str):
        model = load_model(model, weights=weights, num_classes=num_classes)
    elif isinstance(model, LoadedModel) and weights != "none":
        raise ToolkitError("weights= applies to model names; a LoadedModel already has its weights")
    if isinstance(model, LoadedModel):
        if num_classes is not None and num_classes != model.model.num_classes:
            raise ToolkitError(f"the model has {model.model.num_classes} classes but num_classes={num_classes}: load "
                               f"it with load_model(..., num_classes={num_classes})")
        base, provenance = model.model, model.weights
    elif isinstance(model, nn.Module):
        if weights != "none":
            raise ToolkitError("weights= applies to model names; load the weights into the module before passing it")
        if num_classes is not None and num_classes != getattr(model, "num_classes", num_classes):
            raise ToolkitError(f"the module has {model.num_classes} classes but num_classes={num_classes}: call "
                               f"model.reset_classifier({num_classes}) before passing it")
        base, provenance = model, f"in-memory {type(model).__name__} passed to create_msun"
    else:
        raise ToolkitError(f"model must be a timm model name or an nn.Module, got {type(model).__name__}")
    cuttable = require_splittable(base, nearest=True)  # a model no cut can serve (a ViT) is refused here, saying why
    if report is not None:
        from msun_builder.autosplit import auto_split

        options = {} if split_rule is None else {"rule": split_rule}
        module = auto_split(report, num_subnets=len(scales), cuttable=cuttable, **options).module
        tap = next(t for t in cuttable if t.module == module)
    elif split_module is not None:
        tap = next((t for t in cuttable if split_module in (t.module, t.stands_for)), None)
        if tap is None:
            names = ", ".join(f"{t.module} (stride {t.reduction})" for t in cuttable)
            raise ToolkitError(f"split_module={split_module!r} is not a tap the surgery can cut; choose one of: "
                               f"{names}")
    else:
        at = [t for t in cuttable if t.reduction == split_reduction]  # the deepest cuttable one at that stride
        tap = at[-1] if at else choose_tap(base, split_reduction, None)  # uncuttable: assemble says why
    config: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "model": (getattr(base, "pretrained_cfg", None) or {}).get("architecture"),
        "num_classes": getattr(base, "num_classes", None),
        "in_chans": input_channels(base),
        "split": {"module": tap.module, "reduction": tap.reduction, "num_chs": tap.num_chs,
                  **({"stands_for": tap.stands_for} if tap.stands_for else {})},
        "weights": provenance,
    }
    msun = assemble(base, tap.module, scales, config=config, routing=routing)
    msun.train(base.training)
    if verify:
        _verify(msun, base, scales[-1], config["in_chans"])
    return msun


def _check_rebuildable(msun: MSUN, arch: str, num_classes: int | None) -> None:
    """Refuse to save an MSUN whose unified net does not match ``arch`` as timm builds it from the name alone."""
    try:
        with torch.device("meta"):
            fresh = timm.create_model(arch, pretrained=False, **({} if num_classes is None else
                                                                 {"num_classes": num_classes}))
    except Exception:  # a model that cannot be built on the meta device is checked at load time instead
        return
    shapes = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    for key, value in msun.unified.state_dict().items():
        if shapes.get(key) != tuple(value.shape):
            raise ToolkitError(
                f"cannot save: {arch} built from its name does not match this MSUN at {key!r} "
                f"({shapes.get(key)} vs {tuple(value.shape)}). msun.json records only the name and num_classes, "
                "so build the MSUN from a timm model made without extra constructor arguments")


def save_msun(model: MSUN, directory: str | os.PathLike[str]) -> Path:
    """Write ``msun.safetensors`` (every weight and buffer) and ``msun.json`` (the config), each atomically.

    Args:
        model: An MSUN built from a timm model.
        directory: Output folder (created if missing); existing MSUN files in it are replaced.

    Returns:
        The folder.

    Raises:
        ToolkitError: The base model is not a timm model (no ``pretrained_cfg['architecture']``), or the timm model
            of that name would not have the same shapes.
    """
    from safetensors.torch import save_file

    arch = model.config.get("model")
    if not arch or not timm.is_model(arch):
        raise ToolkitError("cannot save this MSUN: its base model is not a timm model (no "
                           "pretrained_cfg['architecture']), so load_msun could not rebuild it; build it with "
                           "create_msun('<timm model name>', ...) or from timm.create_model(...)")
    _check_rebuildable(model, arch, model.config.get("num_classes"))
    folder = Path(directory)
    state: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        ptr = value.untyped_storage().data_ptr()
        state[key] = value.clone() if ptr in storages else value  # safetensors refuses shared storage
        storages.add(ptr)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": f"msun_builder/{FORMAT_VERSION}"})
    atomic_write_json(folder / CONFIG_FILE, model.config)
    return folder


_FIX = "save the MSUN again with save_msun (for a training run: continue it with `msun-build --resume RUN`)"


def _read_config(folder: Path) -> dict[str, Any]:
    config = read_json(folder / CONFIG_FILE, what="saved MSUN description", fix=_FIX)
    needed = ("model", "num_classes", "scales", "split", "unified_size", "routing", "subnets")
    missing = [k for k in needed if not isinstance(config, dict) or k not in config]
    if missing:
        raise ToolkitError(f"{folder / CONFIG_FILE} lacks {', '.join(missing)}: it was not written by save_msun; "
                           "save the MSUN again")
    absent = [s for s in config["scales"] if str(s) not in config["subnets"]]
    if absent:
        raise ToolkitError(f"{folder / CONFIG_FILE} has no subnet entry for scale(s) {absent}; save the MSUN again")
    return config


def load_msun(directory: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> MSUN:
    """Rebuild an MSUN saved by :func:`save_msun` and load its weights strictly.

    The architecture comes from ``msun.json``: the timm model by name (random init, the saved ``num_classes``),
    the same split, the same de-strided modules. Outputs are bit-identical to the saved MSUN's.

    Args:
        directory: The folder written by :func:`save_msun`.
        map_location: Device to put the MSUN on.

    Returns:
        The MSUN, in eval mode.

    Raises:
        ToolkitError: A file is missing or unreadable, or the config and the weights do not match.
    """
    folder = Path(directory)
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if missing:
        raise ToolkitError(f"{folder} lacks {' and '.join(missing)}: give the folder written by save_msun "
                           "(it holds msun.json and msun.safetensors)")
    config = _read_config(folder)
    if config.get("preset") == "paper":  # the authors' hand-built designs (msun_builder.presets)
        from msun_builder.presets import rebuild_paper_msun

        msun = rebuild_paper_msun(config)
    else:
        base = load_model(config["model"], weights="none", num_classes=config["num_classes"]).model
        plans = {int(s): SubnetPlan(int(p.get("removed_steps", 0)), list(p.get("destrided", [])),
                                    list(p.get("pool_kernel_1", [])), int(p.get("output_side", 0)))
                 for s, p in config["subnets"].items()}
        try:
            msun = assemble(base, config["split"]["module"], sorted(int(s) for s in config["scales"]), plans=plans,
                            config=config, routing=config["routing"], unified_size=int(config["unified_size"]))
        except (AttributeError, KeyError, TypeError) as err:
            raise ToolkitError(f"{folder / CONFIG_FILE} does not describe a valid MSUN for {config['model']} ({err}); "
                               "save the MSUN again") from None
    state = read_safetensors(folder / WEIGHTS_FILE, what="saved MSUN weights", fix=_FIX)
    own = msun.state_dict()
    problems = [f"missing {k}" for k in own if k not in state] + [f"unexpected {k}" for k in state if k not in own]
    problems += [f"{k}: file {tuple(v.shape)} vs config {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
    if problems:
        raise ToolkitError(f"{folder / WEIGHTS_FILE} does not match {folder / CONFIG_FILE} ({len(problems)} "
                           f"problem(s), first: {'; '.join(problems[:3])}): the two files come from different "
                           "MSUNs; save the MSUN again")
    msun.load_state_dict(state, strict=True)
    return msun.eval().to(map_location)
