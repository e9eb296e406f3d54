"""Float64 NumPy reference for CKA, written from the formulas and kept slow and literal on purpose.

Kornblith et al. 2019 (CKA, RBF median rule over all n^2 squared distances); Gretton et al. 2005 (biased HSIC,
explicit double centring with H = I - 11^T/n); Song et al. 2012, eq. 5 (unbiased HSIC, term by term); Nguyen, Raghu &
Kornblith 2021 (minibatch CKA: sums of per-batch unbiased HSIC, normalised at the end).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def features(x) -> np.ndarray:
    """(n, ...) -> (n, d) float64; a 1-D input becomes one feature."""
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


def gram_linear(x) -> np.ndarray:
    x = features(x)
    return x @ x.T


def sq_distances(x) -> np.ndarray:
    """|x_i - x_j|^2 from explicit differences (no Gram identity)."""
    x = features(x)
    diff = x[:, None, :] - x[None, :, :]
    return np.einsum("ijk,ijk->ij", diff, diff)


def gram_rbf(x, threshold: float = 1.0, *, large: bool = False) -> np.ndarray:
    """RBF Gram, sigma^2 = threshold^2 * median of all n^2 squared distances (np.median: mean of the middle two).

    ``large`` computes distances through the Gram identity, for sizes where n^2 d differences do not fit in memory.
    """
    if large:
        x = features(x)
        x = x - x.mean(0)
        g = x @ x.T
        d = np.diag(g)[:, None] + np.diag(g)[None, :] - 2 * g
        np.fill_diagonal(d, 0.0)
    else:
        d = sq_distances(x)
    return np.exp(-d / (2.0 * threshold**2 * np.median(d)))


def hsic_biased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """tr(HKH HLH) / (n-1)^2 with an explicit centring matrix H."""
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.sum((h @ k @ h) * (h @ l @ h)) / (n - 1) ** 2)


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Song et al. 2012 eq. 5: [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))."""
    n = k.shape[0]
    kt, lt = k.copy(), l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    one = np.ones(n)
    term1 = np.trace(kt @ lt)
    term2 = (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one @ kt @ lt @ one)
    return float((term1 + term2 - term3) / (n * (n - 3)))


def hsic(k: np.ndarray, l: np.ndarray, unbiased: bool) -> float:  # noqa: E741
    return hsic_unbiased(k, l) if unbiased else hsic_biased(k, l)


def kernel_gram(x, kernel: str, threshold: float = 1.0, *, large: bool = False) -> np.ndarray:
    return gram_linear(x) if kernel == "linear" else gram_rbf(x, threshold, large=large)


def cka(x, y, kernel: str = "linear", unbiased: bool = False, threshold: float = 1.0) -> float:
    k, l = kernel_gram(x, kernel, threshold), kernel_gram(y, kernel, threshold)  # noqa: E741
    return hsic(k, l, unbiased) / np.sqrt(hsic(k, k, unbiased) * hsic(l, l, unbiased))


def centred(k: np.ndarray) -> np.ndarray:
    """HKH written out: subtract row and column means, add back the grand mean (O(n^2), no n x n H)."""
    return k - k.mean(0)[None, :] - k.mean(1)[:, None] + k.mean()


def hsic_biased_vec(kc: np.ndarray, lc: np.ndarray) -> float:
    """Biased HSIC from already centred Grams: <HKH, HLH>_F / (n-1)^2."""
    return float(np.sum(kc * lc) / (kc.shape[0] - 1) ** 2)


def hsic_unbiased_vec(kt: np.ndarray, lt: np.ndarray) -> float:
    """Song et al. eq. 5 on zero-diagonal Grams, each term in O(n^2): tr(K~L~) = sum(K~ * L~), 1'K~L~1 = (K~1).(L~1)."""
    n = kt.shape[0]
    term1 = np.sum(kt * lt)
    term2 = kt.sum() * lt.sum() / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (kt.sum(1) @ lt.sum(1))
    return float((term1 + term2 - term3) / (n * (n - 3)))


def cka_matrix(xs: Sequence, ys: Sequence | None = None, kernel: str = "linear", unbiased: bool = False,
               threshold: float = 1.0, *, large: bool = False) -> np.ndarray:
    """All pairs, one at a time; ``large`` uses the O(n^2)-per-pair forms of the same formulas (for benchmarks)."""
    gx = [kernel_gram(x, kernel, threshold, large=large) for x in xs]
    gy = gx if ys is None else [kernel_gram(y, kernel, threshold, large=large) for y in ys]
    if large:
        prep = (lambda g: g - np.diag(np.diag(g))) if unbiased else centred
        gx = [prep(g) for g in gx]
        gy = gx if ys is None else [prep(g) for g in gy]
    pair = (hsic_unbiased_vec if unbiased else hsic_biased_vec) if large else (lambda a, b: hsic(a, b, unbiased))
    sx = [pair(k, k) for k in gx]
    sy = sx if ys is None else [pair(k, k) for k in gy]
    out = np.empty((len(gx), len(gy)))
    for i, kx in enumerate(gx):
        for j, ky in enumerate(gy):
            if ys is None and j < i:
                out[i, j] = out[j, i]
                continue
            out[i, j] = pair(kx, ky) / np.sqrt(sx[i] * sy[j])
    return out


def minibatch_cka_matrix(batches: Sequence[Sequence], kernel: str = "linear", threshold: float = 1.0) -> np.ndarray:
    """Nguyen et al. 2021: sum the unbiased HSIC of every pair over the batches, then normalise."""
    m = len(batches[0])
    total = np.zeros((m, m))
    for batch in batches:
        grams = [kernel_gram(x, kernel, threshold) for x in batch]
        total += np.array([[hsic_unbiased(kx, ky) for ky in grams] for kx in grams])
    d = np.sqrt(np.diag(total))
    return total / np.outer(d, d)
