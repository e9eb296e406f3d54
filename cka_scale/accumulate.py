"""Streaming minibatch CKA: float64 sums of unbiased HSIC over batches, mergeable across processes.

Nguyen, Raghu & Kornblith 2021, "Do Wide and Deep Networks Learn the Same Things?": for every batch, the unbiased
HSIC (Song et al. 2012) of every pair among m entries (m = S x L: scale x layer) is added to an (m, m) sum; CKA is
the normalised sum. Memory is O(m^2 + m b^2) for batches of b samples, whatever the number of images. Every state is
a plain sum, so merging two half-streams, or summing over ``torch.distributed`` ranks, equals one pass over all
batches. Mirrors the torchmetrics ``Metric`` contract (update / compute / reset / merge) without depending on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from cka_scale import functional as F
from scale_common.device import require_float64
from scale_common.errors import ToolkitError

__all__ = ["CKAAccumulator"]


class CKAAccumulator:
    """Minibatch CKA among m entries (e.g. S scales x L layers), fed one batch at a time.

    Attributes:
        names: One name per entry, used in warnings and errors.
        hsic_sum: ``(m, m)`` float64 sum over batches of the HSIC of every pair.
        scale_sum: ``(m,)`` float64 sum of the magnitude each self-HSIC is computed from (tells a zero from rounding).
        num_batches: Batches seen.
        num_samples: Samples seen (each batch counts once in the sums, whatever its size).

    Example:
        >>> acc = CKAAccumulator(["a", "b"])
        >>> for _ in range(4):
        ...     x = torch.randn(16, 8)
        ...     acc.update([x, 2 * x + 1])
        >>> round(float(acc.compute()[0, 1]), 6)
        1.0
    """

    def __init__(self, names: Sequence[str] | int, *, kernel: str = "linear", threshold: float = 1.0,
                 unbiased: bool = True, shape: tuple[int, int] | None = None,
                 device: torch.device | str | None = None) -> None:
        """Create empty sums.

        Args:
            names: Entry names, or their count m (names are then ``"[i]"``, or ``"(s, l)"`` with ``shape``).
            kernel: A name from :func:`cka_scale.functional.list_kernels`.
            threshold: RBF bandwidth threshold.
            unbiased: Sum unbiased HSIC (the minibatch estimator; batches need >= 4 samples). Biased sums are allowed
                but are not a consistent estimator across batches.
            shape: ``(S, L)`` with ``S * L == m``: lets :meth:`compute` return ``(S, L, S, L)``.
            device: Where the sums live (default: the CPU).

        Raises:
            ToolkitError: Unknown kernel, bad threshold, no entries, duplicate names, or a shape that does not match m.
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
        self.reset()

    @property
    def m(self) -> int:
        """Number of entries."""
        return len(self.names)

    def reset(self) -> None:
        """Zero the sums and counters."""
        self.hsic_sum = torch.zeros(self.m, self.m, dtype=torch.float64, device=self.device)
        self.scale_sum = torch.zeros(self.m, dtype=torch.float64, device=self.device)
        self.num_batches = 0
        self.num_samples = 0

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
        self.hsic_sum += terms.cross.to(self.device)
        self.scale_sum += terms.scale_x.to(self.device)
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

    def _config(self) -> dict[str, Any]:
        return {"names": self.names, "kernel": self.kernel, "threshold": self.threshold, "unbiased": self.unbiased,
                "shape": self.shape}

    def _check_compatible(self, config: dict[str, Any], what: str) -> None:
        mine = self._config()
        if self.kernel != "rbf":
            mine.pop("threshold")
        for key in mine:
            theirs = config.get(key)
            theirs = tuple(theirs) if key == "shape" and theirs is not None else theirs
            if theirs != mine[key]:
                raise ToolkitError(f"cannot combine with {what}: {key} differs ({theirs!r} vs {mine[key]!r})")

    def merge(self, other: CKAAccumulator) -> None:
        """Add another accumulator's sums to this one (same entries, kernel and estimator).

        Args:
            other: An accumulator fed with other batches of the same entries.

        Raises:
            ToolkitError: The two are not compatible.
        """
        if not isinstance(other, CKAAccumulator):
            raise ToolkitError(f"merge() takes a CKAAccumulator, got {type(other).__name__}")
        self._check_compatible(other._config(), "the other accumulator")
        self.hsic_sum += other.hsic_sum.to(self.device)
        self.scale_sum += other.scale_sum.to(self.device)
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
        counts = torch.tensor([self.num_batches, self.num_samples], dtype=torch.float64, device=self.device)
        packed = torch.cat([self.hsic_sum.reshape(-1), self.scale_sum, counts])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        m2 = self.m * self.m
        self.hsic_sum = packed[:m2].reshape(self.m, self.m).clone()
        self.scale_sum = packed[m2 : m2 + self.m].clone()
        self.num_batches, self.num_samples = (int(v) for v in packed[m2 + self.m :].tolist())

    def state_dict(self) -> dict[str, Any]:
        """The sums, counters and configuration (CPU tensors), for ``torch.save`` or :meth:`load_state_dict`."""
        return {"hsic_sum": self.hsic_sum.cpu().clone(), "scale_sum": self.scale_sum.cpu().clone(),
                "num_batches": self.num_batches, "num_samples": self.num_samples, **self._config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the sums with saved ones from a compatible accumulator.

        Args:
            state: A dict from :meth:`state_dict`.

        Raises:
            ToolkitError: The saved state belongs to different entries, kernel or estimator.
        """
        self._check_compatible(state, "the saved state")
        self.hsic_sum = state["hsic_sum"].to(self.device, torch.float64).clone()
        self.scale_sum = state["scale_sum"].to(self.device, torch.float64).clone()
        self.num_batches, self.num_samples = int(state["num_batches"]), int(state["num_samples"])

    def __repr__(self) -> str:
        estimator = F.cka_id(self.kernel, self.unbiased, self.threshold)
        return f"CKAAccumulator(m={self.m}, {estimator}, batches={self.num_batches}, samples={self.num_samples})"
