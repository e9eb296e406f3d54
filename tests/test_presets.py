"""The authors' MSUNs (presets): parameter counts and subnet shapes against their code, equivalence, save/load."""

import json

import pytest
import timm
import torch
import torchvision
from torch import nn

from msun_builder import load_msun, save_msun
from msun_builder.presets import PAPER_MODELS, paper_msun
from scale_common.errors import ToolkitError
from scale_common.modules import count_params

# The MSUN authors' parameter totals, in millions (their torchvision-based MSUNs; the paper's figure data reads
# 26.0/8.7/141/3.9).
SPEC_MILLIONS = {"resnet50": 26.00, "densenet121": 8.72, "vgg16_bn": 141.84, "mobilenetv2_100": 3.87}
# Subnet output sides for 32 / 128 / 224 px inputs and U, as the authors' code (SmallPigPeppa/MSC) builds them.
SPEC_SIDES = {"resnet50": (34, 64, 56), "densenet121": (17, 32, 28), "vgg16_bn": (29, 31, 28),
              "mobilenetv2_100": (16, 16, 14)}
CHANNELS = {"resnet50": 256, "densenet121": 128, "vgg16_bn": 256, "mobilenetv2_100": 64}


def _conv_bn(cin, cout, k):
    return cin * cout * k * k + 2 * cout


def _authors_params(name):
    """Their total from torchvision's models (which their code builds on): the vanilla model plus what the small and
    mid subnets add (own copies of the shallow layers; the new stems in place of the 7x7 / 3x3 one)."""
    with torch.device("meta"):
        tv = {"resnet50": torchvision.models.resnet50, "densenet121": torchvision.models.densenet121,
              "vgg16_bn": torchvision.models.vgg16_bn, "mobilenetv2_100": torchvision.models.mobilenet_v2}[name]()
    vanilla = count_params(tv)
    if name == "resnet50":
        return vanilla + 2 * count_params(tv.layer1) + _conv_bn(3, 64, 3) + _conv_bn(3, 64, 5)
    if name == "densenet121":
        shared = count_params(tv.features.denseblock1) + count_params(tv.features.transition1)
        return vanilla + 2 * shared + _conv_bn(3, 64, 3) + _conv_bn(3, 64, 5)
    if name == "vgg16_bn":
        return vanilla + 2 * count_params(tv.features[:24])
    stem = count_params(tv.features[0])  # mobilenet_v2: features[:10] twice, stems 1x1 and 3x3 instead
    return vanilla + 2 * (count_params(tv.features[:10]) - stem) + _conv_bn(3, 32, 1) + _conv_bn(3, 32, 3)


def _meta(name):
    with torch.device("meta"):
        return timm.create_model(name)


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_parameter_counts_and_shapes_match_the_authors(name):
    msun = paper_msun(_meta(name))
    assert count_params(msun) == _authors_params(name)
    assert round(count_params(msun) / 1e6, 2) == SPEC_MILLIONS[name]
    sides = (*(msun.config["subnets"][str(s)]["output_side"] for s in (32, 128)), msun.unified_size)
    assert sides == SPEC_SIDES[name]
    for scale in msun.scales:
        out = msun.subnets[str(scale)](torch.zeros(2, 3, scale, scale, device="meta"))
        assert out.shape[:2] == (2, CHANNELS[name])
    assert msun.routing == [(32, 32), (128, 128), (224, 224)]


def test_resnet50_small_and_mid_stems_are_the_authors():
    msun = paper_msun(_meta("resnet50"))
    small, mid, large = (msun.subnets[s] for s in ("32", "128", "224"))
    assert (small.conv1.kernel_size, small.conv1.stride, small.conv1.padding) == ((3, 3), (1, 1), (2, 2))
    assert isinstance(small.maxpool, nn.Identity) and isinstance(mid.maxpool, nn.MaxPool2d)
    assert (mid.conv1.kernel_size, mid.conv1.padding) == ((5, 5), (2, 2)) and large.conv1.kernel_size == (7, 7)
    assert isinstance(msun.unified.layer1, nn.Identity) and not isinstance(msun.unified.layer2, nn.Identity)


def test_stems_are_the_centre_of_the_model_kernel_or_random():
    base = timm.create_model("mobilenetv2_100", pretrained=False)
    stem = base.conv_stem.weight.detach().clone()
    crop = paper_msun(base)
    torch.testing.assert_close(crop.subnets["32"].conv_stem.weight, stem[:, :, 1:2, 1:2])
    torch.testing.assert_close(crop.subnets["128"].conv_stem.weight, stem)
    assert crop.subnets["128"].conv_stem.stride == (1, 1)
    torch.testing.assert_close(crop.subnets["32"].bn1.weight, base.bn1.weight)  # the stem norm is copied
    rand = paper_msun(base, stem_init="random")
    assert not torch.equal(rand.subnets["32"].conv_stem.weight, stem[:, :, 1:2, 1:2])
    assert torch.equal(rand.subnets["32"].bn1.running_var, torch.ones(32))  # reset with its new conv
    assert rand.subnets["32"].blocks_1[0].conv_dw.stride == (1, 1)  # features[2] depthwise
    assert rand.subnets["224"].blocks_1[0].conv_dw.stride == (2, 2)
    torch.testing.assert_close(rand.subnets["32"].blocks_2[0].conv_dw.weight, base.blocks[2][0].conv_dw.weight)


def test_the_large_branch_reproduces_the_model_and_save_load_round_trips(tmp_path):
    base = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=7).eval()
    msun = paper_msun(base).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(msun(x), base(x), rtol=0, atol=0)
        small = torch.randn(2, 3, 32, 32)
        expected = msun(small)
    save_msun(msun, tmp_path)
    loaded = load_msun(tmp_path)
    assert loaded.config["preset"] == "paper" and loaded.routing == msun.routing
    with torch.no_grad():
        torch.testing.assert_close(loaded(small), expected, rtol=0, atol=0)


def test_unknown_models_and_bad_arguments_are_refused():
    with pytest.raises(ToolkitError, match="choose from resnet50"):
        paper_msun("resnet18")
    with pytest.raises(ToolkitError, match="no paper preset"):
        paper_msun(timm.create_model("test_resnet", pretrained=False))
    with pytest.raises(ToolkitError, match="3 subnets"):
        paper_msun(_meta("resnet50"), scales=(32, 224))
    with pytest.raises(ToolkitError, match="unknown stem_init"):
        paper_msun(_meta("resnet50"), stem_init="zeros")


@pytest.mark.parametrize("name", ["resnet50", "densenet121", pytest.param("vgg16_bn", marks=pytest.mark.slow)])
def test_full_size_models_run_every_branch_and_the_large_one_is_the_model(name):
    base = timm.create_model(name, pretrained=False).eval()
    with torch.no_grad():
        x = torch.randn(1, 3, 224, 224)
        reference = base(x)
        msun = paper_msun(base).eval()
        torch.testing.assert_close(msun(x), reference, rtol=0, atol=0)
        outs = msun.forward_branches(x)
    assert [tuple(f.shape[-2:]) for f in outs.features] == [(msun.unified_size,) * 2] * 3
    assert all(y.shape == (1, 1000) for y in outs.logits)


def test_msun_build_preset_paper_builds_trains_and_resumes_the_authors_design(tmp_path):
    from msun_builder.cli import build_main
    from msun_builder.config import TrainConfig
    from msun_builder.runs import RunRecord
    from msun_builder.train import build_model, resume, train

    assert build_main(["resnet50", "--preset", "paper", "--weights", "none", "--num-classes", "10",
                       "--out", str(tmp_path / "built"), "--quiet"]) == 0
    built = load_msun(tmp_path / "built")
    assert built.config["preset"] == "paper" and built.config["split"]["module"] == "layer1"
    assert build_main(["resnet50", "--preset", "paper", "--split-reduction", "4", "--weights", "none",
                       "--out", str(tmp_path / "x"), "--quiet"]) == 2  # one way to choose the split
    cfg = TrainConfig(model="resnet50", method="msun", preset="paper", stem_init="random", weights="none",
                      scales=(16, 32, 64), data="fashion-mnist-subset", epochs=1, batch_size=16, train_images=32,
                      test_images=16, holdout_images=10, routing_sizes=(16, 32, 64), device="cpu")
    run = tmp_path / "run"
    train(cfg, run, build_model(cfg, 10), progress=False)
    record = RunRecord.load(run)
    assert record.split == {"module": "layer1", "owned": ["conv1", "bn1", "act1", "maxpool", "layer1"],
                            "reduction": None}
    assert record.validation["images"] == 10 and load_msun(run / "model").config["stem_init"] == "random"
    assert resume(run, progress=False) == json.loads((run / "metrics.json").read_text())[-1]
