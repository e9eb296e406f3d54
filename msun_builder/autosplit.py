"""Choose the MSUN split depth from a CKA scale-sensitivity report, and say why in one sentence.

The rule (documented in the README, tested on synthetic reports):

1. **Candidates** are the model's ``feature_info`` taps with ``min_reduction <= reduction <= max_reduction``
   (default 2..16), except the last tap (something must remain to share), and, given the model's cuttable taps,
   only those; a tap the cut cannot reach (nested inside a block) is replaced by the nearest cuttable boundary at
   its stride (``splittable_taps(model, nearest=True)``), measured at that boundary when the report has it, else at
   the tap itself, and the reason says so. Bounding the stride keeps the search
   away from the last stage, which is scale-sensitive too: the CKA curve of a CNN is U-shaped (the MSUN authors'
   ResNet-50: 0.52 / 0.86 / 0.84 / 0.77 / 0.40), so "the first stage above a threshold" alone is not a rule.
2. **Robustness** v(k) of tap k is its CKA between the smallest scale and the reference (``scale`` picks another),
   i.e. how similar the tap's output already is across scales in the vanilla model.
3. **Cost** d(k) = (num_subnets - 1) x params before the cut / all params: the parameters a cut at k duplicates.
4. **Reach**: the smallest scale's subnet de-strides its shallow part to approach the unified size U; a tap is
   deep enough when reference / smallest < ``max_upsample`` x stride (default 2), i.e. that subnet's features need
   less than a 2x upsampling to U. ``bench/split_study.py`` trained an MSUN at every cuttable tap: without this rule
   the stride-2 cut wins on the lossy-size average in one regime (resnet10t from scratch, +0.7 points) but loses
   4.2 points at 8 px there and 8.7 at 8 px (0.8 on the average) with Lite0 fine-tuned (bench/RESULTS.md).
5. **Choice**, by ``rule``:

   - ``"deep"`` (the default): the deepest candidate deep enough (any candidate when none is), whatever its CKA;
     v(k) and d(k) are measured and reported, not used. The split study's evidence: with Lite0 fine-tuned the
     deepest cut beat the cost rule's by 1.9 [0.5, 3.2] points on validation's lossy sizes (3 seeds, seeds
     resampled), from scratch it tied (+0.1 [-0.3, +0.6]), and on Lite1, held out from that choice, it won by 2.1
     [1.2, 3.1], for 37-46% more parameters (the same FLOPs per branch at those scales, 8/16/32 px; at 32..224 px
     Lite0's small branches cost about 10% more); CKA ranked the cuts backwards where its curve varied.
   - ``"cost"``: among the candidates deep enough (all of them when ``max_upsample`` is ``inf`` or no tap is), those
     with v(k) >= ``threshold`` (default 0.8); of these the one with the highest score v(k) - ``param_weight`` x
     d(k) (ties: the earlier); if none reaches the threshold, the highest score among them all. The cheap cut, in
     parameters: "cut where the features are already alike across scales".

On the authors' published curves (scales 32..224) the cost rule picks their own choice for ResNet-50 (after layer1,
stride 4) and MobileNetV2 (stride 16), DenseNet-121 one transition earlier (after denseblock1), and for VGG-16,
whose curve never passes 0.81, the most robust early stage.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cka_scale.report import Report, load_report
from msun_builder.config import DEFAULT_SPLIT_RULE, SPLIT_RULES
from msun_builder.split import Tap
from scale_common.errors import ToolkitError

__all__ = ["SplitChoice", "auto_split"]


@dataclass(frozen=True)
class SplitChoice:
    """The split ``auto_split`` chose.

    Attributes:
        module: The tap to cut after (a ``feature_info`` module path).
        reduction: Its stride; pass it as ``split_reduction``.
        cka: Its CKA between the compared scale and the reference.
        reason: One sentence: which layers, which values.
        candidates: Every candidate with its CKA, duplicated-parameter fraction, score and robustness flag.
    """

    module: str
    reduction: int
    cka: float
    reason: str
    candidates: list[dict[str, Any]] = field(default_factory=list)


def _as_report(report: Report | str | os.PathLike[str]) -> Report:
    """The report itself, or the one saved in a folder (or its ``report.json``), read through the checked reader."""
    if isinstance(report, Report):
        return report
    if isinstance(report, (str, os.PathLike)):
        return load_report(report)
    raise ToolkitError(f"auto_split takes a cka_scale Report or the folder of a saved one, got {type(report).__name__}:"
                       " run `cka-scale analyze MODEL --out DIR` and pass DIR")


def _tap_index(names: Sequence[str], tap: str) -> int | None:
    """The report row of ``tap``: the layer itself, or the last block inside it (same output)."""
    if tap in names:
        return names.index(tap)
    inside = [i for i, name in enumerate(names) if name.startswith(tap + ".")]
    return inside[-1] if inside else None


def auto_split(report: Report | str | os.PathLike[str], *, threshold: float = 0.8, max_reduction: int = 16,
               min_reduction: int = 2, param_weight: float = 0.5, num_subnets: int = 3, scale: int | None = None,
               cuttable: Sequence[str | Tap] | None = None, max_upsample: float = 2.0,
               rule: str = DEFAULT_SPLIT_RULE) -> SplitChoice:
    """Pick the split tap from measured per-layer CKA (see the module docstring for the rule).

    Args:
        report: A :class:`cka_scale.report.Report`, or a report folder (or its ``report.json``) to load.
        threshold: CKA a tap must reach to count as scale-robust.
        max_reduction: Deepest stride considered.
        min_reduction: Shallowest stride considered.
        param_weight: Score penalty per unit of duplicated-parameter fraction.
        num_subnets: Subnets of the MSUN to build (the cost counts num_subnets - 1 copies).
        scale: The scale compared with the reference; the smallest in the report when None.
        cuttable: Taps the model can actually be cut at, as module names or :class:`~msun_builder.split.Tap` entries
            (``msun_builder.splittable_taps(model, nearest=True)``, whose boundaries stand for taps a cut cannot
            reach); all taps when None.
        max_upsample: A tap is deep enough when reference / smallest scale < max_upsample x its stride; shallower
            taps are passed over (the reach rule; ``float("inf")`` turns it off).
        rule: ``"cost"``: the most scale-robust candidate for its cost (step 5 of the module docstring);
            ``"deep"``: the deepest candidate deep enough to reach, whatever its CKA (threshold and cost unused;
            CKA is still measured and reported).

    Returns:
        The choice, its one-sentence reason, and the scored candidates (each with its CKA's 95% interval,
        ``ci95``, ``None`` where the report has none).

    Raises:
        ToolkitError: No readable report, or it has no feature_info taps with CKA values in the allowed range.
    """
    if rule not in SPLIT_RULES:
        raise ToolkitError(f"unknown split rule {rule!r}: choose one of {', '.join(SPLIT_RULES)}")
    report = _as_report(report)
    scales = [int(s) for s in report.scales]
    reference = int(report.reference)
    smallest = min(scales)
    scale = min(s for s in scales if s != reference) if scale is None else int(scale)
    if scale not in scales or scale == reference:
        raise ToolkitError(f"scale {scale} is not a non-reference scale of the report ({scales}, ref {reference})")
    names = report.layer_names
    taps = report.meta.get("feature_info") or [{"module": row["name"], "reduction": row["reduction"]}
                                               for row in report.layers if row.get("tap")]
    total = report.meta.get("total_params") or 0
    values, _ = report.sensitivity(scale)
    low, high = report.interval(scale)
    plain = None if cuttable is None else {c if isinstance(c, str) else c.module for c in cuttable
                                           if isinstance(c, str) or not c.stands_for}
    stand_ins = {c.stands_for: c for c in cuttable or [] if isinstance(c, Tap) and c.stands_for}
    candidates = []
    for i, tap in enumerate(taps[:-1]):
        module, red, note = tap["module"], int(tap["reduction"]), None
        if plain is not None and module not in plain:
            if module not in stand_ins:
                continue
            boundary = stand_ins[module]
            at = boundary.module if _tap_index(names, boundary.module) is not None else module
            note = (f"{boundary.module} is the nearest boundary a cut can reach for the tap {module} at stride {red}"
                    f" (CKA measured at {at})")
            module, row = boundary.module, _tap_index(names, at)
        else:
            row = _tap_index(names, module)
        if row is None or not math.isfinite(values[row]) or not min_reduction <= red <= max_reduction:
            continue
        if any(c["module"] == module for c in candidates):
            continue
        value = float(values[row])
        cum = report.layers[row].get("cum_params", 0)
        dup = (num_subnets - 1) * cum / total if total else 0.0
        band = [float(low[row]), float(high[row])] if math.isfinite(low[row]) and math.isfinite(high[row]) else None
        candidates.append({"module": module, "reduction": red, "cka": value, "ci95": band, "note": note,
                           "dup_fraction": dup, "dup_params": int((num_subnets - 1) * cum),
                           "score": value - param_weight * dup, "robust": value >= threshold,
                           "deep_enough": reference / smallest < max_upsample * red, "index": i})
    if not candidates and plain is not None:
        listed = ", ".join(sorted(plain | {c.module for c in stand_ins.values()})) or "none"
        raise ToolkitError(f"no tap of the report at stride {min_reduction}..{max_reduction} (the last tap excluded: "
                           f"something must remain to share) is one the model can be cut at (cuttable: {listed}); "
                           "msun_builder.require_splittable(model) says why the others cannot be cut")
    if not candidates:
        raise ToolkitError(f"the report has no feature_info tap with a CKA value at stride {min_reduction}.."
                           f"{max_reduction}: analyse with --layers stages (or a selection including the taps)")
    deep = [c for c in candidates if c["deep_enough"]]
    robust = [] if rule == "deep" else [c for c in deep or candidates if c["robust"]]
    pool = robust or deep or candidates
    if rule == "deep":
        best = max(pool, key=lambda c: c["index"])
    else:
        best = max(pool, key=lambda c: (c["score"], -c["index"]))
    values = ", ".join(f"{c['module']} {c['cka']:.2f}" for c in candidates)
    measured = f"CKA between {scale}px and {reference}px at the candidate taps: {values}"
    n = best["dup_params"]
    amount = f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"
    cost = f"duplicating {amount} parameters ({100 * best['dup_fraction']:.1f}% of the model)"
    if rule == "deep":
        why = (f"the deepest candidate up to stride {max_reduction} (rule 'deep': CKA is reported, not used; in the "
               "split study of bench/RESULTS.md the deepest cut beat the most scale-robust one by about 2 points "
               "on the small-size average of two fine-tuned models and tied from scratch; --split-rule cost picks "
               "the cut that duplicates fewer parameters)")
    elif robust:
        why = f"the most scale-robust tap for its cost (threshold {threshold:.2f})"
    else:
        why = f"no tap up to stride {max_reduction} reaches CKA {threshold:.2f}, and this one scores best"
    if rule == "cost" and deep and len(deep) < len(candidates):
        shallow = ", ".join(c["module"] for c in candidates if not c["deep_enough"])
        why += (f" among the taps deep enough for the {smallest}px subnet to reach the unified size"
                f" ({shallow} would upsample its features {max_upsample:g}x or more)")
    bands = [c["ci95"] for c in pool]
    if rule == "cost" and robust and len(pool) > 1 and all(bands) and all(
            b[0] <= best["ci95"][1] and best["ci95"][0] <= b[1] for b in bands):
        cheapest = best["dup_fraction"] <= min(c["dup_fraction"] for c in pool)
        why += ("; the candidates' CKA values agree within their 95% intervals, so "
                + ("the duplicated parameters decided" if cheapest else
                   "the choice rests on CKA differences smaller than their uncertainty"))
    if best["note"]:
        why += f" ({best['note']})"
    reason = f"split after {best['module']} (stride {best['reduction']}): {why}; {measured}; {cost}"
    for c in candidates:
        c.pop("index")
    return SplitChoice(best["module"], best["reduction"], best["cka"], reason + ".", candidates)
