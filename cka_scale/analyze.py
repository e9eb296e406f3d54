"""Model x data x scales -> report: how much each layer's representation changes with the input scale.

Protocol (Liu, Zhu & Liu 2024, "Multi-scale Unified Network", arXiv 2403.18294, section on CKA): the same images
are fed at every scale; each image is preprocessed at the reference scale (timm's eval transform), then, in the
default ``down-up`` mode, shrunk to scale ``s`` and re-enlarged to the reference (bilinear, no antialias), so every
layer keeps its reference shape; ``native`` feeds the ``s``-sized image directly. Every chosen layer's activation
becomes an n x n Gram matrix in a forward hook, and all (scale, layer) Grams of a batch go into one
:class:`~cka_scale.accumulate.CKAAccumulator`: minibatch CKA with unbiased HSIC (Nguyen, Raghu & Kornblith 2021,
arXiv 2010.15327). ``repeats`` independent draws of images give a mean and a standard deviation.

Under ``torchrun`` the batches are shared out among the processes and the accumulator's sums are reduced exactly,
so the report equals the single-process one.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from cka_scale.accumulate import CKAAccumulator
from cka_scale.data import eval_transform, open_dataset
from cka_scale.distributed import distributed
from cka_scale.errors import ToolkitError
from cka_scale.functional import cka_id, list_kernels
from cka_scale.hooks import capture_grams, parse_spatial, select_layers, trace_layers
from cka_scale.models import load_model
from cka_scale.report import Report

__all__ = ["AnalyzeConfig", "analyze", "plan_batches", "rescale"]

RESIZE_MODES = ("down-up", "native")


@dataclass(frozen=True)
class AnalyzeConfig:
    """Everything ``cka-scale analyze`` needs; the CLI fills it from its flags.

    Attributes:
        model: timm model name (a label when a model object is passed to :func:`analyze`).
        scales: Input sizes to compare.
        reference: The scale the others are compared with; the largest when None.
        resize: ``down-up`` (shrink to s, re-enlarge to the reference: the paper's) or ``native`` (feed s x s).
        spatial: ``flatten`` (C*H*W, the paper's), ``gap`` or ``pool:K``.
        kernel: ``linear`` or ``rbf``.
        threshold: RBF bandwidth as a fraction of the median distance.
        unbiased: Unbiased HSIC (minibatch CKA) when True, biased HSIC per batch otherwise.
        images: Images per repeat (a smaller source is used whole).
        batch_size: Images per forward pass and per HSIC minibatch.
        repeats: Independent draws of ``images`` images (mean and std over them).
        seed: Seed of the first draw; repeat r uses ``seed + r``.
        data: ``samples``, ``textures``, ``fashion-mnist``, ``fashion-mnist-subset`` or a directory.
        split: Data split to draw from.
        weights: ``auto``, ``none`` or a state-dict path.
        layers: ``stages``, ``blocks``, ``all`` or comma-separated globs.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        num_workers: DataLoader worker processes.
    """

    model: str
    scales: tuple[int, ...] = (64, 128, 224)
    reference: int | None = None
    resize: str = "down-up"
    spatial: str = "flatten"
    kernel: str = "linear"
    threshold: float = 1.0
    unbiased: bool = True
    images: int = 256
    batch_size: int = 64
    repeats: int = 1
    seed: int = 0
    data: str = "samples"
    split: str = "test"
    weights: str = "auto"
    layers: str = "stages"
    device: str = "auto"
    num_workers: int = 0

    def resolved(self) -> AnalyzeConfig:
        """Validate every field and fill the defaults (sorted unique scales, the reference).

        Raises:
            ToolkitError: A field is out of range; the message names the flag and the fix.
        """
        scales = tuple(sorted({int(s) for s in self.scales}))
        if not scales or any(s <= 0 for s in self.scales):
            raise ToolkitError(f"--scales must be positive integers, got {list(self.scales)}")
        if len(scales) < 2:
            raise ToolkitError(f"--scales needs at least two different sizes to compare, got {list(scales)}")
        reference = max(scales) if self.reference is None else int(self.reference)
        if reference not in scales:
            raise ToolkitError(f"--reference {reference} is not one of --scales {','.join(map(str, scales))}")
        if self.resize not in RESIZE_MODES:
            raise ToolkitError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")
        if self.kernel not in list_kernels():
            raise ToolkitError(f"--kernel must be one of {', '.join(list_kernels())}, got {self.kernel!r}")
        parse_spatial(self.spatial)
        min_batch = 4 if self.unbiased else 2
        for flag, value, low in (("--images", self.images, min_batch), ("--batch-size", self.batch_size, min_batch),
                                 ("--repeats", self.repeats, 1), ("--num-workers", self.num_workers, 0)):
            if value < low:
                why = " (the unbiased HSIC estimator needs 4 samples per batch)" if low == 4 else ""
                raise ToolkitError(f"{flag} must be at least {low}{why}, got {value}")
        if self.threshold <= 0:
            raise ToolkitError(f"--threshold must be positive, got {self.threshold}")
        return dataclasses.replace(self, scales=scales, reference=reference)


def rescale(x: torch.Tensor, size: int, reference: int, mode: str) -> torch.Tensor:
    """The input at scale ``size``: bilinear (no antialias) to ``size``, then back to ``reference`` in down-up mode."""
    if size == x.shape[-1] and (mode == "native" or size == reference):
        return x
    small = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    if mode == "native":
        return small
    return F.interpolate(small, size=(reference, reference), mode="bilinear", align_corners=False, antialias=False)


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
            progress: bool = True) -> Report:
    """Measure per-layer CKA across input scales.

    Args:
        cfg: The analysis settings.
        model: Analyse this module instead of loading ``cfg.model`` (``data_config`` is then needed too).
        data_config: timm preprocessing config for ``model``.
        progress: Show a progress bar with ETA (rank 0 only).

    Returns:
        The report (every process returns it; only the caller decides what to write).

    Raises:
        ToolkitError: Bad settings, unknown model, unloadable weights, unreadable data, too few images.
    """
    cfg = cfg.resolved()
    reference = int(cfg.reference or max(cfg.scales))
    started = time.perf_counter()
    with distributed(cfg.device) as ctx:
        if model is None:
            with torch.random.fork_rng(devices=[]):  # random init (--weights none) follows --seed on every rank
                torch.manual_seed(cfg.seed)
                loaded = load_model(cfg.model, cfg.weights)
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
        batches = plan_batches(count, cfg.batch_size, min_batch)
        mine = batches[ctx.rank::ctx.world_size]
        runs = []
        bar = tqdm(total=cfg.repeats * len(mine), unit="batch", desc=f"CKA {cfg.model}", dynamic_ncols=True,
                   disable=not (progress and ctx.is_main))
        reduce = parse_spatial(cfg.spatial)
        with torch.no_grad(), capture_grams(model, names, reduce=reduce, kernel=cfg.kernel,
                                            threshold=cfg.threshold) as take:
            for repeat in range(cfg.repeats):
                order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed + repeat))
                subset = Subset(dataset, order[:count].tolist())
                loader = DataLoader(subset, batch_sampler=mine, num_workers=cfg.num_workers,
                                    pin_memory=ctx.device.type == "cuda")
                for images, _ in loader:
                    images = images.to(ctx.device, non_blocking=True)
                    grams = []
                    for size in cfg.scales:
                        model(rescale(images, size, reference, cfg.resize))
                        grams.append(take())
                    acc.update_grams(torch.cat(grams))
                    bar.update()
                acc.all_reduce()
                runs.append(acc.compute(reshape=True).cpu().numpy())
                acc.reset()
        bar.close()
        total_params = sum(p.numel() for p in model.parameters())
        meta = {
            "data": dataset.description,
            "images": count,
            "batches": [len(b) for b in batches],
            "estimator": cka_id(cfg.kernel, cfg.unbiased, cfg.threshold),
            "world_size": ctx.world_size,
            "device": str(ctx.device),
            "seconds": round(time.perf_counter() - started, 3),
            "total_params": total_params,
            "feature_info": [{"module": e["module"], "reduction": e["reduction"], "num_chs": e["num_chs"]}
                             for e in getattr(model, "feature_info", []) or [] if isinstance(e, dict)],
            "notes": notes,
            "versions": _versions(),
        }
    rows = [{"name": i.name, "kind": i.kind, "shape": list(i.shape), "reduction": i.reduction, "tap": i.tap,
             "cum_params": i.cum_params} for i in layers]
    return Report(cfg.model, weights, list(cfg.scales), reference, rows, np.stack(runs),
                  dataclasses.asdict(cfg), meta)
