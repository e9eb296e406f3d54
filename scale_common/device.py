"""Device selection shared by every command: ``auto`` picks CUDA when present, else the CPU; what a device can do."""

from __future__ import annotations

import platform
import re
from typing import Any

import torch

from scale_common.errors import ToolkitError

__all__ = ["describe_device", "require_float64", "resolve_device"]

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


def require_float64(device: torch.device, what: str = "cka-scale analyze") -> None:
    """Refuse, up front, a device without float64 arithmetic (Apple's MPS): CKA sums its HSIC terms in float64.

    Args:
        device: The resolved device.
        what: The command or object that needs float64, for the message.

    Raises:
        ToolkitError: ``device`` is an MPS device.
    """
    if torch.device(device).type == "mps":
        raise ToolkitError(f"{what} sums HSIC in float64, which MPS (Apple GPUs) does not support: use --device cpu "
                           "(or a CUDA GPU)")


def describe_device(device: torch.device) -> dict[str, Any]:
    """What produced a result: device name and the float32 matmul settings (TF32) in force, for report metadata.

    Args:
        device: The device the work ran on.

    Returns:
        ``device``, ``device_name``, ``float32_matmul_precision``, ``cuda_matmul_allow_tf32`` and
        ``cudnn_allow_tf32`` (the model's layers follow them; the Gram GEMMs always run in IEEE float32).
    """
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device": str(device), "device_name": name,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32)}


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"
