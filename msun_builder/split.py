"""Cut a timm CNN into a shallow and a deep part at a ``feature_info`` tap (the MSUN split, arXiv 2403.18294).

MSUN duplicates the shallow layers of a trained CNN per input-scale group and shares the deep layers. This module
finds where a given model can be cut, from timm's ``feature_info`` metadata only (never from the model's name):

* the candidate pieces are the model's children, with one level expanded for the container whose name prefixes
  the tap (``features`` for DenseNet's ``features.denseblock1``, ``blocks`` for EfficientNet's ``blocks.2``),
  the rule of timm's ``FeatureListNet``;
* a cut is accepted when the tap hands over one ``(B, C, H, W)`` feature map with ``feature_info``'s channel count
  (not a list of parallel branches, not tokens ``(B, N, C)`` or a channels-last ``(B, H, W, C)`` map, which the
  MSUN could not resize), a dry forward (eval mode, hooks on the pieces) calls the shallow pieces once each, in
  registration order and before everything else, no module or parameter is shared with the deep part, and
  ``deep(shallow(x))`` reproduces ``model(x)`` on a small random input.

:func:`require_splittable` turns "no tap can be cut" into one error that names why, grouped by reason (e.g. a vision
transformer: every stage returns tokens).
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from scale_common.errors import ToolkitError
from scale_common.modules import eval_no_grad

__all__ = ["Tap", "list_taps", "require_splittable", "split_candidates", "split_model", "splittable_taps"]

_CHECK_SIZES = (64,)  # side of the random check input; the model's own pretrained_cfg size is tried after these
_RTOL = 1e-4  # equivalence tolerance, relative to the largest reference output (at least 1)


@dataclass(frozen=True)
class Tap:
    """One ``feature_info`` entry: where a timm model exposes a feature map.

    Attributes:
        module: Dotted module path, e.g. ``"layer1"`` or ``"features.denseblock2"``.
        reduction: Total stride of the feature map relative to the input.
        num_chs: Channels of the feature map.
        stands_for: For a cut boundary that replaces a tap the cut cannot reach (a tap nested inside a block), the
            ``feature_info`` module it stands for; None for a tap itself.
    """

    module: str
    reduction: int
    num_chs: int
    stands_for: str | None = None


def list_taps(model: nn.Module) -> list[Tap]:
    """The model's ``feature_info`` taps, shallow to deep.

    Args:
        model: A timm classifier (its ``feature_info`` is a list of dicts) or a ``features_only`` wrapper.

    Returns:
        One :class:`Tap` per ``feature_info`` entry, in the model's order.

    Raises:
        ToolkitError: The model has no ``feature_info``.
    """
    info = getattr(model, "feature_info", None)
    info = getattr(info, "info", info)  # timm's FeatureInfo object keeps the dicts in .info
    if not info:
        raise ToolkitError(f"{type(model).__name__} has no timm feature_info, so it cannot be split by metadata: "
                           "use a timm CNN (timm.create_model(...)) or set model.feature_info to a list of "
                           "dict(module=..., reduction=..., num_chs=...)")
    return [Tap(str(d["module"]), int(d["reduction"]), int(d["num_chs"])) for d in info]


def _pieces(model: nn.Module, cut: str) -> list[tuple[str, nn.Module]]:
    """The model's children in order, with one level expanded for the container named by ``cut``'s prefix."""
    head, _, rest = cut.partition(".")
    top = dict(model.named_children())
    if head not in top:
        raise _Refused(f"{head!r} is not a child module of the model (a name only timm's feature wrappers know)")
    if "." in rest:
        raise _Refused("nested deeper than one container level below the model, where a cut cannot reach")
    if rest and rest not in dict(top[head].named_children()):
        raise _Refused(f"{rest!r} is not a direct child of {head!r}")
    pieces: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if rest and name == head:
            pieces += [(f"{name}.{sub}", grandchild) for sub, grandchild in child.named_children()]
        else:
            pieces.append((name, child))
    return pieces


def _shallow_pieces(model: nn.Module, cut: str) -> list[tuple[str, nn.Module]]:
    pieces = _pieces(model, cut)
    return pieces[: [name for name, _ in pieces].index(cut) + 1]


class _Refused(Exception):
    """Why a tap cannot be cut (internal; turned into a ToolkitError listing the cuttable taps)."""


def input_channels(model: nn.Module) -> int:
    """Image channels the model expects: timm's ``in_chans``, else the first convolution's ``in_channels``."""
    if isinstance(getattr(model, "in_chans", None), int):
        return model.in_chans
    for module in model.modules():
        if isinstance(getattr(module, "in_channels", None), int):
            return module.in_channels
    return 3


def _check_input(model: nn.Module) -> torch.Tensor:
    """A small random input on which ``model`` runs (eval mode must already be set)."""
    cfg_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    sizes = (*_CHECK_SIZES, int(cfg_size))
    for channels in dict.fromkeys((input_channels(model), 3)):
        for size in sizes:
            x = torch.randn(1, channels, size, size, generator=gen).to(device)
            try:
                model(x)
                return x
            except (RuntimeError, AssertionError, ValueError):  # timm asserts a fixed input size with AssertionError
                continue
    raise ToolkitError(f"{type(model).__name__} does not run on a random image batch of side "
                       f"{', '.join(map(str, sizes))}: split a standard timm CNN classifier")


@contextmanager
def _hollowed(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Temporarily replace the named pieces of ``model`` by ``nn.Identity`` (restored on exit)."""
    saved = []
    try:
        for name in names:
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            saved.append((parent, leaf, getattr(parent, leaf)))
            setattr(parent, leaf, nn.Identity())
        yield
    finally:
        for parent, leaf, module in reversed(saved):
            setattr(parent, leaf, module)


def _call_order(model: nn.Module, names: set[str], x: torch.Tensor,
                taps: Sequence[str] = ()) -> tuple[list[str], torch.Tensor, dict[str, object]]:
    """One forward pass: the output, the given submodules in call order (one entry per call), the taps' outputs.

    Each entry of ``taps`` that names a module gets its first output recorded.
    """
    events: list[str] = []
    outputs: dict[str, object] = {}
    modules = dict(model.named_modules())
    handles = [model.get_submodule(name).register_forward_pre_hook(lambda _m, _a, n=name: events.append(n))
               for name in names]
    def record(tap: str) -> Callable[[nn.Module, object, object], None]:
        def hook(_module: nn.Module, _args: object, out: object) -> None:  # returns None: the output stays
            outputs.setdefault(tap, out)

        return hook

    handles += [modules[tap].register_forward_hook(record(tap)) for tap in taps if tap in modules]
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return events, out, outputs


_LAYOUT_REASONS = ("it returns", "its feature map")  # how _layout_problem's reasons start


def _ambiguous(output: object, tap: Tap) -> bool:
    """Whether a 4-D output could be NCHW or NHWC at this size (its height equals its channel count)."""
    return isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[1] == output.shape[3] == tap.num_chs


def _layout_problem(output: object, tap: Tap, larger: object = None) -> str | None:
    """Why the tap's output cannot be handed to the MSUN's shared part, None when it is one NCHW feature map.

    ``larger`` is the tap's output on a larger input, for an output whose height happens to equal its channels.
    """
    if _ambiguous(output, tap) and isinstance(larger, torch.Tensor) and larger.dim() == 4 and \
            larger.shape[1] != tap.num_chs and larger.shape[3] == tap.num_chs:
        return (f"its feature map is channels-last {tuple(larger.shape[1:])} (B, H, W, C), which the MSUN cannot "
                "resize: it needs (B, C, H, W) maps")
    if output is None:
        return None  # the tap did not run as a module of its own: the other checks decide
    if not isinstance(output, torch.Tensor):
        items = output.values() if isinstance(output, dict) else output if isinstance(output, list | tuple) else []
        count = sum(isinstance(t, torch.Tensor) for t in items)
        return (f"it returns {count} tensors (parallel branches), not one feature map that the subnets could hand "
                "to the shared part")
    shape = tuple(output.shape[1:])
    if len(shape) == 2:
        return (f"it returns token sequences {shape} (B, N, C), not a (B, C, H, W) feature map: MSUN splits CNNs, "
                "not transformers")
    if len(shape) != 3:
        return f"it returns shape {shape}, not a (B, C, H, W) feature map"
    if shape[0] != tap.num_chs:
        if shape[-1] == tap.num_chs:
            return (f"its feature map is channels-last {shape} (B, H, W, C), which the MSUN cannot resize: it "
                    "needs (B, C, H, W) maps")
        return f"it returns {shape[0]} channels where feature_info says {tap.num_chs}"
    return None


def _shared_with_deep(model: nn.Module, shallow_names: list[str]) -> str | None:
    """A module or parameter path outside the shallow pieces that is the same object as one inside them."""
    def inside(path: str) -> bool:
        return any(path == s or path.startswith(s + ".") for s in shallow_names)

    pieces = [model.get_submodule(name) for name in shallow_names]
    ids = {id(m) for p in pieces for m in p.modules()} | {id(t) for p in pieces for t in p.parameters()}
    for path, obj in (*model.named_modules(remove_duplicate=False), *model.named_parameters(remove_duplicate=False)):
        if path and id(obj) in ids and not inside(path):
            return path
    return None


def _mismatch(model: nn.Module, shallow: Sequence[str], x: torch.Tensor, reference: torch.Tensor) -> str | None:
    """None when running the shallow pieces, then the hollowed model, reproduces ``reference``; else why not."""
    try:
        out = x
        for name in shallow:
            out = model.get_submodule(name)(out)
        with _hollowed(model, shallow):
            out = model(out)
    except Exception as err:  # any failure of the cut model is a reason not to cut there
        return f"deep(shallow(x)) fails: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}"
    err = float((out - reference).abs().max())
    if err <= _RTOL * max(1.0, float(reference.abs().max())):
        return None
    return f"deep(shallow(x)) differs from model(x) by {err:.3g} (a functional op between children is lost by the cut)"


def _diagnose(model: nn.Module, taps: Sequence[Tap], x: torch.Tensor) -> list[str | None]:
    """For each tap, None when it can be cut, else the reason (model in eval mode, grad off)."""
    piece_lists: list[list[str] | str] = []
    for tap in taps:
        try:
            piece_lists.append([name for name, _ in _pieces(model, tap.module)])
        except _Refused as why:
            piece_lists.append(str(why))
    watched = {n for p in piece_lists if isinstance(p, list) for n in p}
    events, reference, outputs = _call_order(model, watched, x, [tap.module for tap in taps])
    larger: dict[str, object] = {}
    if any(_ambiguous(outputs.get(tap.module), tap) for tap in taps):  # an NHWC map whose H equals C: look again
        try:
            larger = _call_order(model, set(), torch.nn.functional.interpolate(x, scale_factor=2.0),
                                 [tap.module for tap in taps])[2]
        except (RuntimeError, AssertionError, ValueError):
            larger = {}
    if not isinstance(reference, torch.Tensor):
        raise ToolkitError(f"{type(model).__name__} returns {type(reference).__name__} in eval mode, not a tensor of "
                           "logits: split a timm CNN classifier")
    reasons: list[str | None] = []
    for tap, pieces in zip(taps, piece_lists, strict=True):
        if (layout := _layout_problem(outputs.get(tap.module), tap, larger.get(tap.module))) is not None:
            reasons.append(layout)
            continue
        if isinstance(pieces, str):
            reasons.append(pieces)
            continue
        shallow = pieces[: pieces.index(tap.module) + 1]
        calls = [e for e in events if e in set(pieces)]
        counts = {name: calls.count(name) for name in shallow}
        if any(c != 1 for c in counts.values()):
            name, count = next((n, c) for n, c in counts.items() if c != 1)
            reasons.append(f"{name!r} is called {count} times in one forward pass (it must be called once)")
        elif calls[: len(shallow)] != shallow:
            reasons.append("the children up to it are not called in registration order: "
                           f"registered {shallow}, called {calls[: len(shallow)]}")
        elif (shared := _shared_with_deep(model, shallow)) is not None:
            reasons.append(f"{shared!r} in the deep part is shared with the shallow part")
        else:
            reasons.append(_mismatch(model, shallow, x, reference))
    return reasons


def _tap_reasons(model: nn.Module, taps: Sequence[Tap]) -> list[str | None]:
    with eval_no_grad(model):
        return _diagnose(model, taps, _check_input(model))


def _piece_maps(model: nn.Module, tap: str, x: torch.Tensor) -> list[Tap]:
    """The pieces around ``tap`` that return one square ``(B, C, H, W)`` map, as measured taps, in order.

    The pieces are the model's children, with the tap's top container opened when the tap is nested in it.
    """
    head = tap.partition(".")[0]
    pieces = []
    for name, child in model.named_children():
        pieces += ([(f"{name}.{n}", c) for n, c in child.named_children()] if name == head and "." in tap
                   else [(name, child)])
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(_module: nn.Module, _args: object, out: object) -> None:  # returns None: the output stays
            shapes.setdefault(name, tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else ())

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in pieces]
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [Tap(name, round(x.shape[-1] / shape[-1]), shape[0], stands_for=tap) for name, _ in pieces
            if len(shape := shapes.get(name, ())) == 3 and shape[-1] == shape[-2] and shape[-1] > 0]


def _nearest_boundary(model: nn.Module, tap: Tap, x: torch.Tensor) -> Tap | None:
    """The cuttable piece boundary at ``tap``'s reduction nearest to it in forward order (shallower on a tie)."""
    maps = _piece_maps(model, tap.module, x)
    names = [m.module for m in maps]
    inside = [i for i, name in enumerate(names) if tap.module == name or tap.module.startswith(name + ".")]
    where = inside[0] if inside else len(names)
    same = sorted((m for m in maps if m.reduction == tap.reduction),
                  key=lambda m: (abs(names.index(m.module) - where), names.index(m.module)))
    for candidate in same:
        if _diagnose(model, [candidate], x)[0] is None:
            return candidate
    return None


def splittable_taps(model: nn.Module, *, nearest: bool = False) -> list[Tap]:
    """The taps at which :func:`split_model` can cut ``model``.

    Each tap is checked with hooks in one dry forward (the tap returns one ``(B, C, H, W)`` map of its
    ``num_chs`` channels, the shallow pieces are called once each, in registration order, and share nothing with
    the deep part) and confirmed numerically: ``deep(shallow(x))`` must equal ``model(x)`` in eval mode on a small
    random input (relative tolerance 1e-4).

    Args:
        model: A timm CNN classifier.
        nearest: Replace a tap the cut cannot reach (nested inside a block, like Xception's
            ``blocks.1.stack.act3``) by the nearest boundary between pieces at the same reduction that can be cut
            (``blocks.0``), marked with ``stands_for``. Taps whose output is no feature map are never replaced.

    Returns:
        The cuttable taps (and, with ``nearest``, boundaries), shallow to deep, without duplicates.
    """
    taps = list_taps(model)
    with eval_no_grad(model):
        x = _check_input(model)
        reasons = _diagnose(model, taps, x)
        found: list[Tap] = []
        for tap, why in zip(taps, reasons, strict=True):
            if why is None:
                found.append(tap)
            elif nearest and not why.startswith(_LAYOUT_REASONS):
                boundary = _nearest_boundary(model, tap, x)
                if boundary is not None and boundary.module not in {t.module for t in found}:
                    found.append(boundary)
    return found


def split_candidates(model: nn.Module, cuttable: Sequence[Tap]) -> list[str]:
    """Module paths to measure so that ``auto_split`` can weigh every cut (as a ``--layers`` list).

    These are the ``feature_info`` taps that are modules of the model, and the boundaries in ``cuttable`` that stand
    in for taps a cut cannot reach; the analysis puts them in forward order.
    """
    modules = dict(model.named_modules())
    names = [t.module for t in list_taps(model)] + [t.module for t in cuttable if t.stands_for]
    return [name for name in dict.fromkeys(names) if name in modules]


def require_splittable(model: nn.Module, *, nearest: bool = False) -> list[Tap]:
    """The taps at which :func:`split_model` can cut ``model``; an error naming why when there is none.

    Args:
        model: A timm model.
        nearest: Also offer the nearest cuttable boundary for a tap the cut cannot reach (see
            :func:`splittable_taps`).

    Returns:
        The cuttable taps, shallow to deep (at least one).

    Raises:
        ToolkitError: No tap can be cut; the one-line message groups the taps by reason (a vision transformer's
            stages return tokens, HRNet's parallel branches, a tap nested inside a block, ...).
    """
    ok = splittable_taps(model, nearest=nearest)
    if ok:
        return ok
    taps = list_taps(model)
    reasons = _tap_reasons(model, taps)
    grouped: dict[str, list[tuple[str, str]]] = {}  # reasons that differ only in numbers (shapes) go together
    for tap, why in zip(taps, reasons, strict=True):
        grouped.setdefault(re.sub(r"\d+", "#", str(why)), []).append((tap.module, str(why)))
    parts = []
    for members in grouped.values():
        (first, why), last = members[0], members[-1][0]
        where = first if len(members) == 1 else f"{first} .. {last} ({len(members)} taps; at {first})"
        parts.append(f"{where}: {why}")
    raise ToolkitError(f"{_arch(model)} cannot be split into an MSUN: no feature_info tap can be cut "
                       f"({'; '.join(parts)}); MSUN needs a CNN that runs stage by stage on (B, C, H, W) maps")


def _arch(model: nn.Module) -> str:
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def choose_tap(model: nn.Module, reduction: int | None, module: str | None) -> Tap:
    """The tap named by ``module``, or the last tap with ``reduction`` (exactly one of the two)."""
    if (reduction is None) == (module is None):
        raise ToolkitError("give exactly one of reduction= (e.g. 8) or module= (a feature_info module name)")
    taps = list_taps(model)
    matches = [t for t in taps if (t.module == module if module is not None else t.reduction == reduction)]
    if not matches and module is not None:  # a boundary that stands for a tap the cut cannot reach
        matches = [t for t in splittable_taps(model, nearest=True) if t.module == module and t.stands_for]
    if not matches:
        what = f"module {module!r}" if module is not None else f"reduction {reduction}"
        raise ToolkitError(f"no feature_info tap has {what}. {_valid_taps_hint(model)}")
    return matches[-1]


def _valid_taps_hint(model: nn.Module) -> str:
    ok = splittable_taps(model)
    if not ok:
        return "No tap of this model can be cut (see the reasons above); MSUN needs a plain stage-by-stage CNN."
    listed = ", ".join(f"{t.module} (reduction {t.reduction})" for t in ok)
    return f"Taps that can be cut: {listed}; pass one of these reductions or module names."


def split_model(model: nn.Module, *, reduction: int | None = None,
                module: str | None = None) -> tuple[nn.Module, nn.Module]:
    """Cut ``model`` after one of its ``feature_info`` taps, so that ``deep(shallow(x))`` equals ``model(x)``.

    The pieces are the model's children in registration order, with one level expanded only for the container
    whose name prefixes the tap (``features`` for ``features.denseblock1``). The model is not modified.

    Args:
        model: A timm CNN classifier.
        reduction: Cut after the tap with this total stride. When several taps share it, the LAST of them (the
            deepest) is taken.
        module: Cut after the tap with this module name instead. Give exactly one of ``reduction`` and ``module``.

    Returns:
        ``(shallow, deep)``. ``shallow`` is an ``nn.Sequential`` of deep copies of the pieces up to and including
        the tap, named as in the model with ``.`` replaced by ``_`` (timm's FeatureListNet convention: ``conv1``,
        ``blocks_0``). ``deep`` is a deep copy of the whole model with those pieces replaced by ``nn.Identity``,
        so its own ``forward_features``/``forward_head`` (pooling, dropout, classifier) run untouched.

    Raises:
        ToolkitError: No tap matches, or the tap cannot be cut (a module used twice, a tap nested too deep,
            children called out of registration order, a functional op between children that breaks
            equivalence). The message lists the taps that can be cut.

    Example:
        >>> import timm
        >>> model = timm.create_model("test_resnet").eval()
        >>> shallow, deep = split_model(model, reduction=8)
        >>> x = torch.randn(1, 3, 64, 64)
        >>> torch.allclose(deep(shallow(x)), model(x), atol=1e-5)
        True
    """
    tap = choose_tap(model, reduction, module)
    why = _tap_reasons(model, [tap])[0]
    if why is not None:
        arch = _arch(model)
        raise ToolkitError(f"cannot split {arch} at {tap.module!r} (reduction {tap.reduction}): {why}. "
                           f"{_valid_taps_hint(model)}")
    pieces = _shallow_pieces(model, tap.module)
    names = [name for name, _ in pieces]
    with _hollowed(model, names):
        deep = copy.deepcopy(model)
    copies = copy.deepcopy([piece for _, piece in pieces])  # one memo: sharing inside the shallow part is kept
    shallow = nn.Sequential(OrderedDict((n.replace(".", "_"), piece) for n, piece in zip(names, copies, strict=True)))
    return shallow, deep
