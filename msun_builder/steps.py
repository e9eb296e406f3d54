"""One training step per method as a module, so DistributedDataParallel sees a single forward per step.

``forward(x)`` returns ``({key: logits}, features or None)``: the logits of every branch, scale or exit (their
cross-entropies are summed) and, for MSUN, the branch features at the unified size for the scale-invariant loss.
``evaluate(x)`` returns ``{key: logits}`` under the paper's test protocol (the input shrunk to each scale and
re-enlarged; MSUN routed by that scale). :func:`build_model` creates the model of a :class:`TrainConfig`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from cka_scale.models import load_model
from msun_builder.flops import model_flops
from msun_builder.transforms import down_up

if TYPE_CHECKING:
    from msun_builder.train import TrainConfig

__all__ = ["METHODS", "build_model", "make_step"]

METHODS = ("msun", "vanilla", "mst", "msdnet")


class _Step(nn.Module):
    def __init__(self, model: nn.Module, scales: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.scales = scales

    def evaluate(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {str(s): self.model(down_up(x, s)) for s in self.scales}


class _Vanilla(_Step):
    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], None]:
        return {str(max(self.scales)): self.model(x)}, None


class _MultiScaleTraining(_Step):
    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], None]:
        return {str(s): self.model(down_up(x, s)) for s in self.scales}, None


class _MSUN(_Step):
    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        out = self.model.forward_branches(x)
        return {str(s): logit for s, logit in zip(self.model.scales, out.logits, strict=True)}, list(out.features)

    def evaluate(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {str(s): self.model.forward_branch(down_up(x, s), self.model.route(s))[0] for s in self.scales}


class _MSDNet(_Step):
    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], None]:
        return {f"exit{k}": logit for k, logit in enumerate(self.model(x))}, None

    def evaluate(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"exit{k}": logit for k, logit in enumerate(self.model(x))}


def make_step(cfg: TrainConfig, model: nn.Module) -> nn.Module:
    """The step module of ``cfg.method`` around ``model`` (its ``.model`` is what gets saved)."""
    kind = {"vanilla": _Vanilla, "mst": _MultiScaleTraining, "msun": _MSUN, "msdnet": _MSDNet}[cfg.method]
    scales = (cfg.reference,) if cfg.method == "vanilla" else cfg.scales
    return kind(model, scales)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(cfg: TrainConfig, num_classes: int, *, resumed: bool = False,
                run_info: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Create the model a run trains, its preprocessing config, and facts for ``run.json``.

    A resumed run rebuilds the same architecture without loading starting weights (the checkpoint has them) and
    reuses the recorded MSUN split.
    """
    weights = "none" if resumed else cfg.weights
    if cfg.method == "msdnet":
        from msun_builder.msdnet import create_msdnet, exit_flops

        model = create_msdnet(cfg.msdnet_preset, num_classes=num_classes)
        data_config = {"mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "interpolation": "bilinear",
                       "crop_pct": 1.0, "crop_mode": "center", "input_size": (3, cfg.reference, cfg.reference)}
        facts = {"architecture": f"msdnet-{cfg.msdnet_preset}", "weights": "none (random initialisation)",
                 "params": _params(model), "exit_flops": exit_flops(model, cfg.reference)}
        return model, data_config, facts
    if cfg.method == "msun":
        from msun_builder.msun import create_msun

        split = (run_info or {}).get("split") or {}
        loaded = load_model(cfg.model, weights, num_classes=num_classes)
        reduction = split.get("reduction", cfg.split_reduction)
        if reduction is None:
            from scale_common.errors import ToolkitError

            raise ToolkitError("--method msun needs --split-reduction R or --auto-split")
        msun = create_msun(loaded, cfg.scales, split_reduction=reduction)
        facts = {"architecture": cfg.model, "weights": loaded.weights, "params": _params(msun),
                 "vanilla_params": _params(loaded.model),
                 "split": {"module": msun.config["split"]["module"], "reduction": msun.config["split"]["reduction"],
                           **{k: v for k, v in split.items() if k not in ("module", "reduction")}}}
        return msun, loaded.data_config, facts
    loaded = load_model(cfg.model, weights, num_classes=num_classes)
    facts = {"architecture": cfg.model, "weights": loaded.weights, "params": _params(loaded.model),
             "flops_reference": model_flops(loaded.model, cfg.reference)}
    return loaded.model, loaded.data_config, facts
