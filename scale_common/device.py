"""Device selection shared by every command: ``auto`` picks CUDA when present, else the CPU."""

from __future__ import annotations

import re

import torch

from scale_common.errors import ToolkitError

__all__ = ["resolve_device"]

_SPEC = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a usable :class:`torch.device`.

    Args:
        spec: The device string; ``auto`` is CUDA device 0 when available, else the CPU.

    Returns:
        The device.

    Raises:
        ToolkitError: The string is malformed or names a device this machine does not have.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = spec.strip().lower()
    if not _SPEC.match(spec):
        raise ToolkitError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ToolkitError(f"--device {spec} asked for CUDA, but no CUDA GPU is visible here: use --device cpu")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise ToolkitError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible (cuda:0 ...)"
            )
    if spec == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ToolkitError("--device mps is not available on this machine: use --device cpu")
    return torch.device(spec)
