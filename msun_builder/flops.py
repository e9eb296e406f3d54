"""FLOPs measured by running a model under ``torch.utils.flop_counter`` (no hand-written counters).

Counted FLOPs are what :class:`torch.utils.flop_counter.FlopCounterMode` counts: 2 x the multiply-accumulates of
convolutions and matrix products (normalisation, activations, pooling and resizing are not counted). The MSUN and
MSDNet papers report multiply-accumulates under the name "FLOPs"; divide our numbers by 2 to compare.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from scale_common.modules import count_params, eval_no_grad

__all__ = ["count_flops", "format_cost_table", "model_flops", "msun_cost_table"]


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of everything ``fn()`` runs (under ``torch.no_grad``)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def model_flops(model: nn.Module | Callable[[torch.Tensor], Any], size: int | tuple[int, int], *,
                channels: int = 3, device: torch.device | str = "cpu") -> int:
    """FLOPs per image of ``model`` on one ``channels x size x size`` input.

    Args:
        model: A module or any callable taking an image batch.
        size: Input side (or ``(height, width)``) in pixels.
        channels: Input channels.
        device: Where to run the measuring pass.

    Returns:
        FLOPs for a single image (a batch of one is measured).
    """
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.zeros(1, channels, h, w, device=device)
    if not isinstance(model, nn.Module):
        return count_flops(lambda: model(x))
    with eval_no_grad(model):
        return count_flops(lambda: model(x))


def msun_cost_table(msun: Any, vanilla: nn.Module) -> dict[str, Any]:
    """Parameters and FLOPs per branch of an MSUN beside the plain model it was built from.

    Args:
        msun: The MSUN (:class:`msun_builder.MSUN`).
        vanilla: The plain model, measured at the reference scale.

    Returns:
        ``params_vanilla``, ``params_msun``, ``flops_vanilla``, ``reference`` and one ``branches`` row per scale
        (``branch``, ``input``, ``flops``, ``vs_vanilla``).
    """
    ref = max(msun.scales)
    vanilla_flops = model_flops(vanilla, ref)
    rows = []
    for s in msun.scales:
        probe = torch.zeros(1, 3, s, s)
        flops = count_flops(lambda probe=probe, s=s: msun.forward_branch(probe, s))
        rows.append({"branch": s, "input": s, "flops": flops, "vs_vanilla": flops / vanilla_flops})
    return {"params_vanilla": count_params(vanilla), "params_msun": count_params(msun),
            "flops_vanilla": vanilla_flops, "reference": ref, "branches": rows}


def format_cost_table(table: dict[str, Any]) -> str:
    """The table of :func:`msun_cost_table` as text: parameters, then GFLOPs per branch and vanilla."""
    extra = table["params_msun"] - table["params_vanilla"]
    lines = [f"parameters: vanilla {table['params_vanilla'] / 1e6:.3f}M -> MSUN {table['params_msun'] / 1e6:.3f}M "
             f"(+{extra / 1e6:.3f}M, +{100 * extra / table['params_vanilla']:.1f}%)", "",
             f"{'model':<16}{'input':>7}{'GFLOPs':>10}{'vs vanilla':>12}"]
    for r in table["branches"]:
        lines.append(f"{'MSUN branch ' + str(r['branch']):<16}{r['input']:>7}{r['flops'] / 1e9:>10.4f}"
                     f"{100 * r['vs_vanilla']:>11.1f}%")
    lines.append(f"{'vanilla':<16}{table['reference']:>7}{table['flops_vanilla'] / 1e9:>10.4f}{100.0:>11.1f}%")
    lines.append("(FLOPs = 2 x multiply-accumulates of convolutions and matmuls, by torch.utils.flop_counter)")
    return "\n".join(lines)
