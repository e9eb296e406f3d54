"""msun-eval: per-size accuracy and FLOPs side by side, routed and best-branch MSUN, native mode, MSDNet tables."""

import csv
import json

import pytest

from cka_scale import ToolkitError
from msun_builder.cli import eval_main
from msun_builder.config import TrainConfig, parse_sizes
from msun_builder.evaluate import evaluate_runs, markdown_table
from msun_builder.train import build_model, train

TINY = dict(model="test_resnet", weights="none", scales=(16, 32), data="fashion-mnist-subset", batch_size=16,
            train_images=32, test_images=16, epochs=1, device="cpu")


def fit(cfg, out):
    return train(cfg, out, build_model(cfg, 10), progress=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    fit(TrainConfig(method="msun", split_reduction=8, **TINY), root / "msun")
    fit(TrainConfig(method="vanilla", **TINY), root / "vanilla")
    fit(TrainConfig(method="msdnet", holdout_images=40, **{**TINY, "scales": (32,)}), root / "msdnet")
    return root


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_paper_protocol_table(runs, tmp_path):
    rows = evaluate_runs([runs / "msun", runs / "vanilla"], data="fashion-mnist-subset", sizes=[16, 24, 32],
                         out=tmp_path, images=24, progress=False)
    labels = {(r["run"], r["label"]) for r in rows}
    assert {("msun", "msun (routed)"), ("msun", "msun (best branch)"), ("msun", "msun branch 16"),
            ("vanilla", "vanilla")} <= labels
    for s in (16, 24, 32):
        at = {r["label"]: r for r in rows if r["size"] == s and r["run"] == "msun"}
        branches = [at[f"msun branch {b}"]["accuracy"] for b in (16, 32)]
        assert at["msun (best branch)"]["accuracy"] == max(branches)
        routed = 16 if s <= 16 else 32  # the smallest scale at least the size (default_routing)
        assert at["msun (routed)"]["accuracy"] == at[f"msun branch {routed}"]["accuracy"]
        assert at["msun (routed)"]["flops"] == at[f"msun branch {routed}"]["flops"]
    vanilla = [r["flops"] for r in rows if r["label"] == "vanilla"]
    assert len(set(vanilla)) == 1  # every size is re-enlarged to the reference
    assert {p.name for p in tmp_path.iterdir()} >= {"eval.csv", "eval.md", "eval.json", "accuracy_by_size.png",
                                                     "accuracy_by_size.svg"}
    assert len(_rows(tmp_path / "eval.csv")) == len(rows)
    md = (tmp_path / "eval.md").read_text()
    assert "| run | model | 16 | 24 | 32 | avg |" in md and "msun (best branch)" in md


def test_native_mode_costs_less_at_small_sizes(runs, tmp_path):
    rows = evaluate_runs([runs / "vanilla"], data="fashion-mnist-subset", sizes=[16, 32], out=tmp_path,
                         native=True, images=16, progress=False)
    flops = {r["size"]: r["flops"] for r in rows}
    assert flops[16] < flops[32]
    assert "native sizes" in (tmp_path / "eval.md").read_text()


def test_msdnet_run_gets_anytime_and_budget_tables(runs, tmp_path):
    evaluate_runs([runs / "msdnet", runs / "vanilla"], data="fashion-mnist-subset", sizes=[32], out=tmp_path,
                  images=32, progress=False)
    extra = json.loads((tmp_path / "eval.json").read_text())["msdnet"]["msdnet"]
    flops = [r["flops"] for r in extra["anytime"]]
    assert flops == sorted(flops) and len(flops) == 4
    budget = extra["budget"]
    assert budget[-1]["flops"] <= flops[-1] and budget[0]["flops"] >= flops[0]
    assert (tmp_path / "budget_msdnet.png").is_file() and "anytime prediction" in (tmp_path / "eval.md").read_text()


def test_markdown_table_average_is_unweighted():
    rows = [{"run": "a", "label": "x", "size": s, "accuracy": acc} for s, acc in ((16, 0.5), (32, 1.0))]
    assert markdown_table(rows).splitlines()[-1] == "| a | x | 50.0 | 100.0 | 75.0 |"


def test_parse_sizes():
    assert parse_sizes("32:224:16") == list(range(32, 225, 16)) and len(parse_sizes("32:224:16")) == 13
    assert parse_sizes("64,32,64") == [32, 64]
    for bad in ("32:x:16", "4,8", ""):
        with pytest.raises(ToolkitError):
            parse_sizes(bad)


def test_cli_errors(runs, tmp_path, capsys):
    assert eval_main([str(runs / "vanilla"), "--data", "textures", "--sizes", "32", "--out", str(tmp_path)]) == 2
    assert "trained on 10 classes" in capsys.readouterr().err
    assert eval_main([str(tmp_path), "--data", "fashion-mnist-subset", "--out", str(tmp_path)]) == 2
    assert "not a training run" in capsys.readouterr().err
