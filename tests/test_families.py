"""Every timm model family: analysis in the three layer modes (figures on), MSUN surgery where a cut can be made.

The families are timm's own model modules (``timm.list_modules()``), classified in ``tests/families.py``; a family
timm adds fails ``test_every_timm_family_is_classified`` until it is. The members marked ``fast`` run in the default
suite, every family with ``--runslow``.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from families import FAMILIES, analyse_family, build_family_msun

from cka_scale import ToolkitError
from cka_scale.analyze import AnalyzeConfig, analyze
from cka_scale.hooks import capture_grams, parse_spatial, select_layers, trace_layers
from cka_scale.kernels import gram_linear
from msun_builder.split import require_splittable

CNNS = [k for k, f in FAMILIES.items() if f.kind == "cnn"]
TRANSFORMERS = [k for k, f in FAMILIES.items() if f.kind == "transformer"]


def _params(keys: list[str]) -> list[object]:
    return [pytest.param(k, id=k, marks=() if FAMILIES[k].fast else pytest.mark.slow) for k in keys]


def test_every_timm_family_is_classified():
    missing = sorted(set(timm.list_modules()) - set(FAMILIES))
    assert not missing, f"timm families not yet in tests/families.py (add one small member each): {missing}"
    stale = sorted(set(FAMILIES) - set(timm.list_modules()))
    assert not stale, f"tests/families.py lists families timm no longer has: {stale}"
    for key, family in FAMILIES.items():
        assert family.kind in ("cnn", "transformer", "skip"), key
        assert family.kind != "skip" or family.why, f"{key}: a skipped family needs its reason"
        assert family.cut or family.why, f"{key}: a CNN that cannot be cut needs its reason"
        assert timm.is_model(family.model), f"{key}: {family.model} is not a timm model"
    cnns = len(CNNS)
    assert cnns >= 45 and len(TRANSFORMERS) >= 35, (cnns, len(TRANSFORMERS))


@pytest.mark.parametrize("key", _params(CNNS))
def test_cnn_family(key: str, tmp_path) -> None:
    family = FAMILIES[key]
    for mode in ("stages", "blocks", "all"):
        result = analyse_family(family, tmp_path / mode, mode)
        report = result["report"]
        assert result["layers"] >= 1 and (tmp_path / mode / "sensitivity.png").is_file()
        ref = list(report.scales).index(family.size)
        layers = np.arange(len(report.layers))
        self_similarity = report.cka_runs[:, ref, layers, ref, layers]
        finite = np.isfinite(self_similarity)  # NaN: a layer constant on every image (a zero-initialised norm)
        assert finite.any() and np.allclose(self_similarity[finite], 1.0, atol=1e-4), f"{key} --layers {mode}"
    if family.cut:
        built = build_family_msun(family, tmp_path / "msun")
        assert built["max_error"] <= 1e-5 * max(1.0, built["scale"]), built
        assert built["reload_error"] == 0.0, built
    else:
        model = timm.create_model(family.model).eval()
        with pytest.raises(ToolkitError, match="cannot be split into an MSUN") as info:
            require_splittable(model, nearest=True)
        assert "\n" not in str(info.value) and family.why.split(" (")[0] in str(info.value)


@pytest.mark.parametrize("key", _params(TRANSFORMERS))
def test_transformer_family_analyses(key: str, tmp_path) -> None:
    family = FAMILIES[key]
    result = analyse_family(family, tmp_path, "stages")
    assert result["layers"] >= 1 and np.isfinite(result["report"].sensitivity(family.size // 2)[0]).all()


def _gram_and_output(model, layer: str, reduce: str, infos) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gram matrix capture_grams measures at ``layer`` for 5 random images, and the layer's raw output."""
    kept = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _a, out: kept.setdefault("out", out.clone()))
    with torch.no_grad(), capture_grams(model, [layer], reduce=parse_spatial(reduce), infos=infos) as take:
        model(torch.randn(5, 3, 64, 64))
        grams = take()
    handle.remove()
    return grams[0], kept["out"]


# Item: the eight transformer / hybrid families of the issue, tiniest configs, both resize modes.
# MaxViT's windows and EfficientFormer's attention biases are fixed by their build size: no size can change at run
# time, so `--resize native` is refused with the fix (use down-up) rather than measured.
BOTH_MODES = {
    "test_vit": 64, "deit_tiny_patch16_224": 64, "swin_tiny_patch4_window7_224": 64, "convnextv2_atto": 64,
    "fastvit_t8": 64, "mobilevit_xxs": 64, "test_maxvit": 160, "efficientformer_l1": 224,
}
FIXED_SIZE = {"test_maxvit", "efficientformer_l1"}


@pytest.mark.parametrize("name", BOTH_MODES)
@pytest.mark.parametrize("resize", ["down-up", "native"])
def test_transformers_and_hybrids_in_both_resize_modes(name: str, resize: str) -> None:
    size = BOTH_MODES[name]
    cfg = AnalyzeConfig(model=name, weights="none", data="textures", images=8, batch_size=4, scales=(size // 2, size),
                        resize=resize, device="cpu")
    if resize == "native" and name in FIXED_SIZE:
        with pytest.raises(ToolkitError, match=r"cannot run at input size .*--resize down-up"):
            analyze(cfg, progress=False)
        return
    report = analyze(cfg, progress=False)
    values, _ = report.sensitivity(size // 2)
    assert len(report.layers) >= 4 and np.isfinite(values).all()
    if name.startswith(("swin", "test_vit", "deit")):
        flags = "channels_last" if name.startswith("swin") else "prefix_tokens"
        assert all(row.get(flags) for row in report.layers), report.layers


def test_the_class_token_is_left_out_and_the_patch_grid_measured():
    model = timm.create_model("deit_tiny_distilled_patch16_224", dynamic_img_size=True).eval()
    assert model.num_prefix_tokens == 2
    infos = trace_layers(model, 64)
    blocks = select_layers(model, "stages", infos)
    assert {b.prefix_tokens for b in blocks} == {2} and blocks[0].shape == (2 + 16, 192)
    patch = next(i for i in infos if i.name == "patch_embed")
    assert patch.prefix_tokens == 0 and patch.channels_last  # dynamic size: patch_embed keeps the (B, H, W, C) grid
    gram, out = _gram_and_output(model, "blocks.0", "flatten", blocks)
    torch.testing.assert_close(gram, gram_linear(out[:, 2:].flatten(1)))


def test_channels_last_maps_are_measured_channels_first():
    model = timm.create_model("swin_tiny_patch4_window7_224", dynamic_img_size=True, embed_dim=24, depths=(1, 1, 1, 1),
                              num_heads=(1, 1, 1, 1)).eval()
    infos = trace_layers(model, 64)
    stages = select_layers(model, "stages", infos)
    assert all(s.channels_last for s in stages)
    assert [s.reduction for s in stages] == [4, 8, 16, 32]
    gram, out = _gram_and_output(model, "layers.1", "gap", stages)
    torch.testing.assert_close(gram, gram_linear(out.mean((1, 2))))  # gap over H, W: C features
