"""auto_split follows its documented rule on synthetic reports built from the MSUN authors' published CKA curves."""

import dataclasses
import json

import numpy as np
import pytest

from cka_scale import Report, ToolkitError
from msun_builder.autosplit import auto_split
from msun_builder.config import DEFAULT_SPLIT_RULE


def _report(taps, values, cum_params, total, scales=(32, 224), names=None, more=None):
    """A Report with one layer per tap (or per name in ``names``); CKA with the reference as given.

    ``values`` is the CKA of the smallest scale; ``more`` maps other non-reference scales to their values. Every
    layer has a +-0.02 interval (standard error 0.01 from 9 groups, as a jackknife would give).
    """
    names = names or [m for m, _ in taps]
    layers = [{"name": n, "reduction": r, "tap": n == m, "cum_params": p}
              for n, (m, r), p in zip(names, taps, cum_params, strict=True)]
    count = len(layers)
    runs = np.ones((1, len(scales), count, len(scales), count))
    rows = {scales[0]: values, **(more or {})}
    ref, idx = len(scales) - 1, np.arange(count)
    for scale, vals in rows.items():
        s = list(scales).index(scale)
        runs[0, ref, idx, s, idx] = runs[0, s, idx, ref, idx] = vals
    meta = {"total_params": total, "feature_info": [{"module": m, "reduction": r} for m, r in taps]}
    return Report("synthetic", "none", list(scales), scales[-1], layers, runs, {}, meta,
                  np.full_like(runs, 0.01), [8])


def cost_split(report, **kwargs):
    """auto_split with the cost rule, which most of these tests check (whatever the default rule)."""
    return auto_split(report, rule="cost", **kwargs)


RESNET50 = _report([("act1", 2), ("layer1", 4), ("layer2", 8), ("layer3", 16), ("layer4", 32)],
                   [0.523, 0.858, 0.836, 0.767, 0.395], [9_536, 225_344, 1_444_928, 8_543_296, 23_508_032],
                   25_557_032)


def test_resnet50_curve_gives_the_authors_split_after_layer1():
    choice = cost_split(RESNET50)
    assert (choice.module, choice.reduction) == ("layer1", 4)
    assert "act1 0.52, layer1 0.86, layer2 0.84, layer3 0.77" in choice.reason and "32px and 224px" in choice.reason
    assert choice.reason.count(".") >= 1 and "\n" not in choice.reason
    assert "duplicating 0.45M parameters (1.8% of the model)" in choice.reason


LITE0_TAPS = [("blocks.0", 2), ("blocks.1", 4), ("blocks.2", 8), ("blocks.6", 32)]
LITE0_PARAMS = [1_824, 12_000, 50_000, 3_000_000]


def test_a_small_duplicate_is_counted_in_thousands_not_as_zero_millions():
    report = _report(LITE0_TAPS, [0.99, 0.6, 0.6, 0.5], LITE0_PARAMS, 3_383_818, scales=(32, 64))
    choice = cost_split(report)
    assert choice.module == "blocks.0" and "duplicating 3.6k parameters (0.1% of the model)" in choice.reason


def test_a_tap_too_shallow_for_the_smallest_subnet_to_reach_the_unified_size_is_passed_over():
    # 16 -> 64 px is a 4x ratio: cut at stride 2, the 16 px subnet ends at half the unified size. The split study
    # kept this rule: without it the stride-2 cut lost 4.2 (scratch) and 8.7 (Lite0) points at the smallest size
    report = _report(LITE0_TAPS, [0.99, 0.95, 0.9, 0.5], LITE0_PARAMS, 3_383_818, scales=(16, 32, 64))
    choice = cost_split(report)
    assert choice.module == "blocks.1" and choice.reduction == 4
    assert "deep enough for the 16px subnet" in choice.reason and "(blocks.0 would upsample" in choice.reason
    assert [c["deep_enough"] for c in choice.candidates] == [False, True, True]
    assert cost_split(report, max_upsample=float("inf")).module == "blocks.0"
    # too shallow and not robust loses to deep enough and robust even at a higher cost; if no tap is deep
    # enough (4 -> 224 px), the rule falls back to all candidates
    assert cost_split(_report(LITE0_TAPS, [0.99, 0.6, 0.85, 0.5], LITE0_PARAMS, 3_383_818,
                              scales=(16, 64))).module == "blocks.2"
    far = cost_split(_report(LITE0_TAPS, [0.99, 0.6, 0.6, 0.5], LITE0_PARAMS, 3_383_818, scales=(4, 224)))
    assert far.module == "blocks.0" and "deep enough" not in far.reason


def test_the_reason_says_when_the_cost_decided_because_cka_does_not_separate_the_taps():
    # every layer has a +-0.02 interval: 0.98 / 0.98 / 0.99 overlap, so the cheapest robust tap wins on cost
    # (scales 16/32: every tap is deep enough)
    tied = cost_split(_report(LITE0_TAPS, [0.98, 0.98, 0.99, 0.5], LITE0_PARAMS, 3_383_818, scales=(16, 32)))
    assert tied.module == "blocks.0" and "agree within their 95% intervals, so the duplicated parameters" in tied.reason
    # overlapping again, but a CKA difference inside the intervals outweighs the small cost: the reason says so
    noise = cost_split(_report(LITE0_TAPS, [0.96, 0.98, 0.99, 0.5], LITE0_PARAMS, 3_383_818, scales=(16, 32)))
    assert noise.module == "blocks.1" and "rests on CKA differences smaller than their uncertainty" in noise.reason
    # a tap whose CKA is clearly higher wins on robustness, and the reason does not blame the cost
    clear = cost_split(_report(LITE0_TAPS, [0.85, 0.99, 0.6, 0.5], LITE0_PARAMS, 3_383_818, scales=(16, 32)))
    assert clear.module == "blocks.1" and "agree within" not in clear.reason


def test_mobilenetv2_curve_cuts_at_stride_16():
    report = _report([("blocks.1", 4), ("blocks.2", 8), ("blocks.4", 16), ("blocks.5", 16), ("blocks.6", 32)],
                     [0.511, 0.634, 0.874, 0.892, 0.407], [5_000, 20_000, 300_000, 900_000, 2_200_000], 3_504_872)
    choice = cost_split(report)
    assert choice.reduction == 16 and choice.module == "blocks.4"  # same CKA class, fewer duplicated parameters


def test_vgg_curve_without_a_robust_tap_falls_back_to_the_best_score():
    report = _report([("features.6", 2), ("features.13", 4), ("features.20", 8), ("features.27", 16),
                      ("features.28", 32)], [0.683, 0.805, 0.771, 0.680, 0.670],
                     [40_000, 260_000, 1_700_000, 7_600_000, 14_700_000], 138_000_000)
    assert cost_split(report).module == "features.13"
    fallback = cost_split(report, threshold=0.9)
    assert fallback.module == "features.13" and "no tap up to stride 16 reaches CKA 0.90" in fallback.reason


def test_the_last_stage_is_never_chosen_even_when_robust():
    report = _report([("s1", 4), ("s2", 8), ("s3", 16), ("s4", 32)], [0.5, 0.6, 0.7, 0.99], [1, 2, 3, 4], 10)
    choice = cost_split(report, max_reduction=32)
    assert choice.module != "s4"


def test_cost_decides_between_robust_taps():
    taps = [("a", 4), ("b", 8), ("c", 16), ("d", 32)]
    cheap_deep = _report(taps, [0.81, 0.97, 0.5, 0.4], [10, 20, 30, 100], 100)
    assert cost_split(cheap_deep).module == "b"  # much more robust, nearly free
    costly_deep = _report(taps, [0.81, 0.97, 0.5, 0.4], [10, 60, 70, 100], 100)
    assert cost_split(costly_deep).module == "a"  # 0.97 - 0.5*1.2 < 0.81 - 0.5*0.2
    assert cost_split(costly_deep, param_weight=0.0).module == "b"


# the split study's finetune regime (Lite0 at 8/16/32 px): CKA per candidate tap and parameters before each tap
STUDY_TAPS = [("blocks.0", 2), ("blocks.1", 4), ("blocks.2", 8), ("blocks.4", 16), ("blocks.6", 32)]
STUDY_PARAMS = [1_000, 6_000, 60_000, 700_000, 2_500_000]


def test_the_deep_rule_takes_the_deepest_candidate_whatever_its_cka():
    report = _report(STUDY_TAPS, [0.95, 0.93, 0.95, 0.84, 0.5], STUDY_PARAMS, 3_400_000, scales=(8, 16, 32))
    cost = auto_split(report, rule="cost")
    deep = auto_split(report, rule="deep")
    assert auto_split(report).module == deep.module  # the default
    assert cost.module == "blocks.2" and deep.module == "blocks.4"  # the study's shipped pick and its best tap
    assert "rule 'deep'" in deep.reason and "CKA is reported, not used" in deep.reason
    assert "blocks.4 0.84" in deep.reason and "duplicating 1.40M parameters" in deep.reason
    # below the threshold it is still taken (the threshold belongs to the cost rule), never the last tap
    low = _report(STUDY_TAPS, [0.95, 0.93, 0.95, 0.6, 0.99], STUDY_PARAMS, 3_400_000, scales=(8, 16, 32))
    assert auto_split(low, rule="deep").module == "blocks.4"
    assert auto_split(low, rule="deep", max_reduction=8).module == "blocks.2"
    # the same candidates whatever the rule: only the pick differs
    assert [c["module"] for c in cost.candidates] == [c["module"] for c in deep.candidates]


def test_an_unknown_rule_is_refused_with_the_choices():
    with pytest.raises(ToolkitError, match="unknown split rule 'deepest': choose one of cost, deep"):
        auto_split(RESNET50, rule="deepest")


def test_bounds_cuttable_scale_and_blocks_level_reports(tmp_path):
    assert cost_split(RESNET50, max_reduction=2).module == "act1"
    assert cost_split(RESNET50, cuttable=["layer2", "layer3"]).module == "layer2"
    blocks = dataclasses.replace(RESNET50, layers=[
        dict(row, name=row["name"] + ".2", tap=False) if row["name"].startswith("layer") else row
        for row in RESNET50.layers])
    assert cost_split(blocks).module == "layer1"  # the last block of a stage stands for the stage
    RESNET50.save(tmp_path)
    assert cost_split(tmp_path).module == "layer1"
    assert cost_split(tmp_path / "report.json").module == "layer1"
    three = _report([("a", 4), ("b", 8), ("c", 32)], [0.9, 0.2, 0.1], [1, 2, 3], 10, scales=(32, 64, 224),
                    more={64: [0.3, 0.95, 0.5]})
    assert cost_split(three).module == "a" and cost_split(three, scale=64).module == "b"


def test_candidates_carry_the_interval_of_their_cka():
    choice = cost_split(RESNET50)
    first = choice.candidates[0]
    assert first["module"] == "act1" and first["ci95"] is not None
    low, high = first["ci95"]
    assert low < first["cka"] < high and high - low == pytest.approx(2 * 2.306 * 0.01, abs=1e-3)  # t_8


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(ToolkitError, match="--layers stages"):
        cost_split(RESNET50, min_reduction=64, max_reduction=128)
    with pytest.raises(ToolkitError, match="cka-scale analyze"):
        cost_split(tmp_path / "missing")
    with pytest.raises(ToolkitError, match="Report or the folder"):
        cost_split({"layers": []})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "report.json").write_text("{not json")
    (tmp_path / "bad" / "cka.npz").write_bytes(b"")
    with pytest.raises(ToolkitError, match=r"report\.json"):
        cost_split(tmp_path / "bad")
    with pytest.raises(ToolkitError, match="not a non-reference scale"):
        cost_split(RESNET50, scale=224)


def test_densenet121_curve_cuts_after_denseblock1():
    report = _report([("features.norm0", 2), ("features.denseblock1", 4), ("features.denseblock2", 8),
                      ("features.denseblock3", 16), ("features.norm5", 32)], [0.664, 0.903, 0.955, 0.871, 0.653],
                     [9_536, 344_000, 1_260_000, 5_600_000, 6_950_000], 7_978_856)
    choice = cost_split(report)
    assert choice.module == "features.denseblock1" and choice.candidates[2]["robust"]


def test_create_msun_takes_the_split_from_a_report_and_keeps_weight_provenance(tmp_path):
    from cka_scale import load_model
    from msun_builder import create_msun

    taps = [("act1", 2), ("layer1", 4), ("layer2", 8), ("layer3", 16), ("layer4", 32)]
    report = _report(taps, [0.4, 0.6, 0.9, 0.7, 0.3], [500, 5_000, 30_000, 200_000, 460_000], 469_688,
                     scales=(16, 64))
    report.save(tmp_path)
    loaded = load_model("test_resnet", weights="none")
    msun = create_msun(loaded, scales=(16, 32, 64), report=tmp_path, split_rule="cost")
    assert msun.config["split"] == {"module": "layer2", "reduction": 8, "num_chs": 48}
    deep = create_msun(loaded, scales=(16, 32, 64), report=tmp_path, split_rule="deep")
    assert deep.config["split"]["module"] == "layer3"
    assert msun.config["weights"] == loaded.weights
    with pytest.raises(ToolkitError, match="exactly one"):
        create_msun(loaded, scales=(16, 64), report=report, split_reduction=8)


def test_a_tap_the_cut_cannot_reach_is_replaced_by_its_boundary_and_the_reason_says_so():
    from msun_builder.split import Tap

    report = _report([("stem", 2), ("blocks.1.stack.act3", 4), ("blocks.2.stack.act3", 8), ("blocks.12", 32)],
                     [0.5, 0.9, 0.7, 0.3], [10, 100, 1000, 10_000], 20_000)
    cuttable = [Tap("blocks.0", 4, 128, stands_for="blocks.1.stack.act3"), Tap("blocks.12", 32, 2048)]
    choice = cost_split(report, cuttable=cuttable)
    assert (choice.module, choice.reduction) == ("blocks.0", 4)
    assert "nearest boundary a cut can reach for the tap blocks.1.stack.act3" in choice.reason
    assert "CKA measured at blocks.1.stack.act3" in choice.reason
    with pytest.raises(ToolkitError, match=r"is one the model can be cut at \(cuttable: blocks.12\).*"
                                           "require_splittable"):
        cost_split(report, cuttable=[Tap("blocks.12", 32, 2048)])


def test_msun_build_split_rule_records_the_rule_and_its_pick(tmp_path, capsys):
    from cka_scale.cli import main as cka_main
    from msun_builder.cli import build_main

    assert cka_main(["analyze", "test_resnet", "--weights", "none", "--scales", "16,32", "--data",
                     "fashion-mnist-subset", "--images", "16", "--batch-size", "8", "--device", "cpu", "--quiet",
                     "--no-plots", "--out", str(tmp_path / "r")]) == 0
    picks = {}
    for rule in ("cost", "deep", None):
        out = tmp_path / str(rule)
        flags = [] if rule is None else ["--split-rule", rule]
        assert build_main(["test_resnet", "--weights", "none", "--scales", "16,32", "--auto-split", "--report",
                           str(tmp_path / "r"), *flags, "--out", str(out), "--quiet"]) == 0
        split = json.loads((out / "build.json").read_text())["split"]
        picks[rule] = (split["module"], split["rule"])
    deepest = auto_split(tmp_path / "r", rule="deep").module
    assert picks["deep"] == (deepest, "deep") and picks["cost"][1] == "cost"
    assert picks[None] == (picks[DEFAULT_SPLIT_RULE][0], DEFAULT_SPLIT_RULE)
    assert picks[None] == picks["deep"]  # the default since the split study's re-check
    assert build_main(["test_resnet", "--weights", "none", "--scales", "16,32", "--auto-split", "--split-rule",
                       "deepest", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "invalid choice: 'deepest'" in capsys.readouterr().err
    base = ["test_resnet", "--weights", "none", "--scales", "16,32", "--out", str(tmp_path / "x"), "--quiet"]
    for flags, needle in ((["--auto-split", "--split-threshold", "0.9"], "--split-threshold is the cost rule's"),
                          (["--split-module", "layer1", "--split-rule", "cost"], "add --auto-split, or drop them")):
        assert build_main([*base, *flags]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before any measuring or writing
    assert build_main([*base, "--auto-split", "--report", str(tmp_path / "r"), "--split-rule", "cost",
                       "--split-threshold", "0.99"]) == 0
