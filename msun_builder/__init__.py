"""msun_builder: turn any timm CNN into a Multi-scale Unified Network (MSUN, Liu, Zhu & Liu 2024, arXiv 2403.18294)."""

from msun_builder.autosplit import SplitChoice, auto_split
from msun_builder.evaluate import evaluate_runs
from msun_builder.losses import ScaleInvariantLoss
from msun_builder.msdnet import MSDNet, create_msdnet, exit_flops
from msun_builder.msun import MSUN, BranchOutputs, create_msun, load_msun, save_msun
from msun_builder.split import Tap, list_taps, split_model, splittable_taps
from msun_builder.train import TrainConfig, train

__all__ = [
    "MSUN",
    "BranchOutputs",
    "MSDNet",
    "ScaleInvariantLoss",
    "SplitChoice",
    "Tap",
    "TrainConfig",
    "auto_split",
    "create_msdnet",
    "create_msun",
    "evaluate_runs",
    "exit_flops",
    "list_taps",
    "load_msun",
    "save_msun",
    "split_model",
    "splittable_taps",
    "train",
]
