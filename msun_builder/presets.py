"""The authors' own MSUNs (Liu, Zhu & Liu 2024, arXiv 2403.18294) for ResNet-50, VGG-16-bn, MobileNetV2, DenseNet-121.

:func:`msun_builder.create_msun` cuts any timm CNN at a ``feature_info`` tap and de-strides copies of its shallow
part. The authors instead hand-built one design per backbone (their code, SmallPigPeppa/MSC: ``resnet50_l2_last.py``,
``densenet121_l2_seprate_trans.py``, ``vgg16_l3.py`` + ``vgg16_subnet.py``, ``mobilenetv2_l3.py`` +
``mobilenetv2_l3_subnet.py``). This module rebuilds those designs on timm's models of the same architecture
(``resnet50``, ``vgg16_bn``, ``mobilenetv2_100``, ``densenet121``; same layers and parameter counts as torchvision's):

============  ==============================  ===  =============================================  ====================
backbone      subnets own                     U    small subnet (32 px)                           mid subnet (128 px)
============  ==============================  ===  =============================================  ====================
ResNet-50     stem + layer1                   56   stem conv 3x3 s1 p2, no max-pool (32->34)      stem conv 5x5 s1 p2
DenseNet-121  stem + denseblock1 + trans1     28   stem conv 3x3 s1 p2, no max-pool (32->34->17)  stem conv 5x5 s1 p2
VGG-16-bn     features[0:24] (to pool3)       28   pools 1-3 -> max-pool k2 s1 (32->29)           pool3 -> k2 s1
MobileNetV2   features[:10] (to block 3.2)    14   stem conv 1x1 s1; depthwise of features[2] and  stem conv 3x3 s1
                                                   features[4] stride 1 (32->16)
============  ==============================  ===  =============================================  ====================

The large (reference) subnet is the model's own shallow part, the unified net the rest of the model (its shallow
modules replaced by ``nn.Identity``), and each subnet output is resized to U, as in :class:`msun_builder.MSUN`.
The small and mid subnets are copies of the shallow part with the changes above. Every subnet has its own copy of
each layer (the authors' "seprate_trans" DenseNet variant included), so the parameter counts are the authors'
(25.56 -> 26.00 M, 7.98 -> 8.72 M, 138.37 -> 141.84 M, 3.50 -> 3.87 M).

Initialisation (the authors trained from scratch, so their code is silent on it). Copied layers keep the model's
weights. The replaced stem convolutions are, with ``stem_init="crop"`` (default, for fine-tuning a pretrained
model), the centre of the model's own stem kernel (7x7 -> 3x3 or 5x5; MobileNetV2 3x3 -> 1x1 or the whole 3x3),
followed by a copy of the model's stem BatchNorm; with ``stem_init="random"`` they are drawn afresh (Kaiming normal,
fan-out, as timm and torchvision initialise these networks) and their BatchNorm is reset. MobileNetV2's two
depthwise convolutions set to stride 1 keep their weights (the authors re-created them, randomly, with the same
shapes).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cka_scale.models import LoadedModel, load_model
from msun_builder._network import MSUN
from msun_builder._routing import check_scales
from scale_common.errors import ToolkitError
from scale_common.modules import eval_no_grad

__all__ = ["PAPER_MODELS", "STEM_INITS", "paper_msun", "rebuild_paper_msun"]

STEM_INITS = ("crop", "random")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class _Conv:
    """Replace the convolution at ``path`` by a new one with this kernel, stride and padding (same channels)."""

    path: str
    kernel: int
    stride: int
    padding: int


@dataclass(frozen=True)
class _Drop:
    """Replace the module at ``path`` by ``nn.Identity`` (a max-pool the subnet does without)."""

    path: str


@dataclass(frozen=True)
class _MaxPool:
    """Replace the pooling at ``path`` by ``nn.MaxPool2d(kernel, stride)``."""

    path: str
    kernel: int
    stride: int


@dataclass(frozen=True)
class _Stride1:
    """Set the stride of the convolution at ``path`` to 1, keeping its weights."""

    path: str


_Change = _Conv | _Drop | _MaxPool | _Stride1


@dataclass(frozen=True)
class _Design:
    owned: tuple[str, ...]  # the modules the subnets own, in forward order (module paths in the timm model)
    stem_norm: str  # the norm after the stem convolution (copied or reset with it)
    small: tuple[_Change, ...]
    mid: tuple[_Change, ...]


_DESIGNS: dict[str, _Design] = {
    "resnet50": _Design(
        owned=("conv1", "bn1", "act1", "maxpool", "layer1"), stem_norm="bn1",
        small=(_Conv("conv1", 3, 1, 2), _Drop("maxpool")),
        mid=(_Conv("conv1", 5, 1, 2),)),
    "densenet121": _Design(
        owned=("features.conv0", "features.norm0", "features.pool0", "features.denseblock1", "features.transition1"),
        stem_norm="features.norm0",
        small=(_Conv("features.conv0", 3, 1, 2), _Drop("features.pool0")),
        mid=(_Conv("features.conv0", 5, 1, 2),)),
    "vgg16_bn": _Design(
        owned=tuple(f"features.{i}" for i in range(24)), stem_norm="",
        small=(_MaxPool("features.6", 2, 1), _MaxPool("features.13", 2, 1), _MaxPool("features.23", 2, 1)),
        mid=(_MaxPool("features.23", 2, 1),)),
    "mobilenetv2_100": _Design(
        owned=("conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.3.0", "blocks.3.1", "blocks.3.2"),
        stem_norm="bn1",
        small=(_Conv("conv_stem", 1, 1, 0), _Stride1("blocks.1.0.conv_dw"), _Stride1("blocks.2.0.conv_dw")),
        mid=(_Conv("conv_stem", 3, 1, 1),)),
}

#: timm architectures with a paper preset.
PAPER_MODELS = tuple(_DESIGNS)


def _child_name(path: str) -> str:
    return path.replace(".", "_")


def _locate(owned: Sequence[str], path: str) -> tuple[str, str]:
    """``(child name in the subnet, path inside that child)`` of a module path of the base model."""
    for prefix in owned:
        if path == prefix or path.startswith(prefix + "."):
            return _child_name(prefix), path[len(prefix) + 1:]
    raise AssertionError(f"{path} is not inside the owned modules {owned}")  # a bug in the table above


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _new_stem(old: nn.Conv2d, change: _Conv, stem_init: str) -> nn.Conv2d:
    conv = nn.Conv2d(old.in_channels, old.out_channels, change.kernel, stride=change.stride, padding=change.padding,
                     bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
    start = (old.kernel_size[0] - change.kernel) // 2
    if stem_init == "crop" and start >= 0 and (old.kernel_size[0] - change.kernel) % 2 == 0:
        with torch.no_grad():
            conv.weight.copy_(old.weight[:, :, start:start + change.kernel, start:start + change.kernel])
            if old.bias is not None:
                conv.bias.copy_(old.bias)
    else:
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
    return conv


def _subnet(base: nn.Module, design: _Design, changes: Sequence[_Change], stem_init: str, copy_: bool) -> nn.Module:
    """A ``nn.Sequential`` of the owned modules (copies when ``copy_``), with ``changes`` applied."""
    subnet = nn.Sequential(OrderedDict(
        (_child_name(p), copy.deepcopy(base.get_submodule(p)) if copy_ else base.get_submodule(p))
        for p in design.owned))
    for change in changes:
        child, inner = _locate(design.owned, change.path)
        path = f"{child}.{inner}" if inner else child
        if isinstance(change, _Conv):
            _set(subnet, path, _new_stem(subnet.get_submodule(path), change, stem_init))
            if stem_init == "random" and design.stem_norm:
                norm_child, norm_inner = _locate(design.owned, design.stem_norm)
                subnet.get_submodule(f"{norm_child}.{norm_inner}" if norm_inner else norm_child).reset_parameters()
        elif isinstance(change, _Drop):
            _set(subnet, path, nn.Identity())
        elif isinstance(change, _MaxPool):
            _set(subnet, path, nn.MaxPool2d(change.kernel, change.stride))
        else:
            subnet.get_submodule(path).stride = (1, 1)
    return subnet


def _side(subnet: nn.Module, size: int, channels: int) -> int:
    param = next(subnet.parameters())
    with eval_no_grad(subnet):
        try:
            out = subnet(torch.zeros(1, channels, size, size, device=param.device, dtype=param.dtype))
        except RuntimeError as err:
            raise ToolkitError(f"the paper subnet does not run on {size} px inputs ({err}): use larger scales, "
                               "e.g. the paper's (32, 128, 224)") from None
    return int(out.shape[-1])


def _architecture(base: nn.Module) -> str:
    arch = (getattr(base, "pretrained_cfg", None) or {}).get("architecture")
    if arch not in _DESIGNS:
        raise ToolkitError(f"no paper preset for {arch or type(base).__name__!r}: the authors built MSUNs for "
                           f"{', '.join(PAPER_MODELS)} (timm names); use create_msun for any other CNN")
    return arch


def _build(base: nn.Module, scales: Sequence[int], stem_init: str, routing: Sequence[Sequence[int]] | None,
           config: Mapping[str, Any]) -> MSUN:
    """Take ``base`` apart (it becomes the large subnet and the unified net) into the authors' MSUN."""
    if stem_init not in STEM_INITS:
        raise ToolkitError(f"unknown stem_init {stem_init!r}: choose from {', '.join(STEM_INITS)}")
    scales = check_scales(scales)
    if len(scales) != 3:
        raise ToolkitError(f"the paper's MSUNs have 3 subnets (small, mid, large), got scales {list(scales)}: pass "
                           "3 scales such as (32, 128, 224), or use create_msun for another number")
    arch = _architecture(base)
    design = _DESIGNS[arch]
    small = _subnet(base, design, design.small, stem_init, copy_=True)
    mid = _subnet(base, design, design.mid, stem_init, copy_=True)
    large = _subnet(base, design, (), stem_init, copy_=False)
    for path in design.owned:
        _set(base, path, nn.Identity())
    channels = large[0].in_channels if isinstance(large[0], nn.Conv2d) else 3
    unified_size = _side(large, scales[2], channels)
    sides = {str(s): _side(net, s, channels) for s, net in zip(scales, (small, mid, large), strict=True)}
    roles = {"small": design.small, "mid": design.mid, "large": ()}
    subnet_config = {str(s): {"role": role, "output_side": sides[str(s)],
                              "changes": [{"kind": type(c).__name__.lstrip("_").lower(), **vars(c)} for c in cs]}
                     for s, (role, cs) in zip(scales, roles.items(), strict=True)}
    full = {**config, "model": arch, "preset": "paper", "preset_format": FORMAT_VERSION, "stem_init": stem_init,
            "in_chans": channels, "split": {"module": design.owned[-1], "owned": list(design.owned)},
            "subnets": subnet_config}
    return MSUN(dict(zip(scales, (small, mid, large), strict=True)), base, unified_size, routing=routing, config=full)


def paper_msun(model: str | nn.Module | LoadedModel = "resnet50", scales: Sequence[int] = (32, 128, 224), *,
               weights: str = "none", num_classes: int | None = None, stem_init: str = "crop",
               routing: Sequence[Sequence[int]] | None = None) -> MSUN:
    """Build the authors' MSUN for one of :data:`PAPER_MODELS` (see the module docstring for the designs).

    Args:
        model: ``resnet50``, ``vgg16_bn``, ``mobilenetv2_100`` or ``densenet121`` (a name, loaded with
            :func:`cka_scale.load_model`), the :class:`cka_scale.LoadedModel` it returns, or such a timm model
            instance (copied, not modified).
        scales: The small, mid and large subnets' input sides (the paper's 32, 128, 224 by default).
        weights: ``"none"``, ``"auto"`` or a state-dict path, for a model name.
        num_classes: Classifier size for a model name (None keeps the model's).
        stem_init: ``"crop"`` (the model's stem kernel, centre-cropped) or ``"random"``, for the new stems.
        routing: Custom ``(max_size_inclusive, scale)`` pairs (default: the smallest scale at least the input size,
            which is the authors' assignment).

    Returns:
        The MSUN, in the base model's train/eval mode; ``config["preset"] == "paper"`` so that
        :func:`msun_builder.load_msun` rebuilds it.

    Raises:
        ToolkitError: A model without a preset, scales other than three, or an unknown ``stem_init``.

    Example:
        >>> msun = paper_msun("resnet50", weights="none")
        >>> msun.unified_size, msun.config["subnets"]["32"]["output_side"], msun.route(64)
        (56, 34, 128)
    """
    if isinstance(model, str):
        if model not in _DESIGNS:
            raise ToolkitError(f"no paper preset for {model!r}: choose from {', '.join(PAPER_MODELS)}")
        loaded = load_model(model, weights=weights, num_classes=num_classes)
        base, provenance = loaded.model, loaded.weights  # fresh: taken apart without a copy
    elif weights != "none":
        raise ToolkitError("weights= applies to model names; load the weights into the model before passing it")
    elif isinstance(model, LoadedModel):
        base, provenance = copy.deepcopy(model.model), model.weights
    elif isinstance(model, nn.Module):
        base, provenance = copy.deepcopy(model), f"in-memory {type(model).__name__} passed to paper_msun"
    else:
        raise ToolkitError(f"model must be a timm model name or an nn.Module, got {type(model).__name__}")
    _architecture(base)
    training = base.training
    config = {"format": 1, "num_classes": getattr(base, "num_classes", None), "weights": provenance}
    return _build(base, scales, stem_init, routing, config).train(training)


def rebuild_paper_msun(config: Mapping[str, Any]) -> MSUN:
    """Rebuild the architecture of a saved paper MSUN from its ``msun.json`` (random weights, to be loaded).

    Args:
        config: The saved config, with ``preset == "paper"``.

    Returns:
        The MSUN with the saved config (routing included), untrained.

    Raises:
        ToolkitError: The config does not describe a paper MSUN.
    """
    try:
        base = load_model(config["model"], weights="none", num_classes=config["num_classes"]).model
        return _build(base, [int(s) for s in config["scales"]], config["stem_init"], config["routing"],
                      {k: v for k, v in config.items() if k not in ("scales", "unified_size", "routing")})
    except (KeyError, TypeError, ValueError) as err:
        raise ToolkitError(f"the saved config does not describe a paper MSUN ({type(err).__name__}: {err}); save the "
                           "MSUN again") from None
