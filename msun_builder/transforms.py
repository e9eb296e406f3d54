"""Train and test preprocessing per data source: sensible augmentation, the model's normalisation, one size.

Every image becomes a tensor at the reference scale; the other scales of a batch are made from it by bilinear
resizing (:func:`scale_common.resize.resize`), so all branches of a step see the same crop.

* ``fashion-mnist*`` (28 px product photos): random 28 px crop of the 2 px padded image, horizontal flip; the whole
  image is resized (no centre crop) for training and testing alike.
* ``textures`` (square texture crops): flips and random 90 degree rotations; whole-image resize.
* ``samples`` and folders (natural photos): RandomResizedCrop (area 0.35-1) and flip for training, timm's resize and
  centre crop (``crop_pct``) for testing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T

from cka_scale.data import eval_transform

__all__ = ["test_transform", "train_transform"]

_WHOLE_IMAGE = ("fashion-mnist", "fashion-mnist-subset", "textures")
_INTERPOLATION = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC,
                  "nearest": T.InterpolationMode.NEAREST}


class _Rot90:
    """Rotate a PIL image by a random multiple of 90 degrees (torch RNG, so seeds control it)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        k = int(torch.randint(0, 4, ()).item())
        ops = [None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270]
        return img if ops[k] is None else img.transpose(ops[k])


def _normalise(data_config: dict[str, Any]) -> list[Callable[..., Any]]:
    return [T.ToTensor(), T.Normalize(data_config["mean"], data_config["std"])]


def train_transform(spec: str, size: int, data_config: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """Training augmentation for the ``--data`` source ``spec``, output ``3 x size x size``."""
    interp = _INTERPOLATION.get(data_config.get("interpolation", "bilinear"), T.InterpolationMode.BILINEAR)
    if spec.startswith("fashion-mnist"):
        ops: list[Callable[..., Any]] = [T.RandomCrop(28, padding=2), T.RandomHorizontalFlip(),
                                         T.Resize((size, size), interpolation=interp)]
    elif spec == "textures":
        ops = [T.RandomHorizontalFlip(), T.RandomVerticalFlip(), _Rot90(), T.Resize((size, size), interpolation=interp)]
    else:
        ops = [T.RandomResizedCrop(size, scale=(0.35, 1.0), interpolation=interp), T.RandomHorizontalFlip()]
    return T.Compose(ops + _normalise(data_config))


def test_transform(spec: str, size: int, data_config: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """Test preprocessing at ``size``: whole-image resize for the small-image sources, timm's eval transform else."""
    if spec in _WHOLE_IMAGE:
        interp = _INTERPOLATION.get(data_config.get("interpolation", "bilinear"), T.InterpolationMode.BILINEAR)
        return T.Compose([T.Resize((size, size), interpolation=interp), *_normalise(data_config)])
    return eval_transform(data_config, size)
