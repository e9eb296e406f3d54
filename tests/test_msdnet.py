"""MSDNet: exits per preset, FLOPs per exit against the authors' counts, truncated forward, loss, and training."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from msun_builder.flops import model_flops
from msun_builder.msdnet import (
    MSDNET_PRESETS,
    MSDNet,
    MSDNetConfig,
    create_msdnet,
    exit_flops,
    list_presets,
    msdnet_loss,
)
from scale_common.errors import ToolkitError

FAST_PRESETS = {"small": 4, "cifar-anytime": 7, "cifar-budgeted": 5}  # preset -> exits, all at 32 px

# Multiply-accumulates per exit (millions) counted by the authors' op_counter (spec section 5.2, CIFAR-100 and
# ImageNet step 4); ours are FLOPs = 2 x MACs from torch.utils.flop_counter, which skips BN, ReLU and pooling.
SPEC_MMACS = {
    "cifar-budgeted": (32, 100, [7, 14, 28, 42, 58]),
    "imagenet": (224, 1000, [340, 685, 1008, 1254, 1361]),
}


def test_presets_listed_and_match_the_readme() -> None:
    assert set(list_presets()) >= {"cifar-anytime", "cifar-budgeted", "imagenet", "small"}
    assert MSDNET_PRESETS["cifar-anytime"].steps == (4, 2, 2, 2, 2, 2, 2)
    assert MSDNET_PRESETS["cifar-budgeted"].steps == (1, 2, 3, 4, 5)
    assert MSDNET_PRESETS["imagenet"].steps == (4, 4, 4, 4, 4)
    assert MSDNET_PRESETS["imagenet"].num_scales == 4


@pytest.mark.parametrize("preset", sorted(FAST_PRESETS))
def test_exit_count_and_shapes(preset: str) -> None:
    model = create_msdnet(preset, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert model.num_exits == len(out) == FAST_PRESETS[preset] == model.config.n_blocks
    assert all(z.shape == (2, 7) and torch.isfinite(z).all() for z in out)


@pytest.mark.parametrize("preset", sorted(FAST_PRESETS))
def test_flops_rise_strictly_with_the_exit(preset: str) -> None:
    model = create_msdnet(preset)
    flops = exit_flops(model, 32)
    assert len(flops) == model.num_exits
    assert all(a < b for a, b in itertools.pairwise(flops)), flops
    assert flops[-1] == model_flops(model, 32)  # the last exit costs the whole forward
    assert model.training  # exit_flops restores the mode


@pytest.mark.parametrize("preset", sorted(SPEC_MMACS))
def test_flops_match_the_authors_counts(preset: str) -> None:
    size, classes, mmacs = SPEC_MMACS[preset]
    flops = exit_flops(create_msdnet(preset, num_classes=classes), size)
    ours = [f / 2e6 for f in flops]
    assert ours == pytest.approx(mmacs, rel=0.05, abs=0.5)


def test_imagenet_exits_at_224() -> None:
    model = create_msdnet("imagenet", num_classes=1000).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224), max_exit=1)
    assert model.num_exits == 5 and [z.shape for z in out] == [(1, 1000)] * 2
    params = sum(p.numel() for p in model.parameters())
    assert params == pytest.approx(24.0e6, rel=0.01)  # spec: 24.0 M up to the last exit


def test_max_exit_runs_only_the_prefix() -> None:
    model = create_msdnet("small").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        for k in range(model.num_exits):
            part = model(x, max_exit=k)
            assert len(part) == k + 1
            torch.testing.assert_close(part, full[: k + 1])
    for bad in (-1, model.num_exits):
        with pytest.raises(ToolkitError, match="max_exit"):
            model(x, max_exit=bad)


def test_scales_are_pruned_with_transitions() -> None:
    model = create_msdnet("cifar-anytime")
    x = torch.randn(1, 3, 32, 32)
    seen = []
    with torch.no_grad():
        feats = x
        for block in model.blocks:
            feats = block(feats)
            seen.append([tuple(f.shape[1:]) for f in feats])
    assert [len(s) for s in seen] == [3, 3, 2, 2, 2, 1, 1]  # 16 layers: a scale dropped at layers 7 and 13
    assert seen[0] == [(16 + 4 * 6, 32, 32), (2 * (16 + 4 * 6), 16, 16), (4 * (16 + 4 * 6), 8, 8)]
    assert all(s[-1][1:] == (8, 8) for s in seen)  # classifiers always read the coarsest scale
    assert sum(type(m).__name__ == "_Transition" for m in model.modules()) == 2


def test_unknown_preset_and_field() -> None:
    with pytest.raises(ToolkitError, match="cifar-anytime, cifar-budgeted, imagenet, small"):
        create_msdnet("msdnet-huge")
    with pytest.raises(ToolkitError, match="growth_rate"):
        create_msdnet("small", growth=3)
    with pytest.raises(ToolkitError, match="bn_factor"):
        MSDNetConfig(gr_factor=(1, 2, 4), bn_factor=(1, 2))
    with pytest.raises(ToolkitError, match="step_mode"):
        MSDNetConfig(step_mode="geometric")


def test_overrides_reach_the_model() -> None:
    model = create_msdnet("small", num_classes=3, in_chans=1, n_blocks=3, growth_rate=5)
    assert isinstance(model, MSDNet) and model.config.growth_rate == 5
    out = model.eval()(torch.randn(2, 1, 28, 28))
    assert len(out) == 3 and out[0].shape == (2, 3)


def test_loss_is_the_weighted_sum_of_exit_cross_entropies() -> None:
    logits = [torch.randn(5, 4) for _ in range(3)]
    target = torch.tensor([0, 1, 2, 3, 0])
    ces = [F.cross_entropy(z, target) for z in logits]
    torch.testing.assert_close(msdnet_loss(logits, target), ces[0] + ces[1] + ces[2])
    torch.testing.assert_close(msdnet_loss(logits, target, [0.5, 0.0, 2.0]), 0.5 * ces[0] + 2.0 * ces[2])
    with pytest.raises(ToolkitError, match="one per exit"):
        msdnet_loss(logits, target, [1.0, 1.0])


def test_a_few_sgd_steps_lower_the_loss_on_fashion_mnist() -> None:
    from torchvision import transforms

    from cka_scale import open_dataset

    to_tensor = transforms.Compose([transforms.Grayscale(), transforms.Resize(32), transforms.ToTensor()])
    data = open_dataset("fashion-mnist-subset", "train", transform=to_tensor)
    idx = torch.randperm(len(data))[:64].tolist()
    x = torch.stack([data[i][0] for i in idx])
    y = torch.tensor([int(data[i][1]) for i in idx])
    model = create_msdnet("small", num_classes=10, in_chans=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

    def loss_now() -> float:
        with torch.no_grad():
            return msdnet_loss(model(x), y).item()  # train mode: BN uses this batch's statistics

    before = loss_now()
    for _ in range(10):
        opt.zero_grad()
        msdnet_loss(model(x), y).backward()
        opt.step()
    after = loss_now()
    assert after < 0.8 * before, (before, after)
