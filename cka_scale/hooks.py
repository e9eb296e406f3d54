"""Scoped capture of layer outputs: layer selection from timm metadata, and Gram matrices formed inside the hook.

Layer ids are dotted module paths (``layer2``, ``blocks.1.0``), the strings of ``model.named_modules()``. A module
that returns several tensors (a tuple or list, e.g. HRNet's parallel branches, SelecSLS's feature pairs; or a dict)
is measured per output, one layer id each: ``stage2[0]``, ``stage2[1]`` (``name[key]`` for a dict).
Selections (``--layers``):

``stages``  timm's ``feature_info`` taps (one per stage, the default; every output of a multi-output tap; for a
            stage container that never runs itself, a ``ModuleList``, its last block; when no tap names a module
            of the model, timm's ``group_matcher(coarse=True)`` stage groups);
``blocks``  every block inside the stages, from timm's ``group_matcher(coarse=False)`` (the per-block groups timm
            uses for layer-wise learning rates), plus the stem; a model without ``group_matcher`` gets each stage
            tap's children instead, sequential containers among them opened one level (``stages.0.blocks.1``);
``all``     every module output that is a tensor with spatial or token dims (containers included);
globs       comma-separated patterns on module paths, e.g. ``layer*.0,act1``: ``*`` matches within one dotted
            part, ``**`` across parts, ``?`` one character.

The capture hook reduces each activation to its n x n Gram matrix as soon as the module returns, so in-place
operations that run later (timm's ``ReLU(inplace=True)``) cannot change what was measured.

Transformers: a ``(B, N, C)`` token output is measured over its patch tokens, like a CNN map over its positions;
the class, distillation and register tokens ahead of them (timm's ``num_prefix_tokens``; an output counts as
carrying them when N minus them, and not N itself, is a square grid) are left out, as timm's own average pooling
leaves them out. ``--spatial gap`` then averages the patch tokens. A channels-last ``(B, H, W, C)`` map (Swin,
MambaOut; recognised on the square reference input by H == W != C) is measured as ``(B, C, H, W)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import group_modules
from torch import nn

from cka_scale.kernels import _double_centre, _kernel
from scale_common.errors import ToolkitError

__all__ = ["LayerInfo", "capture_grams", "parse_spatial", "select_layers", "split_layer_id", "trace_layers"]


@dataclass(frozen=True)
class LayerInfo:
    """What one dry forward pass saw of a module.

    Attributes:
        name: Dotted module path.
        kind: The module's class name.
        shape: Output shape without the batch dim (``(C, H, W)`` for a conv map), or ``()`` for non-tensor output.
        reduction: Input side / output side for maps, e.g. 8 for a stride-8 stage; None otherwise.
        cum_params: Parameters of every module that has finished running when this one returns.
        calls: How often the module ran in one forward pass.
        tap: Whether timm's ``feature_info`` lists it (a stage output).
        channels_last: A ``(B, H, W, C)`` map (Swin, MambaOut stages): it is measured as ``(B, C, H, W)``.
        prefix_tokens: Class, distillation or register tokens ahead of the patch tokens of a ``(B, N, C)`` output
            (timm's ``num_prefix_tokens``); they are left out of the measurement.
        per_image: The output has one row per image; False for windowed attention internals that fold windows or
            heads into the batch dim (never measured).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    reduction: int | None
    cum_params: int
    calls: int
    tap: bool
    channels_last: bool = False
    prefix_tokens: int = 0
    per_image: bool = True


_OUTPUT_ID = re.compile(r"(?P<module>.+)\[(?P<key>[^\[\]]+)\]\Z")


def _tensor_outputs(output: Any) -> list[tuple[str | None, torch.Tensor]]:
    """The tensors a module returned, keyed for layer ids (empty when it returned no tensor).

    ``[(None, t)]`` for one tensor (bare, or the only tensor in a tuple/list/dict); ``[("0", a), ("1", b)]`` for a
    tuple or list of several (position in the sequence); ``[(key, t), ...]`` for a dict of several.
    """
    if isinstance(output, torch.Tensor):
        return [(None, output)]
    if isinstance(output, dict):
        items = [(str(k), v) for k, v in output.items()]
    else:
        items = [(str(i), v) for i, v in enumerate(output)] if isinstance(output, list | tuple) else []
    tensors = [(k, v) for k, v in items if isinstance(v, torch.Tensor)]
    if len(tensors) == 1:
        return [(None, tensors[0][1])]
    return tensors


def split_layer_id(layer: str) -> tuple[str, str | None]:
    """Module path and output key of a layer id: ``("stage2", "1")`` for ``stage2[1]``, ``(layer, None)`` otherwise."""
    match = _OUTPUT_ID.match(layer)
    return (match["module"], match["key"]) if match else (layer, None)


def feature_taps(model: nn.Module) -> list[str]:
    """Module paths of timm's ``feature_info`` stage taps (empty when the model has none)."""
    info = getattr(model, "feature_info", None) or []
    return [entry["module"] for entry in info if isinstance(entry, dict) and "module" in entry]


_TRACE_BATCH = 2  # images in the dry pass: an output whose leading dim differs is not one row per image


@torch.no_grad()
def trace_layers(model: nn.Module, size: int, *, device: torch.device | str = "cpu") -> list[LayerInfo]:
    """Run one dry forward pass at ``size`` x ``size`` and describe every module, in the order they return.

    Args:
        model: The model (put in eval mode for the pass, then restored).
        size: Input side in pixels.
        device: Where to run the pass.

    Returns:
        One :class:`LayerInfo` per module that ran (the root excluded), ordered by when it first returned; a module
        that returned several tensors is followed by one entry per output (``stage2[0]``, ``stage2[1]``, ...).

    Raises:
        ToolkitError: The model cannot run at this input size (e.g. a ViT away from its native size).
    """
    names = {module: name for name, module in model.named_modules() if name}
    seen: dict[str, dict[str, Any]] = {}
    counted: set[int] = set()
    total = [0]
    taps = set(feature_taps(model))
    prefix = getattr(model, "num_prefix_tokens", 0)
    prefix = prefix if isinstance(prefix, int) else 0

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        name = names[module]
        for p in module.parameters(recurse=False):
            if id(p) not in counted:
                counted.add(id(p))
                total[0] += p.numel()
        if name in seen:
            seen[name]["calls"] += 1
            for key in seen[name]["outputs"]:
                seen[f"{name}[{key}]"]["calls"] += 1
            return
        outputs = _tensor_outputs(output)
        single = len(outputs) == 1 and outputs[0][0] is None
        entries = [(name, outputs[0][1] if single else None)]
        entries += [] if single else [(f"{name}[{key}]", tensor) for key, tensor in outputs]
        for entry, tensor in entries:
            shape = tuple(tensor.shape[1:]) if tensor is not None else ()
            last = len(shape) == 3 and shape[0] == shape[1] != shape[2]  # square input: (H, W, C) with H == W
            side = shape[1] if last else shape[-1] if len(shape) == 3 else 0
            seen[entry] = {"kind": type(module).__name__, "shape": shape, "reduction": round(size / side) if side
                           else None, "cum": total[0], "calls": 1, "outputs": [], "module": name, "last": last,
                           "prefix": _prefix_tokens(shape, prefix),
                           "per_image": tensor is None or tensor.shape[0] == _TRACE_BATCH}
        seen[name]["outputs"] = [] if single else [key for key, _ in outputs]

    handles = [module.register_forward_hook(hook) for module in names]
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(_TRACE_BATCH, 3, size, size, device=device)
        model(x)
    except Exception as err:
        raise ToolkitError(
            f"the model cannot run at input size {size}x{size} "
            f"({type(err).__name__}: {(str(err).splitlines() or ['no message'])[0][:160]})."
            " cka-scale needs a CNN that accepts any input size; for a fixed-size model use --resize down-up with "
            "its native size as the reference, or drop this scale."
        ) from None
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [LayerInfo(name, s["kind"], s["shape"], s["reduction"], s["cum"], s["calls"], s["module"] in taps,
                      s["last"], s["prefix"], s["per_image"]) for name, s in seen.items()]


def _prefix_tokens(shape: tuple[int, ...], prefix: int) -> int:
    """``prefix`` for a ``(N, C)`` token output that holds a square patch grid after ``prefix`` leading tokens."""
    if len(shape) != 2 or prefix <= 0 or shape[0] <= prefix:
        return 0
    patches, tokens = shape[0] - prefix, shape[0]
    return prefix if math.isqrt(patches) ** 2 == patches and math.isqrt(tokens) ** 2 != tokens else 0


def _glob(pattern: str) -> re.Pattern[str]:
    """Compile a module-path glob: ``*`` stays inside one dotted part, ``**`` crosses parts."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _block_names(model: nn.Module, order: Sequence[str], *, coarse: bool = False) -> list[str]:
    """The blocks of timm's ``group_matcher(coarse=False)`` groups (stages with ``coarse``), in forward order.

    timm groups parameters per block for layer-wise learning rates; a group may also hold a stem or merge the last
    block with the head. Each module whose parameter-owning submodules all belong to one group, and whose parent's
    do not, is a block (``layer1.0``, ``blocks.6.0``, ``conv_head``, ``features.transition1``); a container with a
    single parameterised child is named by that child, which has the same output. A model without
    ``group_matcher`` gets :func:`_stage_children` instead.
    """
    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        return _stage_children(model, order)
    owners = [name for name, module in model.named_modules() if name and module._parameters]
    found = set()
    for members in group_modules(model, matcher(coarse=coarse)).values():
        group = set(members)
        inside = set()
        for name in order:
            owned = [o for o in owners if o == name or o.startswith(name + ".")]
            if owned and group.issuperset(owned):
                inside.add(name)
        for name in inside:
            parts = name.split(".")
            if any(".".join(parts[:k]) in inside for k in range(1, len(parts))):
                continue  # an ancestor is a block of this group (a ModuleList between them never runs itself)
            block = name
            while True:
                children = [c for c in inside if c.rpartition(".")[0] == block]
                if len(children) != 1:
                    break
                block = children[0]
            found.add(block)
    rank = {name: i for i, name in enumerate(order)}
    return sorted(found, key=rank.__getitem__)


def _stage_children(model: nn.Module, order: Sequence[str]) -> list[str]:
    """Blocks without timm's ``group_matcher``: the children of each ``feature_info`` tap, in forward order.

    A child that is a plain sequence container (``nn.Sequential``, ``nn.ModuleList``) is opened one level, so a
    MetaFormer stage gives ``stages.0.downsample``, ``stages.0.blocks.0``, ``stages.0.blocks.1``; a tap without
    children (a stem's norm layer) stands for itself. The model's own children that return before the first tap
    (a ``stem``) come first.
    """
    taps = feature_taps(model)
    if not taps:
        raise ToolkitError("--layers blocks needs timm's group_matcher or feature_info, and this model has neither: "
                           "use --layers all or glob patterns")
    modules = dict(model.named_modules())
    rank = {name: i for i, name in enumerate(order)}
    first = min((rank[t] for t in taps if t in rank), default=0)
    found = [n for n, _ in model.named_children() if rank.get(n, first) < first and not any(
        t.startswith(n + ".") for t in taps)]
    for tap in taps:
        children = [f"{tap}.{n}" for n, _ in modules[tap].named_children()] if tap in modules else []
        if not children:
            found.append(tap)
        for child in children:
            module = modules[child]
            grandchildren = list(module.named_children()) if isinstance(module, nn.Sequential | nn.ModuleList) else []
            found += [f"{child}.{n}" for n, _ in grandchildren] or [child]
    return sorted(dict.fromkeys(n for n in found if n in rank), key=rank.__getitem__)


def _ran_for(name: str, infos: Sequence[LayerInfo]) -> str:
    """The module that stands for the tap ``name``: itself if it ran.

    A container that never runs itself (a ``ModuleList`` stage, CoaT's ``serial_blocks1``) is represented by its
    direct child that returned last, whose output is the stage's.
    """
    if not name:  # timm names a stem tap "" on some models (TResNet): the model itself, not a stage
        return name
    children = [i.name for i in infos if split_layer_id(i.name)[0].rpartition(".")[0] == name]
    if any(i.name == name for i in infos) or not children:
        return name
    return split_layer_id(children[-1])[0]


def _expand(names: Sequence[str], infos: Sequence[LayerInfo], by_name: dict[str, LayerInfo]) -> list[LayerInfo]:
    """The entries of the named modules: a stage container by its last block, a multi-output module per output."""
    ran = dict.fromkeys(_ran_for(n, infos) for n in dict.fromkeys(names))
    return [out for n in ran if n in by_name for out in _outputs_of(by_name[n], by_name)]


def _outputs_of(info: LayerInfo, by_name: dict[str, LayerInfo]) -> list[LayerInfo]:
    """The measurable entries of one module: itself, or each of its outputs when it returned several tensors."""
    if info.shape or "[" in info.name:
        return [info]
    outputs = [i for name, i in by_name.items() if name != info.name and split_layer_id(name)[0] == info.name]
    return outputs or [info]


def select_layers(model: nn.Module, spec: str | Sequence[str], infos: Sequence[LayerInfo]) -> list[LayerInfo]:
    """Choose the layers to measure, in forward order.

    Args:
        model: The traced model.
        spec: ``stages``, ``blocks``, ``all``, comma-separated glob patterns, or a list of module paths (or layer ids
            such as ``stage2[1]``). A chosen module that returns several tensors is measured per output.
        infos: From :func:`trace_layers` on the same model.

    Returns:
        The selected layers; each ran exactly once and returned one tensor with spatial or token dims.

    Raises:
        ToolkitError: Nothing matched, or an explicitly chosen module runs twice or returns no feature map.
    """
    by_name = {info.name: info for info in infos}
    usable = [i for i in infos if len(i.shape) >= 2 and i.calls == 1 and i.per_image and i.kind != "Identity"]
    if isinstance(spec, str) and spec in ("all", "stages", "blocks"):
        if spec == "all":
            return usable
        if spec == "stages":
            names = feature_taps(model)
            if not names:
                raise ToolkitError("this model has no timm feature_info stages: use --layers blocks, all or globs")
        else:
            names = _block_names(model, [i.name for i in infos])
        chosen = _expand(names, infos, by_name)
        if spec == "stages" and not chosen and getattr(model, "group_matcher", None) is not None:
            # feature_info names modules the model lacks (timm's MViTv2 says block.N for stages.N): timm's coarse
            # parameter groups are its stages
            chosen = [i for i in _expand(_block_names(model, [i.name for i in infos], coarse=True), infos, by_name)
                      if i in usable]
        if spec == "blocks":  # block groups include the classifier: keep the ones with a feature map
            chosen = [i for i in chosen if i in usable]
        chosen = [i for i in chosen if i.per_image or "[" not in i.name]  # TNT's inner tokens: patches in the batch
        for info in chosen:
            _check_measurable(info)
        if not chosen:
            raise ToolkitError(f"--layers {spec} selects no module that ran in the forward pass")
        return sorted(dict.fromkeys(chosen), key=infos.index)
    patterns = [p.strip() for p in spec.split(",")] if isinstance(spec, str) else list(spec)
    patterns = [p for p in patterns if p]
    chosen = []
    for pattern in patterns:
        if not any(ch in pattern for ch in "*?"):
            if pattern not in by_name:
                raise ToolkitError(f"no module {pattern!r} ran in the forward pass; `cka-scale list-layers MODEL "
                                   "--layers all` lists the module paths")
            for info in _outputs_of(by_name[pattern], by_name):
                _check_measurable(info)
                chosen.append(info)
        else:
            regex = _glob(pattern)
            matched = [i for i in usable if regex.match(i.name)]
            if not matched:
                raise ToolkitError(f"no measurable module matches {pattern!r}; `cka-scale list-layers MODEL "
                                   "--layers all` lists the module paths")
            chosen += matched
    unique = {i.name: i for i in chosen}
    return sorted(unique.values(), key=infos.index)


def _check_measurable(info: LayerInfo) -> None:
    if info.calls != 1:
        raise ToolkitError(f"module {info.name!r} runs {info.calls} times per forward pass (a shared module), so "
                           "its output per image is ambiguous: choose the blocks that call it instead")
    if not info.per_image:
        raise ToolkitError(f"module {info.name!r} does not return one row per image (windows or attention heads "
                           "folded into the batch dim): choose the block around it")
    if len(info.shape) < 2:
        what = "no tensor" if not info.shape else f"shape {info.shape}"
        raise ToolkitError(f"module {info.name!r} does not return a feature map ({what}): choose a child module")


def parse_spatial(spec: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-sample feature reduction for ``--spatial flatten|gap|pool:K``.

    ``flatten`` keeps C*H*W values (the paper's choice); ``gap`` averages over space (or tokens) to C values;
    ``pool:K`` average-pools a map to K x K first (C*K*K values).

    Raises:
        ToolkitError: An unknown spec or a K below 1.
    """
    if spec == "flatten":
        return lambda t: t.flatten(1)
    if spec == "gap":
        return lambda t: t.flatten(2).mean(-1) if t.ndim == 4 else t.mean(1) if t.ndim == 3 else t.flatten(1)
    match = re.fullmatch(r"pool:(\d+)", spec)
    if match and int(match.group(1)) >= 1:
        k = int(match.group(1))

        def pool(t: torch.Tensor) -> torch.Tensor:
            if t.ndim != 4:
                raise ToolkitError(f"--spatial pool:{k} needs 4-D feature maps, got shape {tuple(t.shape)}: use gap")
            return F.adaptive_avg_pool2d(t, k).flatten(1)

        return pool
    raise ToolkitError(f"unknown --spatial {spec!r}: use flatten, gap or pool:K (K >= 1)")


def _standard_layout(tensor: torch.Tensor, info: LayerInfo | None) -> torch.Tensor:
    """A channels-last map as ``(B, C, H, W)``; a token output without its class/distillation/register tokens."""
    if info is None:
        return tensor
    if info.channels_last and tensor.dim() == 4:
        return tensor.permute(0, 3, 1, 2)
    if info.prefix_tokens and tensor.dim() == 3:
        return tensor[:, info.prefix_tokens:]
    return tensor


@contextmanager
def capture_grams(model: nn.Module, layers: Sequence[str], *, reduce: Callable[[torch.Tensor], torch.Tensor],
                  kernel: str = "linear", threshold: float = 1.0, splits: int = 1,
                  infos: Sequence[LayerInfo] = ()) -> Iterator[Callable[[], torch.Tensor]]:
    """Hook ``layers`` for the duration of the block; each forward pass leaves one Gram matrix per layer and split.

    The hooks never wait for the device: they do not test the features for NaN or Inf (a non-finite feature makes
    its Gram non-finite, and :meth:`~cka_scale.accumulate.CKAAccumulator.update_grams` tests all Grams of a batch in
    one synchronisation), and the RBF bandwidth stays on the device. Gram GEMMs run in true float32
    (:func:`~cka_scale.kernels.true_float32`) whatever the TF32 setting.

    Args:
        model: The model to hook.
        layers: Layer ids (module paths, or ``module[key]`` for one output of a multi-output module), in the order
            the Grams are returned.
        reduce: Turns an activation ``(n, ...)`` into features ``(n, d)`` (see :func:`parse_spatial`).
        kernel: Kernel name for :func:`cka_scale.functional.gram`.
        threshold: RBF bandwidth threshold.
        splits: The batch holds this many equal groups of images (e.g. one per input scale, concatenated); each
            group gets its own Gram.
        infos: The layers' :class:`LayerInfo` from :func:`trace_layers`: a channels-last map is permuted to
            ``(B, C, H, W)`` and a token output loses its prefix tokens before ``reduce``.

    Yields:
        ``take()``: returns the ``(splits * L, n, n)`` Grams of the last forward pass (split-major, then ``layers``
        order) and clears them.

    Raises:
        ToolkitError: A layer did not run, or ran twice, during a forward pass; a batch does not divide into splits.
    """
    modules = dict(model.named_modules())
    grams: dict[str, list[torch.Tensor]] = {}
    fn = _kernel(kernel)
    wanted: dict[str, list[tuple[str, str | None]]] = {}  # module path -> (layer id, output key)
    layout = {info.name: info for info in infos}
    batch = [0]  # images in the current forward pass, set by a pre-hook on the model

    def count(_model: nn.Module, args: Any) -> None:
        first = args[0] if args else None
        batch[0] = first.shape[0] if isinstance(first, torch.Tensor) else -1
    for layer in layers:
        module, key = split_layer_id(layer)
        if layer in modules:
            module, key = layer, None
        if module not in modules:
            raise ToolkitError(f"no module {module!r} in the model (layer {layer!r}): `cka-scale list-layers MODEL "
                               "--layers all` lists the layer ids")
        wanted.setdefault(module, []).append((layer, key))

    def make_hook(module_name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            outputs = dict(_tensor_outputs(output))
            for name, key in wanted[module_name]:
                if name in grams:
                    raise ToolkitError(f"layer {name!r} ran twice in one forward pass: choose its callers instead")
                tensor = outputs.get(key)
                if tensor is None:
                    what = f"{len(outputs)} tensors" if outputs else "no tensor"
                    raise ToolkitError(f"layer {name!r}: module {module_name!r} returns {what}; measure its outputs "
                                       f"({', '.join(f'{module_name}[{k}]' for k in outputs if k) or 'none'}) or "
                                       "one of its children")
                if batch[0] > 0 and tensor.shape[0] != batch[0]:
                    raise ToolkitError(f"layer {name!r} returns {tensor.shape[0]} rows for {batch[0]} images (windows "
                                       "or heads folded into the batch dim): choose the block around it")
                if tensor.shape[0] % splits:
                    raise ToolkitError(f"layer {name!r}: a batch of {tensor.shape[0]} does not split into {splits} "
                                       "groups")
                with torch.no_grad():  # float32/float64 kept as they are; half precision is upcast by the kernel
                    features = reduce(_standard_layout(tensor.detach(), layout.get(name)))
                    grams[name] = [fn(part, threshold, name, check=False, centred=False)
                                   for part in features.chunk(splits)]  # centred at once in take()

        return hook

    handles = [model.register_forward_pre_hook(count)]
    handles += [modules[name].register_forward_hook(make_hook(name)) for name in wanted]

    def take() -> torch.Tensor:
        missing = [name for name in layers if name not in grams]
        if missing:
            raise ToolkitError(f"layer(s) {', '.join(missing[:3])} did not run in the forward pass")
        stacked = torch.stack([grams[name][part] for part in range(splits) for name in layers])
        grams.clear()
        return _double_centre(stacked) if kernel == "linear" else stacked

    try:
        yield take
    finally:
        for handle in handles:
            handle.remove()
