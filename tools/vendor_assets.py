"""Rebuild the vendored data in ``cka_scale/assets`` from scikit-image, matplotlib and Debian (dev-only script).

Run once by a maintainer; its output is committed. Needs ``pip install scikit-image`` and, for the Fashion-MNIST
subset, ``make data``::

    .venv/bin/python tools/vendor_assets.py
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
from PIL import Image

ASSETS = Path(__file__).resolve().parents[1] / "cka_scale" / "assets"

# name -> (skimage/matplotlib file, source, licence, ImageNet-1k class ids that fit the photo)
PHOTOS = {
    "astronaut": ("skimage:astronaut.png", "NASA Great Images (Eileen Collins), via scikit-image", "public domain", []),
    "brick": ("skimage:brick.png", "CC0Textures Bricks25, via scikit-image", "CC0 1.0", []),
    "camera": ("skimage:camera.png", "Lav Varshney, via scikit-image", "CC0 1.0", []),
    "chelsea": ("skimage:chelsea.png", "Stefan van der Walt (Chelsea the cat), via scikit-image", "CC0 1.0",
                [281, 282, 285]),
    "clock": ("skimage:clock_motion.png", "Stefan van der Walt (motion-blurred wall clock), via scikit-image",
              "public domain", [409, 892]),
    "coffee": ("skimage:coffee.png", "Rachel Michetti, via scikit-image", "CC0 1.0", [967]),
    "coins": ("skimage:coins.png", "Brooklyn Museum open collection, via scikit-image",
              "no known copyright restrictions", []),
    "grace_hopper": ("mpl:grace_hopper.jpg", "US Navy portrait of Grace Hopper, via matplotlib", "public domain",
                     [652, 400, 667]),
    "grass": ("skimage:grass.png", "linolafett on DeviantArt (Grass-01), via scikit-image", "CC0 1.0", []),
    "gravel": ("skimage:gravel.png", "CC0Textures Gravel04, via scikit-image", "CC0 1.0", []),
    "hubble_deep_field": ("skimage:hubble_deep_field.jpg", "NASA/HubbleSite release 2012-37, via scikit-image",
                          "public domain (NASA)", []),
    "moon": ("skimage:moon.png", "USC-SIPI image database 'Moon surface' (a NASA photograph), via scikit-image",
             "believed public domain (NASA work); scikit-image states no licence", []),
    "retina": ("skimage:retina.jpg", "Mikael Häggström, Wikimedia Commons (fundus photograph), via scikit-image",
               "CC0 1.0", []),
    "rocket": ("skimage:rocket.jpg", "SpaceX Photos (Falcon 9), via scikit-image", "public domain", [657, 744]),
}
MAX_SIDE = {"hubble_deep_field": 1000, "retina": 512}  # texture sources keep their resolution (crops come from them)
TEXTURES = ["brick", "grass", "gravel", "moon", "hubble_deep_field"]


def _source(spec: str) -> Path:
    kind, file = spec.split(":")
    if kind == "skimage":
        import skimage.data

        return Path(skimage.data.__file__).parent / file
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / file


def vendor_photos() -> None:
    """Re-encode each photo as JPEG (quality 90, long side at most 512 px unless listed) and write ``photos.json``."""
    out = ASSETS / "samples"
    out.mkdir(parents=True, exist_ok=True)
    meta = []
    for name, (spec, source, licence, classes) in PHOTOS.items():
        img = Image.open(_source(spec))
        img = img.convert("L") if img.mode in ("L", "I", "1", "LA") or name in TEXTURES[:4] else img.convert("RGB")
        side = MAX_SIDE.get(name, 512)
        if max(img.size) > side:
            scale = side / max(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
        img.save(out / f"{name}.jpg", quality=90, optimize=True)
        meta.append({"name": name, "file": f"{name}.jpg", "source": source, "licence": licence,
                     "imagenet_classes": classes, "texture": name in TEXTURES, "size": list(img.size)})
    (ASSETS / "photos.json").write_text(json.dumps(meta, indent=2) + "\n")


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def vendor_fashion_mnist(train_per_class: int = 100, test_per_class: int = 50, seed: int = 0) -> None:
    """Cut a class-balanced subset (1000 train + 500 test) of Debian's Fashion-MNIST into an npz."""
    root = Path("/usr/share/datasets/fashion-mnist")
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, prefix, per_class in (("train", "train", train_per_class), ("test", "t10k", test_per_class)):
        images = _idx(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = _idx(root / f"{prefix}-labels-idx1-ubyte.gz")
        idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in range(10)])
        idx.sort()
        arrays[f"{split}_images"] = images[idx]
        arrays[f"{split}_labels"] = labels[idx]
        arrays[f"{split}_source_index"] = idx.astype(np.int32)
    np.savez_compressed(ASSETS / "fashion_mnist_subset.npz", **arrays)


if __name__ == "__main__":
    vendor_photos()
    vendor_fashion_mnist()
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    print(f"wrote {ASSETS} ({total / 1e6:.2f} MB)")
