"""Layer tracing, selection and capture: metadata-driven choices, in-place safety, refusals with the fix."""

import pytest
import timm
import torch
from torch import nn

from cka_scale import ToolkitError
from cka_scale.functional import gram_linear
from cka_scale.hooks import capture_grams, parse_spatial, select_layers, trace_layers

TINY = ["test_resnet", "test_efficientnet", "test_convnext", "test_byobnet"]


@pytest.fixture(scope="module", params=TINY)
def traced(request):
    model = timm.create_model(request.param).eval()
    return request.param, model, trace_layers(model, 64)


def test_stages_are_the_feature_info_taps_in_forward_order(traced):
    _, model, infos = traced
    chosen = select_layers(model, "stages", infos)
    assert [c.name for c in chosen] == [f["module"] for f in model.feature_info]
    assert [c.reduction for c in chosen] == [f["reduction"] for f in model.feature_info]
    assert [c.shape[0] for c in chosen] == [f["num_chs"] for f in model.feature_info]
    assert all(c.tap for c in chosen)
    params = [c.cum_params for c in chosen]
    assert params == sorted(params) and 0 < params[-1] <= sum(p.numel() for p in model.parameters())


def test_blocks_refine_stages_and_all_refines_blocks(traced):
    _, model, infos = traced
    stages = select_layers(model, "stages", infos)
    blocks = select_layers(model, "blocks", infos)
    every = select_layers(model, "all", infos)
    assert len(stages) <= len(blocks) < len(every)  # test_byobnet has one block per stage
    order = [i.name for i in infos]
    assert [b.name for b in blocks] == sorted((b.name for b in blocks), key=order.index)
    assert all(len(b.shape) == 3 for b in blocks)


def test_resnet_blocks_are_the_residual_blocks():
    model = timm.create_model("test_resnet").eval()
    names = [b.name for b in select_layers(model, "blocks", trace_layers(model, 64))]
    assert "layer1.0" in names and "layer4.0" in names and "layer1.0.conv1" not in names


def test_globs_and_exact_names():
    model = timm.create_model("test_resnet").eval()
    infos = trace_layers(model, 64)
    assert [i.name for i in select_layers(model, "layer*.0", infos)] == ["layer1.0", "layer2.0", "layer3.0",
                                                                          "layer4.0"]
    assert [i.name for i in select_layers(model, "layer2,act1", infos)] == ["act1", "layer2"]
    with pytest.raises(ToolkitError, match="list-layers"):
        select_layers(model, "nonexistent*", infos)
    with pytest.raises(ToolkitError, match="list-layers"):
        select_layers(model, "layer9", infos)


class _SharedAct(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.pair = _Pair()

    def forward(self, x):
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.pair(x)[0].mean((2, 3))


class _Pair(nn.Module):
    def forward(self, x):
        return x, x * 2


def test_shared_modules_are_refused_and_tuple_outputs_measured_per_output():
    model = _SharedAct().eval()
    infos = trace_layers(model, 16)
    with pytest.raises(ToolkitError, match=r"'act' runs 2 times per forward pass.*blocks that call it"):
        select_layers(model, "act", infos)
    assert [i.name for i in select_layers(model, "pair", infos)] == ["pair[0]", "pair[1]"]
    assert [i.name for i in select_layers(model, "pair[1]", infos)] == ["pair[1]"]
    assert [i.name for i in select_layers(model, "all", infos)] == ["conv1", "conv2", "pair[0]", "pair[1]"]
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad(), capture_grams(model, ["pair[1]", "conv2", "pair[0]"],
                                        reduce=parse_spatial("flatten")) as take:
        model(x)
        grams = take()
        first = gram_linear(model.conv2(model.act(model.conv1(x))).relu().flatten(1))
    torch.testing.assert_close(grams[2], first)
    torch.testing.assert_close(grams[0], 4 * first)  # pair[1] is twice pair[0]
    with pytest.raises(ToolkitError, match=r"pair\[0\], pair\[1\]"), torch.no_grad(), \
            capture_grams(model, ["pair[2]"], reduce=parse_spatial("flatten")):
        model(x)


def test_multi_branch_stages_are_measured_per_output():
    model = timm.create_model("hrnet_w18_small").eval()
    infos = trace_layers(model, 64)
    stages = [i.name for i in select_layers(model, "stages", infos)]
    assert stages == ["stage2[0]", "stage2[1]", "stage3[0]", "stage3[1]", "stage3[2]", "stage4[0]", "stage4[1]",
                      "stage4[2]", "stage4[3]"]
    reductions = [i.reduction for i in select_layers(model, "stage4", infos)]
    assert reductions == [4, 8, 16, 32]


def test_blocks_fall_back_to_the_stage_children_without_group_matcher():
    model = timm.create_model("poolformer_s12").eval()
    assert not hasattr(model, "group_matcher")
    names = [i.name for i in select_layers(model, "blocks", trace_layers(model, 64))]
    assert names[:3] == ["stem", "stages.0.blocks.0", "stages.0.blocks.1"] and "stages.3.blocks.1" in names


def test_capture_is_safe_against_inplace_activations():
    model = timm.create_model("test_resnet").eval()
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())
    x = torch.randn(6, 3, 64, 64)
    layer = "conv1.1"  # a BatchNorm followed by an in-place ReLU
    kept = {}

    def keep(_module, _inputs, out):  # returns None, so the module output is left as it is
        kept["pre_relu"] = out.clone()

    handle = dict(model.named_modules())[layer].register_forward_hook(keep)
    with torch.no_grad(), capture_grams(model, [layer], reduce=parse_spatial("flatten")) as take:
        model(x)
        grams = take()
    handle.remove()
    assert (kept["pre_relu"] < 0).any()  # the ReLU would have clipped these
    torch.testing.assert_close(grams[0], gram_linear(kept["pre_relu"].flatten(1)))


def test_hooks_are_removed_even_on_error():
    model = timm.create_model("test_resnet").eval()
    with pytest.raises(RuntimeError), capture_grams(model, ["layer1"], reduce=parse_spatial("gap")):
        raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())


def test_spatial_reductions():
    x = torch.randn(5, 8, 6, 6)
    assert parse_spatial("flatten")(x).shape == (5, 288)
    assert parse_spatial("gap")(x).shape == (5, 8)
    assert parse_spatial("pool:2")(x).shape == (5, 32)
    assert parse_spatial("gap")(torch.randn(5, 10, 8)).shape == (5, 8)  # tokens
    for bad in ("pool:0", "avg", "pool:x"):
        with pytest.raises(ToolkitError, match="flatten, gap or pool:K"):
            parse_spatial(bad)


def test_fixed_size_model_gets_a_clear_error():
    vit = timm.create_model("vit_tiny_patch16_224").eval()  # strict 224 px input
    with pytest.raises(ToolkitError, match=r"cannot run at input size 32x32.*--resize down-up"):
        trace_layers(vit, 32)


def test_blocks_are_not_split_into_the_members_of_a_module_list():
    model = timm.create_model("res2net50_14w_8s").eval()  # Bottle2neck keeps its convs in a ModuleList
    names = [i.name for i in select_layers(model, "blocks", trace_layers(model, 64))]
    assert "layer1.0" in names and not any(".convs." in n or ".bns." in n for n in names)
    assert len(names) == 18  # conv1, bn1 and the 16 residual blocks


class _ListStages(nn.Module):
    """A stage kept in a ModuleList (never called itself), named by feature_info as CoaT does."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList([nn.Conv2d(4, 4, 3, padding=1) for _ in range(3)])
        self.feature_info = [dict(module="stem", reduction=2, num_chs=4), dict(module="blocks", reduction=2,
                                                                                num_chs=4)]

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x.mean((2, 3))


def test_a_stage_that_never_runs_itself_is_measured_at_its_last_block():
    model = _ListStages().eval()
    assert [i.name for i in select_layers(model, "stages", trace_layers(model, 16))] == ["stem", "blocks.2"]
