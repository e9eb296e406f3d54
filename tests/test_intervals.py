"""Intervals and honest sample sizes: jackknife calibration, exact bucket merges, different draws, notes, stamps,
bounded figures, estimator ids and the angular CKA distance."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cka_scale import CKAAccumulator, ToolkitError, cka_matrix
from cka_scale import data as data_module
from cka_scale.accumulate import minibatch_size
from cka_scale.analyze import AnalyzeConfig, analyze
from cka_scale.cli import main
from cka_scale.functional import angular_cka, angular_distance, cka_id, parse_cka_id
from cka_scale.plot import MAX_FIGURE_INCHES, plot_report
from cka_scale.report import Report, load_report
from cka_scale.sampling import draw_subsets

FAST = dict(weights="none", data="textures", scales=(32, 64), device="cpu")


def _population_pair(p=8, q=6, sigma=1.0, seed=0):
    """X ~ N(0, I_p), Y = X A + sigma E: population linear CKA = ||A||_F^2 / sqrt(p ||A^T A + sigma^2 I||_F^2)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(p, q, generator=g, dtype=torch.float64)
    syy = a.T @ a + sigma**2 * torch.eye(q, dtype=torch.float64)
    return a, float((a**2).sum() / math.sqrt(p * (syy**2).sum())), g


@pytest.mark.parametrize("minibatches,sigma", [(10, 1.0), (24, 3.0)])
def test_jackknife_interval_is_calibrated(minibatches, sigma):
    a, population, g = _population_pair(sigma=sigma)
    trials, batch = 200, 16
    covered, estimates, errors = 0, [], []
    for _ in range(trials):
        acc = CKAAccumulator(["x", "y"])
        for _ in range(minibatches):
            x = torch.randn(batch, a.shape[0], generator=g, dtype=torch.float64)
            acc.update([x, x @ a + sigma * torch.randn(batch, a.shape[1], generator=g, dtype=torch.float64)])
        jack = acc.jackknife()
        low, high = jack.interval(0.95)
        covered += float(low[0, 1]) <= population <= float(high[0, 1])
        estimates.append(float(jack.cka[0, 1]))
        errors.append(float(jack.se[0, 1]))
    assert covered / trials >= 0.90, (covered / trials, population)
    assert abs(np.mean(estimates) - population) < 0.02  # minibatch CKA with unbiased HSIC is nearly unbiased
    assert 0.7 < np.mean(errors) / np.std(estimates) < 1.3  # the standard error matches the real spread
    assert jack.dof == min(minibatches, acc.buckets) - 1


def test_bucket_state_merges_exactly_and_places_ranks():
    a, _, g = _population_pair()
    batches = []
    for _ in range(7):
        x = torch.randn(12, 8, generator=g, dtype=torch.float64)
        batches.append([x, x @ a + torch.randn(12, 6, generator=g, dtype=torch.float64)])
    one = CKAAccumulator(["x", "y"], buckets=4)
    ranks = [CKAAccumulator(["x", "y"], buckets=4) for _ in range(2)]
    for rank, acc in enumerate(ranks):
        acc.place(rank, 2)
    for i, batch in enumerate(batches):
        one.update(batch)
        ranks[i % 2].update(batch)
    ranks[0].merge(ranks[1])
    torch.testing.assert_close(ranks[0].hsic_buckets, one.hsic_buckets, rtol=1e-13, atol=0)
    assert ranks[0].bucket_counts.tolist() == one.bucket_counts.tolist() == [2, 2, 2, 1]
    for got, want in zip(ranks[0].jackknife(), one.jackknife(), strict=True):
        torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(want), rtol=1e-12, atol=1e-14)
    state = one.state_dict()
    legacy = {k: v for k, v in state.items() if k not in ("hsic_buckets", "scale_buckets", "bucket_counts", "buckets")}
    legacy |= {"hsic_sum": one.hsic_sum, "scale_sum": one.scale_sum}
    old = CKAAccumulator(["x", "y"], buckets=4)
    old.load_state_dict(legacy)  # a state saved before buckets existed: same CKA, no interval
    torch.testing.assert_close(old.compute(), one.compute(), rtol=0, atol=1e-14)
    assert math.isnan(float(old.jackknife().se[0, 1]))
    with pytest.raises(ToolkitError, match="buckets differs"):
        CKAAccumulator(["x", "y"], buckets=5).merge(one)


def test_too_few_buckets_give_no_interval():
    acc = CKAAccumulator(2)
    for _ in range(2):
        x = torch.randn(8, 3)
        acc.update([x, x + torch.randn(8, 3)])
    jack = acc.jackknife()
    assert jack.dof == 1 and torch.isnan(jack.se[0, 1]) and torch.isnan(jack.interval()[0][0, 1])


def test_minibatch_size_makes_room_for_the_jackknife():
    assert minibatch_size(256, 64) == 32  # 8 minibatches instead of 4
    assert minibatch_size(4096, 64) == 64  # enough batches: the forward batch is kept
    assert minibatch_size(14, 64) == 4  # never below the estimator's minimum
    assert minibatch_size(256, 64, unbiased=False) == 64  # biased HSIC: smaller minibatches would add bias


def test_repeats_draw_different_subsets_or_refuse():
    draws, how = draw_subsets(100, 30, 3, seed=0)
    assert how == "disjoint" and len(set().union(*map(set, draws))) == 90
    draws, how = draw_subsets(50, 30, 3, seed=0)
    assert how == "overlapping" and len({tuple(sorted(d)) for d in draws}) == 3
    assert draw_subsets(50, 30, 1, seed=0)[0][0] == draws[0]  # repeat 0 is the same draw either way
    with pytest.raises(ToolkitError, match=r"--repeats 2 needs 2 different draws of 14 images.*--images 7"):
        draw_subsets(14, 14, 2, seed=0, what="samples")


def test_cli_refuses_repeats_on_a_source_too_small(capsys, tmp_path):
    code = main(["analyze", "test_resnet", "--weights", "none", "--scales", "32,64", "--repeats", "2",
                 "--device", "cpu", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "zero spread" in err and "bigger --data source" in err
    assert not (tmp_path / "report.json").exists()


def test_few_images_and_wide_intervals_are_noted_and_warned(capsys, tmp_path):
    code = main(["analyze", "test_resnet", "--weights", "none", "--scales", "32,64", "--device", "cpu",
                 "--no-plots", "--json", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert code == 0 and report["images"] == 14 and report["minibatches"] == 3 and report["hsic_minibatch"] == 4
    notes = report["notes"]
    assert any("only 14 images" in n and "--images" in n for n in notes)
    assert all(f"warning: {n}" in captured.err for n in notes)
    rows = report["layers"]
    assert all(r["ci95"]["32"][0] <= r["cka"]["32"] <= r["ci95"]["32"][1] for r in rows)


def test_biased_estimator_of_many_features_warns():
    rep = analyze(AnalyzeConfig(model="test_resnet", unbiased=False, images=16, batch_size=16, **FAST),
                  progress=False)
    assert rep.meta["hsic_minibatch"] == 16 and any("Murphy, Zylberberg & Fyshe 2024" in n for n in rep.meta["notes"])
    gap = analyze(AnalyzeConfig(model="test_resnet", unbiased=False, images=32, batch_size=32, spatial="gap", **FAST),
                  progress=False)  # at most 192 channels per image for 32 images a minibatch
    assert not any("Murphy" in n for n in gap.meta["notes"])


def test_repeats_combine_into_a_narrower_interval():
    rep = analyze(AnalyzeConfig(model="test_resnet", images=32, batch_size=8, repeats=3, **FAST), progress=False)
    assert rep.meta["draws"] == "disjoint" and rep.dof == [7, 7, 7]  # 8 minibatches of 4
    low, high = rep.interval(32)
    singles = [Report(rep.model, rep.weights, rep.scales, rep.reference, rep.layers, rep.cka_runs[i:i + 1],
                      rep.config, rep.meta, rep.cka_se_runs[i:i + 1], rep.dof[i:i + 1]).interval(32) for i in range(3)]
    widest = np.max([h - lo for lo, h in singles], axis=0)
    assert np.all(high - low < widest)  # three disjoint draws: se / sqrt(3) of their pooled se, more dof
    se = np.sqrt((rep.cka_se_runs ** 2).sum(0)) / 3  # the documented rule
    s, r, diag = rep.scales.index(32), rep.scales.index(64), np.arange(len(rep.layers))
    np.testing.assert_allclose(high - low, 2 * 2.0796 * se[r, diag, s, diag], rtol=1e-4)  # t_0.975(21) = 2.0796
    assert np.all(low <= rep.sensitivity(32)[0]) and np.all(rep.sensitivity(32)[0] <= high)


def test_a_report_without_intervals_still_loads(tmp_path):
    runs = np.ones((1, 2, 3, 2, 3))
    layers = [{"name": f"l{i}", "reduction": 2} for i in range(3)]
    Report("m", "none", [32, 64], 64, layers, runs, {}, {"estimator": "cka-kernel=linear-hsic=unbiased"}).save(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["layers"][0]["ci95"] == {"32": None, "64": None}
    loaded = load_report(tmp_path)
    assert loaded.cka_se_runs is None and np.isnan(loaded.interval(32)[0]).all()
    assert "0.999" not in loaded.summary_table() and "1.000" in loaded.summary_table()
    assert parse_cka_id(loaded.meta["estimator"]) == ("linear", True, 1.0)


@pytest.mark.parametrize("kernel,unbiased,threshold", [("linear", True, 1.0), ("linear", False, 1.0),
                                                       ("rbf", True, 0.5), ("rbf", False, 2.0)])
def test_estimator_ids_round_trip(kernel, unbiased, threshold):
    for angular in (False, True):
        text = cka_id(kernel, unbiased, threshold, angular=angular)
        assert text.startswith("cka-kernel=") and ("-hsic=song" in text) == unbiased
        assert parse_cka_id(text) == (kernel, unbiased, threshold)
    old = f"cka-kernel={kernel if kernel == 'linear' else f'rbf(median,threshold={threshold:g})'}-hsic=" + (
        "unbiased" if unbiased else "biased")
    assert parse_cka_id(old) == (kernel, unbiased, threshold)
    with pytest.raises(ToolkitError, match="not a CKA estimator id"):
        parse_cka_id("procrustes-angular-score")


@pytest.mark.parametrize("unbiased", [False, True])
def test_angular_cka_distance_is_a_metric(unbiased):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 6, generator=g, dtype=torch.float64)
    feats = [base @ torch.randn(6, 5, generator=g, dtype=torch.float64) + s * torch.randn(40, 5, generator=g,
             dtype=torch.float64) for s in (0.0, 0.3, 1.0, 3.0)] + [torch.randn(40, 7, generator=g, dtype=torch.float64)
                                                                   for _ in range(6)]
    d = angular_distance(cka_matrix(feats, unbiased=unbiased))
    assert torch.allclose(d, d.T) and d.diagonal().abs().max() < 1e-6 and (d >= 0).all() and (d <= math.pi).all()
    for i, j, k in itertools.permutations(range(len(feats)), 3):
        assert d[i, k] <= d[i, j] + d[j, k] + 1e-9
    assert float(angular_cka(feats[0], 3 * feats[0])) < 1e-6
    torch.testing.assert_close(angular_cka(feats[0], feats[4], unbiased=unbiased), d[0, 4])


def test_figures_of_hundreds_of_layers_are_bounded(tmp_path):
    count = 200
    rng = np.random.default_rng(0)
    layers = [{"name": f"stages.{i // 50}.blocks.{i % 50}.conv", "kind": "Conv2d", "shape": [8, 4, 4],
               "reduction": 4 * 2 ** (i // 50), "tap": i % 50 == 49, "cum_params": i} for i in range(count)]
    rep = Report("big", "none", [64, 128], 128, layers, rng.uniform(0.3, 1, (1, 2, count, 2, count)), {},
                 {"images": 8, "estimator": "x"}, rng.uniform(0, 0.05, (1, 2, count, 2, count)), [7])
    paths = plot_report(rep, tmp_path)
    cap = (150 * MAX_FIGURE_INCHES[0] + 300, 150 * MAX_FIGURE_INCHES[1] + 300)  # tight box adds the labels
    for path in (p for p in paths if p.suffix == ".png"):
        with Image.open(path) as img:
            assert img.width <= cap[0] and img.height <= cap[1], (path.name, img.size)
    svg = (tmp_path / "heatmap_64.svg").read_text()
    assert svg.count("<text") < 200 and "stages.2.blocks.0.conv (/16)" in svg  # thinned names, stage start named


def _fake_stamps(root):
    rng = np.random.default_rng(0)
    for group, name in (("animals/birds", "owl"), ("food/fruit", "pear"), ("plants/flowers", "rose")):
        folder = root / group
        folder.mkdir(parents=True)
        photo = rng.integers(0, 256, (60, 40, 4), dtype=np.uint8)
        photo[..., 3] = 255
        photo[:5, :, 3] = 0  # a transparent margin, as in a cut-out
        Image.fromarray(photo, "RGBA").save(folder / f"{name}.png")
    flat = np.zeros((60, 60, 4), np.uint8)
    flat[..., 0], flat[..., 3] = 200, 255
    Image.fromarray(flat, "RGBA").save(root / "food/fruit/drawing.png")  # flat artwork: left out
    (root / "animals/birds/cartoon").mkdir()
    Image.fromarray(photo, "RGBA").save(root / "animals/birds/cartoon/tux.png")  # a cartoon folder: left out
    Image.fromarray(photo, "RGBA").save(root / "plants/flowers/vector.png")
    (root / "plants/flowers/vector.svg").write_text("<svg/>")  # drawn from a vector original: left out


def test_stamps_source_reads_photo_cutouts_and_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "STAMPS_DIR", tmp_path / "missing")
    with pytest.raises(ToolkitError, match=r"make data.*apt-get install tuxpaint-stamps-default"):
        data_module.open_dataset("stamps")
    _fake_stamps(tmp_path / "stamps")
    monkeypatch.setattr(data_module, "STAMPS_DIR", tmp_path / "stamps")
    ds = data_module.open_dataset("stamps")
    assert len(ds) == 3 and ds.classes == ["animals/birds", "food/fruit", "plants/flowers"]
    img = ds.image(0)
    assert img.mode == "RGB" and img.width == img.height == 69
    assert img.getpixel((0, 0)) == data_module.STAMP_BACKGROUND  # the margin is the neutral background


@pytest.mark.skipif(not data_module.STAMPS_DIR.is_dir(), reason="tuxpaint-stamps-default is not installed")
def test_installed_stamps_hold_at_least_200_photos():
    ds = data_module.open_dataset("stamps")
    assert len(ds) >= 200 and len(ds.classes) >= 10
    assert all(c.split("/")[0] in data_module.STAMP_GROUPS for c in ds.classes)


@pytest.mark.slow
def test_every_layer_of_a_resnet50_with_figures_stays_under_3_gb(tmp_path):
    import resource
    import subprocess
    import sys

    args = [sys.executable, "-m", "cka_scale", "analyze", "resnetv2_50", "--layers", "all", "--scales", "64,128",
            "--weights", "none", "--data", "textures", "--images", "8", "--device", "cpu", "--quiet",
            "--out", str(tmp_path)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak_kib < 3 * 1024 * 1024 or before >= 3 * 1024 * 1024, peak_kib  # was 23.7 GB (killed)
    assert len(json.loads((tmp_path / "report.json").read_text())["layers"]) >= 180
    with Image.open(tmp_path / "heatmap_64.png") as img:
        assert img.width <= 150 * MAX_FIGURE_INCHES[0] + 300
