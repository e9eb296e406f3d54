"""Routing: the default rule against the authors' assignment, and the table fitted on validation accuracy."""

import math

import pytest

from msun_builder._routing import check_routing, default_routing, fit_routing, route
from scale_common.errors import ToolkitError

PAPER = (32, 128, 224)
# The authors' assignment for 32/128/224 (figure markers and transfer code, spec section 2.4), and 28 px (transfer).
AUTHORS = {28: 32, 32: 32, 64: 128, 96: 128, 128: 128, 160: 224, 192: 224, 224: 224}


def test_the_default_rule_reproduces_the_authors_assignment() -> None:
    table = default_routing(PAPER)
    assert {size: route(table, size) for size in AUTHORS} == AUTHORS
    assert [route(table, s) for s in (1, 33, 129, 225, 500)] == [32, 128, 224, 224, 224]  # only ever enlarged


def test_the_rejected_candidates_do_not() -> None:
    def nearest(size, midpoint):
        small, mid, large = PAPER
        return small if size < midpoint(small, mid) else mid if size < midpoint(mid, large) else large

    linear = {s: nearest(s, lambda a, b: (a + b) / 2) for s in AUTHORS}
    geometric = {s: nearest(s, lambda a, b: math.sqrt(a * b)) for s in AUTHORS}  # ties (64) to the larger
    assert linear[64] == 32 and geometric[160] == 128  # the two places they part from the authors


def test_the_rule_generalises_to_any_scales() -> None:
    table = default_routing((16, 24, 64))
    assert [route(table, s) for s in (8, 16, 17, 24, 25, 64, 65)] == [16, 16, 24, 24, 64, 64, 64]
    assert check_routing(table, (16, 24, 64)) == table


def test_fit_picks_the_best_branch_per_size_on_a_known_answer() -> None:
    # The authors' ResNet-50 per-subnet accuracy (spec section 3.4), as if it were validation accuracy.
    rows = {32: [61.83, 61.73, 61.48, 60.04, 60.48, 60.39, 60.48],
            128: [37.11, 70.28, 71.98, 72.99, 72.76, 72.28, 73.70],
            224: [34.52, 61.76, 67.98, 69.96, 74.07, 74.35, 75.06]}
    sizes = [32, 64, 96, 128, 160, 192, 224]
    acc = {(scale, size): row[i] for scale, row in rows.items() for i, size in enumerate(sizes)}
    table = fit_routing(acc, sizes, PAPER)
    assert table == [(32, 32), (128, 128), (224, 224)] == default_routing(PAPER)  # the data agree with the rule
    acc[(32, 64)] = 99.0  # now the small branch wins at 64: 33..64 px go to it
    table = fit_routing(acc, sizes, PAPER)
    assert table == [(64, 32), (128, 128), (224, 224)]
    assert [route(table, s) for s in (40, 64, 65, 300)] == [32, 32, 128, 224]


def test_ties_go_to_the_rule_then_to_the_larger_branch() -> None:
    acc = {(s, z): 0.5 for s in (16, 64) for z in (16, 32, 64)}
    assert fit_routing(acc, [16, 32, 64], (16, 64)) == [(16, 16), (64, 64)]
    assert fit_routing(acc, [16, 32, 64], (16, 64), rule=[(40, 16), (64, 64)]) == [(32, 16), (64, 64)]


def test_sizes_beyond_the_measured_ones_follow_the_rule() -> None:
    acc = {(s, z): float(s == 32) for s in PAPER for z in (32, 64)}  # the small branch wins everywhere measured
    table = fit_routing(acc, [32, 64], PAPER)
    assert [route(table, s) for s in (50, 64, 65, 128, 129, 1000)] == [32, 32, 128, 128, 224, 224]
    acc = {(s, z): float(s == 32) for s in (32, 64) for z in (32, 100)}
    assert [route(fit_routing(acc, [32, 100], (32, 64)), s) for s in (100, 101)] == [32, 64]


def test_fit_refuses_missing_accuracy() -> None:
    with pytest.raises(ToolkitError, match=r"no accuracy for \(branch, size\) \[\(128, 32\)"):
        fit_routing({(32, 32): 1.0}, [32], (32, 128))
    with pytest.raises(ToolkitError, match="positive integer"):
        fit_routing({}, [], (32, 128))
