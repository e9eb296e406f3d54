"""cka_scale: measure how each layer of a CNN changes with input scale (CKA), on real data and real weights."""

from cka_scale.accumulate import CKAAccumulator
from cka_scale.analyze import AnalyzeConfig, analyze
from cka_scale.data import DATA_SOURCES, ImageDataset, eval_transform, open_dataset, sample_path, sample_photos
from cka_scale.device import resolve_device
from cka_scale.errors import ToolkitError
from cka_scale.functional import (
    DegenerateCKAWarning,
    cka_id,
    cka_matrix,
    gram,
    gram_linear,
    gram_rbf,
    hsic,
    hsic_matrix,
    linear_cka,
    list_kernels,
    rbf_cka,
)
from cka_scale.models import LoadedModel, load_model
from cka_scale.plot import plot_compare, plot_report
from cka_scale.report import Report, load_report

__version__ = "0.1.0"

__all__ = [
    "DATA_SOURCES",
    "AnalyzeConfig",
    "CKAAccumulator",
    "DegenerateCKAWarning",
    "ImageDataset",
    "LoadedModel",
    "Report",
    "ToolkitError",
    "analyze",
    "cka_id",
    "cka_matrix",
    "eval_transform",
    "gram",
    "gram_linear",
    "gram_rbf",
    "hsic",
    "hsic_matrix",
    "linear_cka",
    "list_kernels",
    "load_model",
    "load_report",
    "open_dataset",
    "plot_compare",
    "plot_report",
    "rbf_cka",
    "resolve_device",
    "sample_path",
    "sample_photos",
]
