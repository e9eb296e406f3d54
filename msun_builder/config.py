"""Settings of a training run: one frozen dataclass, its defaults written once, torch-free so ``--help`` is fast.

The command line's flags default to None and only the ones given override these defaults
(:func:`scale_common.cli.config_from_args`); the resolved config is stored in the run record (``run.json``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from scale_common.errors import ToolkitError

#: The rules ``msun_builder.autosplit.auto_split`` can choose a split by, and the default one (``--split-rule``):
#: "deep" since the split study's re-check on Lite1 (bench/RESULTS.md, "The split rule re-checked").
SPLIT_RULES = ("cost", "deep")
DEFAULT_SPLIT_RULE = "deep"

__all__ = ["SI_KINDS", "SI_PAIRS", "EvalConfig", "TrainConfig", "parse_sizes"]

SI_KINDS = ("mse", "cosine", "cka")
SI_PAIRS = ("all", "reference")


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
        split_module: MSUN cut after this cuttable tap (a module name; wins over ``split_reduction``, which then
            only records its stride). ``--auto-split`` sets it to the tap it chose, so the build cuts exactly there
            even when two cuttable taps share a stride.
        preset: ``paper``: build the MSUN authors' own design for the model (:mod:`msun_builder.presets`: their
            split point and replaced stems) instead of cutting at ``split_reduction``; None: the default surgery.
        stem_init: With ``preset="paper"``: ``crop`` (centre of the pretrained stem kernel) or ``random``.
        si_weight: lambda of the scale-invariant constraint.
        si_tau: Truncation of each constraint term.
        si_pairs: ``all`` or ``reference``.
        si_detach_reference: Stop gradients into the reference branch in the constraint.
        si_kind: ``mse``, ``cosine`` or ``cka``.
        label_smoothing: Cross-entropy label smoothing.
        amp: ``auto`` (on with CUDA), ``on`` or ``off``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        num_workers: DataLoader worker processes.
        train_images: Use this many training images (a seeded, class-stratified subset); all when None.
        test_images: Images of the test split evaluated after every epoch (a class-stratified subset, the same
            for every run); all when None. Only for watching a run: no decision reads them.
        holdout_images: Training images held out as a validation split (seeded, class-stratified), on which every
            decision is made (MSUN routing, MSDNet thresholds); None: :func:`msun_builder.runs.default_holdout`,
            0: none.
        routing_sizes: Input sizes at which each MSUN branch is scored on the validation split after training to
            fit its routing table; None: every reference/8 px up to the reference, plus the scales.
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
    split_module: str | None = None
    preset: str | None = None
    stem_init: str = "crop"
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
    routing_sizes: tuple[int, ...] | None = None
    msdnet_preset: str = "small"

    def resolved(self) -> TrainConfig:
        """Validate the settings that need no model (sorted unique scales, optimizer, loss, ranges).

        The method name and what it needs (e.g. two scales) are checked by its registry entry
        (:func:`msun_builder.methods.get_method`).

        Raises:
            ToolkitError: A setting is out of range; the message names the flag.
        """
        scales = tuple(sorted({int(s) for s in self.scales}))
        if any(s < 8 for s in scales):
            raise ToolkitError(f"--scales must be integers >= 8, got {list(self.scales)}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ToolkitError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.si_kind not in SI_KINDS:
            raise ToolkitError(f"--si-kind must be one of {', '.join(SI_KINDS)}, got {self.si_kind!r}")
        if self.si_pairs not in SI_PAIRS:
            raise ToolkitError(f"--si-pairs must be one of {', '.join(SI_PAIRS)}, got {self.si_pairs!r}")
        if self.preset not in (None, "paper"):
            raise ToolkitError(f"--preset must be paper (or left out), got {self.preset!r}")
        if self.stem_init not in ("crop", "random"):
            raise ToolkitError(f"--stem-init must be crop or random, got {self.stem_init!r}")
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

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TrainConfig:
        """Rebuild a config stored by :meth:`to_json` (lists become tuples).

        Raises:
            ToolkitError: A key this version does not know (a record from another version).
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ToolkitError(f"unknown training settings {', '.join(unknown)} (written by another version)")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in obj.items()})

    def to_json(self) -> dict[str, Any]:
        """The config as a JSON-able dict."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def parse_sizes(text: str) -> list[int]:
    """``32:224:16`` (start:stop:step, inclusive) or ``32,64,224`` -> sorted sizes.

    Raises:
        ToolkitError: Malformed, or a size below 8.
    """
    try:
        if ":" in text:
            start, stop, step = (int(v) for v in text.split(":"))
            sizes = list(range(start, stop + 1, step))
        else:
            sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ToolkitError(f"--sizes {text!r}: use start:stop:step (e.g. 32:224:16) or a list (32,64,224)") from None
    if not sizes or min(sizes) < 8:
        raise ToolkitError(f"--sizes {text!r} must give sizes of at least 8 pixels")
    return sorted(set(sizes))


@dataclass(frozen=True)
class EvalConfig:
    """Settings of ``msun-eval``: which test sizes, how they are fed, how many images.

    Attributes:
        data: ``--data`` source whose test split is used (the one the runs trained on).
        sizes: Test sizes, ``start:stop:step`` (inclusive) or a comma list.
        native: Feed each size as is instead of shrinking and re-enlarging to the reference.
        images: Evaluate a class-stratified subset of this many test images, the same for every run (all when None).
        lossy_below: Sizes below this are averaged separately, the lossy ones (None: the native image size of
            ``data`` when it has one, 28 for Fashion-MNIST).
        batch_size: Test batch size.
        out: Output folder.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """

    data: str = "fashion-mnist"
    sizes: str = "32:224:16"
    native: bool = False
    images: int | None = None
    lossy_below: int | None = None
    batch_size: int = 128
    out: str = "runs/eval"
    device: str = "auto"

    def __post_init__(self) -> None:
        """Refuse counts that cannot be meant (the message names the flag)."""
        for flag, value in (("--images", self.images), ("--lossy-below", self.lossy_below),
                            ("--batch-size", self.batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ToolkitError(f"{flag} must be a positive integer, got {value!r}")
