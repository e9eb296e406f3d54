"""Input-size routing and scale validation for MSUN (Multi-scale Unified Network, arXiv 2403.18294).

A routing table is a sorted list of ``(max_size_inclusive, scale)`` pairs: an input of side ``s`` goes to the subnet
of the first pair whose bound is ``>= s``, and sizes above the last bound go to the last pair's subnet. It is stored
as is in ``msun.json``, so a saved MSUN keeps the table it was built or fitted with.

**The default rule: the smallest subnet whose scale is at least the input size** (inputs are only ever enlarged,
never shrunk: shrinking loses detail that a larger subnet could have used, enlarging loses nothing), i.e. the table
``[(s, s) for s in scales]``. It is the only simple candidate that reproduces the authors' assignment for the scales
32/128/224 (32 -> small; 64, 96, 128 -> mid; 160, 192, 224 -> large: the markers of their per-subnet figure and their
transfer code, which also sends 28 px to the small subnet):

- nearest scale on a linear scale (midpoints 80 and 176, this module's former default) sends 64 to the small subnet;
- nearest scale on a log scale (geometric midpoints 64 and 169.3, ties to the larger) sends 160 to the mid subnet;
- smallest scale >= size sends 64..128 to mid and 129..224 to large, as the authors do.

The authors' own ResNet-50 numbers agree where the rules differ: at 64 px the mid subnet scores 70.28 vs 61.73 for the
small one, at 160 px the large one 74.07 vs 72.76 for the mid one (their figure data). The rule generalises to any
scale set without a free parameter. Which branch is best at a size is an empirical question, though:
:func:`fit_routing` picks the best branch per size on validation accuracy, for a table stored beside the rule's.

:meth:`MSUN.forward` routes by the side of the tensor it is given. Under the paper's evaluation protocol every test
image is shrunk to the test size and enlarged back to the reference size before the model sees it, so routing by the
test size there uses what the input no longer shows (its original size): the authors' oracle, to be labelled as such.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

from scale_common.errors import ToolkitError

__all__ = ["check_routing", "check_scales", "default_routing", "fit_routing", "route"]


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
    """Route each input size to the smallest subnet whose scale is at least that size (see the module docstring).

    Args:
        scales: Ascending subnet scales.

    Returns:
        ``(max_size_inclusive, scale)`` pairs, ascending: each scale is its own bound, and sizes above the largest
        scale also go to the largest. For ``(32, 128, 224)``: ``[(32, 32), (128, 128), (224, 224)]``, so 64, 96 and
        128 go to the 128 subnet and 160, 192 and 224 to the 224 subnet, as in the authors' code.
    """
    return [(int(s), int(s)) for s in scales]


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


def fit_routing(accuracy: Mapping[tuple[int, int], float], sizes: Sequence[int], scales: Sequence[int], *,
                rule: Sequence[Sequence[int]] | None = None) -> list[tuple[int, int]]:
    """A routing table that sends each measured size to its most accurate branch (fit it on validation data).

    For each size in ``sizes`` the branch with the highest ``accuracy[(scale, size)]`` wins; ties go to the branch the
    ``rule`` picks when it is among the best, else to the larger scale. Sizes between two measured sizes go where
    the next larger measured size goes (they are enlarged to it, in the spirit of the default rule); sizes above the
    largest measured one follow ``rule``.

    Args:
        accuracy: Validation accuracy keyed by ``(branch scale, input size)``, for every scale and size.
        sizes: The input sizes measured.
        scales: The MSUN's scales.
        rule: The table to fall back on and to break ties with (default: :func:`default_routing`).

    Returns:
        ``(max_size_inclusive, scale)`` pairs in the format of :func:`check_routing`, consecutive pairs with the same
        scale merged.

    Raises:
        ToolkitError: No sizes, a size that is not a positive integer, or a missing ``(scale, size)`` accuracy.

    Example:
        >>> acc = {(32, 32): .6, (128, 32): .4, (32, 64): .7, (128, 64): .6, (32, 128): .5, (128, 128): .8}
        >>> fit_routing(acc, [32, 64, 128], [32, 128])
        [(64, 32), (128, 128)]
    """
    scales = check_scales(scales)
    rule = default_routing(scales) if rule is None else check_routing(rule, scales)
    if isinstance(sizes, (str, bytes)) or not sizes or any(not _is_int(s) or s < 1 for s in sizes):
        raise ToolkitError(f"sizes must be positive integer input sides, got {sizes!r}")
    measured = sorted({int(s) for s in sizes})
    missing = [(scale, size) for size in measured for scale in scales if (scale, size) not in accuracy]
    if missing:
        raise ToolkitError(f"no accuracy for (branch, size) {missing[:4]}{' ...' if len(missing) > 4 else ''}: "
                           "evaluate every branch at every size on the validation split first")
    pairs = []
    for size in measured:
        best = max(float(accuracy[(scale, size)]) for scale in scales)
        winners = [scale for scale in scales if float(accuracy[(scale, size)]) == best]
        ruled = route(rule, size)
        pairs.append((size, ruled if ruled in winners else max(winners)))
    tail = [(bound, scale) for bound, scale in rule if bound > measured[-1]]
    if not tail and pairs[-1][1] != rule[-1][1]:
        tail = [(measured[-1] + 1, rule[-1][1])]  # sizes above every measured one: as the rule routes them
    pairs += tail
    merged = [pair for pair, after in zip(pairs, [*pairs[1:], None], strict=True)
              if after is None or after[1] != pair[1]]
    return check_routing(merged, scales)
