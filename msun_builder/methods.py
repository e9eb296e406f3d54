"""The method registry: one entry per method (msun, vanilla, mst, msdnet): how to build, step, score, save, load it.

Modelled on timm's ``_registry`` (``_model_entrypoints[name] = fn``): training, evaluation and the command line ask
:func:`get_method` for an entry and never compare method names themselves, so a new method is one
:func:`register_method` call. An unknown name raises with the known ones.

An entry's ``step(model, cfg)`` wraps the model in a module whose ``forward(x)`` returns ``{key: logits}`` and,
for MSUN, the branch features at the unified size, so DistributedDataParallel sees one forward per step;
``criterion(cfg)`` turns that output and the labels into the loss and its logged terms; ``views(model)`` gives the
evaluation rows (label -> function of the image at a test size); ``save``/``load`` write and rebuild the trained
model (weights in safetensors, its description in JSON).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from msun_builder.config import TrainConfig
from scale_common.errors import ToolkitError
from scale_common.files import atomic_path, atomic_write_json, read_json, read_safetensors
from scale_common.modules import count_params
from scale_common.resize import down_up

__all__ = ["Built", "Method", "get_method", "list_methods", "register_method"]

Outputs = tuple[dict[str, torch.Tensor], list[torch.Tensor] | None]
Criterion = Callable[[Outputs, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
View = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class Built:
    """A model ready to train, with what the run record says about it.

    Attributes:
        model: The module whose weights are trained and saved.
        data_config: timm preprocessing config (mean, std, interpolation, crop).
        facts: JSON-able facts for the run record: ``architecture``, ``weights``, ``params`` and per method extras
            (``vanilla_params``, ``flops_reference``, ``exit_flops``, the MSUN ``split``).
    """

    model: nn.Module
    data_config: dict[str, Any]
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """One training method: everything training, evaluation and the command line need to know about it.

    Attributes:
        name: The ``--method`` value.
        summary: One line for ``--help``.
        min_scales: The fewest ``--scales`` it trains with.
        build: ``(cfg, num_classes, base, resumed) -> Built``; ``base`` is a loaded timm model to reuse (the CLI
            loaded it to choose the MSUN split) or None; ``resumed`` builds the architecture without starting
            weights (the checkpoint has them).
        step: ``(model, cfg) -> module`` whose forward gives the logits per branch/scale/exit and the features.
        criterion: ``cfg -> (outputs, labels) -> (loss, terms)``.
        views: ``model -> {label: (x, size) -> logits}``: the rows this method contributes to an evaluation.
        save: ``(model, folder) -> folder``.
        load: ``folder -> model`` (CPU, eval mode).
        needs_split: Built from a split timm CNN (``--auto-split`` / ``--split-reduction``); such a model can also
            be built and saved without training.
        needs_model: Built from a timm model name (False: the method's own architecture, e.g. an MSDNet preset).
    """

    name: str
    summary: str
    min_scales: int
    build: Callable[[TrainConfig, int, Any, bool], Built]
    step: Callable[[nn.Module, TrainConfig], nn.Module]
    criterion: Callable[[TrainConfig], Criterion]
    views: Callable[[nn.Module], dict[str, View]]
    save: Callable[[nn.Module, Path], Path]
    load: Callable[[Path], nn.Module]
    needs_split: bool = False
    needs_model: bool = True


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (a second entry of the same name replaces the first) and return it."""
    _METHODS[method.name] = method
    return method


def list_methods() -> list[str]:
    """The registered method names, in registration order."""
    return list(_METHODS)


def get_method(name: str) -> Method:
    """The registry entry of ``name``.

    Raises:
        ToolkitError: Unknown name; the message lists the known ones.
    """
    try:
        return _METHODS[name]
    except KeyError:
        raise ToolkitError(f"unknown method {name!r}: use one of {', '.join(_METHODS)}") from None


def check_method(cfg: TrainConfig) -> Method:
    """The entry of ``cfg.method``, after checking that the config suits it (e.g. enough scales).

    Raises:
        ToolkitError: Unknown method, or too few scales for it.
    """
    method = get_method(cfg.method)
    if len(set(cfg.scales)) < method.min_scales:
        raise ToolkitError(f"--method {method.name} needs at least {method.min_scales} --scales, "
                           f"got {list(cfg.scales)}")
    return method


# ----------------------------------------------------------------------------------------------- step modules


class _Step(nn.Module):
    def __init__(self, model: nn.Module, scales: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.scales = scales

    def evaluate(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per test scale under the paper's protocol (shrunk to the scale and re-enlarged)."""
        return {str(s): self.model(down_up(x, s)) for s in self.scales}


class _Vanilla(_Step):
    def forward(self, x: torch.Tensor) -> Outputs:
        return {str(max(self.scales)): self.model(x)}, None


class _MultiScaleTraining(_Step):
    def forward(self, x: torch.Tensor) -> Outputs:
        return {str(s): self.model(down_up(x, s)) for s in self.scales}, None


class _MSUNStep(_Step):
    def forward(self, x: torch.Tensor) -> Outputs:
        out = self.model.forward_branches(x)
        return {str(s): logit for s, logit in zip(self.model.scales, out.logits, strict=True)}, list(out.features)

    def evaluate(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each test scale through the subnet its routing table picks."""
        return {str(s): self.model.forward_branch(down_up(x, s), self.model.route(s))[0] for s in self.scales}


class _MSDNetStep(_Step):
    def forward(self, x: torch.Tensor) -> Outputs:
        return {f"exit{k}": logit for k, logit in enumerate(self.model(x))}, None

    def evaluate(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every exit at the reference scale."""
        return {f"exit{k}": logit for k, logit in enumerate(self.model(x))}


# ----------------------------------------------------------------------------------------------- criteria


def _cross_entropies(cfg: TrainConfig) -> Criterion:
    def loss(outputs: Outputs, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = {f"ce_{k}": F.cross_entropy(v.float(), labels, label_smoothing=cfg.label_smoothing)
                 for k, v in outputs[0].items()}
        return sum(terms.values()), terms  # type: ignore[return-value]

    return loss


def _msun_criterion(cfg: TrainConfig) -> Criterion:
    from msun_builder.losses import ScaleInvariantLoss

    ce = _cross_entropies(cfg)
    si_loss = ScaleInvariantLoss(cfg.si_weight, cfg.si_tau, cfg.si_pairs, cfg.si_detach_reference, cfg.si_kind)

    def loss(outputs: Outputs, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, terms = ce(outputs, labels)
        features = outputs[1] or []
        si, logs = si_loss([f.float() for f in features], list(cfg.scales))
        terms.update({k: torch.tensor(v) for k, v in logs.items()})
        terms["si_total"] = si.detach()
        return total + si, terms

    return loss


def _msdnet_criterion(cfg: TrainConfig) -> Criterion:
    from msun_builder.msdnet import msdnet_loss

    def loss(outputs: Outputs, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = [v.float() for v in outputs[0].values()]
        terms = {f"ce_{k}": F.cross_entropy(v.float(), labels).detach() for k, v in outputs[0].items()}
        return msdnet_loss(logits, labels), terms

    return loss


# ----------------------------------------------------------------------------------------------- build


def _load_base(cfg: TrainConfig, num_classes: int, base: Any, resumed: bool) -> Any:
    from cka_scale.models import load_model

    if base is not None:
        return base
    return load_model(cfg.model, "none" if resumed else cfg.weights, num_classes=num_classes)


def _build_plain(cfg: TrainConfig, num_classes: int, base: Any, resumed: bool) -> Built:
    from msun_builder.flops import model_flops

    loaded = _load_base(cfg, num_classes, base, resumed)
    return Built(loaded.model, loaded.data_config, {
        "architecture": cfg.model, "weights": loaded.weights, "params": count_params(loaded.model),
        "flops_reference": model_flops(loaded.model, cfg.reference)})


def _build_msun(cfg: TrainConfig, num_classes: int, base: Any, resumed: bool) -> Built:
    from msun_builder.msun import create_msun

    if cfg.preset is None and cfg.split_reduction is None and cfg.split_module is None:
        raise ToolkitError("--method msun needs --split-reduction R, --auto-split or --preset paper")
    loaded = _load_base(cfg, num_classes, base, resumed)
    vanilla_params = count_params(loaded.model)
    if cfg.preset == "paper":
        from msun_builder.presets import paper_msun

        msun = paper_msun(loaded, cfg.scales, stem_init=cfg.stem_init)
        split = {**msun.config["split"], "reduction": None}
    else:
        by = {"split_module": cfg.split_module} if cfg.split_module else {"split_reduction": cfg.split_reduction}
        msun = create_msun(loaded, cfg.scales, **by)
        split = msun.config["split"]
    return Built(msun, loaded.data_config, {
        "architecture": cfg.model, "weights": loaded.weights, "params": count_params(msun),
        "vanilla_params": vanilla_params,
        "split": {k: split[k] for k in ("module", "reduction", "owned") if k in split}})


def _build_msdnet(cfg: TrainConfig, num_classes: int, base: Any, resumed: bool) -> Built:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from msun_builder.msdnet import create_msdnet, exit_flops

    model = create_msdnet(cfg.msdnet_preset, num_classes=num_classes)
    data_config = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "interpolation": "bilinear",
                   "crop_pct": 1.0, "crop_mode": "center", "input_size": (3, cfg.reference, cfg.reference)}
    return Built(model, data_config, {
        "architecture": f"msdnet-{cfg.msdnet_preset}", "weights": "none (random initialisation)",
        "params": count_params(model), "exit_flops": exit_flops(model, cfg.reference)})


# ----------------------------------------------------------------------------------------------- save / load

_FIX = "the run did not finish or its files were damaged: continue it with `msun-build --resume RUN` or train again"


def _save_safetensors(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ToolkitError(f"{str(path)!r} does not match its description: {str(err).splitlines()[0][:200]}; "
                           f"{_FIX}") from None
    return model.eval()


def _save_timm(model: nn.Module, folder: Path) -> Path:
    arch = getattr(model, "pretrained_cfg", {}).get("architecture")
    if not arch:
        raise ToolkitError("cannot save a non-timm model by name: build it with timm.create_model")
    _save_safetensors(model, folder / "model.safetensors")
    atomic_write_json(folder / "model.json", {"format": "timm-model/1", "architecture": arch,
                                              "num_classes": int(model.num_classes)})
    return folder


def _load_timm(folder: Path) -> nn.Module:
    import timm

    meta = read_json(folder / "model.json", what="saved model description", fix=_FIX, format="timm-model/1")
    state = read_safetensors(folder / "model.safetensors", what="saved model weights", fix=_FIX)
    model = timm.create_model(meta["architecture"], pretrained=False, num_classes=meta["num_classes"])
    return _load_strict(model, state, folder / "model.safetensors")


def _save_msun(model: nn.Module, folder: Path) -> Path:
    from msun_builder.msun import save_msun

    return save_msun(model, folder)


def _load_msun(folder: Path) -> nn.Module:
    from msun_builder.msun import load_msun

    return load_msun(folder).eval()


def _save_msdnet(model: nn.Module, folder: Path) -> Path:
    _save_safetensors(model, folder / "msdnet.safetensors")
    atomic_write_json(folder / "msdnet.json", {"format": "msdnet/1", "config": dataclasses.asdict(model.config)})
    return folder


def _load_msdnet(folder: Path) -> nn.Module:
    from msun_builder.msdnet import MSDNet, MSDNetConfig

    meta = read_json(folder / "msdnet.json", what="saved MSDNet description", fix=_FIX, format="msdnet/1")
    state = read_safetensors(folder / "msdnet.safetensors", what="saved MSDNet weights", fix=_FIX)
    try:
        model = MSDNet(MSDNetConfig(**meta["config"]))
    except (KeyError, TypeError) as err:
        raise ToolkitError(f"{str(folder / 'msdnet.json')!r} does not describe an MSDNet ({err}); {_FIX}") from None
    return _load_strict(model, state, folder / "msdnet.safetensors")


# ----------------------------------------------------------------------------------------------- the entries


def _plain_views(name: str) -> Callable[[nn.Module], dict[str, View]]:
    return lambda model: {name: lambda x, s: model(x)}


register_method(Method(
    name="msun", summary="MSUN: per-scale subnets for the shallow layers, one shared deep network, SI loss",
    min_scales=2, build=_build_msun, step=lambda m, cfg: _MSUNStep(m, cfg.scales), criterion=_msun_criterion,
    views=lambda model: {f"msun branch {b}": (lambda x, s, b=b: model.forward_branch(x, b)[0])
                         for b in model.scales},
    save=_save_msun, load=_load_msun, needs_split=True))
register_method(Method(
    name="vanilla", summary="the plain model trained at the reference scale only", min_scales=1,
    build=_build_plain, step=lambda m, cfg: _Vanilla(m, (cfg.reference,)), criterion=_cross_entropies,
    views=_plain_views("vanilla"), save=_save_timm, load=_load_timm))
register_method(Method(
    name="mst", summary="multi-scale training: the plain model on every scale (shrunk and re-enlarged)",
    min_scales=2, build=_build_plain, step=lambda m, cfg: _MultiScaleTraining(m, cfg.scales),
    criterion=_cross_entropies, views=_plain_views("mst"), save=_save_timm, load=_load_timm))
register_method(Method(
    name="msdnet", summary="MSDNet (Huang et al. 2018): early exits, trained at the reference scale",
    min_scales=1, build=_build_msdnet, step=lambda m, cfg: _MSDNetStep(m, (cfg.reference,)),
    criterion=_msdnet_criterion, views=lambda model: {"msdnet (last exit)": lambda x, s: model(x)[-1]},
    save=_save_msdnet, load=_load_msdnet, needs_model=False))
