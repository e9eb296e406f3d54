"""cka_scale: measure how each layer of a CNN changes with input scale (CKA), on real data and real weights.

The public names below are imported on first use (PEP 562), so ``import cka_scale`` and the ``cka-scale`` command's
``--help`` do not pay for torch and timm until work starts.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from scale_common import __version__

_EXPORTS = {
    "CKAAccumulator": "cka_scale.accumulate",
    "AnalyzeConfig": "cka_scale.analyze",
    "analyze": "cka_scale.analyze",
    "DATA_SOURCES": "cka_scale.data",
    "ImageDataset": "cka_scale.data",
    "eval_transform": "cka_scale.data",
    "open_dataset": "cka_scale.data",
    "sample_path": "cka_scale.data",
    "sample_photos": "cka_scale.data",
    "resolve_device": "scale_common.device",
    "ToolkitError": "scale_common.errors",
    "DegenerateCKAWarning": "cka_scale.functional",
    "angular_cka": "cka_scale.functional",
    "cka_id": "cka_scale.functional",
    "cka_matrix": "cka_scale.functional",
    "gram": "cka_scale.functional",
    "gram_linear": "cka_scale.functional",
    "gram_rbf": "cka_scale.functional",
    "hsic": "cka_scale.functional",
    "hsic_matrix": "cka_scale.functional",
    "linear_cka": "cka_scale.functional",
    "list_kernels": "cka_scale.functional",
    "rbf_cka": "cka_scale.functional",
    "LoadedModel": "cka_scale.models",
    "load_model": "cka_scale.models",
    "plot_compare": "cka_scale.plot",
    "plot_report": "cka_scale.plot",
    "Report": "cka_scale.report",
    "load_report": "cka_scale.report",
}

__all__ = [
    "DATA_SOURCES",
    "AnalyzeConfig",
    "CKAAccumulator",
    "DegenerateCKAWarning",
    "ImageDataset",
    "LoadedModel",
    "Report",
    "ToolkitError",
    "__version__",
    "analyze",
    "angular_cka",
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

if TYPE_CHECKING:
    from cka_scale.accumulate import CKAAccumulator
    from cka_scale.analyze import AnalyzeConfig, analyze
    from cka_scale.data import DATA_SOURCES, ImageDataset, eval_transform, open_dataset, sample_path, sample_photos
    from cka_scale.functional import (
        DegenerateCKAWarning,
        angular_cka,
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
    from scale_common.device import resolve_device
    from scale_common.errors import ToolkitError


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cka_scale' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names and the module's own."""
    return sorted([*globals(), *_EXPORTS])
