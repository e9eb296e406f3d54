"""cka-scale analyze end to end: report contents, figures, repeats, modes, families, bad input, two processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
from PIL import Image

from cka_scale import ToolkitError
from cka_scale.analyze import AnalyzeConfig, analyze, plan_batches
from cka_scale.cli import main
from cka_scale.functional import parse_cka_id
from cka_scale.report import load_report

FAST = dict(weights="none", data="textures", images=16, batch_size=8, scales=(32, 64), device="cpu")


@pytest.fixture(scope="module")
def report():
    return analyze(AnalyzeConfig(model="test_resnet", repeats=2, **FAST), progress=False)


def test_report_shape_and_identities(report):
    runs = report.cka_runs
    s, l_ = len(report.scales), len(report.layers)
    assert runs.shape == (2, s, l_, s, l_)
    eye = runs.reshape(2, s * l_, s * l_)
    np.testing.assert_allclose(np.diagonal(eye, axis1=1, axis2=2), 1.0, atol=1e-6)
    np.testing.assert_allclose(eye, eye.transpose(0, 2, 1), atol=1e-6)
    assert report.reference == 64 and report.cka_std is not None
    mean, std = report.sensitivity(32)
    assert mean.shape == (l_,) and np.all(mean <= 1.0 + 1e-6) and np.all(std >= 0)
    assert not np.allclose(runs[0], runs[1])  # two independent draws


def test_report_json_has_the_documented_fields(report, tmp_path):
    report.save(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    for key in ("model", "weights", "scales", "reference", "config", "layers", "estimator", "data", "images",
                "minibatches", "hsic_minibatch", "draws"):
        assert key in data
    layer = data["layers"][0]
    assert set(layer) >= {"name", "reduction", "cka", "cka_std", "ci95"}
    low, high = layer["ci95"]["32"]
    assert low <= layer["cka"]["32"] <= high
    assert set(layer["cka"]) == {"32", "64"} and layer["cka"]["64"] == pytest.approx(1.0, abs=1e-6)
    assert data["config"]["images"] == 16 and data["estimator"] == "cka-kernel=linear-hsic=song-score"
    loaded = load_report(tmp_path)
    np.testing.assert_array_equal(loaded.cka_runs, report.cka_runs)
    np.testing.assert_array_equal(loaded.cka_interval, report.cka_interval)
    assert loaded.layers == report.layers and loaded.scales == report.scales
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_a_failed_write_leaves_no_report(report, tmp_path, monkeypatch):
    def fail(*_args, **_kwargs):
        raise OSError("killed")

    monkeypatch.setattr("cka_scale.report.atomic_write_json", fail)
    with pytest.raises(OSError):
        report.save(tmp_path)
    with pytest.raises(ToolkitError, match="holds no cka-scale report"):
        load_report(tmp_path)


def test_native_mode_compares_different_spatial_sizes():
    rep = analyze(AnalyzeConfig(model="test_efficientnet", resize="native", spatial="flatten", **FAST),
                  progress=False)
    mean, _ = rep.sensitivity(32)
    assert np.isfinite(mean).all() and mean.shape == (len(rep.layers),)


@pytest.mark.parametrize("kernel,unbiased,spatial", [("rbf", True, "gap"), ("linear", False, "pool:2")])
def test_other_estimators_run(kernel, unbiased, spatial):
    rep = analyze(AnalyzeConfig(model="test_convnext", kernel=kernel, unbiased=unbiased, spatial=spatial, **FAST),
                  progress=False)
    assert parse_cka_id(rep.meta["estimator"])[:2] == (kernel, unbiased)
    assert np.isfinite(rep.cka_mean).all()


def test_small_source_is_used_whole_and_said(tmp_path):
    rep = analyze(AnalyzeConfig(model="test_resnet", weights="none", data="samples", images=500, batch_size=64,
                                scales=(32, 64), device="cpu"), progress=False)
    assert rep.meta["images"] == 14 and "using all 14" in rep.meta["notes"][0]


def test_plan_batches_never_leaves_a_batch_below_the_estimator_minimum():
    assert [len(b) for b in plan_batches(10, 4, 4)] == [4, 6]
    assert [len(b) for b in plan_batches(12, 4, 4)] == [4, 4, 4]
    assert [len(b) for b in plan_batches(5, 8, 4)] == [5]


@pytest.mark.parametrize("field,value,match", [
    ("scales", (0, 64), "positive"), ("scales", (64,), "at least two"), ("reference", 100, "not one of"),
    ("images", 3, "needs 4 samples"), ("kernel", "cosine", "linear, rbf"), ("resize", "crop", "down-up"),
    ("spatial", "max", "flatten, gap"),
])
def test_bad_settings_name_the_flag(field, value, match):
    with pytest.raises(ToolkitError, match=match):
        AnalyzeConfig(model="test_resnet", **{**FAST, field: value}).resolved()


def _cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_analyze_writes_report_figures_and_table(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = _cli(capsys, "analyze", "test_resnet", "--weights", "none", "--data", "textures",
                             "--images", "12", "--batch-size", "6", "--scales", "32,48,64", "--out", str(out),
                             "--device", "cpu")
    assert code == 0, err
    assert "layer4" in stdout and "48px" in stdout
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "cka.npz", "sensitivity.png", "sensitivity.svg", "heatmap_32.png", "heatmap_48.svg"} <= names
    code, stdout, _ = _cli(capsys, "plot", str(out), "--out", str(tmp_path / "again"))
    assert code == 0 and (tmp_path / "again" / "sensitivity.png").is_file()
    code, stdout, _ = _cli(capsys, "compare", str(out), str(out), "--labels", "a,b", "--out", str(tmp_path / "cmp"))
    assert code == 0 and (tmp_path / "cmp" / "compare.svg").is_file()


def test_cli_json_output_is_the_report(tmp_path, capsys):
    code, stdout, _ = _cli(capsys, "analyze", "test_resnet", "--weights", "none", "--data", "textures",
                           "--images", "8", "--batch-size", "8", "--scales", "32,64", "--out", str(tmp_path),
                           "--json", "--no-plots", "--device", "cpu")
    assert code == 0
    assert json.loads(stdout)["layers"][0]["name"] == "act1"


def _bad_folder(tmp_path: Path) -> str:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(folder / f"{i}.png")
    return str(folder)


@pytest.mark.parametrize("args,match", [
    (["resnt50"], "unknown model 'resnt50'.*resnet50"),
    (["test_resnet", "--scales", "0,64"], "positive integer"),
    (["test_resnet", "--scales", "32,big"], "comma-separated integers"),
    (["test_resnet", "--scales", "32,64", "--reference", "100"], "not one of --scales"),
    (["test_resnet", "--data", "/nonexistent/folder"], "neither a known source"),
    (["test_resnet", "--images", "2"], "at least 4"),
    (["test_resnet", "--weights", "/nonexistent.pth"], "does not exist"),
    (["test_resnet", "--weights", "auto"], "--weights PATH"),
    (["test_resnet", "--layers", "nothing*"], "list-layers"),
])
def test_cli_bad_input_is_one_line_and_nonzero(args, match, capsys, tmp_path):
    extra = [] if "--weights" in args else ["--weights", "none"]
    code, _, err = _cli(capsys, "analyze", *args, *extra, "--out", str(tmp_path), "--device", "cpu")
    assert code != 0
    assert "Traceback" not in err
    assert err.startswith("error:") or "usage:" in err
    import re

    assert re.search(match, err), err


def test_cli_too_few_images_in_a_folder(capsys, tmp_path):
    code, _, err = _cli(capsys, "analyze", "test_resnet", "--weights", "none", "--data", _bad_folder(tmp_path),
                        "--split", "all", "--out", str(tmp_path / "o"), "--device", "cpu")
    assert code == 2 and "at least 4" in err and not (tmp_path / "o" / "report.json").exists()


def test_list_layers(capsys):
    code, stdout, _ = _cli(capsys, "list-layers", "test_efficientnet", "--layers", "blocks", "--size", "64")
    assert code == 0 and "blocks.1.0" in stdout and "--layers stages: 5" in stdout


def test_random_init_follows_the_seed():
    cfg = AnalyzeConfig(model="test_resnet", **{**FAST, "images": 8})
    assert np.array_equal(analyze(cfg, progress=False).cka_runs, analyze(cfg, progress=False).cka_runs)


def test_two_processes_give_the_single_process_report(tmp_path):
    # both runs in subprocesses with one thread each, so float32 convolutions sum in the same order
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "cka_scale", "analyze", "test_resnet", "--weights", "none", "--data", "textures", "--images", "24",
            "--batch-size", "4", "--scales", "32,64", "--device", "cpu", "--quiet", "--no-plots"]
    single = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env=env, capture_output=True,
                            text=True, timeout=240)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    multi = subprocess.run([*torchrun, *args, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                           text=True, timeout=240)
    assert multi.returncode == 0, multi.stderr[-2000:]
    one, two = load_report(tmp_path / "one"), load_report(tmp_path / "two")
    assert (one.meta["world_size"], two.meta["world_size"]) == (1, 2)
    np.testing.assert_allclose(two.cka_runs, one.cka_runs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(two.cka_interval, one.cka_interval, rtol=0, atol=1e-10)  # same jackknife buckets


TINY_AND_REAL = [("test_byobnet", 64)] + [
    pytest.param(name, size, marks=pytest.mark.slow) for name, size in
    (("resnet50", 64), ("densenet121", 64), ("vgg11_bn", 64), ("mobilenetv2_100", 64), ("efficientnet_b0", 64),
     ("regnetx_002", 64), ("convnext_tiny", 64), ("tf_efficientnet_lite0", 64), ("inception_v3", 96), ("dla34", 64))
]  # inception_v3 (multi-branch) needs at least 75 px; dla34 has nested tree stages


@pytest.mark.parametrize("name,size", TINY_AND_REAL)
def test_any_timm_cnn_family(name, size):
    model = timm.create_model(name).eval()
    cfg = AnalyzeConfig(model=name, weights="none", data="textures", images=8, batch_size=8, scales=(32, size),
                        layers="blocks", device="cpu")
    data_config = timm.data.resolve_data_config(model=model)
    rep = analyze(cfg, model=model, data_config=data_config, progress=False)
    assert len(rep.layers) >= len(model.feature_info)
    assert np.isfinite(rep.sensitivity(32)[0]).sum() >= len(rep.layers) - 1
