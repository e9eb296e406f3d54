"""Data sources: embedded photos with licences, the texture task, Fashion-MNIST, ImageFolder with bad files."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from cka_scale import ToolkitError, eval_transform, open_dataset, resolve_device, sample_photos
from cka_scale.data import ASSETS, TEXTURE_CLASSES
from scale_common.files import atomic_write_text


def test_every_embedded_photo_has_a_source_and_licence_in_the_notice():
    notice = (ASSETS / "NOTICE").read_text()
    photos = sample_photos()
    assert len(photos) >= 10
    for photo in photos:
        assert photo.path.is_file()
        assert photo.source and photo.licence
        assert photo.path.name in notice
    total = sum(p.path.stat().st_size for p in photos)
    assert total < 1.5e6  # about 1 MB of photos


def test_samples_are_rgb_and_labelled_by_name():
    ds = open_dataset("samples")
    assert len(ds) == len(sample_photos())
    img, label = ds[0]
    assert img.mode == "RGB"
    assert ds.classes[label] == sample_photos()[0].name


def test_textures_train_and_test_come_from_disjoint_halves():
    train = open_dataset("textures", "train", texture_per_class=20)
    test = open_dataset("textures", "test", texture_per_class=20)
    assert train.classes == TEXTURE_CLASSES
    assert len(train) == len(test) == 100
    assert np.bincount(train.labels).tolist() == [20] * 5
    train_crops = {np.asarray(train.image(i)).tobytes() for i in range(len(train))}
    assert not any(np.asarray(test.image(i)).tobytes() in train_crops for i in range(len(test)))
    assert train.image(0).size == (96, 96)


def test_textures_are_deterministic_per_seed():
    a = open_dataset("textures", "train", texture_per_class=4, seed=1)
    b = open_dataset("textures", "train", texture_per_class=4, seed=1)
    c = open_dataset("textures", "train", texture_per_class=4, seed=2)
    assert np.array_equal(np.asarray(a.image(3)), np.asarray(b.image(3)))
    assert not np.array_equal(np.asarray(a.image(3)), np.asarray(c.image(3)))


def test_fashion_mnist_subset_is_balanced_real_images():
    train = open_dataset("fashion-mnist-subset", "train")
    test = open_dataset("fashion-mnist-subset", "test")
    assert (len(train), len(test)) == (1000, 500)
    assert np.bincount(train.labels).tolist() == [100] * 10
    img, _ = train[0]
    assert img.size == (28, 28) and img.mode == "RGB"
    assert np.asarray(img).std() > 10  # a real photo, not a blank


def test_eval_transform_follows_the_model_config():
    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
           "crop_pct": 0.875, "crop_mode": "center"}
    ds = open_dataset("samples", transform=eval_transform(cfg, size=64))
    x, _ = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert -1.01 <= float(x.min()) and float(x.max()) <= 1.01


def _folder(tmp_path, split=None):
    root = tmp_path / "data"
    base = root / split if split else root
    for cls in ("a", "b"):
        (base / cls).mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(base / "a" / "rgb.jpg")
    Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(base / "a" / "grey.png")
    Image.fromarray(rng.integers(0, 255, (40, 50, 4), dtype=np.uint8)).save(base / "b" / "rgba.png")
    full = base / "b" / "full.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    (base / "b" / "truncated.jpg").write_bytes(full.read_bytes()[:300])
    (base / "b" / "garbage.png").write_bytes(b"this is not an image")
    (base / "b" / "notes.txt").write_text("ignored")
    return root


def test_image_folder_skips_bad_files_with_one_counted_warning(tmp_path):
    root = _folder(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = open_dataset(str(root), "all")
    skipped = [w for w in caught if "unreadable" in str(w.message)]
    assert len(skipped) == 1 and "skipped 2 " in str(skipped[0].message)
    assert len(ds) == 4 and ds.classes == ["a", "b"]
    assert all(ds.image(i).mode == "RGB" for i in range(len(ds)))


def test_image_folder_uses_split_subfolders(tmp_path):
    root = _folder(tmp_path, split="train")
    (root / "test" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "test" / "a" / "x.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(open_dataset(str(root), "train")) == 4
    assert len(open_dataset(str(root), "test")) == 1


def test_flat_folder_and_80_20_split(tmp_path):
    for i in range(10):
        Image.new("RGB", (8, 8), (i, i, i)).save(tmp_path / f"{i}.png")
    train, test = open_dataset(str(tmp_path), "train"), open_dataset(str(tmp_path), "test")
    assert (len(train), len(test)) == (8, 2)
    assert open_dataset(str(tmp_path), "all").classes == [tmp_path.name]


def test_bad_data_specs_name_the_fix(tmp_path):
    with pytest.raises(ToolkitError, match="neither a known source"):
        open_dataset(str(tmp_path / "missing"))
    with pytest.raises(ToolkitError, match="no readable images"):
        open_dataset(str(tmp_path))
    with pytest.raises(ToolkitError, match="unknown split"):
        open_dataset("samples", "validation")


def test_resolve_device():
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ToolkitError, match="unknown device"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ToolkitError, match="--device cpu"):
            resolve_device("cuda:0")


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    atomic_write_text(target, "old")

    def boom(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
