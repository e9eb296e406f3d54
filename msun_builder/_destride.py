"""Make an MSUN subnet for a smaller input scale by removing stride steps from the front (arXiv 2403.18294).

The MSUN authors hand-design their small- and mid-scale stems (ResNet-50, DenseNet-121, VGG-16-bn, MobileNetV2) by
dropping the first downsampling steps of the shallow part, so that a 32 or 128 px input yields a feature map near
the reference size U (the shallow part's output side at the largest scale), then resize it to U. This module
does that for any CNN from what a dry forward observes:

* a *step* is the group of strided leaf modules (convolutions and pools, timm's ``*Same`` variants included, which
  subclass them) that read the same input resolution, e.g. a residual block's strided conv and its strided
  shortcut conv or pool, which must lose their stride together or the shapes break;
* removing a step sets ``stride`` to 1 on each of its modules. Kernels, padding and weights are kept as they are,
  so the subnet inherits the trained filters unchanged and only applies them densely. A pure downsampling pool
  (kernel == stride, no padding) keeps its kernel too, unless that breaks the shapes (an average-pool shortcut
  beside a same-size conv branch); then it also gets kernel 1, i.e. becomes the identity;
* for scale ``s`` the subnet removes the first ``k`` steps, the ``k`` whose measured output side at ``s`` is nearest
  to U in log scale (ties: fewer removals). A stride-2 step doubles the side, so whenever the scale leaves enough
  steps to remove the result lies within sqrt(2) x of U (a stride-4 step such as ConvNeXt's patchify stem: within
  2 x), inside the "within 2 x" the paper's designs keep. It reproduces three of the authors' four hand-made
  designs at (32, 128, 224): ResNet-50 cut at stride 4 (small removes 2 steps, mid 1), VGG-16-bn at 8 (3 and 1),
  MobileNetV2 at 16 (3 and 1). For DenseNet-121 at 8 it removes 3 steps at 32 px where the authors removed 2
  (a 31 px map instead of their 17 px one; mid: 1 step, as theirs).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from scale_common.modules import eval_no_grad

__all__ = ["SubnetPlan", "apply_plan", "find_steps", "output_side", "plan_subnet"]


def _strided_types() -> tuple[type[nn.Module], ...]:
    """Leaf module types whose ``stride`` attribute is read at forward time and can be set to 1."""
    types: list[type[nn.Module]] = [nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d]
    try:
        from timm.layers import BlurPool2d  # anti-aliased downsampling (ResNet aa_layer variants)

        types.append(BlurPool2d)
    except ImportError:  # pragma: no cover - present in every supported timm
        pass
    return tuple(types)


_STRIDED = _strided_types()
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)


def _pair(value: int | Sequence[int]) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, Sequence) else (int(value),)


def _is_strided(module: nn.Module) -> bool:
    return isinstance(module, _STRIDED) and not list(module.children()) and max(_pair(module.stride)) > 1


def _is_downsampling_pool(module: nn.Module) -> bool:
    """A pool whose windows do not overlap (kernel == stride) and that has no padding."""
    return (isinstance(module, _POOLS) and _pair(module.kernel_size) == _pair(module.stride)
            and max(_pair(module.padding)) == 0)


@dataclass
class SubnetPlan:
    """How one subnet differs from the reference shallow part.

    Attributes:
        removed_steps: Number of stride steps removed from the front.
        destrided: Module paths (inside the shallow ``nn.Sequential``) whose stride is set to 1.
        pool_kernel_1: The subset of ``destrided`` pools whose kernel is also set to 1.
        output_side: Measured side of the subnet's output at its scale (before resizing to U).
    """

    removed_steps: int = 0
    destrided: list[str] = field(default_factory=list)
    pool_kernel_1: list[str] = field(default_factory=list)
    output_side: int = 0


def _probe(module: nn.Module, size: int, channels: int) -> torch.Tensor:
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return torch.zeros(1, channels, size, size, device=device)


def find_steps(shallow: nn.Module, size: int, channels: int) -> list[list[str]]:
    """Group the strided leaf modules of ``shallow`` by the input resolution they read, in forward order.

    Args:
        shallow: The reference shallow part.
        size: Side of the dry-run input (the reference scale).
        channels: Input channels.

    Returns:
        One list of module paths per stride step, first step first.
    """
    seen: dict[tuple[int, ...], list[str]] = {}
    handles = []
    for name, module in shallow.named_modules():
        if _is_strided(module):
            def hook(_m: nn.Module, args: tuple, n: str = name) -> None:
                group = seen.setdefault(tuple(args[0].shape[-2:]), [])
                if n not in group:
                    group.append(n)
            handles.append(module.register_forward_pre_hook(hook))
    try:
        with eval_no_grad(shallow):
            shallow(_probe(shallow, size, channels))
    finally:
        for handle in handles:
            handle.remove()
    return list(seen.values())


def apply_plan(shallow: nn.Module, destrided: Sequence[str], pool_kernel_1: Sequence[str] = ()) -> None:
    """Set stride 1 on the ``destrided`` modules of ``shallow`` (and kernel 1 on ``pool_kernel_1``), in place."""
    for name in destrided:
        module = shallow.get_submodule(name)
        module.stride = tuple(1 for _ in module.stride) if isinstance(module.stride, Sequence) else 1
    for name in pool_kernel_1:
        module = shallow.get_submodule(name)
        module.kernel_size = tuple(1 for _ in module.kernel_size) if isinstance(module.kernel_size, Sequence) else 1


@contextmanager
def _applied(shallow: nn.Module, destrided: Sequence[str], pool_kernel_1: Sequence[str]) -> Iterator[None]:
    """Temporarily apply a plan to ``shallow`` (attributes restored on exit)."""
    saved = [(shallow.get_submodule(n), "stride") for n in destrided]
    saved += [(shallow.get_submodule(n), "kernel_size") for n in pool_kernel_1]
    values = [getattr(m, attr) for m, attr in saved]
    try:
        apply_plan(shallow, destrided, pool_kernel_1)
        yield
    finally:
        for (module, attr), value in zip(saved, values, strict=True):
            setattr(module, attr, value)


def output_side(shallow: nn.Module, size: int, channels: int) -> int | None:
    """Side of the output of ``shallow`` on a ``size`` x ``size`` input, or None when the input does not fit."""
    try:
        with eval_no_grad(shallow):
            out = shallow(_probe(shallow, size, channels))
    except RuntimeError:  # a kernel larger than its input, or shapes that no longer match after de-striding
        return None
    return int(out.shape[-2]) if out.dim() >= 3 and out.shape[-2] > 0 else None


def plan_subnet(shallow: nn.Module, steps: Sequence[Sequence[str]], scale: int, target: int,
                channels: int) -> SubnetPlan | None:
    """Choose how many stride steps the subnet for ``scale`` removes, measuring each candidate with a dry forward.

    Tries k = 0, 1, 2, ... removed steps and keeps the k whose output side is nearest to ``target`` in log scale,
    fewer removals on ties; stops early once the side reaches ``target`` (more removals only grow it).
    ``shallow`` is modified only temporarily.

    Args:
        shallow: The reference shallow part.
        steps: Its stride steps, from :func:`find_steps`.
        scale: The subnet's input side.
        target: The reference output side U.
        channels: Input channels.

    Returns:
        The chosen plan, or None when no candidate runs at ``scale``.
    """
    best: SubnetPlan | None = None
    destrided: list[str] = []
    kernel_1: list[str] = []
    for k in range(len(steps) + 1):
        if k:
            destrided += steps[k - 1]
        with _applied(shallow, destrided, kernel_1):
            side = output_side(shallow, scale, channels)
        if side is None and k:
            pools = [n for n in steps[k - 1] if _is_downsampling_pool(shallow.get_submodule(n))]
            if pools:
                with _applied(shallow, destrided, kernel_1 + pools):
                    side = output_side(shallow, scale, channels)
                if side is not None:
                    kernel_1 += pools
        if side is None:
            continue
        if best is None or abs(math.log(side / target)) < abs(math.log(best.output_side / target)):
            best = SubnetPlan(k, list(destrided), list(kernel_1), side)
        if side >= target:
            break
    return best
