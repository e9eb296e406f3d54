"""The scale-invariant constraint: each term, truncation, pair sets, detaching, alternatives."""

import pytest
import torch
import torch.nn.functional as F

from cka_scale import ToolkitError
from msun_builder.losses import ScaleInvariantLoss

SCALES = [32, 64, 128]


def _features(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g, requires_grad=True) for _ in SCALES]


def test_all_pairs_mse_is_the_papers_sum():
    feats = _features()
    total, logs = ScaleInvariantLoss(weight=1.0, tau=0.0)(feats, SCALES)
    expected = sum(F.mse_loss(feats[i], feats[j]) for i, j in [(0, 1), (0, 2), (1, 2)])
    torch.testing.assert_close(total, expected)
    assert set(logs) == {"si_32_64", "si_32_128", "si_64_128"}
    assert logs["si_32_64"] == pytest.approx(float(F.mse_loss(feats[0], feats[1]).detach()))


def test_terms_below_tau_are_zeroed_but_still_logged():
    feats = _features()
    close = [feats[0], feats[0] + 0.01, feats[2]]
    total, logs = ScaleInvariantLoss(tau=0.01)(close, SCALES)
    assert logs["si_32_64"] < 0.01
    expected = F.mse_loss(close[0], close[2]) + F.mse_loss(close[1], close[2])
    torch.testing.assert_close(total, expected)
    assert float(ScaleInvariantLoss(tau=100.0)(feats, SCALES)[0]) == 0.0


def test_weight_reference_pairs_and_detaching():
    feats = _features()
    full, _ = ScaleInvariantLoss(weight=1.0, tau=0.0)(feats, SCALES)
    double, _ = ScaleInvariantLoss(weight=2.0, tau=0.0)(feats, SCALES)
    torch.testing.assert_close(double, 2 * full)
    _, logs = ScaleInvariantLoss(tau=0.0, pairs="reference")(feats, SCALES)
    assert set(logs) == {"si_32_128", "si_64_128"}
    loss, _ = ScaleInvariantLoss(tau=0.0, detach_reference=True)(feats, SCALES)
    loss.backward()
    assert feats[2].grad is None and feats[0].grad is not None
    both = _features()
    ScaleInvariantLoss(tau=0.0)(both, SCALES)[0].backward()
    assert both[2].grad is not None and both[2].grad.abs().sum() > 0  # paper: gradients into both sides


@pytest.mark.parametrize("kind", ["cosine", "cka"])
def test_alternatives_vanish_for_identical_features_and_are_differentiable(kind):
    x = _features()[0]
    same, _ = ScaleInvariantLoss(tau=0.0, kind=kind)([x, x.clone()], [32, 64])
    assert abs(float(same.detach())) < 1e-5
    diff, _ = ScaleInvariantLoss(tau=0.0, kind=kind)(_features()[:2], [32, 64])
    assert float(diff.detach()) > 0.01
    diff.backward()


def test_bad_options_name_the_fix():
    with pytest.raises(ToolkitError, match="mse, cosine, cka"):
        ScaleInvariantLoss(kind="l1")
    with pytest.raises(ToolkitError, match="all or reference"):
        ScaleInvariantLoss(pairs="some")
    with pytest.raises(ToolkitError, match="one feature map per branch"):
        ScaleInvariantLoss()(_features()[:1], [32])
