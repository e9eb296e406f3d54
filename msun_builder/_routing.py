"""Input-size routing and scale validation for MSUN (Multi-scale Unified Network, arXiv 2403.18294)."""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence

from scale_common.errors import ToolkitError

__all__ = ["check_routing", "check_scales", "default_routing", "route"]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_scales(scales: Sequence[int]) -> tuple[int, ...]:
    """Validate subnet scales and return them distinct and ascending.

    Args:
        scales: Input sides in pixels, one per subnet; the largest is the reference scale.

    Returns:
        The distinct scales, ascending.

    Raises:
        ToolkitError: A scale is not an integer or is below 8, or fewer than 2 distinct scales are given.
    """
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence):
        raise ToolkitError(f"scales must be a sequence of integers such as (32, 128, 224), got {scales!r}")
    bad = [s for s in scales if not _is_int(s) or s < 8]
    if bad:
        raise ToolkitError(f"scales must be integers >= 8 (input sides in pixels), got {bad}: "
                           "pass e.g. scales=(32, 128, 224)")
    distinct = tuple(sorted({int(s) for s in scales}))
    if len(distinct) < 2:
        raise ToolkitError(f"MSUN needs at least 2 distinct scales, got {list(scales)}: "
                           "add a smaller one, e.g. scales=(32, 128, 224)")
    return distinct


def default_routing(scales: Sequence[int]) -> list[tuple[int, int]]:
    """Route each input size to the nearest scale, ties to the larger one.

    Args:
        scales: Ascending subnet scales.

    Returns:
        ``(max_size_inclusive, scale)`` pairs, ascending; the last bound is the largest scale, and sizes above it
        also go to the largest scale. For ``(32, 128, 224)``: ``[(79, 32), (175, 128), (224, 224)]``.
    """
    pairs = [((small + large - 1) // 2, small) for small, large in itertools.pairwise(scales)]
    return [*pairs, (scales[-1], scales[-1])]


def check_routing(routing: Sequence[Sequence[int]], scales: Sequence[int]) -> list[tuple[int, int]]:
    """Validate a custom routing table and return it sorted.

    Args:
        routing: ``(max_size_inclusive, scale)`` pairs; sizes above the largest bound go to that bound's scale.
        scales: The MSUN's scales.

    Returns:
        The pairs as int tuples, ascending by bound.

    Raises:
        ToolkitError: A pair is malformed, a bound repeats or is not positive, or a scale has no subnet.
    """
    try:
        pairs = sorted((int(bound), int(scale)) for bound, scale in routing
                       if _is_int(bound) and _is_int(scale))
    except (TypeError, ValueError):
        pairs = []
    if not pairs or len(pairs) != len(routing):
        raise ToolkitError(f"routing must be (max_size_inclusive, scale) integer pairs, got {routing!r}: "
                           f"e.g. {default_routing(scales)}")
    bounds = [b for b, _ in pairs]
    if bounds[0] < 1 or len(set(bounds)) != len(bounds):
        raise ToolkitError(f"routing bounds must be distinct positive sizes, got {bounds}")
    unknown = sorted({s for _, s in pairs} - set(scales))
    if unknown:
        raise ToolkitError(f"routing sends sizes to scale(s) {unknown} that have no subnet; the scales are "
                           f"{list(scales)}")
    return pairs


def route(routing: Sequence[tuple[int, int]], size: int) -> int:
    """The scale serving an input of side ``size`` under ``routing`` (see :func:`check_routing`)."""
    for bound, scale in routing:
        if size <= bound:
            return scale
    return routing[-1][1]
