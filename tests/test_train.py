"""Fine-tuning: every method trains a few steps, checkpoints resume exactly after a kill, DDP with 2 processes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from cka_scale import ToolkitError
from msun_builder.config import TrainConfig
from msun_builder.methods import get_method
from msun_builder.runs import RunRecord, data_split, default_holdout, test_subset
from msun_builder.train import (
    VALIDATION_CORRECT,
    build_model,
    fit_validation_routing,
    resume,
    routing_sizes,
    train,
    validation_correctness,
)


def fit(cfg, out):
    """Build once, then train: the path the command line takes."""
    return train(cfg, out, build_model(cfg, 10), progress=False)


TINY = dict(model="test_resnet", weights="none", scales=(16, 32), data="fashion-mnist-subset", batch_size=16,
            train_images=64, test_images=32, optimizer="sgd", lr=0.05, warmup_epochs=0.0, device="cpu")


@pytest.mark.parametrize("method", ["msun", "vanilla", "mst", "msdnet"])
def test_each_method_trains_and_saves_a_loadable_model(method, tmp_path):
    extra = {"split_reduction": 8} if method == "msun" else {}
    if method == "msdnet":
        extra = {"holdout_images": 32, "scales": (32,)}
    row = fit(TrainConfig(method=method, epochs=2, **{**TINY, **extra}), tmp_path)
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2] and row == rows[-1]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    record = RunRecord.load(tmp_path)
    assert record.method == method and record.classes[0] == "T-shirt/top" and record.world_size == 1
    assert record.config == TrainConfig(method=method, epochs=2, **{**TINY, **extra}).resolved()
    keys = {"msun": {"ce_16", "ce_32", "si_16_32", "si_total"}, "vanilla": {"ce_32"}, "mst": {"ce_16", "ce_32"},
            "msdnet": {"ce_exit0", "ce_exit3"}}[method]
    assert keys <= set(row)
    model = get_method(method).load(tmp_path / "model")
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state["model"][key])
    assert (tmp_path / "metrics.csv").read_text().startswith("epoch,lr,loss")


def test_a_few_steps_lower_the_msun_loss(tmp_path):
    cfg = TrainConfig(method="msun", epochs=4, split_reduction=8, **{**TINY, "train_images": 32, "lr": 0.1})
    fit(cfg, tmp_path)
    losses = [r["loss"] for r in json.loads((tmp_path / "metrics.json").read_text())]
    assert losses[-1] < losses[0]


def _build_cmd(out, epochs):
    return [sys.executable, "-m", "msun_builder.cli", "build", "test_resnet", "--weights", "none", "--scales", "16,32",
            "--split-reduction", "8", "--data", "fashion-mnist-subset", "--epochs", str(epochs), "--batch-size", "16",
            "--train-images", "96", "--test-images", "16", "--device", "cpu", "--quiet", "--out", str(out)]


def test_resume_after_a_kill_ends_where_an_uninterrupted_run_ends(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run(_build_cmd(tmp_path / "full", 3), env=env, capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = subprocess.Popen(_build_cmd(tmp_path / "killed", 3), env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    stopped_at = torch.load(ckpt, weights_only=True)["epoch"]
    assert stopped_at < 3, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "model" / "msun.safetensors").exists()
    resumed = subprocess.run([sys.executable, "-m", "msun_builder.cli", "build", "--resume", str(tmp_path / "killed"),
                              "--device", "cpu", "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "full" / "model" / "msun.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model" / "msun.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a = json.loads((tmp_path / "full" / "metrics.json").read_text())
    rows_b = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]


def test_resume_errors_name_the_fix(tmp_path):
    with pytest.raises(ToolkitError, match="not a training run"):
        resume(tmp_path)


def test_two_process_ddp_training(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           *_build_cmd(tmp_path, 1)[1:]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = RunRecord.load(tmp_path)
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert record.world_size == 2 and rows[0]["images"] == 96  # 6 steps of 16 images, 8 per process
    assert get_method("msun").load(tmp_path / "model")(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_run_subsets_are_stratified_disjoint_and_fixed():
    labels = [c for c in range(10) for _ in range(30)]  # class-sorted, like an ImageFolder
    train_idx, held = data_split(labels, holdout=40, train=50, seed=3)
    assert len(held) == 40 and len(train_idx) == 50 and not set(train_idx) & set(held)
    assert {labels[i] for i in held} == set(range(10)) and {labels[i] for i in train_idx} == set(range(10))
    assert data_split(labels, holdout=40, train=50, seed=3) == (train_idx, held)
    assert data_split(labels, holdout=40, train=50, seed=4) != (train_idx, held)
    assert data_split(labels, holdout=0, train=None, seed=0) == (list(range(300)), [])
    first = test_subset(labels, 20)  # the first 20 would be two classes
    assert len(first) == 20 and {labels[i] for i in first} == set(range(10)) and test_subset(labels, 20) == first
    assert test_subset(labels, None) == list(range(300))
    assert default_holdout(60_000, None, 10) == 2000 and default_holdout(60_000, 64, 10) == 20
    assert default_holdout(30, None, 10) == 15  # never more than half the pool


def test_routing_sizes_cover_the_scales_and_a_grid():
    assert routing_sizes((32, 128, 224)) == [28, 32, 56, 84, 112, 128, 140, 168, 196, 224]
    assert routing_sizes((16, 32), (24, 8, 24)) == [8, 24]


def test_msun_run_stores_the_routing_fitted_on_validation_and_resume_fills_it_in(tmp_path):
    fit(TrainConfig(method="msun", epochs=1, split_reduction=8, routing_sizes=(8, 16, 24, 32), **TINY), tmp_path)
    record = RunRecord.load(tmp_path)
    val = record.validation
    assert record.holdout_images == 20 and val["images"] == 20 and val["sizes"] == [8, 16, 24, 32]
    assert val["rule"] == [[16, 16], [32, 32]] and set(val["accuracy"]) == {"16", "32"}
    for size in val["sizes"]:  # the fitted table sends each size to a branch at least as accurate as the other
        branch = next((scale for bound, scale in val["routing"] if size <= bound), val["routing"][-1][1])
        assert val["accuracy"][str(branch)][str(size)] == max(val["accuracy"][b][str(size)] for b in ("16", "32"))
    saved = validation_correctness(tmp_path)  # per image, for paired intervals on validation
    assert saved["correct"].shape == (2, 4, 20) and saved["branches"] == [16, 32] and saved["sizes"] == [8, 16, 24, 32]
    assert len(saved["indices"]) == 20 and saved["indices"] == sorted(saved["indices"])
    for i, branch in enumerate(saved["branches"]):
        for j, size in enumerate(saved["sizes"]):
            assert saved["correct"][i, j].mean() == pytest.approx(val["accuracy"][str(branch)][str(size)])
    import dataclasses

    os.utime(tmp_path / "run.json", (0, 0))
    (tmp_path / VALIDATION_CORRECT).unlink()  # a run trained before the file was stored: refitting adds it
    assert fit_validation_routing(tmp_path, progress=False) == val
    assert (tmp_path / "run.json").stat().st_mtime == 0 and (tmp_path / VALIDATION_CORRECT).is_file()
    dataclasses.replace(record, validation=None).save(tmp_path)  # as if killed after the last epoch
    resume(tmp_path, progress=False)
    assert RunRecord.load(tmp_path).validation == val
    vanilla = tmp_path / "vanilla"
    fit(TrainConfig(method="vanilla", epochs=1, **TINY), vanilla)
    assert RunRecord.load(vanilla).validation is None and fit_validation_routing(vanilla) is None
    with pytest.raises(ToolkitError, match="fit_validation_routing"):
        validation_correctness(vanilla)
    (tmp_path / VALIDATION_CORRECT).write_bytes(b"not an npz")
    with pytest.raises(ToolkitError, match="unreadable"):
        validation_correctness(tmp_path)


@pytest.mark.parametrize("field,value,match", [
    ("method", "fixres", "msun, vanilla, mst, msdnet"), ("scales", (4, 32), ">= 8"), ("optimizer", "lamb", "sgd"),
    ("scales", (32,), "at least 2"), ("epochs", 0, "at least 1"), ("si_kind", "l1", "mse, cosine, cka"),
])
def test_bad_settings(field, value, match):
    with pytest.raises(ToolkitError, match=match):
        build_model(TrainConfig(**{**TINY, "method": "msun", "split_reduction": 8, field: value}), 10)
