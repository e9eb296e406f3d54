"""The split study: an MSUN cut at every cuttable tap, beside the CKA evidence ``auto_split`` reads (issue 13).

For each regime of ``bench/msun_benchmark.py`` (same data, scales 8/16/32, budget, optimizer and seeds 0/1/2):

- **sweep**: ``msun-build MODEL --split-module TAP`` at every tap ``split_model`` can cut with stride 2..16 (at the
  tap ``--auto-split`` chose, the benchmark's finished MSUN run of that seed is reused: the same configuration);
- **evidence**: the CKA report ``--auto-split`` measured on the training images (stored in each benchmark MSUN run's
  ``run.json``: every candidate tap's CKA with its 95% interval, duplicated parameters, score, and the pick);
- **recheck** (``--part recheck``): on a regime held out from tuning the rule (``HELDOUT``: Lite1 fine-tuned from
  its ImageNet weights, the finetune budget), ``--auto-split`` with rule cost against rule deep's pick from the same
  CKA report, per seed, paired on validation (decides) and test (reported);
- **ablation** (``--part ablation``): at the split ``--auto-split`` ships for the regime, the scale-invariant loss off
  and at weights 0.1/0.3/3 (1 is the benchmark's MSUN, reused), truncation tau 0, the reference branch detached, the
  cosine and linear-CKA forms.

Decisions read validation numbers only: each run's ``validation`` record (every branch at every size on its
held-out training images; the rule-routed accuracy averaged over the lossy sizes 8..24 px), and differences between
configurations on validation with a paired interval (per-image validation correctness, ``validation_correct.npz``;
runs trained before it was stored are refitted, same pass, ``run.json`` untouched). The test tables come
from ``msun-eval`` (all 10 000 test images, intervals: paired bootstrap over test images, seeds averaged per image).
The verdict: Spearman's rank correlation across taps between ``auto_split``'s score and the measured lossy-size
test accuracy (interval: the same bootstrap over test images; with 4-5 taps it describes, it cannot generalise),
and for each rule (auto_split's pick, the same without its reach rule, always stride 4, the shallowest tap the
smallest scale can reach, the cheapest tap, the best tap on validation) the test accuracy of its tap and its paired
difference to the best tap. ``--variants`` restricts the ablation to some variants (scores already computed are
reused when more are added).

Finished runs are skipped and killed ones resumed; rerun the same command after an interruption.

    .venv/bin/python bench/split_study.py --regimes scratch            # the sweep, after the benchmark's MSUNs
    .venv/bin/python bench/split_study.py --regimes scratch --part ablation
    .venv/bin/python bench/split_study.py --part recheck                # the rules on Lite1 (held out)
    .venv/bin/python bench/split_study.py --quick                      # minutes: tiny budgets, checks the pipeline
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from msun_benchmark import BIN, DATA, QUICK, REGIMES, SCALES, SIZES, _run, _train

LOSSY = (8, 12, 16, 20, 24)  # test and validation sizes below Fashion-MNIST's native 28 px
ABLATIONS = {"si0": ["--si-weight", "0"], "si0.1": ["--si-weight", "0.1"], "si0.3": ["--si-weight", "0.3"],
             "si3": ["--si-weight", "3"], "tau0": ["--si-tau", "0"], "detach": ["--si-detach-reference"],
             "cosine": ["--si-kind", "cosine"], "cka": ["--si-kind", "cka"]}


def _taps(model: str) -> list[tuple[str, int]]:
    """The taps of ``model`` that the surgery can cut, stride 2..16, as (module, stride)."""
    import timm

    from msun_builder.split import splittable_taps

    net = timm.create_model(model, pretrained=False, num_classes=10).eval()
    return [(t.module, int(t.reduction)) for t in splittable_taps(net) if 2 <= int(t.reduction) <= 16]


def _record(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


def _benchmark_run(run: Path, module: str, stride: int) -> Path | None:
    """The benchmark's finished ``--auto-split`` MSUN run when it cut at ``module``, else None.

    It is the same configuration (model, budget, seed, split) the sweep would train, so it is reused, not retrained.
    """
    if not ((run / "model").is_dir() and (run / "run.json").is_file()):
        return None
    split = _record(run).get("split") or {}
    return run if split.get("module") == module and int(split.get("reduction", 0)) == stride else None


def _trained_cka(regime: str, model: str, taps: list[tuple[str, int]], bench: Path, folder: Path, seeds: list[int],
                 images: int | None) -> dict[int, list[tuple[float, list[float]]]]:
    """CKA (smallest scale vs reference) at every tap of the benchmark's *trained* vanilla model, per seed.

    ``--auto-split`` measures the model it is given (random weights in the scratch regime, where the curve is flat);
    this measures the same taps after training at the reference, where the curve really varies, on training images.
    Returns stride -> [(cka, ci95), ...] over the seeds whose vanilla run exists.
    """
    smallest = min(int(s) for s in SCALES.split(","))
    found: dict[int, list[tuple[float, list[float]]]] = {}
    for seed in seeds:
        weights = bench / regime / f"vanilla-s{seed}" / "model" / "model.safetensors"
        if not weights.is_file():
            continue
        out = folder / f"cka-trained-s{seed}"
        if not (out / "report.json").is_file():
            _run([str(BIN / "cka-scale"), "analyze", model, "--weights", str(weights), "--data", DATA, "--split",
                  "train", "--scales", SCALES, "--images", str(images or 1024), "--seed", str(seed), "--layers",
                  ",".join(m for m, _ in taps), "--no-plots", "--quiet", "--out", str(out)])
        layers = {layer["name"]: layer for layer in json.loads((out / "report.json").read_text())["layers"]}
        for module, stride in taps:
            layer = layers[module]
            found.setdefault(stride, []).append((layer["cka"][str(smallest)], layer["ci95"][str(smallest)]))
    return found


def _cka_cell(values: list[tuple[float, list[float] | None]]) -> str:
    """``mean (seed values; +-widest interval half-width)`` of per-seed CKA values with their 95% intervals."""
    if not values:
        return "n/a"
    halves = [(ci[1] - ci[0]) / 2 for _, ci in values if ci]
    seeds = ", ".join(f"{v:.3f}" for v, _ in values)
    return f"{np.mean([v for v, _ in values]):.3f} ({seeds}; ±{max(halves):.3f})" if halves else f"{seeds}"


def _seeds_cell(values: list[float]) -> str:
    """``mean (each seed's)`` of per-seed accuracies, in percent."""
    return f"{100 * np.mean(values):.1f} ({', '.join(f'{100 * v:.1f}' for v in values)})"


@functools.cache
def _cuttable(model: str) -> tuple:
    """The cuttable taps of ``model`` as ``--auto-split`` passes them to ``auto_split`` (boundaries standing in)."""
    import timm

    from msun_builder.split import splittable_taps

    return tuple(splittable_taps(timm.create_model(model, pretrained=False, num_classes=10), nearest=True))


def _auto_split_unreached(model: str, bench: Path, seeds: list[int]) -> list[int]:
    """The stride ``auto_split`` without its reach rule picks from each seed's benchmark analysis (--auto-split's)."""
    from msun_builder import auto_split

    reports = [bench / f"msun-s{seed}" / "analysis" for seed in seeds]
    return [auto_split(r, cuttable=_cuttable(model), max_upsample=float("inf"), rule="cost").reduction
            for r in reports if (r / "report.json").is_file()]


def _validation_lossy(run: Path) -> float:
    """Rule-routed validation accuracy averaged over the lossy sizes (the decision-time measure)."""
    from msun_builder._routing import route

    val = _record(run)["validation"]
    return float(np.mean([val["accuracy"][str(route(val["rule"], size))][str(size)] for size in LOSSY]))


@functools.cache
def _validation_table(run: Path, at: tuple[int, ...] = LOSSY) -> tuple[np.ndarray, list[int]]:
    """Per-image rule-routed validation correctness averaged over the sizes ``at``, and the images' indices.

    Read from the run's ``validation_correct.npz``; a run trained before that file was stored is refitted first
    (the same validation pass; its ``run.json`` is left as it was). Cached: every table cell of a run reads it once.
    """
    from msun_builder._routing import route
    from msun_builder.train import VALIDATION_CORRECT, fit_validation_routing, validation_correctness

    if not (run / VALIDATION_CORRECT).is_file():
        fit_validation_routing(run, progress=False)
    saved = validation_correctness(run)
    rule = _record(run)["validation"]["rule"]
    rows = [saved["correct"][saved["branches"].index(route(rule, size)), saved["sizes"].index(size)] for size in at]
    return np.mean(rows, axis=0), saved["indices"]


def _validation_difference(runs: list[Path], against: list[Path], resample_seeds: bool = False) -> str:
    """Paired difference on validation (``runs`` minus ``against``, seed by seed on the same images), as a cell.

    The seeds' validation splits differ, but a seed's is the same for every configuration trained with it; the
    bootstrap resamples image positions jointly across seeds (:func:`msun_builder.stats.difference_ci`), and with
    ``resample_seeds`` the seeds too, so that training noise widens the interval.
    """
    from msun_builder.stats import difference_ci

    mine, theirs = [_validation_table(r) for r in runs], [_validation_table(r) for r in against]
    if [idx for _, idx in mine] != [idx for _, idx in theirs]:
        return "n/a (different validation images)"
    diff = difference_ci(np.stack([t for t, _ in mine]), np.stack([t for t, _ in theirs]),
                         resample_seeds=resample_seeds)
    return f"{100 * diff.estimate:+.1f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]"


def _evaluate(runs: list[Path], out: Path, images: int | None) -> dict:
    done = out / "eval.json"
    fresh = done.is_file() and done.stat().st_mtime > max((r / "run.json").stat().st_mtime for r in runs)
    if fresh:  # an evaluation of another set of runs (another --variants) is redone; saved scores are reused
        evaluated = {name for group in json.loads(done.read_text())["groups"].values() for name in group}
        fresh = {r.name for r in runs} <= evaluated
    if not fresh:
        _run([str(BIN / "msun-eval"), *map(str, runs), "--data", DATA, "--sizes", SIZES, "--out", str(out), "--quiet",
              *(["--images", str(images)] if images else [])])
    return json.loads(done.read_text())


def _lossy_table(out: Path, names: list[str], at: tuple[int, ...] = LOSSY) -> np.ndarray:
    """Per group: correctness ``(seeds, images)`` of the rule-routed MSUN averaged over the sizes ``at``."""
    saved = np.load(out / "correct.npz")
    rows, sizes = list(saved["rows"]), list(saved["sizes"])
    idx = [sizes.index(s) for s in at if s in sizes]
    per = [saved["correct"][rows.index(f"{n}|msun (rule)")][idx].mean(axis=0) for n in names]
    return np.stack(per)


def _spearman_ci(score: np.ndarray, tables: list[np.ndarray], resamples: int = 2000) -> tuple[float, float, float]:
    """Spearman's rho between ``score`` and the taps' seed-averaged accuracies, with a bootstrap over test images."""
    from scipy.stats import spearmanr

    acc = np.stack([t.mean(axis=0) for t in tables])  # (taps, images)
    rho = float(spearmanr(score, acc.mean(axis=1)).statistic)
    rng = np.random.default_rng(0)
    draws = []
    for _ in range(resamples):
        pick = rng.integers(0, acc.shape[1], acc.shape[1])
        draws.append(spearmanr(score, acc[:, pick].mean(axis=1)).statistic)
    low, high = np.nanquantile(np.array(draws, dtype=float), [0.025, 0.975])
    return rho, float(low), float(high)


def _study(regime: str, root: Path, bench: Path, seeds: list[int], images: int | None, quick: bool,
           train_only: bool = False) -> str:
    """Sweep every tap of one regime, evaluate, and write its study table; return the Markdown."""
    from msun_builder.stats import accuracy_ci, difference_ci

    model, weights, flags = REGIMES[regime]
    flags = QUICK if quick else flags
    taps = _taps(model)
    runs: dict[int, list[Path]] = {}
    for module, stride in taps:
        for seed in seeds:
            reused = _benchmark_run(bench / regime / f"msun-s{seed}", module, stride)
            out = reused or root / regime / f"r{stride}-s{seed}"
            if reused is None:
                _train(out, model, weights, flags, ["--method", "msun", "--split-module", module], seed)
            runs.setdefault(stride, []).append(out)
    if train_only:
        return ""
    evaluation = _evaluate([r for group in runs.values() for r in group], root / regime / "eval-sweep", images)
    names = {stride: [r.name for r in group] for stride, group in runs.items()}
    tables = {stride: _lossy_table(root / regime / "eval-sweep", names[stride]) for stride in runs}
    # the CKA evidence auto_split used, from the benchmark's MSUN runs (one analysis per seed)
    evidence: dict[int, list[dict]] = {}
    picks = []
    for seed in seeds:
        bench_run = bench / regime / f"msun-s{seed}"
        if (bench_run / "run.json").is_file() and _record(bench_run).get("split"):
            split = _record(bench_run)["split"]
            picks.append(int(split["reduction"]))
            for cand in split.get("candidates", []):
                evidence.setdefault(int(cand["reduction"]), []).append(cand)
    trained = _trained_cka(regime, model, taps, bench, root / regime, seeds, images)
    lines = [f"### {regime}: MSUN at every cuttable tap ({model}, scales {SCALES}, seeds {seeds})", "",
             f"Test: {evaluation['images']} images, rule routing, accuracy averaged over the lossy sizes "
             f"{'/'.join(map(str, LOSSY))} px [95% interval]. Validation: the same on each run's held-out training "
             "images (2000 per seed), mean (each seed's). CKA: smallest scale vs reference at the tap, from "
             "`--auto-split`'s analysis of "
             "training images: mean over seeds (each seed's value; the widest per-seed 95% interval half-width); "
             "score = CKA - 0.5 x duplicated fraction, mean over seeds. CKA trained: the same taps of the "
             "benchmark's vanilla model after training at the reference (1024 training images per seed, same "
             "format).", "",
             "| tap (stride) | CKA | score | CKA trained | validation, lossy | test, lossy | test, smallest size "
             "| test, all sizes | params (M) | GFLOPs per branch 8/16/32 |", "|---" * 10 + "|"]
    smallest, reference = min(int(s) for s in SCALES.split(",")), max(int(s) for s in SCALES.split(","))
    scores, measured, after = [], [], []
    for module, stride in taps:
        per_seed = [_validation_lossy(r) for r in runs[stride]]
        val = float(np.mean(per_seed))
        test = accuracy_ci(tables[stride])
        group = next(g for g, members in evaluation["groups"].items() if members == names[stride])
        avg = next(a for a in evaluation["averages"]
                   if a["group"] == group and a["view"] == "msun (rule)" and a["span"] == "avg")
        build = _record(runs[stride][0])["build"] or {}
        gflops = "/".join(f"{b['flops'] / 1e9:.3f}" for b in build.get("branches", []))
        params = (build.get("params_msun") or 0) / 1e6
        cands = evidence.get(stride, [])
        cka = _cka_cell([(c["cka"], c.get("ci95")) for c in cands])
        score = float(np.mean([c["score"] for c in cands])) if cands else float("nan")
        scores.append(score)
        post = trained.get(stride, [])
        after.append(float(np.mean([c for c, _ in post])) if post else float("nan"))
        low, high = avg["ci95"]
        at_small = accuracy_ci(_lossy_table(root / regime / "eval-sweep", names[stride], (smallest,)))
        measured.append((stride, val, test, at_small))
        small = f"{100 * at_small.estimate:.1f} [{100 * at_small.low:.1f}, {100 * at_small.high:.1f}]"
        lines.append(f"| {module} ({stride}) | {cka} | {score:.3f} | {_cka_cell(post)} | {_seeds_cell(per_seed)} | "
                     f"{100 * test.estimate:.1f} [{100 * test.low:.1f}, {100 * test.high:.1f}] | {small} | "
                     f"{100 * avg['accuracy']:.1f} [{100 * low:.1f}, {100 * high:.1f}] | {params:.2f} | {gflops} |")
    best_val = max(measured, key=lambda m: m[1])[0]
    best_test = max(measured, key=lambda m: m[2].estimate)[0]
    reach = min((s for _, s in taps if reference / smallest < 2 * s), default=None)
    now = _auto_split_unreached(model, bench / regime, seeds)
    rules = {"auto_split rule cost, as the benchmark ran it (mode over seeds)":
             max(set(picks), key=picks.count) if picks else None,
             "rule cost without the reach rule (same reports; mode over seeds)": max(set(now), key=now.count)
             if now else None,
             "always stride 4": 4 if 4 in runs else None, "shallowest tap the smallest scale reaches": reach,
             "shallowest cuttable tap (the cheapest)": min(runs),
             "auto_split rule deep, the default now (the deepest candidate)": max(runs), "best on validation": best_val}
    lines += ["", f"| rule | tap (stride) | validation, lossy, minus the best validation tap (stride {best_val}) "
              f"| test, lossy | minus the best test tap (stride {best_test}) |", "|---|---|---|---|---|"]
    for rule, stride in rules.items():
        if stride is None or stride not in tables:
            lines.append(f"| {rule} | n/a | | | |")
            continue
        test = accuracy_ci(tables[stride])
        diff = difference_ci(tables[stride], tables[best_test])
        lines.append(f"| {rule} | {stride} | {_validation_difference(runs[stride], runs[best_val])} "
                     f"| {100 * test.estimate:.1f} [{100 * test.low:.1f}, {100 * test.high:.1f}]"
                     f" | {100 * diff.estimate:+.1f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}] |")
    shipped, deepest = rules["auto_split rule cost, as the benchmark ran it (mode over seeds)"], max(runs)
    if shipped is not None and shipped != deepest:
        diff = difference_ci(tables[deepest], tables[shipped])
        lines += ["", f"- Rule deep (stride {deepest}) minus rule cost (stride {shipped}): validation, "
                  f"lossy {_validation_difference(runs[deepest], runs[shipped])} (seeds resampled too "
                  f"{_validation_difference(runs[deepest], runs[shipped], True)}); test, lossy "
                  f"{100 * diff.estimate:+.1f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]."]
    before = [np.mean([c["cka"] for c in evidence[s]]) if evidence.get(s) else np.nan for _, s in taps]
    measures = {"auto_split score": scores, "CKA as --auto-split measures it": before, "CKA after training": after}
    lines.append("")
    for what, values in measures.items():
        finite = [i for i, v in enumerate(values) if np.isfinite(v)]
        if len(finite) >= 3:
            rho, low, high = _spearman_ci(np.array(values)[finite], [tables[taps[i][1]] for i in finite])
            lines.append(f"- Spearman's rho, {what} vs test lossy accuracy ({len(finite)} taps): {rho:+.2f} "
                         f"[{low:+.2f}, {high:+.2f}] (bootstrap over test images; describes these taps only).")
    _figure(root / regime, taps, before, after, measured, [runs[s][0] for _, s in taps], regime, smallest)
    return "\n".join(lines) + "\n"


def _figure(folder: Path, taps: list, before: list[float], after: list[float], measured: list,
            first_runs: list[Path], regime: str, smallest: int) -> None:
    """CKA above; lossy-size and smallest-size accuracy and GFLOPs below, on one split-depth axis."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 6), layout="constrained")
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    x = np.arange(len(taps))
    top.plot(x, before, "o-", color="C0", label="as --auto-split measures it (before training)")
    top.plot(x, after, "^-", color="C3", label="after training (the vanilla model)")
    top.legend(fontsize=8)
    top.set(ylabel="CKA, smallest vs reference", title=f"{regime}: the split study")
    acc = np.array([[100 * m[2].estimate, 100 * m[2].low, 100 * m[2].high] for m in measured])
    bottom.errorbar(x, acc[:, 0], yerr=[acc[:, 0] - acc[:, 1], acc[:, 2] - acc[:, 0]], fmt="o-", color="C1",
                    label="test accuracy, lossy sizes (95% interval)")
    bottom.plot(x, [100 * m[1] for m in measured], "D:", color="C4", mfc="none", label="validation, lossy sizes")
    small = np.array([[100 * m[3].estimate, 100 * m[3].low, 100 * m[3].high] for m in measured])
    bottom.errorbar(x, small[:, 0], yerr=[small[:, 0] - small[:, 1], small[:, 2] - small[:, 0]], fmt="v-",
                    color="C5", label=f"test accuracy, {smallest} px (95% interval)")
    twin = bottom.twinx()
    gflops = [(_record(r)["build"] or {}).get("branches", [{}])[0].get("flops", np.nan) / 1e9 for r in first_runs]
    twin.plot(x, gflops, "s--", color="C2", label="GFLOPs, smallest branch")
    bottom.set(xticks=x, xticklabels=[f"{m}\n(stride {s})" for m, s in taps], ylabel="top-1 (%)")
    twin.set_ylabel("GFLOPs")
    top.set_xticks(x, [""] * len(x))
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    bottom.legend(loc="lower center", bbox_to_anchor=(0.42, 0.0), fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    fig.savefig(folder / "split_study.png", dpi=120)


def _ablation(regime: str, root: Path, bench: Path, seeds: list[int], images: int | None, quick: bool,
              train_only: bool = False, variants: list[str] | None = None) -> str:
    """Variants of the shipped configuration at the split --auto-split chose; evaluated with the benchmark MSUN.

    ``variants`` restricts the run to some keys of ``ABLATIONS`` (all when None).
    """
    from msun_builder.stats import accuracy_ci, difference_ci

    model, weights, flags = REGIMES[regime]
    flags = QUICK if quick else flags
    base = [bench / regime / f"msun-s{seed}" for seed in seeds]
    missing = [str(r) for r in base if not (r / "model").is_dir()]
    if missing:
        sys.exit(f"the ablation reuses the benchmark's MSUN runs; train them first: {missing}")
    runs = {"shipped": base}
    for name, extra in ((n, ABLATIONS[n]) for n in variants or ABLATIONS):
        for seed in seeds:
            module = _record(bench / regime / f"msun-s{seed}")["split"]["module"]  # exactly the shipped cut
            out = root / regime / "ablation" / f"{name}-s{seed}"
            _train(out, model, weights, flags, ["--method", "msun", "--split-module", module, *extra], seed)
            runs.setdefault(name, []).append(out)
    if train_only:
        return ""
    folder = root / regime / "eval-ablation"
    evaluation = _evaluate([r for group in runs.values() for r in group], folder, images)
    reference = max(int(s) for s in SCALES.split(","))
    tables = {name: (_lossy_table(folder, [r.name for r in group]),
                     _lossy_table(folder, [r.name for r in group], (reference,))) for name, group in runs.items()}
    lines = [f"### {regime}: ablations at the shipped split ({model}, seeds {seeds})", "",
             f"Test: {evaluation['images']} images, rule routing; lossy = the average over {'/'.join(map(str, LOSSY))} "
             f"px; differences are paired (bootstrap over test images, seeds averaged per image) against the shipped "
             f"configuration (scale-invariant MSE, weight 1, tau 0.01, all pairs: the benchmark's MSUN runs). "
             "Validation: rule-routed accuracy over the lossy sizes on each run's held-out training images (2000 per "
             "seed), mean (each seed's); its difference is paired the same way (a seed's validation images are the "
             "same for every variant), and it is what a decision reads; 'seeds resampled too' also draws the seeds "
             "(two-way bootstrap), so training noise counts: a default changes only when that interval excludes 0.",
             "",
             f"| variant | validation, lossy | minus shipped | the same, seeds resampled too | test, lossy "
             f"| minus shipped | test, {reference} px | minus shipped |", "|---" * 8 + "|"]
    for name, group in runs.items():
        cells = [name, _seeds_cell([_validation_lossy(r) for r in group])]
        cells += ["", ""] if name == "shipped" else [_validation_difference(group, runs["shipped"]),
                                                     _validation_difference(group, runs["shipped"], True)]
        for k in range(2):
            acc = accuracy_ci(tables[name][k])
            cells.append(f"{100 * acc.estimate:.1f} [{100 * acc.low:.1f}, {100 * acc.high:.1f}]")
            if name == "shipped":
                cells.append("")
                continue
            diff = difference_ci(tables[name][k], tables["shipped"][k])
            cells.append(f"{100 * diff.estimate:+.1f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: Regimes held out from tuning the split rule: used only to re-check it (``--part recheck``).
HELDOUT: dict[str, tuple[str, str, list[str]]] = {
    "finetune-lite1": ("tf_efficientnet_lite1", "auto", REGIMES["finetune"][2]),
}


def _deep_pick(model: str, analysis: Path) -> tuple[str, int]:
    """The tap ``auto_split(rule="deep")`` picks from an ``--auto-split`` run's own CKA report."""
    from msun_builder import auto_split

    choice = auto_split(analysis, cuttable=_cuttable(model), rule="deep", num_subnets=len(SCALES.split(",")))
    return choice.module, choice.reduction


def _recheck(regime: str, root: Path, seeds: list[int], images: int | None, quick: bool,
             train_only: bool = False) -> str:
    """Both split rules on a regime held out from tuning them: ``--auto-split`` (rule cost) against rule deep.

    Per seed, ``msun-build --auto-split --split-rule cost`` measures CKA on training images and cuts where the cost
    rule says; rule deep's pick is read from that same report, and trained with ``--split-module`` (the same run
    when both rules agree). The decision reads the paired validation difference, seeds resampled too.
    """
    from msun_builder.stats import accuracy_ci, difference_ci

    model, weights, flags = HELDOUT[regime]
    flags = QUICK if quick else flags
    runs: dict[str, list[Path]] = {"cost": [], "deep": []}
    picks: dict[str, list[tuple[str, int]]] = {"cost": [], "deep": []}
    for seed in seeds:
        auto = root / regime / f"auto-s{seed}"
        _train(auto, model, weights, flags, ["--method", "msun", "--auto-split", "--split-rule", "cost"], seed)
        module, stride = _deep_pick(model, auto / "analysis")
        split = _record(auto)["split"]
        deep = auto if split["module"] == module else root / regime / f"r{stride}-s{seed}"
        if deep != auto:
            _train(deep, model, weights, flags, ["--method", "msun", "--split-module", module], seed)
        for rule, run, tap in (("cost", auto, (split["module"], int(split["reduction"]))),
                               ("deep", deep, (module, stride))):
            runs[rule].append(run)
            picks[rule].append(tap)
    if train_only:
        return ""
    folder = root / regime / "eval-recheck"
    every = list(dict.fromkeys(r for group in runs.values() for r in group))
    evaluation = _evaluate(every, folder, images)
    smallest, reference = min(int(s) for s in SCALES.split(",")), max(int(s) for s in SCALES.split(","))
    spans = {"lossy": LOSSY, f"{smallest} px": (smallest,), f"{reference} px": (reference,)}
    tables = {(rule, span): _lossy_table(folder, [r.name for r in group], at)
              for rule, group in runs.items() for span, at in spans.items()}
    lines = [f"### {regime}: the split rules re-checked ({model}, scales {SCALES}, seeds {seeds})", "",
             f"Held out: no rule was tuned on this model. Validation: rule-routed accuracy over the lossy sizes "
             f"{'/'.join(map(str, LOSSY))} px on each run's held-out training images (2000 per seed), mean (each "
             f"seed's), and rule deep minus rule cost paired on the same images (image-only; seeds resampled too). "
             f"Test: {evaluation['images']} images, paired bootstrap over images, seeds averaged per image.", "",
             "| rule | tap per seed (stride) | CKA at the tap per seed | params (M, mean over seeds) "
             "| validation, lossy "
             "| " + " | ".join(f"test, {span}" for span in spans) + " |", "|---" * (5 + len(spans)) + "|"]
    for rule, group in runs.items():
        cka = [next(f"{c['cka']:.2f}" for c in _record(auto)["split"]["candidates"] if c["module"] == module)
               for (module, _), auto in zip(picks[rule], runs["cost"], strict=True)]
        params = np.mean([(_record(r)["build"] or {}).get("params_msun", 0) for r in group]) / 1e6
        cells = [rule, ", ".join(f"{m} ({s})" for m, s in picks[rule]), ", ".join(cka), f"{params:.2f}",
                 _seeds_cell([_validation_lossy(r) for r in group])]
        for span in spans:
            acc = accuracy_ci(tables[(rule, span)])
            cells.append(f"{100 * acc.estimate:.1f} [{100 * acc.low:.1f}, {100 * acc.high:.1f}]")
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["deep minus cost", "", "", "", f"{_validation_difference(runs['deep'], runs['cost'])}; seeds "
             f"resampled too {_validation_difference(runs['deep'], runs['cost'], True)}"]
    for span in spans:
        diff = difference_ci(tables[("deep", span)], tables[("cost", span)])
        cells.append(f"{100 * diff.estimate:+.1f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]")
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the sweep (or the ablation) for every regime and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regimes", default=None,
                        help="comma list of " + ", ".join(REGIMES) + " (default: both), or with --part recheck of "
                        + ", ".join(HELDOUT) + " (default: all)")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds")
    parser.add_argument("--part", choices=("sweep", "ablation", "recheck"), default="sweep",
                        help="recheck: both split rules on a held-out regime (" + ", ".join(HELDOUT) + ")")
    parser.add_argument("--quick", action="store_true", help="tiny budgets, 500 test images (pipeline check)")
    parser.add_argument("--train-only", action="store_true",
                        help="train the runs and stop (one process per seed can train in parallel; evaluate after)")
    parser.add_argument("--variants", default=None,
                        help="--part ablation: comma list of variants to train and tabulate (default: all of "
                        + ", ".join(ABLATIONS) + ")")
    parser.add_argument("--out", default="bench/out/split-study")
    parser.add_argument("--benchmark", default="bench/out/msun-benchmark", help="bench/msun_benchmark.py's --out")
    args = parser.parse_args()
    suffix = "-quick" if args.quick else ""
    root, bench = Path(args.out + suffix), Path(args.benchmark + suffix)
    seeds = [int(s) for s in args.seeds.split(",")]
    images = 500 if args.quick else None
    variants = args.variants.split(",") if args.variants else None
    unknown = sorted(set(variants or []) - set(ABLATIONS))
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {', '.join(ABLATIONS)}")
    known = HELDOUT if args.part == "recheck" else REGIMES
    for regime in (args.regimes or ",".join(known)).split(","):
        if regime not in known:
            parser.error(f"unknown regime {regime!r} for --part {args.part}: choose from {', '.join(known)}")
        if args.part == "sweep":
            text = _study(regime, root, bench, seeds, images, args.quick, args.train_only)
        elif args.part == "recheck":
            text = _recheck(regime, root, seeds, images, args.quick, args.train_only)
        else:
            text = _ablation(regime, root, bench, seeds, images, args.quick, args.train_only, variants)
        if args.train_only:
            continue
        (root / regime).mkdir(parents=True, exist_ok=True)
        (root / regime / f"{args.part}.md").write_text(text)
        print(text, flush=True)


if __name__ == "__main__":
    main()
