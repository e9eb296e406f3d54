"""Run folders: the typed run record (``run.json``) and the checkpoint, each written and read in one place.

Layout of a run written by ``msun-build ... --epochs E --out RUN``::

    RUN/run.json             the RunRecord: method, config, classes, data, weights provenance, split, counts
    RUN/checkpoint.pt        the last finished epoch: model, optimizer, scheduler, scaler, RNG states (--resume)
    RUN/checkpoint.prev.pt   the epoch before it, kept so a damaged checkpoint costs one epoch, not the run
    RUN/metrics.csv|json     one row per epoch
    RUN/model/               the final model, saved by its method's registry entry (:mod:`msun_builder.methods`)

Reading validates: a missing, truncated, damaged or foreign-version file is one :class:`ToolkitError` naming the
file and the fix (see :mod:`scale_common.files`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from msun_builder.config import TrainConfig
from scale_common.errors import ToolkitError
from scale_common.files import atomic_torch_save, atomic_write_json, read_json, read_torch

__all__ = ["CHECKPOINT_KEYS", "MAX_HOLDOUT", "RUN_FORMAT", "TEST_SUBSET_SEED", "RunRecord", "data_split",
           "default_holdout", "load_checkpoint", "save_checkpoint", "test_subset"]

#: Version 2: subsets are class-stratified, a validation split is carved by default, ``validation`` holds the
#: routing fitted on it. A version-1 record's subsets cannot be rebuilt, so it is refused (train again).
RUN_FORMAT = "msun-run/2"
#: The largest validation split carved by default (images).
MAX_HOLDOUT = 2000
#: Every test subset (``--test-images``, ``msun-eval --images``) is drawn with this seed, whatever the training seed,
#: so runs trained with different seeds and methods are scored on the same images (a paired comparison).
TEST_SUBSET_SEED = 0
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scheduler", "scaler", "rng", "metrics")
_START_AGAIN = "start the run again without --resume (or with another --out)"


@dataclass
class RunRecord:
    """What was trained and how: written once when a run starts, read by resume and by evaluation.

    Attributes:
        method: The registry name of the method.
        config: The resolved training config.
        classes: Class names, in label order.
        data: Description of the training data.
        data_config: timm preprocessing config (mean, std, interpolation, crop) the model was trained with.
        train_images: Training images used.
        holdout_images: Training images held out as a validation split (:func:`data_split` rebuilds it).
        world_size: Processes that trained it.
        architecture: timm model name or MSDNet preset.
        weights: Where the starting weights came from.
        params: Parameters of the trained model.
        vanilla_params: Parameters of the plain model an MSUN was built from.
        flops_reference: FLOPs per image of a plain model at the reference size.
        exit_flops: Cumulative FLOPs per image of each MSDNet exit.
        split: The MSUN split: module, reduction and, when chosen automatically, the reason and candidates.
        build: The MSUN cost table printed when it was built (parameters, FLOPs per branch).
        validation: After training, what was measured on the validation split. For a routed model (MSUN):
            ``images``, ``sizes``, ``accuracy`` (``{"<branch scale>": {"<size>": accuracy}}``), ``rule`` (the
            default routing table) and ``routing`` (the table fitted on it: the best branch per size), tables as
            ``[[max_size_inclusive, scale], ...]``. None before training ends or without a validation split.
    """

    method: str
    config: TrainConfig
    classes: list[str]
    data: str
    data_config: dict[str, Any]
    train_images: int
    holdout_images: int = 0
    world_size: int = 1
    architecture: str = ""
    weights: str = ""
    params: int = 0
    vanilla_params: int | None = None
    flops_reference: int | None = None
    exit_flops: list[int] | None = None
    split: dict[str, Any] | None = None
    build: dict[str, Any] | None = field(default=None)
    validation: dict[str, Any] | None = None

    @property
    def reference(self) -> int:
        """The largest training scale."""
        return max(self.config.scales)

    def to_json(self) -> dict[str, Any]:
        """The record as written to ``run.json``."""
        out: dict[str, Any] = {"format": RUN_FORMAT}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "config":
                value = value.to_json()
            elif f.name == "data_config":
                value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any], path: str | os.PathLike[str] = "run.json") -> RunRecord:
        """Rebuild a record from ``run.json`` contents, checking every field.

        Raises:
            ToolkitError: A field is missing, unknown or of the wrong type; the message names the file.
        """
        fix = "it was not written by this version of msun-build; train the run again"
        names = {f.name for f in dataclasses.fields(cls)}
        body = {k: v for k, v in obj.items() if k != "format"}
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in body and f.default is dataclasses.MISSING]
        unknown = sorted(set(body) - names)
        if missing or unknown:
            detail = "; ".join(p for p in (f"missing {', '.join(missing)}" if missing else "",
                                           f"unknown {', '.join(unknown)}" if unknown else "") if p)
            raise ToolkitError(f"{str(path)!r} is not a readable run record ({detail}): {fix}")
        try:
            body["config"] = TrainConfig.from_json(dict(body["config"]))
            record = cls(**body)
            if not (isinstance(record.classes, list) and all(isinstance(c, str) for c in record.classes)):
                raise TypeError("classes must be a list of names")
            if not isinstance(record.method, str) or not isinstance(record.data_config, dict):
                raise TypeError("method must be a name and data_config an object")
        except (TypeError, ValueError, ToolkitError) as err:
            raise ToolkitError(f"{str(path)!r} is not a readable run record ({err}): {fix}") from None
        return record

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``run.json`` into ``directory`` atomically and return its path."""
        path = Path(directory) / "run.json"
        atomic_write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> RunRecord:
        """Read and validate ``run.json`` of a run folder.

        Raises:
            ToolkitError: No run there, or its record is damaged or from another version.
        """
        path = Path(directory) / "run.json"
        if not path.is_file():
            raise ToolkitError(f"{str(directory)!r} is not a training run (no run.json): train one with "
                               "`msun-build MODEL --data DATA --epochs E --out DIR`")
        obj = read_json(path, what="run record", fix="train the run again", format=RUN_FORMAT)
        return cls.from_json(obj, path)


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike[str]) -> Path:
    """Write ``checkpoint.pt`` atomically, keeping the one it replaces as ``checkpoint.prev.pt``.

    Args:
        state: A dict with :data:`CHECKPOINT_KEYS`.
        directory: The run folder.

    Returns:
        The checkpoint's path.
    """
    folder = Path(directory)
    path = folder / "checkpoint.pt"
    if path.is_file():
        os.replace(path, folder / "checkpoint.prev.pt")
    atomic_torch_save(state, path)
    return path


def load_checkpoint(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``checkpoint.pt`` of a run folder (tensors and plain containers only).

    Raises:
        ToolkitError: Missing, truncated or damaged; the message says how to fall back to the previous
            checkpoint when one is kept, or to start again.
    """
    folder = Path(directory)
    path = folder / "checkpoint.pt"
    if not path.is_file():
        raise ToolkitError(f"{str(folder)!r} has no checkpoint.pt yet: {_START_AGAIN}")
    prev = folder / "checkpoint.prev.pt"
    fix = (f"resume from the previous epoch's checkpoint with `mv {prev} {path}` and `msun-build --resume "
           f"{folder}`, or {_START_AGAIN}") if prev.is_file() else _START_AGAIN
    return read_torch(path, what="training checkpoint", fix=fix, keys=CHECKPOINT_KEYS)


def default_holdout(pool: int, train_images: int | None, num_classes: int) -> int:
    """The validation split carved when ``--holdout-images`` is not given.

    A fifth of the training images the run uses (``train_images``, or the whole pool), at least two per class, at
    most :data:`MAX_HOLDOUT` and at most half the pool.

    Args:
        pool: Images in the training split of the data.
        train_images: ``--train-images`` (None: the whole pool).
        num_classes: Classes in the data.

    Returns:
        The number of validation images (0 when the pool is too small to spare any).
    """
    used = pool if train_images is None else min(pool, train_images)
    want = min(MAX_HOLDOUT, max(2 * num_classes, used // 5))
    return max(0, min(want, pool // 2))


def data_split(labels: list[int], *, holdout: int, train: int | None, seed: int) -> tuple[list[int], list[int]]:
    """The training and validation indices of a run: both seeded and class-stratified, disjoint.

    The validation split (``holdout`` images) is carved from the whole training split first; ``train`` images (all
    the rest when None) are then drawn from what remains. Training and evaluation both call this, so evaluation
    rebuilds a run's validation split from its record (``holdout_images``, ``config.train_images``,
    ``config.seed``).

    Args:
        labels: One class id per image of the data's training split.
        holdout: Validation images (0: none).
        train: Training images wanted (None: all that remain).
        seed: The run's seed.

    Returns:
        ``(train_indices, validation_indices)``, sorted.

    Raises:
        ToolkitError: The split leaves no training images.
    """
    from scale_common.subsets import stratified_split, stratified_subset

    indices, val = list(range(len(labels))), []
    if holdout:
        indices, val = stratified_split(labels, holdout, seed=10_007 + seed)
    if train is not None and train < len(indices):
        picked = stratified_subset([labels[i] for i in indices], train, seed=seed)
        indices = [indices[i] for i in picked]
    return indices, val


def test_subset(labels: list[int], count: int | None) -> list[int]:
    """Indices of the test images evaluated: all, or a class-stratified subset the same for every run.

    Args:
        labels: One class id per image of the data's test split.
        count: Images wanted (None: all).

    Returns:
        Sorted indices, drawn with :data:`TEST_SUBSET_SEED` whatever the run's seed (a paired comparison).
    """
    if count is None or count >= len(labels):
        return list(range(len(labels)))
    from scale_common.subsets import stratified_subset

    return stratified_subset(labels, count, seed=TEST_SUBSET_SEED)


test_subset.__test__ = False  # type: ignore[attr-defined]  # not a test, whatever pytest guesses from its name
