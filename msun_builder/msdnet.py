"""MSDNet: multi-scale dense network with early exits (Huang et al., ICLR 2018, arXiv 1703.09844).

The network is a grid of layers x scales. Every layer adds ``growth_rate * gr_factor[s]`` channels to each scale
``s`` it keeps: a 3x3 conv of that scale, plus (below the finest kept scale) a strided 3x3 conv of the next finer
one, both optionally behind a 1x1 bottleneck, concatenated to the layer's input (dense connectivity). Finer scales are
dropped with depth ("max" pruning); each drop is followed by a 1x1 transition that halves the channels. After each
block a classifier reads the coarsest scale, so ``forward`` returns one logit tensor per exit.

Presets (numbers from the authors' code; where the Lua original ``gaohuang/MSDNet`` and the PyTorch port
``kalviny/MSDNet-PyTorch`` disagree, the PyTorch README is followed, this being a PyTorch implementation):

``cifar-anytime``
    PyTorch README: 7 blocks, even steps 2 (first block 4 layers), 16 channels, growth 6, factors 1-2-4.
    (The Lua README uses 10 blocks.)
``cifar-budgeted``
    PyTorch README: 5 blocks, lin_grow steps 1 (first block 1 layer), otherwise as above. (Lua: 7 blocks.)
``imagenet``
    Both READMEs: 4 scales, 5 blocks, even steps 4, 32 channels, growth 16, factors 1-2-4-4, 7x7/2 stem + max pool.
``small``
    Ours: 3 scales, 4 blocks, 8 channels, growth 4; trains in minutes on a laptop CPU at 32x32.

Deliberate differences from the port, none of which changes the FLOPs or the outputs at 32 px (CIFAR) or 224 px
(ImageNet): the classifiers end in a global average pool instead of a 2x2 one (so any input size works); the ImageNet
stem conv has no bias (a BatchNorm follows it); an odd number of new channels is split down/same as floor/ceil.

Example:
    >>> model = create_msdnet("small", num_classes=10)
    >>> [tuple(t.shape) for t in model(torch.zeros(2, 3, 32, 32))]
    [(2, 10), (2, 10), (2, 10), (2, 10)]
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msun_builder.flops import count_flops
from scale_common.errors import ToolkitError
from scale_common.modules import eval_no_grad

__all__ = ["MSDNET_PRESETS", "MSDNet", "MSDNetConfig", "create_msdnet", "exit_flops", "list_presets", "msdnet_loss"]

STEP_MODES = ("even", "lin_grow")
STEMS = ("cifar", "imagenet")


@dataclass(frozen=True)
class MSDNetConfig:
    """Architecture hyper-parameters of an MSDNet (names follow the port's ``args.py``, in snake case).

    Attributes:
        n_blocks: Blocks, one exit after each.
        step_mode: ``"even"`` (every block after the first has ``step`` layers) or ``"lin_grow"`` (block ``i`` has
            ``step * i + 1`` layers).
        step: Layers per block (``even``) or their growth per block (``lin_grow``).
        base: Layers of the first block.
        n_channels: Channels of the stem at scale ``s`` are ``n_channels * gr_factor[s]``.
        growth_rate: New channels per layer at scale ``s`` are ``growth_rate * gr_factor[s]``.
        gr_factor: Width factor per scale, finest first; its length is the number of scales.
        bn_factor: Bottleneck width factor per scale: the 1x1 conv has ``min(in, bn_factor[s] * out)`` channels.
        bottleneck: Put a 1x1 bottleneck before each 3x3 conv.
        prune: Scale pruning; only ``"max"`` (the paper's, drop a finer scale every ``ceil(layers / scales)``).
        reduction: Channel compression of the transition after each dropped scale (0 disables transitions).
        stem: ``"cifar"`` (3x3 conv) or ``"imagenet"`` (7x7/2 conv + 3x3/2 max pool) at the finest scale.
        classifier_channels: Channels of the two strided convs of each classifier; None keeps the input's.
        num_classes: Outputs of every exit.
        in_chans: Input image channels.
    """

    n_blocks: int = 4
    step_mode: str = "even"
    step: int = 2
    base: int = 2
    n_channels: int = 8
    growth_rate: int = 4
    gr_factor: tuple[int, ...] = (1, 2, 4)
    bn_factor: tuple[int, ...] = (1, 2, 4)
    bottleneck: bool = True
    prune: str = "max"
    reduction: float = 0.5
    stem: str = "cifar"
    classifier_channels: int | None = 32
    num_classes: int = 10
    in_chans: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "gr_factor", tuple(int(f) for f in self.gr_factor))
        object.__setattr__(self, "bn_factor", tuple(int(f) for f in self.bn_factor))
        problems = []
        if self.step_mode not in STEP_MODES:
            problems.append(f"step_mode {self.step_mode!r} is not one of {', '.join(STEP_MODES)}")
        if self.stem not in STEMS:
            problems.append(f"stem {self.stem!r} is not one of {', '.join(STEMS)}")
        if self.prune != "max":
            problems.append(f"prune {self.prune!r} is not supported: use 'max' (the paper's scale pruning)")
        if not self.gr_factor or len(self.bn_factor) != len(self.gr_factor):
            problems.append("gr_factor and bn_factor need one entry per scale (same length, at least 1)")
        if min(self.gr_factor + self.bn_factor, default=1) < 1:
            problems.append("gr_factor and bn_factor entries must be >= 1")
        for name in ("n_blocks", "base", "n_channels", "growth_rate", "num_classes", "in_chans"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1")
        if self.step < (1 if self.step_mode == "even" else 0):
            problems.append("step must be >= 1 ('even') or >= 0 ('lin_grow')")
        if not 0.0 <= self.reduction <= 1.0:
            problems.append("reduction must lie in [0, 1]")
        if self.classifier_channels is not None and self.classifier_channels < 1:
            problems.append("classifier_channels must be >= 1, or None for as many as the classifier's input")
        if problems:
            raise ToolkitError("invalid MSDNetConfig: " + "; ".join(problems))

    @property
    def num_scales(self) -> int:
        """Number of scales (the length of ``gr_factor``)."""
        return len(self.gr_factor)

    @property
    def steps(self) -> tuple[int, ...]:
        """Layers per block (the stem is not counted)."""
        rest = [self.step if self.step_mode == "even" else self.step * i + 1 for i in range(1, self.n_blocks)]
        return (self.base, *rest)


MSDNET_PRESETS: dict[str, MSDNetConfig] = {
    "cifar-anytime": MSDNetConfig(n_blocks=7, step_mode="even", step=2, base=4, n_channels=16, growth_rate=6,
                                  classifier_channels=128, num_classes=100),
    "cifar-budgeted": MSDNetConfig(n_blocks=5, step_mode="lin_grow", step=1, base=1, n_channels=16, growth_rate=6,
                                   classifier_channels=128, num_classes=100),
    "imagenet": MSDNetConfig(n_blocks=5, step_mode="even", step=4, base=4, n_channels=32, growth_rate=16,
                             gr_factor=(1, 2, 4, 4), bn_factor=(1, 2, 4, 4), stem="imagenet",
                             classifier_channels=None, num_classes=1000),
    "small": MSDNetConfig(),
}


def list_presets() -> list[str]:
    """Names accepted by :func:`create_msdnet`, sorted."""
    return sorted(MSDNET_PRESETS)


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _dense_conv(cin: int, cout: int, stride: int, bottleneck: bool, bn_factor: int) -> nn.Sequential:
    """Optional 1x1 bottleneck to ``min(cin, bn_factor * cout)``, then a 3x3 conv; BN-ReLU after each."""
    if not bottleneck:
        return nn.Sequential(*_conv_bn_relu(cin, cout, 3, stride))
    inner = min(cin, bn_factor * cout)
    return nn.Sequential(*_conv_bn_relu(cin, inner, 1), *_conv_bn_relu(inner, cout, 3, stride))


class _DenseUnit(nn.Module):
    """One scale of one layer: ``cat(x, down(finer), conv(x))``, the strided link only where a finer input exists."""

    def __init__(self, c_same: int, c_finer: int | None, new: int, cfg: MSDNetConfig, scale: int) -> None:
        super().__init__()
        n_down = 0 if c_finer is None else new // 2
        self.down = None
        if c_finer is not None:
            self.down = _dense_conv(c_finer, n_down, 2, cfg.bottleneck, cfg.bn_factor[scale - 1])
        self.same = _dense_conv(c_same, new - n_down, 1, cfg.bottleneck, cfg.bn_factor[scale])

    def forward(self, x: Tensor, finer: Tensor | None = None) -> Tensor:
        parts = [x] if self.down is None else [x, self.down(finer)]
        return torch.cat([*parts, self.same(x)], dim=1)


class _MSDLayer(nn.Module):
    """A layer over the scales ``[S - out_scales, S)``, reading the scales ``[S - in_scales, S)``."""

    def __init__(self, width: int, cfg: MSDNetConfig, in_scales: int, out_scales: int) -> None:
        super().__init__()
        n = cfg.num_scales
        self.first_in, self.first_out = n - in_scales, n - out_scales
        self.units = nn.ModuleList(
            _DenseUnit(width * cfg.gr_factor[s], width * cfg.gr_factor[s - 1] if s > self.first_in else None,
                       cfg.growth_rate * cfg.gr_factor[s], cfg, s)
            for s in range(self.first_out, n))

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        out = []
        for s, unit in enumerate(self.units, start=self.first_out):
            i = s - self.first_in
            out.append(unit(feats[i], feats[i - 1] if unit.down is not None else None))
        return out


class _Transition(nn.ModuleList):
    """1x1 Conv-BN-ReLU per kept scale, compressing ``width * g`` to ``new_width * g`` channels."""

    def __init__(self, width: int, new_width: int, factors: Sequence[int]) -> None:
        super().__init__(nn.Sequential(*_conv_bn_relu(width * g, new_width * g, 1)) for g in factors)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        return [conv(x) for conv, x in zip(self, feats, strict=True)]


class _Stem(nn.ModuleList):
    """The first layer: the finest scale from the image, each coarser one by a 3x3/2 conv of the previous."""

    def __init__(self, cfg: MSDNetConfig) -> None:
        widths = [cfg.n_channels * g for g in cfg.gr_factor]
        if cfg.stem == "cifar":
            first = nn.Sequential(*_conv_bn_relu(cfg.in_chans, widths[0], 3))
        else:
            first = nn.Sequential(*_conv_bn_relu(cfg.in_chans, widths[0], 7, 2), nn.MaxPool2d(3, 2, 1))
        coarser = [nn.Sequential(*_conv_bn_relu(a, b, 3, 2)) for a, b in itertools.pairwise(widths)]
        super().__init__([first, *coarser])

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for conv in self:
            x = conv(x)
            feats.append(x)
        return feats


def _classifier(cin: int, mid: int | None, num_classes: int) -> nn.Sequential:
    mid = cin if mid is None else mid
    return nn.Sequential(*_conv_bn_relu(cin, mid, 3, 2), *_conv_bn_relu(mid, mid, 3, 2), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(1), nn.Linear(mid, num_classes))


class MSDNet(nn.Module):
    """Multi-scale dense network; ``forward`` returns the logits of every exit (or of the first ones).

    Args:
        config: The architecture.

    Attributes:
        config: The architecture it was built from.
        blocks: ``blocks[k]`` maps the previous block's features (the image for ``k = 0``) to a list of feature maps,
            finest kept scale first.
        classifiers: ``classifiers[k]`` maps the coarsest map of ``blocks[k]`` to logits.
    """

    def __init__(self, config: MSDNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        n_scales, total = cfg.num_scales, sum(cfg.steps)
        interval = math.ceil(total / n_scales)
        width, layer = cfg.n_channels, 0
        self.blocks, self.classifiers = nn.ModuleList(), nn.ModuleList()
        for k, n_layers in enumerate(cfg.steps):
            mods: list[nn.Module] = [_Stem(cfg)] if k == 0 else []
            for _ in range(n_layers):
                layer += 1
                in_scales = n_scales - max(0, layer - 2) // interval
                out_scales = n_scales - (layer - 1) // interval
                mods.append(_MSDLayer(width, cfg, in_scales, out_scales))
                width += cfg.growth_rate
                if in_scales > out_scales and cfg.reduction > 0:
                    new_width = math.floor(cfg.reduction * width)
                    mods.append(_Transition(width, new_width, cfg.gr_factor[n_scales - out_scales:]))
                    width = new_width
            self.blocks.append(nn.Sequential(*mods))
            self.classifiers.append(_classifier(width * cfg.gr_factor[-1], cfg.classifier_channels, cfg.num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @property
    def num_exits(self) -> int:
        """Number of exits (one per block)."""
        return len(self.blocks)

    def forward(self, x: Tensor, *, max_exit: int | None = None) -> list[Tensor]:
        """Logits of exits ``0..max_exit``; nothing after exit ``max_exit`` is computed.

        Args:
            x: Image batch ``(N, in_chans, H, W)``.
            max_exit: Last exit to compute (0-based); all exits when None.

        Returns:
            One ``(N, num_classes)`` tensor per computed exit, earliest first.

        Raises:
            ToolkitError: ``max_exit`` outside ``0..num_exits - 1``.
        """
        last = self.num_exits - 1 if max_exit is None else max_exit
        if not 0 <= last < self.num_exits:
            raise ToolkitError(f"max_exit={max_exit} is out of range: this MSDNet has exits 0..{self.num_exits - 1}")
        feats, logits = x, []
        for block, head in zip(self.blocks[:last + 1], self.classifiers[:last + 1], strict=True):
            feats = block(feats)
            logits.append(head(feats[-1]))
        return logits


def create_msdnet(preset: str = "small", *, num_classes: int | None = None, **overrides: object) -> MSDNet:
    """Build an MSDNet from a named preset, like ``timm.create_model``.

    Args:
        preset: One of :func:`list_presets`.
        num_classes: Outputs of every exit; the preset's own (10, 100 or 1000) when None.
        **overrides: Any other :class:`MSDNetConfig` field (e.g. ``in_chans=1``, ``n_blocks=3``).

    Returns:
        The model, randomly initialised as in the authors' code.

    Raises:
        ToolkitError: Unknown preset or field, or an invalid configuration.
    """
    if preset not in MSDNET_PRESETS:
        raise ToolkitError(f"unknown MSDNet preset {preset!r}: use one of {', '.join(list_presets())}")
    fields = {f.name for f in dataclasses.fields(MSDNetConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ToolkitError(f"unknown MSDNetConfig field(s) {', '.join(unknown)}: "
                           f"use any of {', '.join(sorted(fields))}")
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    return MSDNet(dataclasses.replace(MSDNET_PRESETS[preset], **overrides))


def exit_flops(model: MSDNet, size: int | tuple[int, int], channels: int = 3) -> list[int]:
    """Cumulative FLOPs per image up to each exit, measured by ``torch.utils.flop_counter``.

    Exit ``k`` costs everything ``model(x, max_exit=k)`` runs, the earlier classifiers included (an image that
    reaches exit ``k`` in budgeted inference has evaluated them all). FLOPs are 2 x multiply-accumulates.

    Args:
        model: The network (measured in eval mode; its mode is restored).
        size: Input side, or ``(height, width)``, in pixels.
        channels: Input channels.

    Returns:
        ``num_exits`` integers, one per exit.
    """
    h, w = (size, size) if isinstance(size, int) else size
    device = next(model.parameters()).device
    x = torch.zeros(1, channels, h, w, device=device)
    with eval_no_grad(model):
        return [count_flops(lambda k=k: model(x, max_exit=k)) for k in range(model.num_exits)]


def msdnet_loss(logits: Sequence[Tensor], target: Tensor, weights: Sequence[float] | None = None) -> Tensor:
    """Training loss of an MSDNet: the (weighted) sum of every exit's cross-entropy.

    Args:
        logits: One ``(N, C)`` tensor per exit, as returned by :meth:`MSDNet.forward`.
        target: Class indices ``(N,)``.
        weights: One weight per exit; all 1 (the paper's choice) when None.

    Returns:
        A scalar tensor.

    Raises:
        ToolkitError: No logits, or a number of weights different from the number of exits.
    """
    if not logits:
        raise ToolkitError("msdnet_loss got no logits: pass the list returned by MSDNet.forward")
    weights = [1.0] * len(logits) if weights is None else list(weights)
    if len(weights) != len(logits):
        raise ToolkitError(f"msdnet_loss got {len(weights)} weights for {len(logits)} exits: give one per exit")
    return torch.stack([w * F.cross_entropy(z, target) for w, z in zip(weights, logits, strict=True)]).sum()
