"""Run folders: ``run.json`` (what was trained and how) and the final model of every method, saved and loaded.

Layout of a run written by ``msun-build ... --epochs E --out RUN``::

    RUN/run.json          method, config, classes, scales, weights provenance, split choice, parameter counts
    RUN/checkpoint.pt     the last finished epoch: model, optimizer, scheduler, scaler, RNG states (for --resume)
    RUN/metrics.csv|json  one row per epoch
    RUN/model/            the final model: msun.json + msun.safetensors (MSUN), model.json + model.safetensors
                          (vanilla and MST: a timm model), or msdnet.json + msdnet.safetensors (MSDNet)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from scale_common.errors import ToolkitError
from scale_common.files import atomic_path, atomic_write_json

__all__ = ["RUN_FORMAT", "load_run", "load_run_model", "save_run_model", "write_run_json"]

RUN_FORMAT = "msun-run/1"


def write_run_json(directory: str | os.PathLike[str], info: dict[str, Any]) -> None:
    """Write ``run.json`` atomically (``format`` added)."""
    atomic_write_json(Path(directory) / "run.json", {"format": RUN_FORMAT, **info})


def load_run(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``run.json`` of a run folder.

    Raises:
        ToolkitError: The folder is not a run written by ``msun-build ... --epochs``.
    """
    path = Path(directory) / "run.json"
    if not path.is_file():
        raise ToolkitError(f"{str(directory)!r} is not a training run (no run.json): train one with "
                           "`msun-build MODEL --data DATA --epochs E --out DIR`")
    info = json.loads(path.read_text())
    if info.get("format") != RUN_FORMAT:
        raise ToolkitError(f"{str(path)!r} is not a {RUN_FORMAT} file")
    return info


def _save_safetensors(model: nn.Module, path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))


def save_run_model(model: nn.Module, method: str, directory: str | os.PathLike[str], *,
                   architecture: str | None = None) -> Path:
    """Save the trained model of ``method`` into ``directory`` (weights, then the JSON that describes them)."""
    from msun_builder.msun import save_msun

    folder = Path(directory)
    if method == "msun":
        return save_msun(model, folder)
    if method == "msdnet":
        _save_safetensors(model, folder / "msdnet.safetensors")
        atomic_write_json(folder / "msdnet.json", {"format": "msdnet/1", "config": asdict(model.config)})
        return folder
    arch = architecture or getattr(model, "pretrained_cfg", {}).get("architecture")
    if not arch:
        raise ToolkitError("cannot save a non-timm model by name")
    _save_safetensors(model, folder / "model.safetensors")
    atomic_write_json(folder / "model.json", {"format": "timm-model/1", "architecture": arch,
                                              "num_classes": int(model.num_classes)})
    return folder


def load_run_model(directory: str | os.PathLike[str], method: str) -> nn.Module:
    """Rebuild and load the model saved by :func:`save_run_model` (eval mode, CPU)."""
    folder = Path(directory)
    try:
        if method == "msun":
            from msun_builder.msun import load_msun

            return load_msun(folder).eval()
        if method == "msdnet":
            from msun_builder.msdnet import MSDNet, MSDNetConfig

            cfg = json.loads((folder / "msdnet.json").read_text())["config"]
            model: nn.Module = MSDNet(MSDNetConfig(**cfg))
            model.load_state_dict(load_file(str(folder / "msdnet.safetensors")))
            return model.eval()
        import timm

        meta = json.loads((folder / "model.json").read_text())
        model = timm.create_model(meta["architecture"], pretrained=False, num_classes=meta["num_classes"])
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        return model.eval()
    except FileNotFoundError as err:
        raise ToolkitError(f"the run's model is incomplete ({err.filename} is missing): the run did not finish; "
                           "continue it with `msun-build --resume RUN`") from None
    except RuntimeError as err:
        raise ToolkitError(f"the saved model in {str(folder)!r} does not match its description: "
                           f"{str(err).splitlines()[0][:200]}") from None


def checkpoint_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``checkpoint.pt`` (tensors and plain containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
