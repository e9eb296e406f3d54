"""Multi-process runs under ``torchrun``: one process per device, gloo on the CPU and NCCL on CUDA.

A collective waits for every rank, so a rank that raises before one leaves the others waiting until the backend's
timeout. :func:`raise_together` is the cure: every rank does its work inside ``try``, then all meet there before the
next collective, and if any failed, all raise the same :class:`~scale_common.errors.ToolkitError`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scale_common.device import resolve_device
from scale_common.errors import ToolkitError

__all__ = ["DistContext", "distributed", "raise_together"]


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
    ``cuda:LOCAL_RANK``. A group started here is destroyed on exit. Inside the block, ranks other than 0 print no
    warnings: every rank meets the same ones, and rank 0 prints them once.

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
        ctx = DistContext(dist.get_rank(), dist.get_world_size(), resolved)
        with warnings.catch_warnings():
            if not ctx.is_main:
                warnings.simplefilter("ignore")
            yield ctx
    finally:
        if started:
            dist.destroy_process_group()


def _describe(failure: BaseException) -> str:
    """One line for an exception: its message, with the type named unless it is a ToolkitError."""
    text = str(failure).strip().splitlines()[0] if str(failure).strip() else ""
    return text if isinstance(failure, ToolkitError) else f"{type(failure).__name__}: {text}".rstrip(": ")


def raise_together(failure: BaseException | None) -> None:
    """Meet the other ranks and, if any of them failed, raise the same error on all (no-op for one process).

    Every rank must call it at the same point, e.g. after its share of the batches and before ``all_reduce``; each
    passes the exception it caught there, or None. One ``all_gather_object`` of the messages: it costs a
    synchronisation, so call it once per collective, not per batch.

    Args:
        failure: What this rank caught, or None.

    Raises:
        ToolkitError: Some rank failed: ``rank R of W failed: <its message>`` (the lowest failing rank), the same text
            on every rank; the failing rank chains its own exception. A single process re-raises ``failure`` as is.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if failure is not None:
            raise failure
        return
    world = dist.get_world_size()
    messages: list[str | None] = [None] * world
    dist.all_gather_object(messages, None if failure is None else _describe(failure))
    failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
    if not failed:
        return
    rank, text = failed[0]
    others = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
    raise ToolkitError(f"rank {rank} of {world} failed{others}: {text}") from failure
