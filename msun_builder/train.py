"""The training loop, given a built model: MSUN or a baseline with the same recipe (vanilla, MST, MSDNet).

One recipe for every method, so comparisons are fair (MSUN paper, arXiv 2403.18294; the recipe follows the
authors' training script): SGD (momentum 0.9) or AdamW, linear warm-up then cosine decay to 1% of the peak rate,
gradient-norm clipping, seeds, AMP on CUDA, DistributedDataParallel under ``torchrun`` (gloo on the CPU). Each
batch is one augmented crop at the reference scale; every smaller scale is that crop resized (bilinear).

What differs between methods (the step module, the loss, how the model is saved) comes from the method's registry
entry (:mod:`msun_builder.methods`); this module never names a method. :func:`train` starts a run from a model the
caller built (the command line builds it once, choosing the MSUN split on the way); :func:`resume` rebuilds the
same architecture from the run record and continues from the last checkpoint. Both go through one loop, and a
resumed run ends where an uninterrupted one would: each epoch re-seeds every RNG from (seed, epoch) and its data
order comes from a generator seeded the same way.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset
from tqdm.auto import tqdm

from cka_scale.data import open_dataset
from msun_builder.config import TrainConfig
from msun_builder.methods import Built, check_method
from msun_builder.runs import RunRecord, data_split, default_holdout, load_checkpoint, save_checkpoint, test_subset
from msun_builder.transforms import test_transform, train_transform
from scale_common.device import resolve_device
from scale_common.distributed import DistContext, distributed
from scale_common.errors import ToolkitError
from scale_common.files import atomic_write_bytes, atomic_write_json
from scale_common.seeds import rng_state, seed_everything, set_rng_state

__all__ = ["VALIDATION_CORRECT", "build_model", "fit_validation_routing", "resume", "routing_sizes", "train",
           "validation_correctness"]


def build_model(cfg: TrainConfig, num_classes: int, *, base: Any = None, resumed: bool = False) -> Built:
    """Build the model ``cfg`` trains, seeded so a random initialisation follows ``cfg.seed``.

    Args:
        cfg: The recipe (its method, model, scales and, for MSUN, ``split_reduction``).
        num_classes: Classifier size.
        base: A loaded timm model to reuse (:class:`cka_scale.models.LoadedModel`), e.g. the one the split was
            chosen on; loaded from ``cfg`` when None.
        resumed: Build the architecture only (no starting weights): a checkpoint will supply them.

    Returns:
        The model, its preprocessing config and the facts for the run record.
    """
    cfg = cfg.resolved()
    method = check_method(cfg)
    if base is None:
        seed_everything(cfg.seed, -1)
    return method.build(cfg, num_classes, base, resumed)


def _optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


def _schedule(cfg: TrainConfig, steps_per_epoch: int) -> Any:
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = min(total, round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warm:
            return 0.01 + (1 - 0.01) * step / max(1, warm)
        progress = (step - warm) / max(1, total - warm)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
def _test_accuracy(step: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Accuracy at each scale of the step's evaluation view (paper protocol: shrink, re-enlarge, route)."""
    step.eval()
    correct: dict[str, int] = {}
    seen = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        for key, logits in step.evaluate(images).items():
            correct[key] = correct.get(key, 0) + int((logits.argmax(-1) == labels).sum())
        seen += len(labels)
    step.train()
    return {f"test_acc_{k}": v / max(1, seen) for k, v in correct.items()}


def _write_metrics(out: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_json(out / "metrics.json", rows)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / "metrics.csv", buffer.getvalue().encode())


def _tensorboard(out: Path, ctx: DistContext) -> Any:
    if not ctx.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard is optional
        return None
    return SummaryWriter(str(out / "tb"))


def train(cfg: TrainConfig, out: str | Path, built: Built, *, progress: bool = True,
          split: dict[str, Any] | None = None, build: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train a freshly built model and write the run folder ``out`` (see :mod:`msun_builder.runs`).

    Args:
        cfg: The recipe.
        out: Run folder.
        built: The model from :func:`build_model` (built once, by the caller).
        progress: Progress bars (rank 0).
        split: How the MSUN split was chosen (module, reduction, reason, candidates), for the run record.
        build: The MSUN cost table, for the run record.

    Returns:
        The final metrics row.

    Raises:
        ToolkitError: Bad settings or unusable data.
    """
    cfg = cfg.resolved()
    check_method(cfg)
    if split is not None:
        split = {**split, **(built.facts.get("split") or {})}
    return _fit(cfg, Path(out), built, None, progress, {"split": split or built.facts.get("split"), "build": build})


def resume(out: str | Path, *, device: str | None = None, num_workers: int | None = None,
           progress: bool = True) -> dict[str, Any]:
    """Continue the run in ``out`` from its last checkpoint: the record rebuilds the model, the loop goes on.

    Args:
        out: The run folder.
        device: Override the recorded ``--device`` (the machine may differ).
        num_workers: Override the recorded DataLoader workers.
        progress: Progress bars (rank 0).

    Returns:
        The final metrics row (at once, when the run had already finished).

    Raises:
        ToolkitError: No run there, or its record or checkpoint is damaged (the message says what to do).
    """
    out = Path(out)
    record = RunRecord.load(out)
    state = load_checkpoint(out)
    cfg = dataclasses.replace(record.config, **{k: v for k, v in (("device", device), ("num_workers", num_workers))
                                                if v is not None})
    if int(state["epoch"]) >= cfg.epochs and (out / "model").is_dir():
        if record.validation is None:  # stopped after the last epoch, before the routing was fitted
            fit_validation_routing(out, device=resolve_device(cfg.device), progress=progress)
        return state["metrics"][-1] if state["metrics"] else {}
    built = build_model(cfg, len(record.classes), resumed=True)
    return _fit(cfg, out, built, state, progress, {"split": record.split, "build": record.build})


def _fit(cfg: TrainConfig, out: Path, built: Built, state: dict[str, Any] | None, progress: bool,
         extra: dict[str, Any]) -> dict[str, Any]:
    method = check_method(cfg)
    with distributed(cfg.device) as ctx:
        if cfg.batch_size % ctx.world_size:
            raise ToolkitError(f"--batch-size {cfg.batch_size} must divide among {ctx.world_size} processes")
        train_set = open_dataset(cfg.data, "train")
        classes = train_set.classes
        model, data_config = built.model.to(ctx.device), built.data_config
        indices, holdout = _run_split(cfg, train_set.labels, len(classes))
        description = train_set.description
        train_set = Subset(train_set.with_transform(train_transform(cfg.data, cfg.reference, data_config)), indices)
        test_set = open_dataset(cfg.data, "test", transform=test_transform(cfg.data, cfg.reference, data_config))
        test_set = Subset(test_set, test_subset(test_set.labels, cfg.test_images))
        per_rank = cfg.batch_size // ctx.world_size
        if len(train_set) < cfg.batch_size:
            raise ToolkitError(f"{len(train_set)} training images are fewer than --batch-size {cfg.batch_size}")
        step = method.step(model, cfg)
        criterion = method.criterion(cfg)
        wrapped: nn.Module = DistributedDataParallel(step) if ctx.active else step
        optimizer = _optimizer(cfg, step)
        steps_per_epoch = len(train_set) // cfg.batch_size
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, steps_per_epoch))
        use_amp = (ctx.device.type == "cuda" and cfg.amp != "off") or cfg.amp == "on"
        amp_dtype = torch.bfloat16 if ctx.device.type != "cuda" or torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler(ctx.device.type, enabled=use_amp and amp_dtype == torch.float16)
        history: list[dict[str, Any]] = []
        start_epoch = 0
        if state is not None:
            try:
                step.model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
            except (RuntimeError, ValueError, KeyError) as err:
                detail = str(err).splitlines()[0][:160]
                raise ToolkitError(f"{str(out / 'checkpoint.pt')!r} does not fit the model its run.json describes "
                                   f"({detail}): start the run again without --resume") from None
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
            history, start_epoch = list(state["metrics"]), int(state["epoch"])
        elif ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            facts = {k: v for k, v in built.facts.items() if k != "split"}
            RunRecord(method=cfg.method, config=cfg, classes=list(classes), data=description,
                      data_config=dict(data_config), train_images=len(indices), holdout_images=len(holdout),
                      world_size=ctx.world_size, **facts, **extra).save(out)
        test_loader = DataLoader(test_set, batch_size=max(per_rank, 64), num_workers=cfg.num_workers)
        writer = _tensorboard(out, ctx)
        row: dict[str, Any] = history[-1] if history else {}
        for epoch in range(start_epoch, cfg.epochs):
            seed_everything(cfg.seed, epoch)
            if ctx.active:
                sampler: Any = DistributedSampler(train_set, shuffle=True, seed=cfg.seed, drop_last=True)
                sampler.set_epoch(epoch)
            else:
                sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
            loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler, drop_last=True,
                                num_workers=cfg.num_workers, pin_memory=ctx.device.type == "cuda")
            sums: dict[str, float] = {}
            started, count = time.perf_counter(), 0
            bar = tqdm(loader, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False,
                       disable=not (progress and ctx.is_main), dynamic_ncols=True)
            step.train()
            for images, labels in bar:
                images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
                with torch.autocast(ctx.device.type, dtype=amp_dtype, enabled=use_amp):
                    outputs = wrapped(images)
                    loss, terms = criterion(outputs, labels)
                if not torch.isfinite(loss):
                    raise ToolkitError(f"the loss became {float(loss)} at epoch {epoch + 1}: lower --lr (now "
                                       f"{cfg.lr}) or keep --clip-grad on")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(step.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                count += 1
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                for key, value in outputs[0].items():
                    acc = float((value.argmax(-1) == labels).float().mean())
                    sums[f"train_acc_{key}"] = sums.get(f"train_acc_{key}", 0.0) + acc
                bar.set_postfix(loss=f"{sums['loss'] / count:.3f}")
            bar.close()
            row = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], **{k: v / max(1, count) for k, v in
                                                                              sums.items()},
                   "seconds": round(time.perf_counter() - started, 2), "images": count * cfg.batch_size}
            if ctx.is_main:
                row.update(_test_accuracy(step, test_loader, ctx.device))
                history.append(row)
                save_checkpoint({"epoch": epoch + 1, "model": step.model.state_dict(),
                                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                 "scaler": scaler.state_dict(), "rng": rng_state(), "metrics": history}, out)
                _write_metrics(out, history)
                if writer is not None:
                    for key, value in row.items():
                        if isinstance(value, int | float):
                            writer.add_scalar(key, value, epoch + 1)
                if progress:
                    shown = {k: round(v, 4) for k, v in row.items() if k.startswith(("loss", "test_acc"))}
                    tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: {shown}")
            if ctx.active:
                torch.distributed.barrier()
        if ctx.is_main:
            method.save(step.model, out / "model")
            fit_validation_routing(out, device=ctx.device, progress=progress)
        if writer is not None:
            writer.close()
    return row


def _run_split(cfg: TrainConfig, labels: list[int], num_classes: int) -> tuple[list[int], list[int]]:
    """The run's training and validation indices (stratified, seeded; see :func:`msun_builder.runs.data_split`)."""
    holdout = cfg.holdout_images
    if holdout is None:
        holdout = default_holdout(len(labels), cfg.train_images, num_classes)
    return data_split(labels, holdout=holdout, train=cfg.train_images, seed=cfg.seed)


def routing_sizes(scales: tuple[int, ...] | list[int], sizes: tuple[int, ...] | None = None) -> list[int]:
    """The input sizes a routing table is fitted at.

    ``sizes`` when given, else every reference/8 px up to the reference plus the scales themselves (for 32/128/224:
    28, 32, 56, 84, 112, 128, 140, ..., 224).

    Args:
        scales: The MSUN's scales.
        sizes: Explicit sizes (``TrainConfig.routing_sizes``).

    Returns:
        Sorted distinct sizes.
    """
    if sizes:
        return sorted({int(v) for v in sizes})
    reference = max(scales)
    step = max(1, reference // 8)
    return sorted(set(range(step, reference + 1, step)) | {int(v) for v in scales})


#: Per-image validation correctness beside ``run.json`` (``numpy.savez``): ``correct`` (branches, sizes, images) 0/1,
#: ``branches``, ``sizes`` and ``indices`` (the validation images' indices in the training split, sorted).
VALIDATION_CORRECT = "validation_correct.npz"


@torch.no_grad()
def fit_validation_routing(out: str | Path, *, device: torch.device | str = "cpu", batch_size: int = 128,
                           progress: bool = True) -> dict[str, Any] | None:
    """Score each branch of a trained routed model (MSUN) on the run's validation split; store the fitted routing.

    Every validation image (preprocessed at the reference size, like a test image) is shrunk to each size of
    :func:`routing_sizes` and re-enlarged (the paper's protocol), and every branch classifies it. The table that
    sends each size to its most accurate branch (:func:`msun_builder._routing.fit_routing`) is written to the run
    record's ``validation`` field beside the accuracies and the default rule; ``msun-eval`` reports the test
    accuracy of both tables. The per-image correctness goes to ``validation_correct.npz`` (:data:`VALIDATION_CORRECT`,
    read by :func:`validation_correctness`), so that two runs of one seed can be compared on validation with a
    paired interval. ``run.json`` is rewritten only when its ``validation`` record changes (refitting an older run
    to add the per-image file leaves it as it was). Runs of models without branches, or without a validation split,
    are left as they are.

    Args:
        out: A finished run folder (``model/`` saved).
        device: Where to run the model.
        batch_size: Validation batch size.
        progress: A progress bar.

    Returns:
        The ``validation`` dict written, or None when there is nothing to fit.
    """
    import numpy as np

    from msun_builder._routing import default_routing, fit_routing
    from msun_builder.methods import get_method
    from scale_common.files import atomic_path
    from scale_common.resize import down_up

    out = Path(out)
    record = RunRecord.load(out)
    if not record.holdout_images:
        return None
    model = get_method(record.method).load(out / "model")
    if not hasattr(model, "route"):
        return None
    device = torch.device(device)
    model = model.to(device).eval()
    cfg = record.config
    train_set = open_dataset(cfg.data, "train", transform=test_transform(cfg.data, record.reference,
                                                                        record.data_config))
    _, holdout = data_split(train_set.labels, holdout=record.holdout_images, train=cfg.train_images, seed=cfg.seed)
    sizes = routing_sizes(cfg.scales, cfg.routing_sizes)
    scales = list(model.scales)
    correct = torch.zeros(len(scales), len(sizes), len(holdout), dtype=torch.uint8)
    loader = DataLoader(Subset(train_set, holdout), batch_size=batch_size, num_workers=cfg.num_workers)
    start = 0
    for images, labels in tqdm(loader, desc="validation routing", unit="batch", leave=False, disable=not progress):
        images, labels = images.to(device), labels.to(device)
        stop = start + len(labels)
        for j, size in enumerate(sizes):
            shrunk = images if size == record.reference else down_up(images, size)
            for i, branch in enumerate(scales):
                logits = model.forward_branch(shrunk, branch)[0]
                correct[i, j, start:stop] = (logits.argmax(-1) == labels).cpu()
        start = stop
    totals = correct.sum(dim=-1).tolist()
    accuracy = {(b, s): totals[i][j] / len(holdout) for i, b in enumerate(scales) for j, s in enumerate(sizes)}
    rule = default_routing(scales)
    fitted = fit_routing(accuracy, sizes, scales, rule=rule)
    validation = {"images": len(holdout), "sizes": sizes,
                  "accuracy": {str(b): {str(s): accuracy[(b, s)] for s in sizes} for b in scales},
                  "rule": [list(pair) for pair in rule], "routing": [list(pair) for pair in fitted]}
    with atomic_path(out / VALIDATION_CORRECT) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, correct=correct.numpy(), branches=np.array(scales), sizes=np.array(sizes),
                            indices=np.array(holdout))
    if record.validation != validation:
        dataclasses.replace(record, validation=validation).save(out)
    return validation


def validation_correctness(out: str | Path) -> dict[str, Any]:
    """The per-image validation correctness :func:`fit_validation_routing` stored in a run folder.

    Args:
        out: A run folder.

    Returns:
        ``{"correct": uint8 array (branches, sizes, images), "branches": [...], "sizes": [...], "indices": [...]}``.

    Raises:
        ToolkitError: The file is missing (a run trained before it was stored, or with no validation split) or
            unreadable; the message names the fix.
    """
    import numpy as np

    path = Path(out) / VALIDATION_CORRECT
    try:
        with np.load(path) as saved:
            return {"correct": saved["correct"], "branches": saved["branches"].tolist(),
                    "sizes": saved["sizes"].tolist(), "indices": saved["indices"].tolist()}
    except FileNotFoundError:
        raise ToolkitError(f"{path} is missing: refit the validation scores with "
                           "msun_builder.train.fit_validation_routing(run_folder) (a run with a validation split "
                           "and branches)") from None
    except (OSError, ValueError, KeyError) as err:
        raise ToolkitError(f"{path} is unreadable ({err}): delete it and refit with "
                           "msun_builder.train.fit_validation_routing(run_folder)") from None
