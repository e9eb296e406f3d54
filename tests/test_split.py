"""Splitting timm CNNs at feature_info taps: deep(shallow(x)) == model(x) at every tap, and clear refusals."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from msun_builder import Tap, list_taps, require_splittable, split_model, splittable_taps
from scale_common.errors import ToolkitError

# One small but real member per family (reduced constructor kwargs where timm has no tiny variant).
FAST_MODELS = {
    "resnet": ("test_resnet", {}),
    "efficientnet": ("test_efficientnet", {}),
    "convnext": ("test_convnext", {}),
    "byobnet": ("test_byobnet", {}),
    "densenet": ("densenet121", {"growth_rate": 8, "block_config": (1, 1, 1, 1), "num_classes": 10}),
    "vgg": ("vgg11_bn", {"mlp_ratio": 1 / 64, "num_classes": 10}),
    "mobilenetv2": ("mobilenetv2_035", {"num_classes": 10}),
    "regnet": ("regnetx_002", {"num_classes": 10}),
}
SLOW_MODELS = ["resnet50", "densenet121", "vgg16_bn", "mobilenetv2_100", "efficientnet_b0", "regnetx_002",
               "convnext_tiny", "tf_efficientnet_lite0"]


def _model(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _assert_every_tap_splits(model: nn.Module, size: int = 64) -> None:
    taps = list_taps(model)
    assert splittable_taps(model) == taps
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
    for tap in taps:
        shallow, deep = split_model(model, module=tap.module)
        assert isinstance(shallow, nn.Sequential)
        assert list(shallow.named_children())[-1][0] == tap.module.replace(".", "_")
        with torch.no_grad():
            features = shallow(x)
            got = deep(features)
        assert features.shape[1] == tap.num_chs, tap
        assert abs(features.shape[-1] - size / tap.reduction) <= 1, tap
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m, t=tap: f"{t}: {m}")
        assert not set(map(id, shallow.parameters())) & set(map(id, model.parameters()))
        assert not set(map(id, deep.parameters())) & set(map(id, model.parameters()))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("family", sorted(FAST_MODELS))
def test_every_tap_splits_fast(family: str) -> None:
    name, kwargs = FAST_MODELS[family]
    _assert_every_tap_splits(_model(name, **kwargs))


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_MODELS)
def test_every_tap_splits_real_size(name: str) -> None:
    _assert_every_tap_splits(_model(name))


def test_list_taps_reads_feature_info() -> None:
    taps = list_taps(_model("test_resnet"))
    assert [(t.module, t.reduction) for t in taps] == [("act1", 2), ("layer1", 4), ("layer2", 8), ("layer3", 16),
                                                      ("layer4", 32)]
    assert taps[1] == Tap("layer1", 4, 32)
    features = timm.create_model("test_resnet", features_only=True)
    assert [t.module for t in list_taps(features)] == ["act1", "layer1", "layer2", "layer3", "layer4"]


def test_list_taps_needs_feature_info() -> None:
    with pytest.raises(ToolkitError, match="feature_info"):
        list_taps(nn.Sequential(nn.Conv2d(3, 8, 3)))


def test_deep_part_keeps_the_head_and_identity_pieces() -> None:
    model = _model("test_efficientnet")
    shallow, deep = split_model(model, reduction=8)
    assert list(shallow._modules) == ["conv_stem", "bn1", "blocks_0", "blocks_1", "blocks_2"]
    assert isinstance(deep.conv_stem, nn.Identity) and isinstance(deep.blocks[2], nn.Identity)
    assert not isinstance(deep.blocks[3], nn.Identity) and not isinstance(model.blocks[0], nn.Identity)
    assert deep.classifier.weight is not model.classifier.weight
    torch.testing.assert_close(deep.classifier.weight, model.classifier.weight, rtol=0, atol=0)


class Toy(nn.Module):
    """stem -> act -> layer -> pool -> fc, with forward variants that break (or do not break) a split."""

    def __init__(self, mode: str = "plain", feature_info: list[dict] | None = None) -> None:
        super().__init__()
        self.mode = mode
        if mode == "reorder":  # registered layer-first, called stem-first
            self.layer = nn.Conv2d(8, 8, 3, 2, 1)
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.act = nn.ReLU()
        if mode != "reorder":
            self.layer = nn.Conv2d(8, 8, 3, 2, 1)
        self.tail = nn.Conv2d(8, 8, 3, 1, 1)
        if mode == "tied":
            self.tail.weight = self.layer.weight
        self.fc = nn.Linear(8, 4)
        self.feature_info = feature_info or [dict(module="act", reduction=2, num_chs=8),
                                             dict(module="layer", reduction=4, num_chs=8)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        if self.mode == "functional":
            x = x * 2.0 - 0.5
        x = self.layer(x)
        if self.mode == "reused":
            x = self.act(x)
        x = self.tail(x)
        return self.fc(x.mean((2, 3)))


def test_toy_plain_splits_everywhere() -> None:
    toy = Toy().eval()
    assert splittable_taps(toy) == list_taps(toy)


def test_same_reduction_takes_the_last_tap() -> None:
    toy = Toy(feature_info=[dict(module="stem", reduction=2, num_chs=8), dict(module="act", reduction=2, num_chs=8),
                            dict(module="layer", reduction=4, num_chs=8)]).eval()
    shallow, _ = split_model(toy, reduction=2)
    assert list(shallow._modules) == ["stem", "act"]


def test_functional_op_between_children_refuses_only_the_cut_that_loses_it() -> None:
    toy = Toy("functional").eval()
    assert [t.module for t in splittable_taps(toy)] == ["act"]  # the op runs in the deep part: still exact
    with pytest.raises(ToolkitError, match=r"functional op.*Taps that can be cut: act \(reduction 2\)"):
        split_model(toy, reduction=4)


def test_module_called_twice_is_refused() -> None:
    toy = Toy("reused").eval()
    assert splittable_taps(toy) == []
    with pytest.raises(ToolkitError, match=r"'act' is called 2 times.*No tap of this model can be cut"):
        split_model(toy, module="act")


def test_children_out_of_registration_order_are_refused() -> None:
    toy = Toy("reorder").eval()
    assert splittable_taps(toy) == []
    with pytest.raises(ToolkitError, match="registration order"):
        split_model(toy, reduction=2)


def test_parameter_shared_with_the_deep_part_is_refused() -> None:
    toy = Toy("tied").eval()
    assert [t.module for t in splittable_taps(toy)] == ["act"]
    with pytest.raises(ToolkitError, match=r"'tail\.weight' in the deep part is shared"):
        split_model(toy, module="layer")


def test_tap_nested_too_deep_is_refused() -> None:
    model = _model("test_resnet")
    model.feature_info = [*model.feature_info, dict(module="layer2.0.conv1", reduction=8, num_chs=48)]
    assert "layer2.0.conv1" not in [t.module for t in splittable_taps(model)]
    with pytest.raises(ToolkitError, match="nested deeper"):
        split_model(model, module="layer2.0.conv1")


def test_bad_reduction_lists_the_cuttable_taps() -> None:
    with pytest.raises(ToolkitError, match=r"no feature_info tap has reduction 3\. Taps that can be cut: act1 "
                                           r"\(reduction 2\), layer1 \(reduction 4\).*layer4 \(reduction 32\)"):
        split_model(_model("test_resnet"), reduction=3)


def test_exactly_one_of_reduction_and_module() -> None:
    model = _model("test_resnet")
    with pytest.raises(ToolkitError, match="exactly one"):
        split_model(model)
    with pytest.raises(ToolkitError, match="exactly one"):
        split_model(model, reduction=4, module="layer1")


def test_split_keeps_training_mode_and_running_stats() -> None:
    model = timm.create_model("test_resnet").train()
    stats = model.bn1.running_mean.clone()
    shallow, deep = split_model(model, reduction=4)
    assert model.training and shallow.training and deep.training
    torch.testing.assert_close(model.bn1.running_mean, stats, rtol=0, atol=0)  # the dry runs are in eval mode


def test_a_nested_tap_maps_to_the_nearest_boundary_at_its_reduction() -> None:
    model = _model("test_resnet")
    model.feature_info = [*model.feature_info[:2], dict(module="layer2.0.conv1", reduction=8, num_chs=48),
                          *model.feature_info[3:]]
    plain = [t.module for t in splittable_taps(model)]
    assert "layer2.0.conv1" not in plain
    mapped = {t.stands_for: t for t in splittable_taps(model, nearest=True) if t.stands_for}
    boundary = mapped["layer2.0.conv1"]
    assert boundary.module.startswith("layer2") and boundary.reduction == 8
    shallow, deep = split_model(model, module=boundary.module)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(deep(shallow(x)), model(x))
        assert shallow(x).shape[1] == boundary.num_chs and shallow(x).shape[-1] == 64 // 8


@pytest.mark.parametrize("name,why", [("test_vit", r"token sequences .* MSUN splits CNNs, not transformers"),
                                      ("test_mambaout", r"channels-last .*\(B, H, W, C\)")])
def test_a_model_no_cut_can_serve_is_refused_in_one_line_naming_why(name, why) -> None:
    model = _model(name)
    assert splittable_taps(model, nearest=True) == []
    with pytest.raises(ToolkitError, match=f"cannot be split into an MSUN: no feature_info tap can be cut.*{why}") \
            as info:
        require_splittable(model)
    assert "\n" not in str(info.value)
