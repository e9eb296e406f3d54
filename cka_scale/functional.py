"""Pure CKA math: biased and unbiased HSIC and CKA, for one pair or for all pairs of stacked Grams at once.

The Gram matrices come from :mod:`cka_scale.kernels` (re-exported here: ``gram``, ``gram_linear``, ``gram_rbf``).

References:
    Kornblith, Norouzi, Lee & Hinton 2019, "Similarity of Neural Network Representations Revisited" (CKA; the RBF
    bandwidth sigma = threshold * sqrt(median squared distance)). Gretton, Bousquet, Smola & Schoelkopf 2005 (biased
    HSIC). Song, Smola, Gretton, Bedo & Borgwardt 2012, JMLR 13, eq. 5 (unbiased HSIC). Nguyen, Raghu & Kornblith 2021,
    "Do Wide and Deep Networks Learn the Same Things?" (all pairs from stacked Grams; minibatch CKA). Williams, Kunz,
    Kornblith & Linderman 2021, "Generalized Shape Metrics on Neural Representations" (arccos of CKA, a metric).
    Cloos, Siegel, Brincat, Miller & Cueva 2024, "Differentiable Optimization of Similarity Scores Between Models and
    Brains" and its similarity-repository (the estimator ids, e.g. ``cka-kernel=linear-hsic=song-score``).

Numerics: features are centred over the samples before any Gram or distance is formed; Grams are formed in the input
dtype on its device; every HSIC sum is accumulated in float64, reading the Grams in row blocks cast to float64. A
float32 Gram entry is exact in float64, so the algebraic HSIC forms below lose only float64 digits.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from cka_scale.kernels import KERNELS, _kernel, flatten_features, gram, gram_linear, gram_rbf, list_kernels
from scale_common.errors import ToolkitError

__all__ = [
    "KERNELS",
    "DegenerateCKAWarning",
    "angular_cka",
    "angular_distance",
    "cka_from_hsic",
    "cka_id",
    "cka_matrix",
    "flatten_features",
    "gram",
    "gram_linear",
    "gram_rbf",
    "hsic",
    "hsic_matrix",
    "linear_cka",
    "list_kernels",
    "parse_cka_id",
    "rbf_cka",
]

# A self-HSIC at or below this fraction of the magnitude of the terms it is summed from is float64 rounding of an
# exact zero (constant features, a constant Gram): its CKA is undefined.
_DEGENERATE_RTOL = 1e-12
# float64 elements per row block of stacked Grams (8 MiB): bounds the extra memory of the float64 accumulation
# (measured on 2 CPU cores: 4 ms for 16 Grams at n=512, 0.05 s at n=2048, about a tenth of the time to form them).
_BLOCK_ELEMENTS = 1 << 20


class DegenerateCKAWarning(RuntimeWarning):
    """CKA is undefined for some entries (features constant across the batch, zero self-HSIC): they are NaN."""


def _check_samples(n: int, unbiased: bool, label: str) -> None:
    need = 4 if unbiased else 2
    if n < need:
        estimator = "unbiased HSIC (Song et al. 2012)" if unbiased else "biased HSIC"
        raise ToolkitError(f"{label} has {n} sample(s); {estimator} needs at least {need} per batch")


def _grams(xs: Sequence[Tensor], kernel: str, threshold: float, labels: Sequence[str], unbiased: bool) -> list[Tensor]:
    """Gram matrices of a list of feature tensors, after checking sample counts and devices agree."""
    fn = _kernel(kernel)
    if len(xs) == 0:
        raise ToolkitError("no feature tensors were given")
    n0 = xs[0].shape[0] if xs[0].ndim else 0
    for x, label in zip(xs, labels, strict=True):
        n = x.shape[0] if x.ndim else 0
        if n != n0:
            raise ToolkitError(f"{labels[0]} has {n0} samples but {label} has {n}: every input needs the same samples")
        if x.device != xs[0].device:
            raise ToolkitError(f"{label} is on {x.device} but {labels[0]} is on {xs[0].device}: move them together")
    _check_samples(n0, unbiased, labels[0])
    # _hsic_terms tests every Gram for NaN/Inf and does not need them double-centred (HSIC is translation invariant)
    return [fn(x, threshold, label, check=False, centred=False) for x, label in zip(xs, labels, strict=True)]


class _Terms(NamedTuple):
    """HSIC of all pairs, each entry's self-HSIC, and the magnitude each self-HSIC was summed from (all float64)."""

    cross: Tensor
    self_x: Tensor
    self_y: Tensor
    scale_x: Tensor
    scale_y: Tensor


def _block(grams: Sequence[Tensor], rows: slice, cols: slice) -> Tensor:
    """One block of every Gram, stacked and cast to float64: ``(m, rows, cols)``, a fresh tensor (two ops, not m)."""
    return torch.stack([g[rows, cols] for g in grams]).to(torch.float64)


def _gemm(prod: Tensor, norms: Tensor, flat: Tensor, m1: int, square: bool, weight: float) -> None:
    """Add ``weight * <block_i, block_j>`` to ``prod`` (all pairs, or first side x second side plus own norms)."""
    if square:
        prod.addmm_(flat, flat.T, alpha=weight)
    else:
        prod.addmm_(flat[:m1], flat[m1:].T, alpha=weight)
        norms += weight * torch.linalg.vecdot(flat, flat)


def _hsic_terms(grams: Sequence[Tensor], others: Sequence[Tensor] | None, unbiased: bool,
                labels: Sequence[str]) -> _Terms:
    """All-pairs HSIC in two float64 GEMMs over row blocks of the stacked Grams (the shared core of this module).

    With ``A_ij = <G_i, G_j>_F``, row sums ``R`` and totals ``s`` of the Grams (zero-diagonal for the unbiased
    estimator), HSIC is ``c0 (A + c1 s s^T - c2 R R^T)``: unbiased (Song et al. eq. 5) ``c0 = 1/(n(n-3))``,
    ``c1 = 1/((n-1)(n-2))``, ``c2 = 2/(n-2)``; biased ``<HKH, HLH>/(n-1)^2``, i.e. ``c0 = 1/(n-1)^2``, ``c1 = 1/n^2``,
    ``c2 = 2/n``. Grams are symmetric, so ``A`` reads only the upper block triangle, in float64 row blocks: each
    diagonal block once and each block right of it twice.
    """
    both = list(grams) + list(others or [])
    m1, m = len(grams), len(both)
    n = both[0].shape[-1]
    opts = {"dtype": torch.float64, "device": both[0].device}
    square = others is None
    prod = torch.zeros((m, m) if square else (m1, m - m1), **opts)
    norms = torch.zeros(m, **opts)
    # Row sums from whole Grams, one op each; any NaN/Inf in a Gram, diagonal included, makes its row sums non-finite.
    sums = torch.stack([g.sum(-1, dtype=torch.float64) for g in both])
    finite = torch.isfinite(sums).all(-1)
    if unbiased:
        sums = sums - torch.stack([g.diagonal() for g in both]).to(torch.float64)
    step = max(1, _BLOCK_ELEMENTS // (m * n))
    for a in range(0, n, step):
        b = min(n, a + step)
        blk = _block(both, slice(a, b), slice(a, b))  # diagonal block, counted once
        if unbiased:
            blk.diagonal(dim1=1, dim2=2).zero_()
        _gemm(prod, norms, blk.reshape(m, -1), m1, square, 1.0)
        if b < n:  # the block right of it stands for itself and its mirror image below the diagonal
            _gemm(prod, norms, _block(both, slice(a, b), slice(b, n)).reshape(m, -1), m1, square, 2.0)
    if square:
        norms = prod.diagonal().clone()
    finite &= torch.isfinite(norms)
    if not bool(finite.all()):
        bad = [labels[i] for i in torch.nonzero(~finite).flatten().tolist()]
        raise ToolkitError(f"the Gram matrix of {', '.join(bad)} contains NaN or Inf (non-finite features, or products "
                           f"that overflow {both[0].dtype}: cast the features to float64)")
    if unbiased:
        c0, c1, c2 = 1.0 / (n * (n - 3)), 1.0 / ((n - 1) * (n - 2)), 2.0 / (n - 2)
    else:
        c0, c1, c2 = 1.0 / (n - 1) ** 2, 1.0 / n**2, 2.0 / n
    totals = sums.sum(-1)
    rr = sums @ sums.T
    own = c1 * totals * totals
    self_h = c0 * (norms + own - c2 * rr.diagonal())
    scale = c0 * (norms + own + c2 * rr.diagonal())
    if square:
        cross = c0 * (prod + c1 * torch.outer(totals, totals) - c2 * rr)
        return _Terms(cross, self_h, self_h, scale, scale)
    cross = c0 * (prod + c1 * torch.outer(totals[:m1], totals[m1:]) - c2 * rr[:m1, m1:])
    return _Terms(cross, self_h[:m1], self_h[m1:], scale[:m1], scale[m1:])


def _check_grams(grams: Tensor, label: str, unbiased: bool, n: int | None = None) -> int:
    """Check a ``(m, n, n)`` stack of Grams; return n."""
    if not isinstance(grams, Tensor) or grams.ndim != 3 or grams.shape[-1] != grams.shape[-2]:
        shape = tuple(grams.shape) if isinstance(grams, Tensor) else type(grams).__name__
        raise ToolkitError(f"{label} must be a (m, n, n) stack of Gram matrices, got {shape}")
    if grams.shape[0] == 0:
        raise ToolkitError(f"{label} holds no Gram matrix")
    if n is not None and grams.shape[-1] != n:
        raise ToolkitError(f"{label} has {grams.shape[-1]} samples but the first input has {n}")
    _check_samples(grams.shape[-1], unbiased, label)
    return grams.shape[-1]


def hsic(k: Tensor, l: Tensor, *, unbiased: bool = False) -> Tensor:  # noqa: E741
    """HSIC of two ``(n, n)`` Gram matrices.

    Biased: ``<HKH, HLH>_F / (n-1)^2`` with ``H = I - 11^T/n`` (Gretton et al. 2005). Unbiased: Song et al. 2012,
    eq. 5, on the zero-diagonal Grams (needs n >= 4).

    Args:
        k: First Gram matrix, e.g. from :func:`gram`.
        l: Second Gram matrix, same n.
        unbiased: Use the unbiased estimator.

    Returns:
        A float64 0-dim tensor on the Grams' device.

    Raises:
        ToolkitError: Shapes disagree, too few samples, or a Gram contains NaN or Inf.
    """
    for g, label in ((k, "k"), (l, "l")):
        if not isinstance(g, Tensor) or g.ndim != 2:
            raise ToolkitError(f"{label} must be a (n, n) Gram matrix")
    n = _check_grams(k[None], "k", unbiased)
    _check_grams(l[None], "l", unbiased, n)
    return _hsic_terms([k], [l], unbiased, ["k", "l"]).cross[0, 0]


def hsic_matrix(grams: Tensor, others: Tensor | None = None, *, unbiased: bool = False) -> Tensor:
    """HSIC of all pairs of Gram matrices, in two float64 GEMMs over the stacked Grams (no loop over pairs).

    Args:
        grams: ``(m, n, n)`` stacked symmetric Gram matrices (only the upper triangle of each is read).
        others: Optional second stack ``(m2, n, n)``; without it, all pairs within ``grams``.
        unbiased: Use the unbiased estimator of Song et al. 2012 (needs n >= 4).

    Returns:
        ``(m, m2)`` (or ``(m, m)``) float64 HSIC values on the Grams' device.

    Raises:
        ToolkitError: Bad shapes, too few samples, or a Gram contains NaN or Inf.
    """
    n = _check_grams(grams, "grams", unbiased)
    labels = [f"grams[{i}]" for i in range(grams.shape[0])]
    if others is not None:
        _check_grams(others, "others", unbiased, n)
        labels += [f"others[{j}]" for j in range(others.shape[0])]
    return _hsic_terms(list(grams), None if others is None else list(others), unbiased, labels).cross


def _degenerate(self_h: Tensor, scale: Tensor | None) -> Tensor:
    bad = ~(self_h > 0)
    if scale is not None:
        bad |= self_h <= _DEGENERATE_RTOL * scale.to(self_h)
    return bad


def cka_from_hsic(cross: Tensor, self_x: Tensor, self_y: Tensor, *, names_x: Sequence[str] | None = None,
                  names_y: Sequence[str] | None = None, scale_x: Tensor | None = None,
                  scale_y: Tensor | None = None) -> Tensor:
    """Normalise HSIC to CKA: ``cross_ij / sqrt(self_x_i * self_y_j)``, with undefined entries set to NaN.

    An entry is undefined when its self-HSIC is <= 0 (features constant across the batch give exactly 0; the unbiased
    estimate can also come out negative for tiny batches) or, when ``scale_*`` is given, at most 1e-12 of it (float64
    rounding of an exact zero). Its whole row or column is NaN and one :class:`DegenerateCKAWarning` names it.
    No epsilon is added and nothing is clamped: an unbiased CKA may leave [0, 1] slightly.

    Args:
        cross: ``(m1, m2)`` HSIC between the two sides (0-dim for one pair).
        self_x: ``(m1,)`` self-HSIC of each entry on the first side.
        self_y: ``(m2,)`` self-HSIC on the second side.
        names_x: Entry names for the warning (default ``x[i]``).
        names_y: Entry names for the warning (default ``y[j]``).
        scale_x: Optional ``(m1,)`` magnitude of the terms each self-HSIC was summed from.
        scale_y: Optional ``(m2,)`` likewise.

    Returns:
        float64 CKA with the shape of ``cross``.

    Raises:
        ToolkitError: The shapes do not fit together.
    """
    return _normalise(cross, self_x, self_y, names_x, names_y, scale_x, scale_y, stacklevel=3)


def _normalise(cross: Tensor, self_x: Tensor, self_y: Tensor, names_x: Sequence[str] | None,
               names_y: Sequence[str] | None, scale_x: Tensor | None, scale_y: Tensor | None, *,
               stacklevel: int) -> Tensor:
    """:func:`cka_from_hsic`, with the warning attributed ``stacklevel`` frames up (to the user's call)."""
    cross = cross.to(torch.float64)
    sx, sy = self_x.to(cross).reshape(-1), self_y.to(cross).reshape(-1)
    if cross.numel() != sx.numel() * sy.numel() or (cross.ndim == 2 and cross.shape != (sx.numel(), sy.numel())):
        raise ToolkitError(f"cross HSIC {tuple(cross.shape)} does not match self_x {tuple(self_x.shape)} and "
                           f"self_y {tuple(self_y.shape)}")
    bad_x, bad_y = _degenerate(sx, scale_x), _degenerate(sy, scale_y)
    cka = cross.reshape(sx.numel(), sy.numel()) / torch.sqrt(torch.outer(sx, sy))
    mask = bad_x[:, None] | bad_y[None, :]
    if bool(mask.any()):
        cka = cka.masked_fill(mask, math.nan)
        named = [names_x[i] if names_x else f"x[{i}]" for i in torch.nonzero(bad_x).flatten().tolist()]
        named += [names_y[j] if names_y else f"y[{j}]" for j in torch.nonzero(bad_y).flatten().tolist()]
        named = list(dict.fromkeys(named))
        warnings.warn(f"CKA is undefined (set to NaN) for {', '.join(named)}: zero self-HSIC, i.e. features constant "
                      "across the batch (or a constant Gram matrix)", DegenerateCKAWarning, stacklevel=stacklevel)
    return cka.reshape(cross.shape)


def cka_matrix(xs: Sequence[Tensor], ys: Sequence[Tensor] | None = None, *, kernel: str = "linear",
               unbiased: bool = False, threshold: float = 1.0) -> Tensor:
    """CKA between all pairs of two lists of features (or within one list) from stacked Grams in batched GEMMs.

    Args:
        xs: Feature tensors ``(n, ...)``, shapes may differ; the samples (first axis) must be the same.
        ys: Optional second list; without it, the ``(len(xs), len(xs))`` matrix within ``xs``.
        kernel: A name from :func:`list_kernels`.
        unbiased: Use the unbiased HSIC of Song et al. 2012 (needs n >= 4).
        threshold: RBF bandwidth threshold.

    Returns:
        float64 ``(len(xs), len(ys))`` CKA on the inputs' device; undefined entries are NaN (with a warning).

    Raises:
        ToolkitError: Unknown kernel, mismatched sample counts or devices, too few samples, NaN/Inf features.

    Example:
        >>> x = torch.randn(32, 8)
        >>> m = cka_matrix([x, 2 * x, torch.randn(32, 3, 2, 2)])
        >>> m.shape, round(float(m[0, 1]), 6)
        (torch.Size([3, 3]), 1.0)
    """
    xs = list(xs)
    labels = [f"xs[{i}]" for i in range(len(xs))]
    if ys is None:
        t = _hsic_terms(_grams(xs, kernel, threshold, labels, unbiased), None, unbiased, labels)
        return _normalise(t.cross, t.self_x, t.self_y, labels, labels, t.scale_x, t.scale_y, stacklevel=3)
    ys = list(ys)
    labels_y = [f"ys[{j}]" for j in range(len(ys))]
    if not ys:
        raise ToolkitError("ys is empty")
    grams = _grams(xs + ys, kernel, threshold, labels + labels_y, unbiased)
    t = _hsic_terms(grams[: len(xs)], grams[len(xs) :], unbiased, labels + labels_y)
    return _normalise(t.cross, t.self_x, t.self_y, labels, labels_y, t.scale_x, t.scale_y, stacklevel=3)


def _pair(x: Tensor, y: Tensor, kernel: str, unbiased: bool, threshold: float) -> Tensor:
    grams = _grams([x, y], kernel, threshold, ["x", "y"], unbiased)
    t = _hsic_terms(grams[:1], grams[1:], unbiased, ["x", "y"])
    return _normalise(t.cross, t.self_x, t.self_y, ["x"], ["y"], t.scale_x, t.scale_y, stacklevel=4)[0, 0]


def linear_cka(x: Tensor, y: Tensor, *, unbiased: bool = False) -> Tensor:
    """Linear CKA (Kornblith et al. 2019) between two feature tensors with the same samples.

    Args:
        x: Features ``(n, ...)``; trailing dimensions are flattened, so conv maps of any shape compare directly.
        y: Features ``(n, ...)``.
        unbiased: Use the unbiased HSIC of Song et al. 2012 (needs n >= 4).

    Returns:
        A float64 0-dim tensor on the inputs' device (NaN, with a warning, if either side is constant).

    Raises:
        ToolkitError: Mismatched sample counts, too few samples, NaN/Inf features.

    Example:
        >>> x = torch.randn(64, 10)
        >>> round(float(linear_cka(x, 3 * x + 1)), 6)
        1.0
    """
    return _pair(x, y, "linear", unbiased, 1.0)


def rbf_cka(x: Tensor, y: Tensor, *, threshold: float = 1.0, unbiased: bool = False) -> Tensor:
    """RBF CKA with the median bandwidth rule, ``sigma = threshold * sqrt(median squared distance)``.

    Args:
        x: Features ``(n, ...)``; trailing dimensions are flattened.
        y: Features ``(n, ...)``.
        threshold: Bandwidth as a fraction of the median distance, per input (see :func:`gram_rbf`).
        unbiased: Use the unbiased HSIC of Song et al. 2012 (needs n >= 4).

    Returns:
        A float64 0-dim tensor on the inputs' device.

    Raises:
        ToolkitError: Mismatched sample counts, too few samples, NaN/Inf features, non-positive threshold.
    """
    return _pair(x, y, "rbf", unbiased, threshold)


def cka_id(kernel: str, unbiased: bool, threshold: float = 1.0, *, angular: bool = False) -> str:
    """Identifier of an estimator, following the similarity-repository convention (Cloos et al. 2024).

    ``hsic=song`` is the unbiased HSIC of Song et al. 2012, ``hsic=gretton`` the biased one of Gretton et al. 2005;
    the RBF kernel carries its median-distance bandwidth threshold as ``(rbf-threshold=T)`` (the
    ``rbf-threshold={threshold}`` kernel of Kornblith et al.'s code in that repository); ``-score`` is CKA itself and
    ``-distance=angular`` its arccos.

    Args:
        kernel: A name from :func:`list_kernels`.
        unbiased: Whether HSIC is the unbiased estimator.
        threshold: RBF bandwidth threshold (not part of a linear id).
        angular: Name the angular distance arccos(CKA) instead of the score.

    Returns:
        E.g. ``"cka-kernel=linear-hsic=song-score"`` or ``"cka-kernel=(rbf-threshold=0.5)-hsic=gretton-score"``.

    Raises:
        ToolkitError: Unknown kernel.
    """
    _kernel(kernel)
    name = kernel if kernel == "linear" else f"({kernel}-threshold={threshold:g})"
    return f"cka-kernel={name}-hsic={'song' if unbiased else 'gretton'}-{'distance=angular' if angular else 'score'}"


def parse_cka_id(text: str) -> tuple[str, bool, float]:
    """Kernel, unbiasedness and threshold from an estimator id: today's (:func:`cka_id`) or that of older reports.

    Older reports wrote ``cka-kernel=linear-hsic=unbiased`` and ``cka-kernel=rbf(median,threshold=0.5)-hsic=biased``.

    Args:
        text: The ``estimator`` field of a report.

    Returns:
        ``(kernel, unbiased, threshold)``; the threshold is 1.0 for a linear kernel.

    Raises:
        ToolkitError: Not a CKA estimator id of either form.
    """
    import re

    new = re.fullmatch(r"cka-kernel=(linear|\((\w+)-threshold=([0-9.eE+-]+)\))-hsic=(song|gretton)"
                       r"(?:-score|-distance=angular)?", text)
    old = re.fullmatch(r"cka-kernel=(linear|(\w+)\(median,threshold=([0-9.eE+-]+)\))-hsic=(unbiased|biased)", text)
    match = new or old
    if match is None:
        raise ToolkitError(f"{text!r} is not a CKA estimator id (e.g. {cka_id('linear', True)!r})")
    kernel = "linear" if match.group(1) == "linear" else match.group(2)
    threshold = 1.0 if kernel == "linear" else float(match.group(3))
    _kernel(kernel)
    return kernel, match.group(4) in ("song", "unbiased"), threshold


def angular_distance(cka: Tensor) -> Tensor:
    """The angular CKA distance ``arccos(CKA)`` in radians, elementwise (Williams et al. 2021).

    CKA is the cosine of the angle between two centred Gram matrices (in the Frobenius inner product; for the
    unbiased estimator, the U-centred one), so the angle is a metric on representations up to the invariances of
    CKA: it is symmetric, zero for identical representations, and obeys the triangle inequality, which CKA itself
    and ``1 - CKA`` do not. Values a finite-sample estimate puts just outside [-1, 1] are clipped first; NaN stays NaN.

    Args:
        cka: CKA values of any shape, e.g. from :func:`cka_matrix`.

    Returns:
        Angles in [0, pi] with the shape and dtype of ``cka``.

    Example:
        >>> round(float(angular_distance(torch.tensor(0.5))), 6)  # pi / 3
        1.047198
    """
    return torch.arccos(cka.clamp(-1.0, 1.0))


def angular_cka(x: Tensor, y: Tensor, *, kernel: str = "linear", unbiased: bool = False,
                threshold: float = 1.0) -> Tensor:
    """The angular CKA distance ``arccos(CKA(x, y))`` between two feature tensors (a metric; Williams et al. 2021).

    Args:
        x: Features ``(n, ...)``; trailing dimensions are flattened.
        y: Features ``(n, ...)`` with the same samples.
        kernel: A name from :func:`list_kernels`.
        unbiased: Use the unbiased HSIC of Song et al. 2012 (needs n >= 4).
        threshold: RBF bandwidth threshold.

    Returns:
        A float64 0-dim tensor in [0, pi].

    Raises:
        ToolkitError: Unknown kernel, mismatched sample counts, too few samples, NaN/Inf features.

    Example:
        >>> x = torch.randn(32, 8)
        >>> float(angular_cka(x, 2 * x)) < 1e-6
        True
    """
    return angular_distance(_pair(x, y, kernel, unbiased, threshold))
