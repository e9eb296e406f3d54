"""msun-eval: per-size accuracy with intervals and FLOPs, seed groups, rule/validation/oracle MSUN rows, native mode."""

import csv
import dataclasses
import json

import numpy as np
import pytest

from cka_scale import ToolkitError
from msun_builder._routing import route
from msun_builder.cli import eval_main
from msun_builder.config import TrainConfig, parse_sizes
from msun_builder.evaluate import ORACLE, RULE, VALIDATION, evaluate_runs, group_runs, markdown_table
from msun_builder.runs import RunRecord
from msun_builder.train import build_model, train

TINY = dict(model="test_resnet", weights="none", scales=(16, 32), data="fashion-mnist-subset", batch_size=16,
            train_images=32, test_images=16, epochs=1, device="cpu")


def fit(cfg, out):
    return train(cfg, out, build_model(cfg, 10), progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    fit(TrainConfig(method="msun", split_reduction=8, **TINY), root / "msun")
    for seed in (0, 1):
        fit(TrainConfig(method="vanilla", seed=seed, **TINY), root / f"vanilla-s{seed}")
    fit(TrainConfig(method="msdnet", holdout_images=40, **{**TINY, "scales": (32,)}), root / "msdnet")
    return root


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_paper_protocol_table(runs, tmp_path):
    rows = evaluate_runs([runs / "msun", runs / "vanilla-s0", runs / "vanilla-s1"], data="fashion-mnist-subset",
                         sizes=[16, 24, 32], out=tmp_path, images=24, resamples=200, progress=False)
    at = {(r["label"], r["size"]): r for r in rows}
    record = RunRecord.load(runs / "msun")
    fitted = record.validation["routing"]
    for s in (16, 24, 32):
        branches = {b: at[(f"msun branch {b}", s)]["accuracy"] for b in (16, 32)}
        assert at[(ORACLE, s)]["accuracy"] == max(branches.values())
        ruled = 16 if s <= 16 else 32  # the smallest scale at least the size (default_routing)
        assert at[(RULE, s)]["accuracy"] == branches[ruled] and at[(RULE, s)]["branch"] == str(ruled)
        assert at[(RULE, s)]["flops"] == at[(f"msun branch {ruled}", s)]["flops"]
        assert at[(VALIDATION, s)]["accuracy"] == branches[route(fitted, s)]
        vanilla = at[("vanilla", s)]  # the two seeds form one group
        assert vanilla["seeds"] == [0, 1] and vanilla["runs"] == ["vanilla-s0", "vanilla-s1"]
        assert vanilla["accuracy"] == pytest.approx(sum(vanilla["seed_accuracies"]) / 2)
        for row in (vanilla, at[(RULE, s)]):
            assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1] and row["images"] == 24
    assert len({r["flops"] for r in rows if r["label"] == "vanilla"}) == 1  # every size re-enlarged
    assert {p.name for p in tmp_path.iterdir()} >= {"eval.csv", "eval.md", "eval.json", "correct.npz",
                                                     "differences.csv", "accuracy_by_size.png", "accuracy_by_size.svg"}
    assert len(_rows(tmp_path / "eval.csv")) == len(rows)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["groups"] == {"msun": ["msun"], "vanilla": ["vanilla-s0", "vanilla-s1"]}
    assert result["lossy_below"] == 28  # Fashion-MNIST's native size
    spans = {(a["label"], a["span"]): a for a in result["averages"]}
    assert spans[("vanilla", "avg<28")]["sizes"] == [16, 24]
    diffs = {(d["a"], d["b"], d["size"]): d for d in result["differences"]}
    assert set(diffs) >= {(RULE, "vanilla", w) for w in ("16", "24", "32", "avg", "avg<28")}
    for s in (16, 24, 32):  # a paired difference is the difference of the two accuracies
        d = diffs[(RULE, "vanilla", str(s))]
        assert d["difference"] == pytest.approx(at[(RULE, s)]["accuracy"] - at[("vanilla", s)]["accuracy"])
        assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
    saved = np.load(tmp_path / "correct.npz")  # every number can be recomputed from the per-image correctness
    names = list(saved["rows"])
    per_seed = [saved["correct"][names.index(f"vanilla-s{seed}|vanilla")][0].mean() for seed in (0, 1)]
    assert at[("vanilla", 16)]["seed_accuracies"] == pytest.approx(per_seed)
    assert list(saved["sizes"]) == [16, 24, 32] and len(saved["images"]) == 24
    md = (tmp_path / "eval.md").read_text()
    assert "| model | 16 | 24 | 32 | avg | avg<28 |" in md and ORACLE in md and "MSUN minus baseline" in md


def test_native_mode_adds_the_enlarged_input_which_is_the_paper_protocol(runs, tmp_path):
    args = dict(data="fashion-mnist-subset", sizes=[16, 32], images=16, resamples=200, progress=False)
    paper = evaluate_runs([runs / "msun", runs / "vanilla-s0"], out=tmp_path / "paper", **args)
    rows = evaluate_runs([runs / "msun", runs / "vanilla-s0"], out=tmp_path / "native", native=True, **args)
    flops = {(r["label"], r["size"]): r["flops"] for r in rows}
    assert flops[("vanilla-s0 (as is)", 16)] < flops[("vanilla-s0 (as is)", 32)]
    assert flops[("vanilla-s0 (enlarged)", 16)] == flops[("vanilla-s0 (as is)", 32)]  # the reference's cost
    acc = {(r["label"], r["size"]): r["accuracy"] for r in rows}
    assert acc[("vanilla-s0 (enlarged)", 32)] == acc[("vanilla-s0 (as is)", 32)]  # nothing to enlarge
    on_paper = {(r["label"], r["size"]): r["accuracy"] for r in paper}
    for s in (16, 32):  # the enlarged input is exactly the paper protocol's shrunk-and-re-enlarged image
        assert acc[("vanilla-s0 (enlarged)", s)] == on_paper[("vanilla-s0", s)]
        assert acc[("msun (rule, enlarged)", s)] == on_paper[(RULE, s)]
        assert ("msun (rule, as is)", s) in acc and ("msun (best branch, oracle, as is)", s) in acc
    pairs = {(d["a"], d["b"]) for d in json.loads((tmp_path / "native" / "eval.json").read_text())["differences"]}
    assert ("msun (rule, enlarged)", "vanilla-s0 (enlarged)") in pairs
    assert ("msun (rule, as is)", "vanilla-s0 (as is)") in pairs
    assert ("msun (rule, enlarged)", "vanilla-s0 (as is)") not in pairs
    assert "native sizes" in (tmp_path / "native" / "eval.md").read_text()


def test_msdnet_run_gets_anytime_and_budget_tables(runs, tmp_path):
    evaluate_runs([runs / "msdnet", runs / "vanilla-s0"], data="fashion-mnist-subset", sizes=[32], out=tmp_path,
                  images=32, resamples=200, progress=False)
    extra = json.loads((tmp_path / "eval.json").read_text())["msdnet"]["msdnet"]
    flops = [r["flops"] for r in extra["anytime"]]
    assert flops == sorted(flops) and len(flops) == 4
    budget = extra["budget"]
    assert budget[-1]["flops"] <= flops[-1] and budget[0]["flops"] >= flops[0]
    assert (tmp_path / "budget_msdnet.png").is_file() and "anytime prediction" in (tmp_path / "eval.md").read_text()


def test_group_runs_by_everything_but_the_seed(runs):
    base = RunRecord.load(runs / "vanilla-s0")
    other_seed = dataclasses.replace(base, config=dataclasses.replace(base.config, seed=7))
    other_lr = dataclasses.replace(base, config=dataclasses.replace(base.config, lr=0.5, seed=8))
    groups = group_runs(["v-s0", "v-s7", "w-s8"], [base, other_seed, other_lr])
    assert groups == {"v": [0, 1], "w-s8": [2]}
    with pytest.raises(ToolkitError, match="same settings and seed"):
        group_runs(["a", "b"], [base, base])


def test_msun_runs_group_by_the_cut_they_built(runs):
    """An --auto-split run records split_module; one from before that field, only the stride: same cut, one group."""
    new = RunRecord.load(runs / "msun")
    cut = new.split["module"]
    old = dataclasses.replace(new, config=dataclasses.replace(new.config, split_module=None, seed=1))
    new = dataclasses.replace(new, config=dataclasses.replace(new.config, split_module=cut))
    assert group_runs(["m-s0", "m-s1"], [new, old]) == {"m": [0, 1]}
    elsewhere = dataclasses.replace(old, split={**old.split, "module": "elsewhere"}, config=dataclasses.replace(
        old.config, seed=2))
    assert group_runs(["m-s0", "m-s2"], [new, elsewhere]) == {"m-s0": [0], "m-s2": [1]}


def test_markdown_table_average_is_unweighted():
    rows = [{"label": "x", "size": s, "accuracy": acc} for s, acc in ((16, 0.5), (32, 1.0))]
    assert markdown_table(rows, key="accuracy").splitlines()[-1] == "| x | 50.0 | 100.0 | 75.0 |"


def test_parse_sizes():
    assert parse_sizes("32:224:16") == list(range(32, 225, 16)) and len(parse_sizes("32:224:16")) == 13
    assert parse_sizes("64,32,64") == [32, 64]
    for bad in ("32:x:16", "4,8", ""):
        with pytest.raises(ToolkitError):
            parse_sizes(bad)


def test_cli_errors(runs, tmp_path, capsys):
    assert eval_main([str(runs / "vanilla-s0"), "--data", "textures", "--sizes", "32", "--out", str(tmp_path)]) == 2
    assert "trained on 10 classes" in capsys.readouterr().err
    assert eval_main([str(tmp_path), "--data", "fashion-mnist-subset", "--out", str(tmp_path)]) == 2
    assert "not a training run" in capsys.readouterr().err
    assert eval_main([str(runs / "vanilla-s0"), "--data", "fashion-mnist-subset", "--images", "0"]) == 2
    assert "--images must be a positive integer" in capsys.readouterr().err
    assert eval_main([str(runs / "vanilla-s0"), str(runs / "vanilla-s0"), "--data", "fashion-mnist-subset",
                      "--out", str(tmp_path)]) == 2
    assert "given twice" in capsys.readouterr().err


def test_a_second_evaluation_reuses_the_saved_correctness_until_a_run_is_retrained(runs, tmp_path):
    """Regrouping or re-tabling needs no rescoring: correct.npz in --out is reused for runs older than it."""
    import os

    import numpy as np

    kwargs = dict(data="fashion-mnist-subset", sizes=[16, 32], out=tmp_path, images=32, resamples=100, progress=False)
    first = evaluate_runs([runs / "vanilla-s0"], **kwargs)
    saved = dict(np.load(tmp_path / "correct.npz"))
    saved["correct"] = np.ones_like(saved["correct"])  # a marker: every image right
    np.savez_compressed(tmp_path / "correct.npz", **saved)
    again = evaluate_runs([runs / "vanilla-s0"], **kwargs)
    assert all(r["accuracy"] == 1.0 for r in again) and any(r["accuracy"] < 1.0 for r in first)
    import shutil

    namesake = shutil.copytree(runs / "vanilla-s0", tmp_path / "elsewhere" / "vanilla-s0")  # same name, old mtimes
    assert [r["accuracy"] for r in evaluate_runs([namesake], **kwargs)] == [r["accuracy"] for r in first]
    np.savez_compressed(tmp_path / "correct.npz", **saved)  # the marker again, for the original folder
    os.utime(runs / "vanilla-s0" / "run.json")  # "retrained": newer than the saved correctness, so scored again
    assert [r["accuracy"] for r in evaluate_runs([runs / "vanilla-s0"], **kwargs)] == [r["accuracy"] for r in first]
