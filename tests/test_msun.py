"""MSUN built from timm CNNs: exact at the reference scale, every branch at its scale, paper designs, save/load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from msun_builder import MSUN, BranchOutputs, create_msun, list_taps, load_msun, save_msun, split_model
from scale_common.errors import ToolkitError

SCALES = (16, 32, 64)
# family -> (timm name, constructor kwargs, split reduction); small members, 64 px reference.
FAST_MODELS = {
    "resnet": ("test_resnet", {}, 4),
    "efficientnet": ("test_efficientnet", {}, 8),
    "convnext": ("test_convnext", {}, 4),
    "byobnet": ("test_byobnet", {}, 8),
    "densenet": ("densenet121", {"growth_rate": 8, "block_config": (1, 1, 1, 1), "num_classes": 10}, 8),
    "vgg": ("vgg11_bn", {"mlp_ratio": 1 / 64, "num_classes": 10}, 8),
    "mobilenetv2": ("mobilenetv2_035", {"num_classes": 10}, 16),
    "regnet": ("regnetx_002", {"num_classes": 10}, 8),
}
SLOW_MODELS = {"resnet50": 4, "densenet121": 8, "vgg16_bn": 8, "mobilenetv2_100": 16, "efficientnet_b0": 8,
               "regnetx_002": 8, "convnext_tiny": 8, "tf_efficientnet_lite0": 8}
# The MSUN authors' hand-made subnets at (32, 128, 224): stride steps removed by the small and the mid subnet.
PAPER_DESIGNS = {"resnet50": (4, 2, 1), "vgg16_bn": (8, 3, 1), "mobilenetv2_100": (16, 3, 1)}


def _model(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, pretrained=False, **kwargs).eval()


def _strides(module: nn.Module) -> dict[str, object]:
    return {n: m.stride for n, m in module.named_modules() if hasattr(m, "stride")}


def _check_msun(msun: MSUN, model: nn.Module, scales: tuple[int, ...], reduction: int) -> None:
    ref = scales[-1]
    tap = [t for t in list_taps(model) if t.reduction == reduction][-1]
    assert msun.scales == scales and list(msun.subnets) == [str(s) for s in scales]
    assert msun.config["split"] == {"module": tap.module, "reduction": reduction, "num_chs": tap.num_chs}
    x = torch.randn(2, 3, ref, ref)
    with torch.no_grad():
        torch.testing.assert_close(msun(x), model(x), rtol=1e-5, atol=1e-5)
        outs = msun.forward_branches(torch.randn(2, 3, 40, 40))
    assert isinstance(outs, BranchOutputs) and len(outs.logits) == len(scales) == len(outs.features)
    u = msun.unified_size
    for logits, feats in zip(outs.logits, outs.features, strict=True):
        assert logits.shape == (2, model.num_classes) and torch.isfinite(logits).all()
        assert feats.shape == (2, tap.num_chs, u, u)
    reference = msun.subnets[str(ref)]
    for scale in scales:
        subnet, plan = msun.subnets[str(scale)], msun.config["subnets"][str(scale)]
        if scale != ref:  # its own copy of the original weights, strides removed from the front only
            assert not set(map(id, subnet.parameters())) & set(map(id, reference.parameters()))
            own, orig = subnet.state_dict(), reference.state_dict()
            assert all(torch.equal(own[k], orig[k]) for k in orig)
        changed = [n for n, s in _strides(subnet).items() if s != _strides(reference)[n]]
        assert sorted(changed) == sorted(plan["destrided"])
        with torch.no_grad():
            side = subnet(torch.randn(1, 3, scale, scale)).shape[-1]
        assert side == plan["output_side"] and 0.5 <= side / u <= 2.0, (scale, side, u)
    shallow, _ = split_model(model, reduction=reduction)  # the reference subnet is the model's own shallow part
    assert _strides(reference) == _strides(shallow)
    own, orig = reference.state_dict(), shallow.state_dict()
    assert own.keys() == orig.keys() and all(torch.equal(own[k], orig[k]) for k in orig)


@pytest.mark.parametrize("family", sorted(FAST_MODELS))
def test_msun_fast_families(family: str) -> None:
    name, kwargs, reduction = FAST_MODELS[family]
    model = _model(name, **kwargs)
    msun = create_msun(model, SCALES, split_reduction=reduction)
    _check_msun(msun, model, SCALES, reduction)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_MODELS))
def test_msun_real_size(name: str) -> None:
    model = _model(name)
    msun = create_msun(model, (32, 128, 224), split_reduction=SLOW_MODELS[name])
    _check_msun(msun, model, (32, 128, 224), SLOW_MODELS[name])


@pytest.mark.parametrize("name", sorted(PAPER_DESIGNS))
def test_removed_steps_match_the_authors_designs(name: str) -> None:
    reduction, small, mid = PAPER_DESIGNS[name]
    # the real architecture with a 10-class head (the head does not change the shallow part, and builds faster)
    msun = create_msun(_model(name, num_classes=10), (32, 128, 224), split_reduction=reduction, verify=False)
    steps = {s: p["removed_steps"] for s, p in msun.config["subnets"].items()}
    assert steps == {"32": small, "128": mid, "224": 0}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAPER_DESIGNS))
def test_removed_steps_match_the_authors_designs_by_name(name: str) -> None:
    reduction, small, mid = PAPER_DESIGNS[name]
    msun = create_msun(name, (32, 128, 224), split_reduction=reduction)
    assert [msun.config["subnets"][str(s)]["removed_steps"] for s in (32, 128, 224)] == [small, mid, 0]
    assert msun.config["model"] == name and msun.config["num_classes"] == 1000


def test_resnet_subnets_remove_the_stem_strides() -> None:
    msun = create_msun("test_resnet", SCALES, split_reduction=4)
    assert msun.unified_size == 16 and msun.config["weights"].startswith("none")
    assert msun.config["subnets"]["16"]["destrided"] == ["conv1.0", "maxpool"]
    assert msun.config["subnets"]["32"]["destrided"] == ["conv1.0"]
    assert msun.subnets["16"].maxpool.stride == 1 and msun.subnets["64"].maxpool.stride == 2
    assert msun.subnets["16"].maxpool.kernel_size == 3  # kernels are kept


def test_residual_step_destrides_conv_and_shortcut_together() -> None:
    msun = create_msun("test_byobnet", SCALES, split_reduction=8)
    plan = msun.config["subnets"]["16"]
    assert plan["destrided"] == ["stem.conv", "stages_0.0.conv1_kxk.conv", "stages_0.0.shortcut.pool"]
    assert plan["pool_kernel_1"] == ["stages_0.0.shortcut.pool"]  # a 2x2 stride-1 avg pool would break the add


def test_forward_routes_by_size_and_matches_forward_branch() -> None:
    msun = create_msun("test_resnet", SCALES, split_reduction=4)
    assert msun.routing == [(16, 16), (32, 32), (64, 64)]
    assert [msun.route(s) for s in (1, 16, 17, 32, 33, 64, 500)] == [16, 16, 32, 32, 64, 64, 64]
    with torch.no_grad():
        for side, scale in ((12, 16), (20, 32), (40, 64), (96, 64)):
            x = torch.randn(1, 3, side, side)
            torch.testing.assert_close(msun(x), msun.forward_branch(x, scale)[0], rtol=0, atol=0)
        wide = torch.randn(1, 3, 16, 64)  # side round(sqrt(1024)) = 32 -> the 32 subnet, on a 32x32 resize
        torch.testing.assert_close(msun(wide), msun.forward_branch(wide, 32)[0], rtol=0, atol=0)
        _, feats = msun.forward_branch(wide, 32)
        manual = msun.subnets["32"](F.interpolate(wide, size=(32, 32), mode="bilinear", align_corners=False))
        torch.testing.assert_close(feats, F.interpolate(manual, size=(16, 16), mode="bilinear", align_corners=False))
    with pytest.raises(ToolkitError, match="no subnet for scale 48"):
        msun.forward_branch(wide, 48)


def test_default_routing_for_the_paper_scales_and_custom_routing() -> None:
    model = _model("test_resnet")
    msun = create_msun(model, (32, 128, 224), split_reduction=4, verify=False)
    assert msun.routing == [(32, 32), (128, 128), (224, 224)]  # the authors' assignment (tests/test_routing.py)
    assert [msun.route(s) for s in (32, 64, 128, 160)] == [32, 128, 128, 224]
    custom = create_msun(model, (32, 128, 224), split_reduction=4, routing=[(152, 128), (40, 32), (9999, 224)],
                         verify=False)
    assert custom.routing == [(40, 32), (152, 128), (9999, 224)] and custom.route(48) == 128
    assert custom.config["routing"] == [[40, 32], [152, 128], [9999, 224]]
    with pytest.raises(ToolkitError, match=r"scale\(s\) \[64\] that have no subnet"):
        create_msun(model, (32, 128, 224), split_reduction=4, routing=[(100, 64), (300, 224)])


def test_branches_train_end_to_end() -> None:
    msun = create_msun("test_resnet", SCALES, split_reduction=4).train()
    outs = msun.forward_branches(torch.randn(4, 3, 64, 64))
    loss = sum(F.cross_entropy(y, torch.zeros(4, dtype=torch.long)) for y in outs.logits)
    loss = loss + F.mse_loss(outs.features[0], outs.features[2])
    loss.backward()
    for scale in SCALES:
        assert msun.subnets[str(scale)].conv1[0].weight.grad.abs().sum() > 0
    assert msun.unified.fc.weight.grad is not None


def test_create_msun_leaves_the_module_untouched() -> None:
    model = _model("test_resnet")
    strides, state = _strides(model), {k: v.clone() for k, v in model.state_dict().items()}
    create_msun(model, SCALES, split_reduction=4)
    assert _strides(model) == strides
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_module_arguments_must_agree_with_the_module() -> None:
    model = _model("test_resnet")
    assert create_msun(model, SCALES, split_reduction=4, num_classes=1000).unified.fc.out_features == 1000
    with pytest.raises(ToolkitError, match=r"reset_classifier\(7\)"):
        create_msun(model, SCALES, split_reduction=4, num_classes=7)
    with pytest.raises(ToolkitError, match="weights= applies to model names"):
        create_msun(model, SCALES, split_reduction=4, weights="auto")


@pytest.mark.parametrize("scales", [(64,), (64, 64), (4, 64), (32.0, 64), "64", (True, 64)])
def test_bad_scales(scales: object) -> None:
    with pytest.raises(ToolkitError, match="scales"):
        create_msun("test_resnet", scales, split_reduction=4)


def test_split_choice_is_required_once() -> None:
    with pytest.raises(ToolkitError, match="exactly one of split_reduction"):
        create_msun("test_resnet", SCALES)
    with pytest.raises(ToolkitError, match="exactly one of split_reduction"):
        create_msun("test_resnet", SCALES, split_reduction=4, report={"scales": []})


def test_split_module_cuts_after_exactly_that_tap() -> None:
    msun = create_msun("test_resnet", SCALES, split_module="layer2")
    assert msun.config["split"]["module"] == "layer2" and msun.config["split"]["reduction"] == 8
    with pytest.raises(ToolkitError, match=r"'layer9' is not a tap the surgery can cut; choose one of: act1"):
        create_msun("test_resnet", SCALES, split_module="layer9")
    with pytest.raises(ToolkitError, match="exactly one of split_reduction"):
        create_msun("test_resnet", SCALES, split_reduction=8, split_module="layer2")


def test_split_module_picks_between_taps_that_share_a_stride() -> None:
    """--auto-split records the tap it chose: a stride alone names the deepest cuttable tap at that stride."""
    from cka_scale.models import load_model
    from msun_builder.config import TrainConfig
    from msun_builder.train import build_model

    loaded = load_model("test_resnet", "none", num_classes=10)
    loaded.model.feature_info.insert(1, {"num_chs": 32, "reduction": 4, "module": "maxpool"})  # two taps at stride 4
    assert create_msun(loaded, SCALES, split_reduction=4).config["split"]["module"] == "layer1"
    assert create_msun(loaded, SCALES, split_module="maxpool").config["split"]["module"] == "maxpool"
    cfg = TrainConfig(model="test_resnet", weights="none", scales=SCALES, split_reduction=4, split_module="maxpool",
                      device="cpu")
    assert build_model(cfg, 10, base=loaded).facts["split"] == {"module": "maxpool", "reduction": 4}


def test_bad_split_reduction_lists_the_valid_taps() -> None:
    with pytest.raises(ToolkitError, match=r"reduction 5\. Taps that can be cut: act1 \(reduction 2\), layer1 "):
        create_msun("test_resnet", SCALES, split_reduction=5)


def test_unknown_model_name_suggests() -> None:
    with pytest.raises(ToolkitError, match="resnet50"):
        create_msun("resnet5O", SCALES, split_reduction=4)


def _same_outputs(a: MSUN, b: MSUN, side: int) -> None:
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        out_a, out_b = a.forward_branches(x), b.forward_branches(x)
    for p, q in zip(out_a.logits + out_a.features, out_b.logits + out_b.features, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name,reduction", [("test_resnet", 4), ("test_byobnet", 8), ("test_efficientnet", 16)])
def test_save_load_round_trip_is_exact(tmp_path: Path, name: str, reduction: int) -> None:
    msun = create_msun(name, SCALES, split_reduction=reduction, num_classes=7)
    with torch.no_grad():  # non-default statistics, so that buffers are really restored
        for module in msun.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
    assert save_msun(msun, tmp_path / "out") == tmp_path / "out"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["msun.json", "msun.safetensors"]
    loaded = load_msun(tmp_path / "out")
    assert not loaded.training and loaded.config == json.loads(json.dumps(msun.config))
    assert loaded.scales == msun.scales and loaded.routing == msun.routing and loaded.unified_size == msun.unified_size
    own, back = msun.state_dict(), loaded.state_dict()
    assert own.keys() == back.keys() and all(torch.equal(own[k], back[k]) for k in own)
    _same_outputs(msun, loaded, 50)


@pytest.mark.slow
def test_save_load_real_size(tmp_path: Path) -> None:
    msun = create_msun("efficientnet_b0", (32, 128, 224), split_reduction=8)
    loaded = load_msun(save_msun(msun, tmp_path))
    _same_outputs(msun, loaded, 160)


def test_load_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ToolkitError, match=r"lacks msun\.json and msun\.safetensors"):
        load_msun(tmp_path / "nowhere")
    save_msun(create_msun("test_resnet", SCALES, split_reduction=4), tmp_path)
    (tmp_path / "msun.safetensors").unlink()
    with pytest.raises(ToolkitError, match=r"lacks msun.safetensors: give the folder written by save_msun"):
        load_msun(tmp_path)


def test_load_config_weights_mismatch(tmp_path: Path) -> None:
    save_msun(create_msun("test_resnet", SCALES, split_reduction=4), tmp_path / "a")
    save_msun(create_msun("test_resnet", SCALES, split_reduction=8), tmp_path / "b")
    shutil.copy(tmp_path / "b" / "msun.safetensors", tmp_path / "a" / "msun.safetensors")
    with pytest.raises(ToolkitError, match=r"msun\.safetensors does not match .*msun\.json"):
        load_msun(tmp_path / "a")
    config = json.loads((tmp_path / "b" / "msun.json").read_text())
    del config["routing"]
    (tmp_path / "b" / "msun.json").write_text(json.dumps(config))
    with pytest.raises(ToolkitError, match="lacks routing"):
        load_msun(tmp_path / "b")


class _PlainCNN(nn.Module):
    """A CNN with feature_info that is not a timm model (no pretrained_cfg)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.layer = nn.Conv2d(8, 16, 3, 2, 1)
        self.fc = nn.Linear(16, 3)
        self.num_classes = 3
        self.feature_info = [dict(module="stem", reduction=2, num_chs=8), dict(module="layer", reduction=4, num_chs=16)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer(torch.relu(self.stem(x))).mean((2, 3)))


def test_non_timm_model_builds_but_cannot_be_saved(tmp_path: Path) -> None:
    model = _PlainCNN().eval()
    msun = create_msun(model, (16, 32), split_reduction=2)
    assert msun.config["subnets"]["16"]["removed_steps"] == 1
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(msun(x), model(x), rtol=0, atol=0)
    with pytest.raises(ToolkitError, match="not a timm model"):
        save_msun(msun, tmp_path)
    assert not any(tmp_path.iterdir())


def test_model_with_extra_constructor_kwargs_cannot_be_saved(tmp_path: Path) -> None:
    name, kwargs, reduction = FAST_MODELS["densenet"]
    msun = create_msun(_model(name, **kwargs), SCALES, split_reduction=reduction)
    with pytest.raises(ToolkitError, match="without extra constructor arguments"):
        save_msun(msun, tmp_path)


def test_a_channels_last_model_is_refused_before_the_surgery() -> None:
    with pytest.raises(ToolkitError, match=r"test_mambaout cannot be split into an MSUN.*channels-last"):
        create_msun("test_mambaout", scales=(32, 64), split_reduction=4)


def test_a_nested_tap_is_cut_at_its_boundary_and_round_trips(tmp_path: Path) -> None:
    base = timm.create_model("xception41").eval()
    msun = create_msun(base, scales=(32, 64), split_reduction=4)
    assert msun.config["split"] == {"module": "blocks.0", "reduction": 4, "num_chs": 128,
                                    "stands_for": "blocks.1.stack.act3"}
    save_msun(msun, tmp_path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(load_msun(tmp_path)(x), msun.eval()(x), rtol=0, atol=0)


def test_msun_build_refuses_a_vision_transformer_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from msun_builder.cli import build_main

    assert build_main(["test_vit", "--weights", "none", "--split-reduction", "4", "--scales", "32,64",
                       "--out", "/nonexistent/never-written"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "token sequences" in err and "not transformers" in err
