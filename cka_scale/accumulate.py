"""Streaming minibatch CKA with a 95% interval: float64 HSIC sums kept in K buckets, mergeable across processes.

Nguyen, Raghu & Kornblith 2021, "Do Wide and Deep Networks Learn the Same Things?": for every minibatch, the
unbiased HSIC (Song et al. 2012) of every pair among m entries (m = S x L: scale x layer) is added to an (m, m) sum;
CKA is the normalised sum. Memory is O(K m^2 + m b^2) for minibatches of b samples, whatever the number of images.

Uncertainty without extra forward passes: minibatch number ``i`` (its global index in the stream) is added to
bucket ``i mod K`` (K = 20 by default), so the state is K partial sums. CKA is a smooth function of the summed HSIC
(a ratio of sums), and its delete-one-group jackknife (Quenouille 1956; Tukey 1958; Efron & Stein 1981; grouped
jackknife of a ratio of sums: Efron 1982, "The Jackknife, the Bootstrap and Other Resampling Plans", ch. 3) gives
its standard error from the K leave-one-bucket-out CKAs: ``se^2 = (G-1)/G * sum_g (cka_(-g) - mean)^2`` over the G
non-empty buckets. The 95% interval is ``cka +- t_{G-1, 0.975} * se`` (Student t with G-1 degrees of freedom, as
for a mean of G group estimates). The minibatches are treated as independent draws of images: true when the images
are a random sample of the source and each image is in one minibatch. With fewer than 3 non-empty buckets the
interval is undefined (NaN). The buckets are plain sums, so merging two half-streams, or summing over
``torch.distributed`` ranks, gives exactly the CKA of one pass; the grouping (hence the interval) is the same too
when every process tells the accumulator its place in the stream (:meth:`CKAAccumulator.place`).

Mirrors the torchmetrics ``Metric`` contract (update / compute / reset / merge) without depending on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from cka_scale import functional as F
from cka_scale._stats import t_quantile
from scale_common.device import require_float64
from scale_common.errors import ToolkitError

__all__ = ["DEFAULT_BUCKETS", "MIN_MINIBATCHES", "CKAAccumulator", "Jackknife", "minibatch_size", "t_quantile"]

#: Buckets (jackknife groups) an accumulator keeps by default.
DEFAULT_BUCKETS = 20
#: Minibatches :func:`minibatch_size` aims for, so that the jackknife has enough groups.
MIN_MINIBATCHES = 8


def minibatch_size(images: int, batch_size: int, unbiased: bool = True, target: int = MIN_MINIBATCHES) -> int:
    """The HSIC minibatch size for ``images`` images: ``batch_size``, made smaller when that gives < ``target`` groups.

    With 256 images and batches of 64 there would be 4 minibatches, too few for a jackknife interval; this returns
    ``images // target`` instead (32: eight minibatches), never below 4. Smaller minibatches make the minibatch CKA a
    little noisier, which the interval then shows. The biased estimator keeps ``batch_size``: its bias grows as the
    minibatch shrinks.

    Args:
        images: Images in the stream.
        batch_size: The largest minibatch wanted (``--batch-size``).
        unbiased: Whether HSIC is the unbiased estimator.
        target: Minibatches wanted at least.

    Returns:
        The minibatch size.
    """
    if not unbiased:
        return batch_size
    return max(min(4, batch_size), min(batch_size, images // max(1, target)))


class Jackknife(NamedTuple):
    """CKA, its jackknife standard error and the degrees of freedom (groups - 1), all float64 (CPU or device)."""

    cka: Tensor
    se: Tensor
    dof: int

    def interval(self, level: float = 0.95) -> tuple[Tensor, Tensor]:
        """``cka -+ t_{dof} * se``: the lower and upper ends of the ``level`` interval (NaN when undefined)."""
        half = t_quantile(level, self.dof) * self.se
        return self.cka - half, self.cka + half


class CKAAccumulator:
    """Minibatch CKA among m entries (e.g. S scales x L layers), fed one batch at a time.

    Attributes:
        names: One name per entry, used in warnings and errors.
        buckets: K, the number of partial sums (jackknife groups).
        hsic_buckets: ``(K, m, m)`` float64: bucket k sums the HSIC of every pair over minibatches ``i = k mod K``.
        scale_buckets: ``(K, m)`` float64 sums of the magnitude each self-HSIC is computed from (tells a zero from
            rounding).
        bucket_counts: ``(K,)`` float64 minibatches in each bucket.
        num_batches: Minibatches seen.
        num_samples: Samples seen (each minibatch counts once in the sums, whatever its size).

    Example:
        >>> acc = CKAAccumulator(["a", "b"])
        >>> for _ in range(4):
        ...     x = torch.randn(16, 8)
        ...     acc.update([x, 2 * x + 1])
        >>> round(float(acc.compute()[0, 1]), 6)
        1.0
        >>> acc.jackknife().dof  # four non-empty buckets
        3
    """

    def __init__(self, names: Sequence[str] | int, *, kernel: str = "linear", threshold: float = 1.0,
                 unbiased: bool = True, shape: tuple[int, int] | None = None,
                 device: torch.device | str | None = None, buckets: int = DEFAULT_BUCKETS) -> None:
        """Create empty sums.

        Args:
            names: Entry names, or their count m (names are then ``"[i]"``, or ``"(s, l)"`` with ``shape``).
            kernel: A name from :func:`cka_scale.functional.list_kernels`.
            threshold: RBF bandwidth threshold.
            unbiased: Sum unbiased HSIC (the minibatch estimator; batches need >= 4 samples). Biased sums are allowed
                but are not a consistent estimator across batches.
            shape: ``(S, L)`` with ``S * L == m``: lets :meth:`compute` return ``(S, L, S, L)``.
            device: Where the sums live (default: the CPU).
            buckets: K partial sums kept for the jackknife interval (minibatch i goes to bucket i mod K).

        Raises:
            ToolkitError: Unknown kernel, bad threshold, no entries, duplicate names, a shape that does not match m,
                or fewer than 1 bucket.
        """
        if isinstance(names, int):
            if shape is not None and len(shape) == 2 and shape[0] * shape[1] == names:
                names = [f"({s}, {i})" for s in range(shape[0]) for i in range(shape[1])]
            else:
                names = [f"[{i}]" for i in range(names)]
        self.names = [str(name) for name in names]
        if not self.names:
            raise ToolkitError("a CKA accumulator needs at least one entry")
        if len(set(self.names)) != len(self.names):
            raise ToolkitError("the entry names of a CKA accumulator must be unique")
        if shape is not None:
            shape = tuple(int(v) for v in shape)
            if len(shape) != 2 or shape[0] * shape[1] != len(self.names):
                raise ToolkitError(f"shape {shape} does not hold the {len(self.names)} entries (need S x L == m)")
        F.cka_id(kernel, unbiased, threshold)  # validates the kernel name
        if kernel == "rbf" and not threshold > 0:
            raise ToolkitError(f"the RBF threshold must be a positive number, got {threshold!r}")
        self.kernel, self.threshold, self.unbiased, self.shape = kernel, float(threshold), bool(unbiased), shape
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        require_float64(self.device, "CKAAccumulator")
        if not int(buckets) >= 1:
            raise ToolkitError(f"a CKA accumulator needs at least one bucket, got buckets={buckets!r}")
        self.buckets = int(buckets)
        self._offset, self._stride = 0, 1
        self.reset()

    @property
    def m(self) -> int:
        """Number of entries."""
        return len(self.names)

    @property
    def hsic_sum(self) -> Tensor:
        """``(m, m)`` float64 HSIC of every pair summed over all minibatches."""
        return self.hsic_buckets.sum(0)

    @property
    def scale_sum(self) -> Tensor:
        """``(m,)`` float64 magnitude each summed self-HSIC comes from."""
        return self.scale_buckets.sum(0)

    def reset(self) -> None:
        """Zero the sums and counters (the place set by :meth:`place` is kept)."""
        opts = {"dtype": torch.float64, "device": self.device}
        self.hsic_buckets = torch.zeros(self.buckets, self.m, self.m, **opts)
        self.scale_buckets = torch.zeros(self.buckets, self.m, **opts)
        self.bucket_counts = torch.zeros(self.buckets, dtype=torch.float64)
        self.num_batches = 0
        self.num_samples = 0

    def place(self, rank: int, world_size: int) -> None:
        """Declare that this process sees minibatches ``rank, rank + world_size, ...`` of one shared stream.

        The sums do not depend on it; the buckets (hence the interval) then equal those of one process reading the
        whole stream in order.

        Args:
            rank: This process's rank.
            world_size: Number of processes sharing the minibatches round-robin.
        """
        self._offset, self._stride = int(rank), max(1, int(world_size))

    @torch.no_grad()
    def update(self, features: Sequence[Tensor]) -> None:
        """Add one batch given as features: m tensors ``(b, ...)`` with the same b samples, in entry order.

        Args:
            features: One tensor per entry; shapes may differ beyond the sample axis.

        Raises:
            ToolkitError: Wrong count, mismatched sample counts, b < 4 (unbiased), NaN/Inf features.
        """
        features = list(features)
        if len(features) != self.m:
            raise ToolkitError(f"update() got {len(features)} feature tensors for {self.m} entries")
        self._add(F._grams(features, self.kernel, self.threshold, self.names, self.unbiased))

    @torch.no_grad()
    def update_grams(self, grams: Tensor) -> None:
        """Add one batch given as ready-made kernel Grams ``(m, b, b)``, e.g. from :func:`cka_scale.functional.gram`.

        Args:
            grams: Stacked symmetric Gram matrices, in entry order, made with this accumulator's kernel.

        Raises:
            ToolkitError: Wrong shape or count, b < 4 (unbiased), a Gram with NaN or Inf.
        """
        if isinstance(grams, Tensor) and grams.ndim == 3 and grams.shape[0] != self.m:
            raise ToolkitError(f"update_grams() got {grams.shape[0]} Gram matrices for {self.m} entries")
        F._check_grams(grams, "grams", self.unbiased)
        self._add(list(grams))

    def _add(self, grams: list[Tensor]) -> None:
        terms = F._hsic_terms(grams, None, self.unbiased, self.names)
        k = (self._offset + self._stride * self.num_batches) % self.buckets
        self.hsic_buckets[k] += terms.cross.to(self.device)
        self.scale_buckets[k] += terms.scale_x.to(self.device)
        self.bucket_counts[k] += 1
        self.num_batches += 1
        self.num_samples += grams[0].shape[-1]

    def compute(self, *, reshape: bool = False) -> Tensor:
        """CKA among all entries from the sums so far; undefined entries are NaN with a warning naming them.

        Args:
            reshape: Return ``(S, L, S, L)`` (needs ``shape``) instead of ``(m, m)``.

        Returns:
            float64 CKA on the accumulator's device.

        Raises:
            ToolkitError: No batch was seen, or ``reshape`` without ``shape``.
        """
        if reshape and self.shape is None:
            raise ToolkitError("compute(reshape=True) needs the accumulator's shape=(S, L)")
        if self.num_batches == 0:
            raise ToolkitError("no batch was seen: call update() or update_grams() before compute()")
        diag = self.hsic_sum.diagonal()
        cka = F._normalise(self.hsic_sum, diag, diag, self.names, self.names, self.scale_sum, self.scale_sum,
                           stacklevel=3)
        return cka.reshape(*self.shape, *self.shape) if reshape else cka

    def jackknife(self, *, reshape: bool = False) -> Jackknife:
        """CKA with its delete-one-bucket jackknife standard error (see the module docstring).

        Args:
            reshape: Return ``(S, L, S, L)`` tensors (needs ``shape``) instead of ``(m, m)``.

        Returns:
            CKA (as :meth:`compute`), the standard error (NaN with fewer than 3 non-empty buckets, or where CKA is
            undefined) and the degrees of freedom G - 1. ``.interval(0.95)`` gives the 95% interval.

        Raises:
            ToolkitError: No batch was seen, or ``reshape`` without ``shape``.
        """
        cka = self.compute(reshape=False)
        full = self.bucket_counts > 0
        groups = int(full.sum())
        se = torch.full_like(cka, math.nan)
        if groups >= 3:
            idx = torch.nonzero(full).flatten().to(self.device)
            kept = self.hsic_sum[None] - self.hsic_buckets[idx]  # (G, m, m) leave-one-bucket-out sums
            diag = kept.diagonal(dim1=1, dim2=2)
            loo = kept / torch.sqrt(diag[:, :, None] * diag[:, None, :])
            loo = loo.masked_fill(~(diag[:, :, None] > 0) | ~(diag[:, None, :] > 0), math.nan)
            var = (groups - 1) / groups * ((loo - loo.mean(0)) ** 2).sum(0)
            se = torch.sqrt(var).masked_fill(torch.isnan(cka), math.nan)
        if reshape:
            if self.shape is None:
                raise ToolkitError("jackknife(reshape=True) needs the accumulator's shape=(S, L)")
            cka, se = cka.reshape(*self.shape, *self.shape), se.reshape(*self.shape, *self.shape)
        return Jackknife(cka, se, groups - 1)

    def _config(self) -> dict[str, Any]:
        return {"names": self.names, "kernel": self.kernel, "threshold": self.threshold, "unbiased": self.unbiased,
                "shape": self.shape, "buckets": self.buckets}

    def _check_compatible(self, config: dict[str, Any], what: str) -> None:
        mine = self._config()
        if self.kernel != "rbf":
            mine.pop("threshold")
        if "buckets" not in config:  # a state saved before buckets existed holds one sum
            mine.pop("buckets")
        for key in mine:
            theirs = config.get(key)
            theirs = tuple(theirs) if key == "shape" and theirs is not None else theirs
            if theirs != mine[key]:
                raise ToolkitError(f"cannot combine with {what}: {key} differs ({theirs!r} vs {mine[key]!r})")

    def merge(self, other: CKAAccumulator) -> None:
        """Add another accumulator's sums to this one, bucket by bucket (same entries, kernel, estimator, buckets).

        Args:
            other: An accumulator fed with other batches of the same entries.

        Raises:
            ToolkitError: The two are not compatible.
        """
        if not isinstance(other, CKAAccumulator):
            raise ToolkitError(f"merge() takes a CKAAccumulator, got {type(other).__name__}")
        self._check_compatible(other._config(), "the other accumulator")
        self.hsic_buckets += other.hsic_buckets.to(self.device)
        self.scale_buckets += other.scale_buckets.to(self.device)
        self.bucket_counts += other.bucket_counts
        self.num_batches += other.num_batches
        self.num_samples += other.num_samples

    def all_reduce(self, group: Any = None) -> None:
        """Sum the state in place over the ranks of ``torch.distributed`` (a no-op when it is not initialised).

        Every rank must call it. The counters travel as float64, exact up to 2^53.

        Args:
            group: Process group (default: the world).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        counts = torch.tensor([self.num_batches, self.num_samples], dtype=torch.float64)
        parts = [self.hsic_buckets, self.scale_buckets, self.bucket_counts.to(self.device), counts.to(self.device)]
        packed = torch.cat([p.reshape(-1) for p in parts])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        pieces = packed.split([p.numel() for p in parts])
        self.hsic_buckets = pieces[0].reshape(self.hsic_buckets.shape).clone()
        self.scale_buckets = pieces[1].reshape(self.scale_buckets.shape).clone()
        self.bucket_counts = pieces[2].cpu().clone()
        self.num_batches, self.num_samples = (int(v) for v in pieces[3].tolist())

    def state_dict(self) -> dict[str, Any]:
        """The sums, counters and configuration (CPU tensors), for ``torch.save`` or :meth:`load_state_dict`."""
        return {"hsic_buckets": self.hsic_buckets.cpu().clone(), "scale_buckets": self.scale_buckets.cpu().clone(),
                "bucket_counts": self.bucket_counts.clone(), "num_batches": self.num_batches,
                "num_samples": self.num_samples, **self._config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the sums with saved ones from a compatible accumulator.

        Args:
            state: A dict from :meth:`state_dict`.

        Raises:
            ToolkitError: The saved state belongs to different entries, kernel or estimator.
        """
        self._check_compatible(state, "the saved state")
        self.reset()
        if "hsic_buckets" in state:
            self.hsic_buckets = state["hsic_buckets"].to(self.device, torch.float64).clone()
            self.scale_buckets = state["scale_buckets"].to(self.device, torch.float64).clone()
            self.bucket_counts = state["bucket_counts"].to("cpu", torch.float64).clone()
        else:  # saved before buckets existed: one sum, no interval
            self.hsic_buckets[0] = state["hsic_sum"].to(self.device, torch.float64)
            self.scale_buckets[0] = state["scale_sum"].to(self.device, torch.float64)
            self.bucket_counts[0] = float(state["num_batches"])
        self.num_batches, self.num_samples = int(state["num_batches"]), int(state["num_samples"])

    def __repr__(self) -> str:
        estimator = F.cka_id(self.kernel, self.unbiased, self.threshold)
        return (f"CKAAccumulator(m={self.m}, {estimator}, batches={self.num_batches}, samples={self.num_samples}, "
                f"buckets={self.buckets})")
