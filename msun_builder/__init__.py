"""msun_builder: turn any timm CNN into a Multi-scale Unified Network (MSUN, Liu, Zhu & Liu 2024, arXiv 2403.18294).

Public names are imported on first use (PEP 562), so ``msun-build --help`` does not pay for torch and timm.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from scale_common import __version__

_EXPORTS = {
    "SplitChoice": "msun_builder.autosplit",
    "auto_split": "msun_builder.autosplit",
    "EvalConfig": "msun_builder.config",
    "TrainConfig": "msun_builder.config",
    "evaluate_runs": "msun_builder.evaluate",
    "ScaleInvariantLoss": "msun_builder.losses",
    "Built": "msun_builder.methods",
    "Method": "msun_builder.methods",
    "get_method": "msun_builder.methods",
    "list_methods": "msun_builder.methods",
    "register_method": "msun_builder.methods",
    "MSDNet": "msun_builder.msdnet",
    "create_msdnet": "msun_builder.msdnet",
    "exit_flops": "msun_builder.msdnet",
    "MSUN": "msun_builder.msun",
    "BranchOutputs": "msun_builder.msun",
    "create_msun": "msun_builder.msun",
    "load_msun": "msun_builder.msun",
    "save_msun": "msun_builder.msun",
    "RunRecord": "msun_builder.runs",
    "Tap": "msun_builder.split",
    "list_taps": "msun_builder.split",
    "require_splittable": "msun_builder.split",
    "split_model": "msun_builder.split",
    "splittable_taps": "msun_builder.split",
    "build_model": "msun_builder.train",
    "resume": "msun_builder.train",
    "train": "msun_builder.train",
}

__all__ = [
    "MSUN",
    "BranchOutputs",
    "Built",
    "EvalConfig",
    "MSDNet",
    "Method",
    "RunRecord",
    "ScaleInvariantLoss",
    "SplitChoice",
    "Tap",
    "TrainConfig",
    "__version__",
    "auto_split",
    "build_model",
    "create_msdnet",
    "create_msun",
    "evaluate_runs",
    "exit_flops",
    "get_method",
    "list_methods",
    "list_taps",
    "load_msun",
    "register_method",
    "require_splittable",
    "resume",
    "save_msun",
    "split_model",
    "splittable_taps",
    "train",
]

if TYPE_CHECKING:
    from msun_builder.autosplit import SplitChoice, auto_split
    from msun_builder.config import EvalConfig, TrainConfig
    from msun_builder.evaluate import evaluate_runs
    from msun_builder.losses import ScaleInvariantLoss
    from msun_builder.methods import Built, Method, get_method, list_methods, register_method
    from msun_builder.msdnet import MSDNet, create_msdnet, exit_flops
    from msun_builder.msun import MSUN, BranchOutputs, create_msun, load_msun, save_msun
    from msun_builder.runs import RunRecord
    from msun_builder.split import Tap, list_taps, require_splittable, split_model, splittable_taps
    from msun_builder.train import build_model, resume, train


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'msun_builder' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names and the module's own."""
    return sorted([*globals(), *_EXPORTS])
