"""Kernel Gram matrices for CKA: linear and RBF (Kornblith's median bandwidth), from centred features.

Kornblith, Norouzi, Lee & Hinton 2019, "Similarity of Neural Network Representations Revisited": the RBF bandwidth
is sigma = threshold * sqrt(median squared distance). Features are shifted by their first sample before any Gram or
distance is formed (one copy at most; a constant feature becomes exact zeros), the linear Gram is then double-centred
on the n x n matrix, and Grams are formed in the input dtype on its device (half precision is upcast to float32),
in IEEE float32 whatever the TF32 setting.
Kernels are registered by name in :data:`KERNELS`; :mod:`cka_scale.functional` turns Grams into HSIC and CKA.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from scale_common.errors import ToolkitError

__all__ = ["KERNELS", "flatten_features", "gram", "gram_linear", "gram_rbf", "list_kernels", "true_float32"]

def flatten_features(x: Tensor) -> Tensor:
    """Flatten the trailing dimensions of ``x`` per sample: ``(n, ...)`` -> ``(n, d)``; ``(n,)`` -> ``(n, 1)``.

    Args:
        x: Features with the samples on the first axis, e.g. a conv map ``(n, C, H, W)``.

    Returns:
        A ``(n, d)`` view (or copy, when the layout needs one) of ``x``.

    Raises:
        ToolkitError: ``x`` is a 0-dim tensor.
    """
    if x.ndim == 0:
        raise ToolkitError("features must have a sample axis: got a 0-dim tensor, expected (n, ...)")
    return x.reshape(x.shape[0], -1)


def _prepare(x: Tensor, label: str) -> Tensor:
    """Flatten; reject non-tensors, complex values and empty batches (the upcast of half precision comes later)."""
    if not isinstance(x, Tensor):
        raise ToolkitError(f"{label} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_complex():
        raise ToolkitError(f"{label} is complex ({x.dtype}): CKA takes real features")
    x = flatten_features(x)
    if x.shape[0] == 0:
        raise ToolkitError(f"{label} has no samples")
    return x


def _check_finite(g: Tensor, label: str) -> None:
    """Reject a non-finite Gram: a NaN or Inf anywhere in the features makes their centred Gram non-finite.

    Testing the n x n Gram instead of the n x d features costs no pass over the activation and no temporary of its
    size (``isfinite`` on a float32 map allocates 1.75 copies of it); one float64 sum reads the Gram once (NaN and
    Inf propagate through it; float32 entries cannot overflow it). The capture hooks and the HSIC engine skip even
    this (``check=False``, no host-device synchronisation per layer): the HSIC terms test all Grams at once.
    """
    if not bool(torch.isfinite(g.sum(dtype=torch.float64))):
        raise ToolkitError(f"{label} contains NaN or Inf (or its Gram overflows {g.dtype}: cast it to float64)")


def _chunk_elements(device: torch.device) -> int:
    """Elements per column chunk of :func:`_shifted_gram`.

    1 MiB on the CPU (the shifted chunk is still in cache for its GEMM; 1 to 16 MiB measured alike in time on 2 cores,
    and larger ones let half-precision upcasts leave more behind in the heap), 64 MiB on an accelerator (few launches).
    """
    return 1 << 18 if device.type == "cpu" else 1 << 24


def _shifted_gram(x: Tensor) -> Tensor:
    """``Y Y^T`` with ``Y = X - x_0`` (every sample minus the first), in IEEE float32 (or float64 for float64 input).

    Shifting by one sample makes a constant feature exactly zero and leaves the rest about centred, so the float32
    Gram loses little to cancellation. ``Y`` is never materialised: column chunks of it pass through one small buffer,
    each straight into its GEMM, so an activation map costs no full-size copy, no page faults for a fresh one, and one
    pass over memory beside the GEMM's (half precision and integers are upcast chunk by chunk). With autograd, ``Y`` is
    formed whole (one copy).
    """
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    n, d = x.shape
    step = max(1, _chunk_elements(x.device) // n)
    with true_float32():
        if x.requires_grad or d <= step:
            y = x.to(dtype)
            y = y - y[:1]
            return y @ y.T
        x0 = x[0].to(dtype)
        g = torch.zeros(n, n, dtype=dtype, device=x.device)
        buf = torch.empty(n, step, dtype=dtype, device=x.device)
        same = x.dtype == dtype
        for a in range(0, d, step):
            y = buf[:, : min(step, d - a)]
            if same:  # one op per chunk: the dispatch overhead adds up over thousands of chunks
                torch.sub(x[:, a : a + y.shape[1]], x0[a : a + y.shape[1]], out=y)
            else:
                y.copy_(x[:, a : a + y.shape[1]]).sub_(x0[a : a + y.shape[1]])
            g.addmm_(y, y.T)
        return g


def _double_centre(g: Tensor) -> Tensor:
    """``H G H`` with ``H = I - 11^T/n``, the Gram of the centred features, for ``(n, n)`` or a stack ``(..., n, n)``.

    Computed in float64 and returned in ``g``'s dtype. The entries ``g_ij - (r_i + r_j) + t`` (row means ``r``,
    grand mean ``t``) keep an exactly symmetric ``g`` exactly symmetric. After the shift the features' mean is
    about one sample's spread, so the float32 Gram loses at most a bit or two to the cancellation, and a constant
    feature contributes exact zeros.
    """
    g64 = g.to(torch.float64)
    r = g64.mean(dim=-1, keepdim=True)  # (..., n, 1); a stack of Grams is centred at once
    return (g64 - (r + r.mT) + r.mean(dim=-2, keepdim=True)).to(g.dtype)


@contextmanager
def true_float32() -> Iterator[None]:
    """Run float32 matmuls in full IEEE float32 inside the block (no TF32 or bf16 passes), then restore the setting.

    ``torch.set_float32_matmul_precision("high")`` (or ``allow_tf32 = True``) makes CUDA GEMMs round their inputs to
    TF32's 10-bit mantissa; a Gram formed so loses about three decimal digits. The setting is a process-wide flag read
    when a kernel is launched, so switching it around the Gram GEMM leaves the model's own layers as the user set them.
    """
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _linear_kernel(x: Tensor, threshold: float, label: str, check: bool = True, centred: bool = True) -> Tensor:
    """Registry entry for ``linear`` (``threshold`` does not apply).

    ``centred=False`` returns the Gram of the shifted features (:func:`_shifted_gram`) without the double centring:
    biased and unbiased HSIC are invariant to a translation of the features (``K -> K + a 1^T + 1 a^T + c 1 1^T``), so
    the HSIC engine and the capture hooks skip that n x n pass.
    """
    g = _shifted_gram(_prepare(x, label))
    if check:
        _check_finite(g, label)
    return _double_centre(g) if centred else g


def _rbf_kernel(x: Tensor, threshold: float, label: str, check: bool = True, centred: bool = True) -> Tensor:
    """Registry entry for ``rbf``: Kornblith's median rule on squared distances between samples.

    Distances do not change under a translation, so ``centred`` changes nothing here.

    Off the CPU the median stays on the device (no synchronisation); the sigma -> 0 limit is then chosen elementwise.
    """
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold > 0):
        raise ToolkitError(f"the RBF threshold must be a positive number, got {threshold!r}")
    d = _shifted_gram(_prepare(x, label))  # distances do not change under a shift: no centring needed
    if check:
        _check_finite(d, label)
    sq = d.diagonal().clone()
    # -2 g_ij + g_ii + g_jj: the diagonal comes out exactly 0; a rounding residue below 0 is set to 0, as d^2 >= 0.
    d.mul_(-2).add_(sq[:, None]).add_(sq[None, :]).clamp_min_(0)
    median = _median_of_all(d)
    # sigma -> 0 limit: 1 where samples coincide, else 0 (all ones for constant features); d * 0 keeps a NaN a NaN
    if not isinstance(median, Tensor):
        if median == 0:
            return (d == 0).to(d.dtype).add_(d.mul(0))
        return d.mul_(-1.0 / (2.0 * threshold**2 * median)).exp_()
    zero = median == 0
    limit = (d == 0).to(d.dtype).add_(d.mul(0))
    safe = torch.where(zero, torch.ones_like(median), median)
    return torch.where(zero, limit, d.mul(-1.0 / (2.0 * threshold**2)).div(safe).exp())


# Devices whose order statistics NumPy computes (introselect, no device to wait for); elsewhere they stay on the device.
_HOST_SELECT = ("cpu",)


@lru_cache(maxsize=2)
def _upper_index(n: int, device: torch.device) -> Tensor:
    """Flat indices of the strict upper triangle of an n x n matrix (cached: 16 MiB at n=2048)."""
    rows, cols = torch.triu_indices(n, n, 1, device=device)
    return rows * n + cols


def _median_of_all(d: Tensor) -> float | Tensor:
    """Exact median of all n^2 entries of a symmetric, non-negative, zero-diagonal distance matrix.

    The n^2 multiset is n zeros plus each off-diagonal value twice, so position k >= n of the sorted whole is entry
    (k - n) // 2 of the sorted upper triangle: one selection on n(n-1)/2 values. An even count averages the two middle
    values (``torch.median`` would return the lower one). When ``d`` requires grad, the median is a 0-dim tensor
    gathered from the entries that hold the selected values, so the bandwidth's gradient flows through them.
    """
    n = d.shape[0]
    total = n * n
    wanted = sorted({(total - 1) // 2, total // 2})
    upper_pos = sorted({(k - n) // 2 for k in wanted if k >= n})
    values: dict[int, float | Tensor] = {}
    if upper_pos:
        index = _upper_index(n, d.device)
        u = d.detach().reshape(-1).take(index)
        select = _select_numpy if u.device.type in _HOST_SELECT else _select_torch
        values = dict(zip(upper_pos, select(u, upper_pos), strict=True))
        if d.requires_grad:
            flat = d.reshape(-1)
            values = {j: flat[index[torch.nonzero(u == v)[0, 0]]] for j, v in values.items()}
    picked = [values[(k - n) // 2] if k >= n else 0.0 for k in wanted]
    return sum(picked) / len(picked)


def _select_numpy(u: Tensor, positions: list[int]) -> list[float]:
    """Order statistics of a CPU vector: one introselect for all positions."""
    part = np.partition(u.numpy(), positions)
    return [float(part[j]) for j in positions]


def _select_torch(u: Tensor, positions: list[int]) -> list[Tensor]:
    """Order statistics at one or two adjacent positions, as 0-dim tensors on ``u``'s device (no synchronisation).

    One selection, then the next position is a tie with it or the smallest value above it (a masked minimum).
    """
    low = torch.kthvalue(u, positions[0] + 1).values
    out = [low]
    if len(positions) == 2:
        above = torch.where(u > low, u, torch.full_like(u, math.inf)).min()
        out.append(torch.where((u <= low).sum() > positions[1], low, above))
    return out


KERNELS: dict[str, Callable[..., Tensor]] = {"linear": _linear_kernel, "rbf": _rbf_kernel}
"""Kernel name -> implementation, called as ``fn(x, threshold, label, check=True, centred=True)``; ``label`` names ``x``
in error messages; ``check=False`` leaves the finiteness test to the caller (see :func:`_check_finite`);
``centred=False`` may return the Gram of translated features, for HSIC, which does not see the difference."""


def list_kernels() -> list[str]:
    """Names accepted by :func:`gram`, :func:`cka_matrix` and the accumulator, sorted."""
    return sorted(KERNELS)


def _kernel(name: str) -> Callable[..., Tensor]:
    if name not in KERNELS:
        raise ToolkitError(f"unknown kernel {name!r}: choose one of {', '.join(list_kernels())}")
    return KERNELS[name]


def gram_linear(x: Tensor) -> Tensor:
    """Linear Gram matrix of centred features, ``Xc Xc^T`` with ``Xc = X - mean(X)`` (so it is double-centred).

    Formed in the input dtype on its device; float16/bfloat16 (and integer) inputs are upcast to float32 first.

    Args:
        x: Features ``(n, ...)``; trailing dimensions are flattened per sample.

    Returns:
        The ``(n, n)`` Gram matrix.

    Raises:
        ToolkitError: ``x`` is empty, complex, or contains NaN or Inf.
    """
    return _linear_kernel(x, 1.0, "x")


def gram_rbf(x: Tensor, threshold: float = 1.0) -> Tensor:
    """RBF Gram matrix ``exp(-|x_i - x_j|^2 / (2 sigma^2))`` with Kornblith et al.'s median bandwidth rule.

    ``sigma^2 = threshold^2 * median`` of all n^2 squared distances between centred samples (diagonal zeros included;
    an even count takes the mean of the two middle values). Formed in the input dtype on its device; float16/bfloat16
    inputs are upcast to float32. Gradients flow through the bandwidth too. When the median is 0 (more than half of
    all pairs coincide, e.g. features constant across the batch) the Gram is the sigma -> 0 limit, 1 where two samples
    coincide and 0 elsewhere: all ones for constant features, whose centred Gram is zero, so their CKA comes out NaN
    with a :class:`DegenerateCKAWarning` downstream.

    Args:
        x: Features ``(n, ...)``; trailing dimensions are flattened per sample.
        threshold: Bandwidth as a fraction of the median distance (Kornblith et al.'s demo uses 0.5).

    Returns:
        The ``(n, n)`` Gram matrix.

    Raises:
        ToolkitError: ``x`` is empty, complex or not finite, or ``threshold`` is not positive.
    """
    return _rbf_kernel(x, threshold, "x")


def gram(x: Tensor, kernel: str = "linear", *, threshold: float = 1.0) -> Tensor:
    """Gram matrix of ``x`` under a kernel from :data:`KERNELS` (see :func:`list_kernels`).

    Args:
        x: Features ``(n, ...)``; trailing dimensions are flattened per sample.
        kernel: ``"linear"`` or ``"rbf"``.
        threshold: RBF bandwidth threshold (ignored by the linear kernel).

    Returns:
        The ``(n, n)`` Gram matrix, in the input dtype (float32 for half precision) on its device.

    Raises:
        ToolkitError: Unknown kernel (the message lists the valid ones) or bad features.
    """
    return _kernel(kernel)(x, threshold, "x")
