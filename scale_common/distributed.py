"""Multi-process runs under ``torchrun``: one process per device, gloo on the CPU and NCCL on CUDA."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scale_common.device import resolve_device

__all__ = ["DistContext", "distributed"]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank, the number of processes, and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


@contextmanager
def distributed(device: str = "auto") -> Iterator[DistContext]:
    """Join the process group that ``torchrun`` describes in the environment (no-op for a single process).

    Under ``torchrun --nproc_per_node N`` every process gets rank ``RANK`` of ``WORLD_SIZE``; on CUDA each uses
    ``cuda:LOCAL_RANK``. A group started here is destroyed on exit.

    Args:
        device: The ``--device`` choice (``auto``, ``cpu``, ``cuda``, ``cuda:N``).

    Yields:
        This process's :class:`DistContext`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = resolve_device(device)
    if world <= 1 or not dist.is_available():
        yield DistContext(0, 1, resolved)
        return
    if resolved.type == "cuda":
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(resolved)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    try:
        yield DistContext(dist.get_rank(), dist.get_world_size(), resolved)
    finally:
        if started:
            dist.destroy_process_group()
