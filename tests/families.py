"""One small member per timm model family (a timm model module), and the run every family test and bench repeats.

The keys are ``timm.list_modules()``: a family timm adds is not in the table, and ``test_families.py`` fails until
it is classified here. Kinds:

``cnn``          analysed in the three layer modes (figures on); MSUN built from the split ``auto_split`` picks,
                 exact at the reference scale, saved and reloaded, when a tap can be cut (``cut``);
``transformer``  analysed in both resize modes (``down-up``, and ``native`` with timm's ``dynamic_img_size``
                 where the model has it); ``msun-build`` refuses it, naming why;
``skip``         not run, for the reason given (no member small enough for a CPU test, or a multimodal encoder).

Each entry names the smallest registered member (parameters counted on the meta device, timm 1.0.31) and the
reference input side of the test: 64 px, more where the architecture needs it (a fixed window, an 8 x 8 minimum).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Family:
    """How one timm model module is tested.

    Attributes:
        model: The member built (random weights).
        kind: ``cnn``, ``transformer`` or ``skip``.
        size: Reference input side of the test (the smaller scale is half of it).
        cut: For a CNN, whether an MSUN can be cut from it (False: the refusal is checked instead).
        why: For ``skip``, and for a CNN that cannot be cut, the reason (for the latter, its words up to the first
            parenthesis are those of the refusal).
        fast: Also run in the default suite (the rest is ``--runslow``): the families whose layout or surgery is
            special (parallel branches, tuple stages, channels-last); the plain ones are covered by the other tests,
            the blocks fallback (poolformer) and nested taps (Xception) by test_hooks and test_msun, and the
            transformers by the both-resize-modes test.
    """

    model: str
    kind: str = "cnn"
    size: int = 64
    cut: bool = True
    why: str = ""
    fast: bool = False


_BIG_ENCODER = "a multimodal-LLM vision encoder of 88M+ parameters at 546-768 px, no member small enough for a CPU test"

FAMILIES: dict[str, Family] = {
    # CNNs and convolutional hybrids (NCHW feature maps at every stage)
    "byobnet": Family("test_byobnet"),
    "byoanet": Family("lambda_resnet26t"),  # halonet_h1 needs 256 px: over 5 min on a shared CPU
    "convmixer": Family("convmixer_768_32"),
    "convnext": Family("test_convnext"),
    "cpubone": Family("cpubone_nano"),
    "cspnet": Family("cs3darknet_focus_s"),
    "cspnext": Family("cspnext_tiny"),
    "densenet": Family("densenet121"),
    "dla": Family("dla46x_c"),
    "dpn": Family("dpn48b"),
    "edgenext": Family("edgenext_xx_small"),
    "efficientnet": Family("test_efficientnet"),
    "efficientvit_mit": Family("efficientvit_b0"),
    "efficientvit_msra": Family("efficientvit_m0", size=128),
    "fasternet": Family("fasternet_t0"),
    "ghostnet": Family("ghostnet_050"),
    "hardcorenas": Family("hardcorenas_b"),
    "hgnet": Family("hgnetv2_b0"),
    "hrnet": Family("hrnet_w18_small", fast=True),
    "inception_next": Family("inception_next_atto"),
    "inception_resnet_v2": Family("inception_resnet_v2", size=96),
    "inception_v3": Family("inception_v3", size=96),
    "inception_v4": Family("inception_v4", size=96),
    "lcnetv2": Family("lcnetv2_small"),
    "mambaout": Family("test_mambaout", cut=False, fast=True,
                       why="its feature map is channels-last (B, H, W, C) at every stage"),
    "metaformer": Family("poolformer_s12"),
    "mobilenetv3": Family("mobilenetv3_small_050"),
    "mobilenetv5": Family("mobilenetv5_base"),
    "nasnet": Family("nasnetalarge", size=96),
    "nfnet": Family("test_nfnet"),
    "pnasnet": Family("pnasnet5large", size=96),
    "rdnet": Family("rdnet_tiny"),
    "regnet": Family("regnetx_002"),
    "repghost": Family("repghostnet_050"),
    "repvit": Family("repvit_m1"),
    "res2net": Family("res2net50_14w_8s"),
    "resnest": Family("resnest14d"),
    "resnet": Family("test_resnet"),
    "resnetv2": Family("resnetv2_18"),
    "rexnet": Family("rexnet_100"),
    "selecsls": Family("selecsls42b", fast=True),
    "senet": Family("legacy_seresnet18"),
    "sknet": Family("skresnet18"),
    "starnet": Family("starnet_s050"),
    "tresnet": Family("tresnet_m"),
    "vgg": Family("vgg11"),
    "vovnet": Family("ese_vovnet19b_slim_dw"),
    "xception": Family("legacy_xception", size=96),
    "xception_aligned": Family("xception41"),
    # transformers and attention hybrids
    "beit": Family("beit_base_patch16_224", "transformer", size=224),
    "cait": Family("cait_xxs24_224", "transformer", size=224),
    "coat": Family("coat_tiny", "transformer", size=224),
    "convit": Family("convit_tiny", "transformer", size=224),
    "crossvit": Family("crossvit_tiny_240", "transformer", size=240),
    "csatv2": Family("csatv2", "transformer", size=512),
    "davit": Family("davit_tiny", "transformer", size=224),
    "deit": Family("deit_tiny_patch16_224", "transformer", size=224),
    "efficientformer": Family("efficientformer_l1", "transformer", size=224),
    "efficientformer_v2": Family("efficientformerv2_s0", "transformer", size=224),
    "efficientvim": Family("efficientvim_m1", "transformer", size=224),
    "eva": Family("eva02_tiny_patch14_224", "transformer", size=224),
    "fastvit": Family("fastvit_t8", "transformer", size=256),
    "focalnet": Family("focalnet_tiny_srf", "transformer", size=224),
    "gcvit": Family("gcvit_xxtiny", "transformer", size=224),
    "hiera": Family("hiera_tiny_224", "transformer", size=224),
    "hieradet_sam2": Family("hieradet_small", "transformer", size=256),
    "iformer": Family("iformer_t", "transformer", size=224),
    "levit": Family("levit_128s", "transformer", size=224),
    "lowformer": Family("lowformer_b0", "transformer", size=224),
    "maxxvit": Family("test_maxvit", "transformer", size=160),
    "mlp_mixer": Family("gmlp_ti16_224", "transformer", size=224),
    "mobilevit": Family("mobilevit_xxs", "transformer", size=256),
    "mvitv2": Family("mvitv2_tiny", "transformer", size=224),
    "nest": Family("nest_tiny", "transformer", size=224),
    "nextvit": Family("nextvit_small", "transformer", size=224),
    "pit": Family("pit_ti_224", "transformer", size=224),
    "pvt_v2": Family("pvt_v2_b0", "transformer", size=224),
    "sequencer": Family("sequencer2d_s", "transformer", size=224),
    "shvit": Family("shvit_s1", "transformer", size=224),
    "swiftformer": Family("swiftformer_xs", "transformer", size=224),
    "swin_transformer": Family("swin_tiny_patch4_window7_224", "transformer", size=224),
    "swin_transformer_v2": Family("swinv2_tiny_window8_256", "transformer", size=256),
    "swin_transformer_v2_cr": Family("swinv2_cr_tiny_224", "transformer", size=224),
    "tiny_vit": Family("tiny_vit_5m_224", "transformer", size=224),
    "tnt": Family("tnt_s_patch16_224", "transformer", size=224),
    "twins": Family("twins_svt_small", "transformer", size=224),
    "visformer": Family("visformer_tiny", "transformer", size=224),
    "vision_transformer": Family("test_vit", "transformer", size=160),
    "vision_transformer_hybrid": Family("vit_tiny_r_s16_p8_224", "transformer", size=224),
    "vision_transformer_relpos": Family("test_vit_relpos", "transformer", size=160),
    "vision_transformer_sam": Family("samvit_base_patch16_224", "transformer", size=224),
    "vitamin": Family("vitamin_small_224", "transformer", size=224),
    "volo": Family("volo_d1_224", "transformer", size=224),
    "xcit": Family("xcit_nano_12_p16_224", "transformer", size=224),
    # not run
    "deepseek_vit": Family("deepseek_vit_412m", "skip", why=_BIG_ENCODER),
    "gemma4_vit": Family("gemma4_vit_167m", "skip", why=_BIG_ENCODER),
    "qwen3_vit": Family("qwen3_vit_88m", "skip", why=_BIG_ENCODER),
    "naflexvit": Family("naflexvit_base_patch16_gap", "skip",
                        why="takes patch dictionaries of variable length (NaFlex), not an image batch; its fixed-size "
                            "variant is a vision_transformer"),
}


def analyse_family(family: Family, out: Path, layers: str, *, resize: str = "down-up",
                   plots: bool = True) -> dict[str, Any]:
    """Analyse ``family.model`` (random weights) on 8 texture images at scales size/2 and size; figures to ``out``.

    Returns:
        ``layers`` (count), ``seconds`` (analysis and figures) and the ``report``.
    """
    from cka_scale.analyze import AnalyzeConfig, analyze
    from cka_scale.plot import plot_report

    cfg = AnalyzeConfig(model=family.model, weights="none", data="textures", images=8, batch_size=4,
                        scales=(family.size // 2, family.size), layers=layers, resize=resize, device="cpu")
    started = time.perf_counter()
    report = analyze(cfg, progress=False)
    if plots:
        plot_report(report, out)
    return {"layers": len(report.layers), "seconds": time.perf_counter() - started, "report": report}


def build_family_msun(family: Family, out: Path) -> dict[str, Any]:
    """MSUN from the split ``auto_split`` picks, as ``msun-build --auto-split`` does; exact at the reference, reloaded.

    The report measures the split candidates (:func:`msun_builder.split.split_candidates`) on 8 texture images.

    Returns:
        The split (``module``, ``reduction``, ``stands_for``), ``max_error`` at the reference scale against
        ``scale`` (the largest logit) and ``reload_error``.
    """
    from cka_scale.analyze import AnalyzeConfig, analyze
    from cka_scale.models import load_model
    from msun_builder import create_msun, load_msun, save_msun
    from msun_builder.split import require_splittable, split_candidates

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        loaded = load_model(family.model, weights="none")
    base = loaded.model
    layers = ",".join(split_candidates(base, require_splittable(base, nearest=True)))
    cfg = AnalyzeConfig(model=family.model, weights="none", data="textures", images=8, batch_size=4,
                        scales=(family.size // 2, family.size), layers=layers, device="cpu")
    report = analyze(cfg, model=base, data_config=loaded.data_config, progress=False)
    # the cost rule: the families table of bench/RESULTS.md was made with it (any cuttable tap tests the surgery)
    msun = create_msun(base, scales=(family.size // 2, family.size), report=report, split_rule="cost").eval()
    x = torch.randn(2, 3, family.size, family.size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = base(x), msun(x)
        save_msun(msun, out)
        reloaded = load_msun(out)(x)
    return {**msun.config["split"], "max_error": float((got - expected).abs().max()),
            "scale": float(expected.abs().max()), "reload_error": float((reloaded - got).abs().max())}
