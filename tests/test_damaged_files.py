"""Every file the toolkit reads back, damaged: one ``error:`` line naming the file and the fix, exit status 2."""

import json
import shutil

import pytest

from cka_scale.cli import main as cka_main
from msun_builder.cli import build_main, eval_main
from msun_builder.config import TrainConfig
from msun_builder.train import build_model, train

TINY = dict(model="test_resnet", weights="none", scales=(16, 32), data="fashion-mnist-subset", batch_size=16,
            train_images=32, test_images=16, epochs=2, device="cpu", split_reduction=8)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "msun"
    cfg = TrainConfig(method="msun", **TINY)
    train(cfg, out, build_model(cfg, 10), progress=False)
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "msun"
    shutil.copytree(finished_run, copy)
    return copy


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_finished_run_keeps_the_previous_checkpoint(finished_run):
    assert (finished_run / "checkpoint.pt").is_file() and (finished_run / "checkpoint.prev.pt").is_file()


def test_truncated_checkpoint_names_the_kept_previous_one(run, capsys):
    _truncate(run / "checkpoint.pt")
    assert build_main(["--resume", str(run), "--quiet"]) == 2
    _one_error_line(capsys, "checkpoint.pt", "damaged or truncated", "checkpoint.prev.pt", "without --resume")


def test_checkpoint_without_its_keys(run, capsys):
    import torch

    torch.save({"epoch": 1}, run / "checkpoint.pt")
    assert build_main(["--resume", str(run)]) == 2
    _one_error_line(capsys, "checkpoint.pt", "missing model")


@pytest.mark.parametrize("damage,needle", [
    (lambda p: _truncate(p), "damaged or truncated JSON"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "format": "msun-run/9"})), "msun-run/9"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "flavour": 1})), "unknown flavour"),
    (lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != "classes"})),
     "missing classes"),
    (lambda p: p.write_text("[1, 2]"), "not a JSON object"),
])
def test_damaged_run_record(run, capsys, damage, needle):
    damage(run / "run.json")
    assert build_main(["--resume", str(run)]) == 2
    _one_error_line(capsys, "run.json", needle)
    assert eval_main([str(run), "--data", "fashion-mnist-subset", "--sizes", "16,32", "--out", str(run / "e")]) == 2
    _one_error_line(capsys, "run.json", needle)


@pytest.mark.parametrize("name,needle", [("msun.safetensors", "saved MSUN weights"),
                                         ("msun.json", "saved MSUN description")])
def test_damaged_saved_msun(run, capsys, name, needle):
    _truncate(run / "model" / name)
    assert eval_main([str(run), "--data", "fashion-mnist-subset", "--sizes", "16,32", "--out", str(run / "e")]) == 2
    _one_error_line(capsys, name, needle, "damaged or truncated")


def test_damaged_report(tmp_path, capsys):
    assert cka_main(["analyze", "test_resnet", "--weights", "none", "--scales", "16,32", "--data",
                     "fashion-mnist-subset", "--images", "16", "--batch-size", "8", "--device", "cpu", "--quiet",
                     "--no-plots", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    _truncate(tmp_path / "report.json")
    assert cka_main(["plot", str(tmp_path)]) == 2
    _one_error_line(capsys, "report.json")
    assert build_main(["test_resnet", "--weights", "none", "--scales", "16,32", "--auto-split", "--report",
                       str(tmp_path), "--out", str(tmp_path / "m"), "--quiet"]) == 2
    _one_error_line(capsys, "report.json")
    (tmp_path / "report.json").unlink()
    (tmp_path / "cka.npz").write_bytes(b"PK\x03\x04 not a zip")
    assert cka_main(["plot", str(tmp_path)]) == 2
    _one_error_line(capsys)
