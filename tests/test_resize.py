"""The one resize pins the paper's protocol: bilinear, no antialias, half-pixel centres, shrink then re-enlarge."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cka_scale.analyze import rescale
from scale_common.resize import down_up, resize


def _linear_1d(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D linear interpolation with half-pixel centres, clamped at the edges."""
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(np.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        w[i, lo] += 1 - frac
        w[i, hi] += frac
    return w


def _reference(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of (H, W) to (size, size), computed independently of torch."""
    return _linear_1d(img.shape[0], size) @ img @ _linear_1d(img.shape[1], size).T


def test_halving_averages_pixel_pairs_as_the_authors_code_does():
    img = torch.arange(16.0).reshape(1, 1, 4, 4)
    expected = torch.tensor([[2.5, 4.5], [10.5, 12.5]])  # means of the 2 x 2 blocks, no wider filter
    assert torch.equal(resize(img, 2)[0, 0], expected)


@pytest.mark.parametrize("side,size", [(12, 5), (28, 8), (64, 20), (9, 9)])
def test_resize_and_down_up_match_an_independent_reference(side, size):
    rng = np.random.default_rng(side * 100 + size)
    img = rng.normal(size=(side, side))
    x = torch.from_numpy(img).reshape(1, 1, side, side)
    small = _reference(img, size)
    np.testing.assert_allclose(resize(x, size)[0, 0].numpy(), small, atol=1e-12)
    np.testing.assert_allclose(down_up(x, size)[0, 0].numpy(), _reference(small, side), atol=1e-12)
    np.testing.assert_allclose(rescale(x, size, side, "down-up")[0, 0].numpy(), _reference(small, side), atol=1e-12)
    np.testing.assert_allclose(rescale(x, size, side, "native")[0, 0].numpy(), small, atol=1e-12)


def test_an_antialiased_resize_would_fail_the_protocol():
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 1, 28, 28)))
    smooth = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    assert not torch.allclose(smooth, resize(x, 8), atol=1e-3)
    np.testing.assert_allclose(resize(x, 8)[0, 0].numpy(), _reference(x[0, 0].numpy(), 8), atol=1e-12)
