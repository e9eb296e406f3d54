"""msun_builder: turn any timm CNN into a Multi-scale Unified Network (MSUN, Liu, Zhu & Liu 2024, arXiv 2403.18294)."""

from msun_builder.msun import MSUN, BranchOutputs, create_msun, load_msun, save_msun
from msun_builder.split import Tap, list_taps, split_model, splittable_taps

__all__ = [
    "MSUN",
    "BranchOutputs",
    "Tap",
    "create_msun",
    "list_taps",
    "load_msun",
    "save_msun",
    "split_model",
    "splittable_taps",
]
