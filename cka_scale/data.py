"""Real images offline: the embedded photos, the texture task, Fashion-MNIST, and any ImageFolder directory.

Every command's ``--data`` takes one of:

``samples``
    The embedded default: 14 CC0/public-domain photos vendored in ``cka_scale/assets/samples`` (sources and
    licences in ``assets/NOTICE``). One split; labels are the photo names.
``textures``
    A 5-class texture task (brick, grass, gravel, moon, Hubble deep field) cut from the vendored photos: square
    crops from the left half of each photo form the train split, crops from the right half the test split, so the
    two never share a pixel. Classes differ mostly in the scale of their structure, which makes the task genuinely
    scale-sensitive.
``stamps``
    About 210 real photo cut-outs (animals, fruit, vegetables, flowers, trees, fish, ...) from Debian's
    ``tuxpaint-stamps-default`` (GPL-2, installed by ``make data``; never vendored). Each transparent cut-out is
    composited, centred with a margin, on a square neutral grey background; the class is its stamp folder (e.g.
    ``animals/birds``). Drawings are left out: anything under a ``cartoon`` folder or with an SVG original, and flat
    artwork whose 8 commonest colours cover more than half of it. One split (``--split`` is ignored).
``fashion-mnist``
    Zalando's Fashion-MNIST (10 classes of real product photos, 28x28 grey, MIT): the full 60k/10k set from Debian's
    ``dataset-fashion-mnist`` when installed (``make data``), else the committed 1000/500 subset with a warning.
``fashion-mnist-subset``
    Always the committed, class-balanced subset (for tests and quick runs).
``DIR``
    An ImageFolder directory (``DIR/<class>/<image>``, or ``DIR/train|test|val/<class>/<image>`` for splits, or a
    flat folder of images). Unreadable or truncated files are skipped with one counted warning.

Images come out as PIL RGB images (grey and RGBA converted); a ``transform`` turns them into tensors, usually
:func:`eval_transform` built from the model's timm data config.
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform
from torch.utils.data import Dataset

from scale_common.errors import ToolkitError

__all__ = [
    "DATA_SOURCES",
    "ImageDataset",
    "Photo",
    "eval_transform",
    "open_dataset",
    "sample_path",
    "sample_photos",
]

ASSETS = Path(__file__).resolve().parent / "assets"
FASHION_MNIST_DIR = Path(os.environ.get("CKA_SCALE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
STAMPS_DIR = Path(os.environ.get("CKA_SCALE_STAMPS_DIR", "/usr/share/tuxpaint/stamps"))
STAMP_GROUPS = ("animals", "food", "plants")  # the photographic stamp folders
STAMP_BACKGROUND = (124, 116, 104)  # ImageNet's mean colour: neutral for ImageNet-trained models
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
TEXTURE_CLASSES = ["brick", "grass", "gravel", "moon", "hubble_deep_field"]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

#: Names ``--data`` accepts besides a directory path.
DATA_SOURCES = ("samples", "stamps", "textures", "fashion-mnist", "fashion-mnist-subset")
SPLITS = ("train", "test", "all")


@dataclass(frozen=True)
class Photo:
    """One vendored photo and its provenance."""

    name: str
    path: Path
    source: str
    licence: str
    imagenet_classes: tuple[int, ...]
    texture: bool


@cache
def sample_photos() -> tuple[Photo, ...]:
    """List the embedded photos with their sources and licences (from ``assets/photos.json``)."""
    meta = json.loads((ASSETS / "photos.json").read_text())
    return tuple(
        Photo(m["name"], ASSETS / "samples" / m["file"], m["source"], m["licence"], tuple(m["imagenet_classes"]),
              bool(m["texture"]))
        for m in meta
    )


def sample_path(name: str) -> Path:
    """Path of the embedded photo ``name`` (e.g. ``"coffee"``, ``"chelsea"``).

    Raises:
        ToolkitError: No embedded photo has that name.
    """
    for photo in sample_photos():
        if photo.name == name:
            return photo.path
    raise ToolkitError(f"no embedded photo {name!r}; choose from {', '.join(p.name for p in sample_photos())}")


class ImageDataset(Dataset):
    """Labelled images: item ``i`` is ``(transform(image_i), label_i)``, ``image_i`` a PIL RGB image.

    Attributes:
        name: The ``--data`` spec it came from.
        split: ``train``, ``test`` or ``all``.
        classes: Class names; labels index into it.
        labels: One integer label per image.
        description: Provenance in words (source, split, count), for reports.
        transform: Applied to each PIL image in ``__getitem__`` (None returns the PIL image).
    """

    def __init__(self, name: str, split: str, classes: Sequence[str], labels: Sequence[int],
                 load: Callable[[int], Image.Image], description: str,
                 transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.name = name
        self.split = split
        self.classes = list(classes)
        self.labels = [int(v) for v in labels]
        self._load = load
        self.description = description
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        """The untransformed RGB image at ``index``."""
        return self._load(index)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self._load(index)
        return (self.transform(img) if self.transform is not None else img), self.labels[index]

    def with_transform(self, transform: Callable[[Image.Image], Any] | None) -> ImageDataset:
        """A view of the same images with another transform."""
        return ImageDataset(self.name, self.split, self.classes, self.labels, self._load, self.description, transform)


def eval_transform(data_config: dict[str, Any], size: int | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation preprocessing of timm for a model, optionally at another square size.

    Resize (the shorter side to ``size / crop_pct``, the model's interpolation), centre crop to ``size``, to tensor,
    normalise with the model's mean and std.

    Args:
        data_config: From :func:`cka_scale.load_model` (``timm.data.resolve_data_config``).
        size: Output side in pixels; the config's ``input_size`` when None.
    """
    cfg = dict(data_config)
    if size is not None:
        cfg["input_size"] = (3, int(size), int(size))
    return create_transform(**cfg, is_training=False)


# --------------------------------------------------------------------------------------------------- sources
def _pil_from_array(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array).convert("RGB")


@cache
def _photo_array(name: str) -> np.ndarray:
    return np.asarray(Image.open(sample_path(name)).convert("L" if name in TEXTURE_CLASSES[:4] else "RGB"))


def _samples(split: str) -> ImageDataset:
    photos = sample_photos()
    images = [Image.open(p.path).convert("RGB") for p in photos]
    for img in images:
        img.load()
    return ImageDataset("samples", split, [p.name for p in photos], list(range(len(photos))),
                        lambda i: images[i].copy(), f"samples: {len(photos)} embedded CC0/public-domain photos")


def _texture_crops(split: str, crop: int, per_class: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    halves = {"train": 0, "test": 1}
    crops, labels = [], []
    for label, name in enumerate(TEXTURE_CLASSES):
        grey = np.asarray(Image.fromarray(_photo_array(name)).convert("L"))
        w = grey.shape[1]
        half = grey[:, : w // 2] if halves[split] == 0 else grey[:, w // 2:]
        if min(half.shape) < crop:
            raise ToolkitError(f"texture crop {crop} px is larger than half of {name} ({half.shape[1]} px wide)")
        rng = np.random.default_rng([seed, label, halves[split]])
        ys = rng.integers(0, half.shape[0] - crop + 1, per_class)
        xs = rng.integers(0, half.shape[1] - crop + 1, per_class)
        crops += [half[y: y + crop, x: x + crop] for y, x in zip(ys, xs, strict=True)]
        labels += [label] * per_class
    return crops, labels


def _textures(split: str, crop: int, per_class: int | None, seed: int) -> ImageDataset:
    parts = ["train", "test"] if split == "all" else [split]
    crops: list[np.ndarray] = []
    labels: list[int] = []
    for part in parts:
        count = per_class or (128 if part == "train" else 64)
        c, lab = _texture_crops(part, crop, count, seed)
        crops += c
        labels += lab
    return ImageDataset("textures", split, TEXTURE_CLASSES, labels, lambda i: _pil_from_array(crops[i]),
                        f"textures: {len(labels)} {crop}px grey crops of 5 CC0/PD texture photos ({split} half)")


def _is_photo(path: Path) -> bool:
    """A photographic cut-out: no SVG original, not flat artwork (8 colours over half the opaque pixels), >= 500 px."""
    if path.with_suffix(".svg").exists() or "cartoon" in path.parts:
        return False
    with Image.open(path) as img:
        rgba = np.asarray(img.convert("RGBA")).astype(np.int64)
    rgb = rgba[..., :3][rgba[..., 3] > 200]
    if len(rgb) < 500:
        return False
    _, counts = np.unique((rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2], return_counts=True)
    return np.sort(counts)[::-1][:8].sum() <= 0.5 * len(rgb)


@cache
def _stamp_files(root: Path) -> tuple[tuple[Path, str], ...]:
    files = sorted(f for group in STAMP_GROUPS if (root / group).is_dir() for f in (root / group).rglob("*.png"))
    return tuple((f, "/".join(f.relative_to(root).parts[:2])) for f in files if _is_photo(f))


def _composite(path: Path) -> Image.Image:
    with Image.open(path) as img:
        stamp = img.convert("RGBA")
    side = round(1.15 * max(stamp.size))
    canvas = Image.new("RGBA", (side, side), (*STAMP_BACKGROUND, 255))
    canvas.alpha_composite(stamp, ((side - stamp.width) // 2, (side - stamp.height) // 2))
    return canvas.convert("RGB")


def _stamps(split: str) -> ImageDataset:
    fix = ("install Debian's tuxpaint-stamps-default: `make data` (or `sudo apt-get install tuxpaint-stamps-default`)"
           ", or point CKA_SCALE_STAMPS_DIR at its stamps folder")
    if not STAMPS_DIR.is_dir():
        raise ToolkitError(f"--data stamps needs the Tux Paint stamps in {STAMPS_DIR}, which is missing: {fix}")
    files = _stamp_files(STAMPS_DIR)
    if not files:
        raise ToolkitError(f"no photographic stamps found under {STAMPS_DIR}/{{{','.join(STAMP_GROUPS)}}}: {fix}")
    classes = sorted({c for _, c in files})
    return ImageDataset("stamps", split, classes, [classes.index(c) for _, c in files],
                        lambda i: _composite(files[i][0]),
                        f"stamps: {len(files)} photo cut-outs of Debian's tuxpaint-stamps-default (GPL-2) on grey")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@cache
def _fashion_arrays(full: bool) -> dict[str, np.ndarray]:
    if full:
        out = {}
        for split, prefix in (("train", "train"), ("test", "t10k")):
            out[f"{split}_images"] = _read_idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
            out[f"{split}_labels"] = _read_idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        return out
    with np.load(ASSETS / "fashion_mnist_subset.npz") as npz:
        return {k: npz[k] for k in npz.files}


def _fashion_full_available() -> bool:
    return all((FASHION_MNIST_DIR / f).is_file() for f in (
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz"))


def _fashion(spec: str, split: str) -> ImageDataset:
    full = spec == "fashion-mnist" and _fashion_full_available()
    if spec == "fashion-mnist" and not full:
        warnings.warn(f"the full Fashion-MNIST set is not installed ({FASHION_MNIST_DIR}); using the committed "
                      "1000/500 subset. Run `make data` (apt-get install dataset-fashion-mnist) for all 70k images.",
                      stacklevel=3)
    arrays = _fashion_arrays(full)
    parts = ["train", "test"] if split == "all" else [split]
    images = np.concatenate([arrays[f"{p}_images"] for p in parts])
    labels = np.concatenate([arrays[f"{p}_labels"] for p in parts])
    kind = "full Debian set" if full else "committed class-balanced subset"
    return ImageDataset(spec, split, FASHION_MNIST_CLASSES, labels.tolist(), lambda i: _pil_from_array(images[i]),
                        f"fashion-mnist ({kind}), {split} split: {len(labels)} 28x28 images")


def _readable(path: Path) -> str | None:
    """None when ``path`` decodes fully, else the reason it does not."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (64, 64))  # JPEG: decode at reduced scale; truncation is still detected
            img.load()
        return None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}"


def _folder(root: Path, split: str, seed: int) -> ImageDataset:
    if not root.is_dir():
        raise ToolkitError(f"--data {str(root)!r} is neither a known source ({', '.join(DATA_SOURCES)}) nor a "
                           "directory of images")
    base = root
    split_dirs = {"train": ["train"], "test": ["test", "val", "validation"]}
    chosen_split_dir = None
    if split in split_dirs:
        chosen_split_dir = next((root / d for d in split_dirs[split] if (root / d).is_dir()), None)
        base = chosen_split_dir or root
    subdirs = sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if split == "all" and any((root / d).is_dir() for d in ("train", "test", "val")):
        subdirs = sorted(c for d in subdirs for c in d.iterdir() if c.is_dir())
    if subdirs:
        classes = sorted({d.name for d in subdirs})
        files = [(f, classes.index(d.name)) for d in subdirs for f in sorted(d.rglob("*"))
                 if f.suffix.lower() in IMAGE_EXTENSIONS]
    else:
        classes = [base.name]
        files = [(f, 0) for f in sorted(base.iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
    if chosen_split_dir is None and split in ("train", "test") and files:
        # no split folders: a fixed 80/20 split so that train and test never share an image
        order = np.random.default_rng(seed).permutation(len(files))
        cut = round(0.8 * len(files))
        keep = sorted(order[:cut] if split == "train" else order[cut:])
        files = [files[i] for i in keep]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        reasons = list(pool.map(lambda item: _readable(item[0]), files))
    bad = [(f, r) for (f, _), r in zip(files, reasons, strict=True) if r is not None]
    good = [item for item, r in zip(files, reasons, strict=True) if r is None]
    if bad:
        first, why = bad[0]
        warnings.warn(f"skipped {len(bad)} unreadable or truncated image(s) in {root} (first: {first}: {why})",
                      stacklevel=3)
    if not good:
        raise ToolkitError(f"no readable images found in {root} ({split} split); expected DIR/<class>/<image> "
                           f"with extensions {', '.join(IMAGE_EXTENSIONS)}")
    paths = [f for f, _ in good]

    def load(i: int) -> Image.Image:
        with Image.open(paths[i]) as img:
            return img.convert("RGB")

    return ImageDataset(str(root), split, classes, [c for _, c in good], load,
                        f"folder {root}: {len(good)} images in {len(classes)} class(es), {split} split")


def open_dataset(spec: str, split: str = "test", *, transform: Callable[[Image.Image], Any] | None = None,
                 seed: int = 0, texture_crop: int = 96, texture_per_class: int | None = None) -> ImageDataset:
    """Open a data source by its ``--data`` spec.

    Args:
        spec: ``samples``, ``stamps``, ``textures``, ``fashion-mnist``, ``fashion-mnist-subset`` or a directory path.
        split: ``train``, ``test`` or ``all`` (``samples`` and ``stamps`` have one split and ignore it).
        transform: Applied to each PIL RGB image (e.g. :func:`eval_transform`).
        seed: Seeds the texture crops and the 80/20 split of a folder without split subfolders.
        texture_crop: Side of the texture crops in pixels.
        texture_per_class: Crops per class and split (default 128 train, 64 test).

    Returns:
        The dataset.

    Raises:
        ToolkitError: Unknown source or split, a directory without readable images, or ``stamps`` not installed.
    """
    if split not in SPLITS:
        raise ToolkitError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if spec == "samples":
        ds = _samples(split)
    elif spec == "stamps":
        ds = _stamps(split)
    elif spec == "textures":
        ds = _textures(split, texture_crop, texture_per_class, seed)
    elif spec in ("fashion-mnist", "fashion-mnist-subset"):
        ds = _fashion(spec, split)
    else:
        ds = _folder(Path(spec).expanduser(), split, seed)
    return ds.with_transform(transform)
