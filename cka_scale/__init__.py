"""cka_scale: measure how each layer of a CNN changes with input scale (CKA), on real data and real weights."""

from cka_scale.data import DATA_SOURCES, ImageDataset, eval_transform, open_dataset, sample_path, sample_photos
from cka_scale.device import resolve_device
from cka_scale.errors import ToolkitError
from cka_scale.models import LoadedModel, load_model

__version__ = "0.1.0"

__all__ = [
    "DATA_SOURCES",
    "ImageDataset",
    "LoadedModel",
    "ToolkitError",
    "eval_transform",
    "load_model",
    "open_dataset",
    "resolve_device",
    "sample_path",
    "sample_photos",
]
