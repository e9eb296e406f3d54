"""Fine-tune an MSUN, or a baseline with the same recipe: vanilla, multi-scale training (MST), or MSDNet.

One recipe for every method, so comparisons are fair (MSUN paper, arXiv 2403.18294, section 2 of the spec):
SGD (momentum 0.9) or AdamW, linear warm-up then cosine decay to 1% of the peak rate, gradient-norm clipping,
seeds, AMP on CUDA, DistributedDataParallel under ``torchrun`` (gloo on the CPU). Each batch is one augmented crop
at the reference scale; every smaller scale is that crop resized (bilinear).

* ``msun``: every subnet on its own resized copy, the unified net after each; loss = sum of the branches'
  cross-entropies + the scale-invariant constraint (:class:`~msun_builder.losses.ScaleInvariantLoss`).
* ``vanilla``: the plain model at the reference scale only.
* ``mst``: the plain model on the crop and on the crop shrunk to each smaller scale and re-enlarged; loss = sum.
* ``msdnet``: an MSDNet preset at the reference scale; loss = sum of the exits' cross-entropies.

A checkpoint holding everything needed to continue (model, optimizer, scheduler, scaler, RNG states, epoch,
metrics) is written atomically after every epoch; :func:`train` with ``resume=True`` continues a killed run and
ends where an uninterrupted run would: each epoch re-seeds every RNG from (seed, epoch) and its data order comes
from a generator seeded the same way.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset
from tqdm.auto import tqdm

from cka_scale.data import open_dataset
from msun_builder.losses import SI_KINDS, ScaleInvariantLoss
from msun_builder.runs import checkpoint_state, load_run, save_run_model, write_run_json
from msun_builder.steps import METHODS, build_model, make_step
from msun_builder.transforms import test_transform, train_transform
from scale_common.distributed import DistContext, distributed
from scale_common.errors import ToolkitError
from scale_common.files import atomic_torch_save, atomic_write_bytes, atomic_write_json

__all__ = ["TrainConfig", "holdout_split", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; stored in ``run.json`` so a run can be resumed and evaluated.

    Attributes:
        model: timm model name (for ``msdnet``: ignored; the preset decides).
        method: ``msun``, ``vanilla``, ``mst`` or ``msdnet``.
        scales: Input sizes; the largest is the reference (the only one for vanilla and msdnet).
        data: ``--data`` source to train on (its train split) and test on (its test split).
        epochs: Passes over the training images.
        batch_size: Images per step, over all processes.
        optimizer: ``adamw`` (default: fine-tuning pretrained weights on short budgets) or ``sgd`` (the paper's
            from-scratch recipe: momentum 0.9, lr 0.1 x batch/256, weight decay 2e-5).
        lr: Peak learning rate.
        weight_decay: Applied to weights of rank >= 2 (not to norms and biases).
        momentum: SGD momentum.
        warmup_epochs: Linear warm-up from 1% of ``lr`` (may be fractional).
        min_lr_ratio: Final learning rate as a fraction of ``lr`` (cosine decay).
        clip_grad: Gradient-norm clipping (None: off).
        seed: Seeds the data order, augmentation and initialisation.
        weights: ``auto``, ``none`` or a state-dict path (the starting weights).
        split_reduction: MSUN cut, a ``feature_info`` stride; see :func:`msun_builder.create_msun`.
        si_weight: lambda of the scale-invariant constraint.
        si_tau: Truncation of each constraint term.
        si_pairs: ``all`` or ``reference``.
        si_detach_reference: Stop gradients into the reference branch in the constraint.
        si_kind: ``mse``, ``cosine`` or ``cka``.
        label_smoothing: Cross-entropy label smoothing.
        amp: ``auto`` (on with CUDA), ``on`` or ``off``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        num_workers: DataLoader worker processes.
        train_images: Use this many training images (a fixed random subset); all when None.
        test_images: Images of the test split evaluated after every epoch; all when None.
        holdout_images: Training images held out as a validation split (MSDNet threshold fitting).
        msdnet_preset: MSDNet preset (``small``, ``cifar-anytime``, ...).
    """

    model: str = "tf_efficientnet_lite0"
    method: str = "msun"
    scales: tuple[int, ...] = (32, 128, 224)
    data: str = "fashion-mnist"
    epochs: int = 1
    batch_size: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    momentum: float = 0.9
    warmup_epochs: float = 0.5
    min_lr_ratio: float = 0.01
    clip_grad: float | None = 1.0
    seed: int = 0
    weights: str = "auto"
    split_reduction: int | None = None
    si_weight: float = 1.0
    si_tau: float = 0.01
    si_pairs: str = "all"
    si_detach_reference: bool = False
    si_kind: str = "mse"
    label_smoothing: float = 0.0
    amp: str = "auto"
    device: str = "auto"
    num_workers: int = 0
    train_images: int | None = None
    test_images: int | None = 1000
    holdout_images: int | None = None
    msdnet_preset: str = "small"

    def resolved(self) -> TrainConfig:
        """Validate the settings (sorted unique scales, known method/optimizer/loss).

        Raises:
            ToolkitError: A setting is out of range; the message names the flag.
        """
        if self.method not in METHODS:
            raise ToolkitError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        scales = tuple(sorted({int(s) for s in self.scales}))
        if any(s < 8 for s in scales):
            raise ToolkitError(f"--scales must be integers >= 8, got {list(self.scales)}")
        if self.method in ("msun", "mst") and len(scales) < 2:
            raise ToolkitError(f"--method {self.method} needs at least two --scales")
        if self.optimizer not in ("sgd", "adamw"):
            raise ToolkitError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.si_kind not in SI_KINDS:
            raise ToolkitError(f"--si-kind must be one of {', '.join(SI_KINDS)}")
        if self.amp not in ("auto", "on", "off"):
            raise ToolkitError("--amp must be auto, on or off")
        for flag, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size)):
            if value < 1:
                raise ToolkitError(f"{flag} must be at least 1, got {value}")
        if self.lr <= 0:
            raise ToolkitError(f"--lr must be positive, got {self.lr}")
        return dataclasses.replace(self, scales=scales)

    @property
    def reference(self) -> int:
        """The largest scale."""
        return max(self.scales)


def holdout_split(count: int, holdout: int, seed: int) -> tuple[list[int], list[int]]:
    """Split ``range(count)`` into (train, held-out) index lists, fixed by ``seed``."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(10_007 + seed)).tolist()
    return sorted(order[holdout:]), sorted(order[:holdout])


def _seed_everything(seed: int, epoch: int) -> None:
    value = seed * 1_000_003 + epoch
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def _rng_state() -> dict[str, Any]:
    keys, pos, has_gauss, cached = np.random.get_state()[1:]
    state = {"python": json.dumps(random.getstate()), "numpy": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": int(pos), "numpy_gauss": [int(has_gauss), float(cached)], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_gauss"][0], state["numpy_gauss"][1]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False, progress: bool = True,
          run_info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``cfg.method`` and write the run folder ``out`` (see :mod:`msun_builder.runs`).

    Args:
        cfg: The recipe.
        out: Run folder.
        resume: Continue from ``out/checkpoint.pt`` (the config is read from ``out/run.json``).
        progress: Progress bars (rank 0).
        run_info: Extra facts for ``run.json`` (e.g. the auto-split choice).

    Returns:
        The final metrics row.

    Raises:
        ToolkitError: Bad settings, nothing to resume, or unusable data/model.
    """
    out = Path(out)
    state: dict[str, Any] | None = None
    if resume:
        info = load_run(out)
        cfg = TrainConfig(**{**info["config"], "scales": tuple(info["config"]["scales"]),
                             "device": cfg.device, "num_workers": cfg.num_workers})
        if not (out / "checkpoint.pt").is_file():
            raise ToolkitError(f"{str(out)!r} has no checkpoint.pt yet: start the run again without --resume")
        state = checkpoint_state(out / "checkpoint.pt")
        if state["epoch"] >= cfg.epochs:
            return state["metrics"][-1] if state["metrics"] else {}
        run_info = {k: v for k, v in info.items() if k not in ("format", "config")}
    cfg = cfg.resolved()
    with distributed(cfg.device) as ctx:
        if cfg.batch_size % ctx.world_size:
            raise ToolkitError(f"--batch-size {cfg.batch_size} must divide among {ctx.world_size} processes")
        train_set = open_dataset(cfg.data, "train")
        classes = train_set.classes
        _seed_everything(cfg.seed, -1)
        model, data_config, built = build_model(cfg, len(classes), resumed=state is not None, run_info=run_info)
        model.to(ctx.device)
        indices = list(range(len(train_set)))
        holdout: list[int] = []
        if cfg.holdout_images:
            indices, holdout = holdout_split(len(train_set), cfg.holdout_images, cfg.seed)
        if cfg.train_images is not None and cfg.train_images < len(indices):
            pick = torch.randperm(len(indices), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            indices = sorted(indices[i] for i in pick[: cfg.train_images])
        train_set = Subset(train_set.with_transform(train_transform(cfg.data, cfg.reference, data_config)), indices)
        test_set = open_dataset(cfg.data, "test", transform=test_transform(cfg.data, cfg.reference, data_config))
        if cfg.test_images is not None and cfg.test_images < len(test_set):
            test_set = Subset(test_set, list(range(cfg.test_images)))
        per_rank = cfg.batch_size // ctx.world_size
        if len(train_set) < cfg.batch_size:
            raise ToolkitError(f"{len(train_set)} training images are fewer than --batch-size {cfg.batch_size}")
        step = make_step(cfg, model)
        si_loss = ScaleInvariantLoss(cfg.si_weight, cfg.si_tau, cfg.si_pairs, cfg.si_detach_reference, cfg.si_kind)
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
            step.model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"])
            history, start_epoch = list(state["metrics"]), int(state["epoch"])
        elif ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            write_run_json(out, {"method": cfg.method, "config": dataclasses.asdict(cfg), "classes": classes,
                                 "data": train_set.dataset.description, "train_images": len(indices),
                                 "holdout_images": len(holdout), "world_size": ctx.world_size, **built,
                                 **(run_info or {}),
                                 "data_config": {k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in data_config.items()}})
        test_loader = DataLoader(test_set, batch_size=max(per_rank, 64), num_workers=cfg.num_workers)
        writer = _tensorboard(out, ctx)
        row: dict[str, Any] = history[-1] if history else {}
        for epoch in range(start_epoch, cfg.epochs):
            _seed_everything(cfg.seed, epoch)
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
                    logits, features = wrapped(images)
                    terms = {f"ce_{k}": F.cross_entropy(v.float(), labels, label_smoothing=cfg.label_smoothing)
                             for k, v in logits.items()}
                    loss = sum(terms.values())
                    if features is not None:
                        si, si_logs = si_loss([f.float() for f in features], list(cfg.scales))
                        loss = loss + si
                        terms.update({k: torch.tensor(v) for k, v in si_logs.items()})
                        terms["si_total"] = si.detach()
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
                for key, value in logits.items():
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
                atomic_torch_save({"epoch": epoch + 1, "model": step.model.state_dict(),
                                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                   "scaler": scaler.state_dict(), "rng": _rng_state(), "metrics": history},
                                  out / "checkpoint.pt")
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
            save_run_model(step.model, cfg.method, out / "model", architecture=built.get("architecture"))
        if writer is not None:
            writer.close()
    return row
