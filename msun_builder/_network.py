"""The MSUN module and its assembly from a split CNN (Multi-scale Unified Network, arXiv 2403.18294).

The shallow part of a trained CNN (up to a ``feature_info`` tap) is copied once per input scale; copies for the
smaller scales lose their first stride steps (:mod:`msun_builder._destride`) so that their feature map lands near
the reference size U, and is then resized to U. The deep part is shared as one *unified* network that keeps the
model's own head.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from msun_builder._destride import SubnetPlan, apply_plan, find_steps, output_side, plan_subnet
from msun_builder._routing import check_routing, check_scales, default_routing, route
from msun_builder.split import input_channels, split_model
from scale_common.errors import ToolkitError
from scale_common.modules import eval_no_grad
from scale_common.resize import resize

__all__ = ["MSUN", "BranchOutputs", "assemble"]


class BranchOutputs(NamedTuple):
    """Outputs of every branch, in ``MSUN.scales`` order.

    Attributes:
        logits: Each branch's classifier output.
        features: Each subnet's feature map after resizing to ``U x U`` (the unified net's input).
    """

    logits: list[Tensor]
    features: list[Tensor]


class MSUN(nn.Module):
    """Multi-scale Unified Network: one shallow subnet per input scale, one shared (unified) deep network.

    Attributes:
        scales: Ascending subnet input sides; the largest is the reference scale.
        subnets: The shallow subnets, keyed by ``str(scale)``. The reference subnet is the model's own shallow part.
        unified: The shared deep part: the model with its shallow pieces replaced by ``nn.Identity``.
        unified_size: U, the side of the reference subnet's output at the reference scale; every subnet output is
            resized to ``U x U``.
        routing: Sorted ``(max_size_inclusive, scale)`` pairs; sizes above the last bound go to its scale.
        config: JSON-able description (base model, num_classes, scales, split, U, routing, per-subnet de-strided
            modules, weights provenance) from which :func:`load_msun` rebuilds the architecture.
    """

    def __init__(self, subnets: Mapping[int, nn.Module], unified: nn.Module, unified_size: int, *,
                 routing: Sequence[Sequence[int]] | None = None, config: Mapping[str, Any] | None = None) -> None:
        """Assemble an MSUN from ready-made parts (use :func:`create_msun` to build one from a model).

        Args:
            subnets: Shallow subnets keyed by their input scale.
            unified: The shared deep network, taking ``U x U`` feature maps.
            unified_size: U.
            routing: Custom ``(max_size_inclusive, scale)`` pairs; None routes each size to the smallest scale at
                least as large (:func:`msun_builder._routing.default_routing`).
            config: Extra JSON-able description merged into :attr:`config`.
        """
        super().__init__()
        self.scales = check_scales(list(subnets))
        self.subnets = nn.ModuleDict({str(s): subnets[s] for s in self.scales})
        self.unified = unified
        self.unified_size = int(unified_size)
        self.routing = default_routing(self.scales) if routing is None else check_routing(routing, self.scales)
        self.config: dict[str, Any] = {**(config or {}), "scales": list(self.scales),
                                       "unified_size": self.unified_size,
                                       "routing": [list(pair) for pair in self.routing]}

    def extra_repr(self) -> str:
        return f"scales={self.scales}, unified_size={self.unified_size}, routing={self.routing}"

    def route(self, size: int) -> int:
        """The scale of the subnet that serves an input of side ``size`` (pixels)."""
        return route(self.routing, size)

    def forward_branch(self, x: Tensor, scale: int) -> tuple[Tensor, Tensor]:
        """Run one branch: resize to ``scale``, its subnet, resize to U, the unified net.

        Resizing is bilinear (``align_corners=False``, no antialias) and skipped when the size already matches.

        Args:
            x: Images ``(B, C, H, W)``; non-square inputs are resized to a square ``scale x scale``.
            scale: One of :attr:`scales`.

        Returns:
            ``(logits, features)``: the classifier output and the subnet's feature map at ``U x U``.

        Raises:
            ToolkitError: ``scale`` has no subnet.
        """
        if scale not in self.scales:
            raise ToolkitError(f"no subnet for scale {scale}; this MSUN has scales {list(self.scales)}")
        features = resize(self.subnets[str(scale)](resize(x, scale)), self.unified_size)
        return self.unified(features), features

    def forward(self, x: Tensor) -> Tensor:
        """Logits from the branch that :meth:`route` picks for the input's side (``round(sqrt(H*W))``)."""
        h, w = x.shape[-2:]
        side = h if h == w else round(math.sqrt(h * w))
        return self.forward_branch(x, self.route(side))[0]

    def forward_branches(self, x: Tensor) -> BranchOutputs:
        """Run every branch on its own resized copy of ``x`` (the unified net is called once per branch).

        Separate calls keep the paper's training behaviour: BatchNorm in the unified net sees one scale per call.

        Args:
            x: Images ``(B, C, H, W)``.

        Returns:
            Logits and features at U, one entry per scale in :attr:`scales` order.
        """
        outs = [self.forward_branch(x, scale) for scale in self.scales]
        return BranchOutputs([logits for logits, _ in outs], [feats for _, feats in outs])


def _check_feature_map(shallow: nn.Module, split_module: str, size: int, channels: int) -> None:
    """Refuse a shallow part that does not hand one ``(B, C, H, W)`` map to the unified net (checked at ``size``)."""
    probe = next(shallow.parameters(), None)
    x = torch.zeros(1, channels, size, size, device=probe.device if probe is not None else "cpu")
    try:
        with eval_no_grad(shallow):
            out = shallow(x)
    except (RuntimeError, ValueError, AssertionError):
        return  # too small to run: output_side and plan_subnet say so with the fix
    if not isinstance(out, Tensor) or out.dim() != 4 or out.shape[-1] != out.shape[-2]:
        what = type(out).__name__ if not isinstance(out, Tensor) else f"shape {tuple(out.shape[1:])}"
        raise ToolkitError(f"the shallow part up to {split_module!r} returns {what} at {size}px, not one square "
                           "(B, C, H, W) feature map that the subnets can resize and hand to the unified net: choose "
                           "another split (msun_builder.splittable_taps lists those that can be cut)")


def assemble(base: nn.Module, split_module: str, scales: Sequence[int], *,
             plans: Mapping[int, SubnetPlan] | None = None, config: Mapping[str, Any] | None = None,
             routing: Sequence[Sequence[int]] | None = None, unified_size: int | None = None) -> MSUN:
    """Split ``base`` at ``split_module`` and build an MSUN around it.

    Args:
        base: The timm CNN (not modified).
        split_module: The ``feature_info`` tap to cut after.
        scales: Ascending scales; the last is the reference.
        plans: Saved per-scale subnet plans to replay; None plans them with dry forwards.
        config: Description to store in :attr:`MSUN.config`; its ``"subnets"`` entry is written here.
        routing: Custom routing pairs, or None for the default.
        unified_size: U when known (replaying), else measured at the reference scale.

    Returns:
        The MSUN.

    Raises:
        ToolkitError: The split cannot be made, or a scale is too small for the shallow part.
    """
    shallow, deep = split_model(base, module=split_module)
    channels = input_channels(base)
    reference = scales[-1]
    _check_feature_map(shallow, split_module, reference, channels)
    if unified_size is None:
        unified_size = output_side(shallow, reference, channels)
        if unified_size is None:
            raise ToolkitError(f"the shallow part up to {split_module!r} does not run at the reference scale "
                               f"{reference}: use a larger largest scale or a shallower split")
    if plans is None:
        steps = find_steps(shallow, reference, channels)
        plans = {reference: SubnetPlan(0, [], [], unified_size)}
        for scale in scales[:-1]:
            plan = plan_subnet(shallow, steps, scale, unified_size, channels)
            if plan is None:
                raise ToolkitError(f"scale {scale} is too small for the shallow part up to {split_module!r} "
                                   "(it does not run even with its strides removed): use a larger smallest scale "
                                   "or a shallower split (smaller split_reduction)")
            plans[scale] = plan
    subnets: dict[int, nn.Module] = {}
    for scale in scales:
        plan = plans[scale]
        subnet = shallow if scale == reference else copy.deepcopy(shallow)
        apply_plan(subnet, plan.destrided, plan.pool_kernel_1)
        subnets[scale] = subnet
    subnet_config = {str(s): {"removed_steps": p.removed_steps, "destrided": list(p.destrided),
                              "pool_kernel_1": list(p.pool_kernel_1), "output_side": p.output_side}
                     for s, p in sorted(plans.items())}
    return MSUN(subnets, deep, unified_size, routing=routing, config={**(config or {}), "subnets": subnet_config})
