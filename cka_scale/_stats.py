"""Torch-free statistics shared by the accumulator and the report: Student-t quantiles for the 95% intervals."""

from __future__ import annotations

import math

__all__ = ["t_quantile"]


def t_quantile(level: float, dof: float) -> float:
    """The two-sided ``level`` quantile of Student's t with ``dof`` degrees of freedom (NaN when ``dof < 1``).

    Args:
        level: Coverage of the two-sided interval, e.g. 0.95.
        dof: Degrees of freedom.

    Returns:
        ``t`` such that ``P(|T| <= t) = level`` (2.262 for 0.95 and 9 degrees of freedom).
    """
    if not dof >= 1:
        return math.nan
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, dof))
