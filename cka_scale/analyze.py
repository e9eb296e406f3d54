"""Model x data x scales -> report: how much each layer's representation changes with the input scale.

Protocol (Liu, Zhu & Liu 2024, "Multi-scale Unified Network", arXiv 2403.18294, section on CKA): the same images
are fed at every scale; each image is preprocessed at the reference scale (timm's eval transform), then, in the
default ``down-up`` mode, shrunk to scale ``s`` and re-enlarged to the reference (bilinear, no antialias), so every
layer keeps its reference shape; ``native`` feeds the ``s``-sized image directly. Every chosen layer's activation
becomes an n x n Gram matrix in a forward hook, and all (scale, layer) Grams of a batch go into one
:class:`~cka_scale.accumulate.CKAAccumulator`: minibatch CKA with unbiased HSIC (Nguyen, Raghu & Kornblith 2021,
arXiv 2010.15327). Every CKA carries a 95% interval from a jackknife over the HSIC minibatches
(:mod:`cka_scale.accumulate`); when the images give fewer than 8 minibatches of ``batch_size``, the minibatches
shrink (:func:`~cka_scale.accumulate.minibatch_size`) so that the interval exists. ``repeats`` draws of images are
disjoint when the source holds ``repeats x images`` images, else different but overlapping (said in a note); a source
too small for different draws is refused.

Under ``torchrun`` the batches are shared out among the processes and the accumulator's sums are reduced exactly,
so the report equals the single-process one.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from cka_scale.accumulate import CKAAccumulator, minibatch_size
from cka_scale.config import AnalyzeConfig
from cka_scale.data import eval_transform, open_dataset
from cka_scale.functional import cka_id
from cka_scale.hooks import capture_grams, parse_spatial, select_layers, trace_layers
from cka_scale.models import load_model
from cka_scale.report import Report
from cka_scale.sampling import draw_subsets, sample_notes
from scale_common.device import describe_device, require_float64, resolve_device
from scale_common.distributed import distributed, raise_together
from scale_common.errors import ToolkitError
from scale_common.modules import count_params
from scale_common.resize import down_up, resize

__all__ = ["AnalyzeConfig", "analyze", "plan_batches", "rescale"]

def rescale(x: torch.Tensor, size: int, reference: int, mode: str) -> torch.Tensor:
    """The input at scale ``size``: :func:`~scale_common.resize.resize` to it, and back to ``reference`` in down-up."""
    if mode == "native" or size == reference:
        return resize(x, size)
    return down_up(x, size, reference)


def plan_batches(count: int, batch_size: int, min_batch: int) -> list[list[int]]:
    """Split ``range(count)`` into batches of ``batch_size``; a last batch below ``min_batch`` joins the one before."""
    batches = [list(range(i, min(i + batch_size, count))) for i in range(0, count, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < min_batch:
        tail = batches.pop()
        batches[-1] = batches[-1] + tail
    return batches


def _versions() -> dict[str, str]:
    from cka_scale import __version__

    return {"cka_scale": __version__, "torch": torch.__version__, "timm": timm.__version__}


def analyze(cfg: AnalyzeConfig, *, model: nn.Module | None = None, data_config: dict[str, Any] | None = None,
            progress: bool = True, fuse_scales: bool = False) -> Report:
    """Measure per-layer CKA across input scales.

    Args:
        cfg: The analysis settings.
        model: Analyse this module instead of loading ``cfg.model`` (``data_config`` is then needed too).
        data_config: timm preprocessing config for ``model``.
        progress: Show a progress bar with ETA (rank 0 only).
        fuse_scales: In ``down-up`` mode, run all scales of a batch as one forward pass of S x B images (exact: the
            model is in eval mode, so BatchNorm uses its running statistics). Off by default: on the CPU it was no
            faster (bench/RESULTS.md) and holds S times the activations; ``bench/gpu_check.py`` measures it on CUDA.

    Returns:
        The report (every process returns it; only the caller decides what to write).

    Raises:
        ToolkitError: Bad settings, unknown model, unloadable weights, unreadable data, too few images, a device
            without float64 (MPS); under ``torchrun``, a failure on any rank (every rank raises the same error).
    """
    cfg = cfg.resolved()
    require_float64(resolve_device(cfg.device))
    reference = int(cfg.reference or max(cfg.scales))
    started = time.perf_counter()
    with distributed(cfg.device) as ctx:
        if model is None:
            with torch.random.fork_rng(devices=[]):  # random init (--weights none) follows --seed on every rank
                torch.manual_seed(cfg.seed)
                loaded = load_model(cfg.model, cfg.weights, dynamic_size=True)
            model, data_config, weights = loaded.model, loaded.data_config, loaded.weights
        elif data_config is None:
            raise ToolkitError("analyze(model=...) also needs data_config (timm.data.resolve_data_config(model=m))")
        else:
            weights = "in-memory model"
        model = model.to(ctx.device).eval()
        dataset = open_dataset(cfg.data, cfg.split, transform=eval_transform(data_config, reference),
                               seed=cfg.seed)
        notes = []
        count = min(cfg.images, len(dataset))
        if count < cfg.images:
            notes.append(f"--images {cfg.images} asked, but {dataset.description.split(':')[0]} has {len(dataset)} "
                         f"images: using all {len(dataset)}")
        min_batch = 4 if cfg.unbiased else 2
        if count < min_batch:
            raise ToolkitError(f"{dataset.description} has {count} image(s); the estimator needs at least {min_batch}")
        infos = trace_layers(model, reference, device=ctx.device)
        if cfg.resize == "native":
            for size in cfg.scales:
                trace_layers(model, size, device=ctx.device)
        layers = select_layers(model, cfg.layers, infos)
        names = [layer.name for layer in layers]
        acc = CKAAccumulator([f"{s}px:{n}" for s in cfg.scales for n in names], kernel=cfg.kernel,
                             threshold=cfg.threshold, unbiased=cfg.unbiased, shape=(len(cfg.scales), len(names)),
                             device=ctx.device)
        draws, how = draw_subsets(len(dataset), count, cfg.repeats, cfg.seed, dataset.description.split(":")[0])
        if how == "overlapping":
            notes.append(f"{cfg.repeats} draws of {count} among {len(dataset)} images overlap: the interval of their "
                         "mean is that of one draw (conservative)")
        minibatch = minibatch_size(count, cfg.batch_size, cfg.unbiased)
        batches = plan_batches(count, minibatch, min_batch)
        mine = batches[ctx.rank::ctx.world_size]
        acc.place(ctx.rank, ctx.world_size)
        runs, errors, dofs = [], [], []
        bar = tqdm(total=cfg.repeats * len(mine), unit="batch", desc=f"CKA {cfg.model}", dynamic_ncols=True,
                   disable=not (progress and ctx.is_main))
        reduce = parse_spatial(cfg.spatial)
        fuse = cfg.resize == "down-up" and fuse_scales
        dtypes: dict[str, str] = {}
        with torch.no_grad(), capture_grams(model, names, reduce=reduce, kernel=cfg.kernel, threshold=cfg.threshold,
                                            splits=len(cfg.scales) if fuse else 1, infos=layers) as take:
            for repeat in range(cfg.repeats):
                subset = Subset(dataset, draws[repeat])
                loader = DataLoader(subset, batch_sampler=mine, num_workers=cfg.num_workers,
                                    pin_memory=ctx.device.type == "cuda")
                failure = None
                try:  # no host-device synchronisation in here but the accumulator's one finiteness test per batch
                    for images, _ in loader:
                        images = images.to(ctx.device, non_blocking=True)
                        if fuse:
                            model(torch.cat([rescale(images, size, reference, cfg.resize) for size in cfg.scales]))
                            grams = take()
                        else:
                            parts = []
                            for size in cfg.scales:
                                model(rescale(images, size, reference, cfg.resize))
                                parts.append(take())
                            grams = torch.cat(parts)
                        dtypes = {"input": str(images.dtype).removeprefix("torch."),
                                  "grams": str(grams.dtype).removeprefix("torch."), "hsic_sums": "float64"}
                        acc.update_grams(grams)
                        bar.update()
                except Exception as err:  # every rank meets the others before the collective, failed or not
                    failure = err
                raise_together(failure)
                acc.all_reduce()
                jack = acc.jackknife(reshape=True)
                runs.append(jack.cka.cpu().numpy())
                errors.append(jack.se.cpu().numpy())
                dofs.append(jack.dof)
                acc.reset()
        bar.close()
        total_params = count_params(model)
        meta = {
            "data": dataset.description,
            "images": count,
            "batches": [len(b) for b in batches],
            "minibatches": len(batches),
            "hsic_minibatch": minibatch,
            "draws": how,
            "estimator": cka_id(cfg.kernel, cfg.unbiased, cfg.threshold),
            "world_size": ctx.world_size,
            **describe_device(ctx.device),
            "dtypes": dtypes,
            "fused_scales": fuse,
            "seconds": round(time.perf_counter() - started, 3),
            "total_params": total_params,
            "feature_info": [{"module": e["module"], "reduction": e["reduction"], "num_chs": e["num_chs"]}
                             for e in getattr(model, "feature_info", []) or [] if isinstance(e, dict)],
            "notes": notes,
            "versions": _versions(),
        }
    rows = [{"name": i.name, "kind": i.kind, "shape": list(i.shape), "reduction": i.reduction, "tap": i.tap,
             "cum_params": i.cum_params, **({"channels_last": True} if i.channels_last else {}),
             **({"prefix_tokens": i.prefix_tokens} if i.prefix_tokens else {})} for i in layers]
    report = Report(cfg.model, weights, list(cfg.scales), reference, rows, np.stack(runs), dataclasses.asdict(cfg),
                    meta, np.stack(errors), dofs)
    report.meta["notes"] += sample_notes(report, cfg, minibatch)
    return report
