"""Per timm family: layers per --layers mode, analysis time, peak memory, and whether the MSUN surgery is exact.

Runs what ``tests/test_families.py`` runs (one small member per family from ``tests/families.py``, random weights,
8 texture images at scales size/2 and size, figures on), each family in a fresh process so that its peak resident
memory (``ru_maxrss``, which includes the ~0.4 GB of torch and timm themselves) is its own. Prints one Markdown table
row per family as it finishes and keeps the rows in ``bench/out/families-KIND.json`` (``--json``): families already
there are skipped, so an interrupted run resumes where it stopped.

    OMP_NUM_THREADS=1 python bench/families_bench.py                 # every CNN family
    OMP_NUM_THREADS=1 python bench/families_bench.py hrnet selecsls  # some families
    OMP_NUM_THREADS=1 python bench/families_bench.py --kind transformer   # layers in both --resize modes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from families import FAMILIES, analyse_family, build_family_msun  # noqa: E402

from scale_common.errors import ToolkitError  # noqa: E402
from scale_common.files import atomic_write_text  # noqa: E402

HEADER_TRANSFORMER = ("| family | model | size | layers, down-up | layers, native | analysis s (down-up/native) "
                      "| peak RSS MB |\n|---|---|---|---|---|---|---|")
HEADER = ("| family | model | size | stages | blocks | all | analysis s (stages/blocks/all) | peak RSS MB | MSUN split "
          "| exact (max err) | reload |\n|---|---|---|---|---|---|---|---|---|---|---|")


def one(key: str) -> dict[str, object]:
    """Run one family in this process and return its row."""
    warnings.filterwarnings("ignore")
    family = FAMILIES[key]
    row: dict[str, object] = {"family": key, "model": family.model, "size": family.size}
    with tempfile.TemporaryDirectory() as tmp:
        # CNNs: the three --layers modes; transformers: the default layers in both --resize modes
        runs = ([(m, m, "down-up") for m in ("stages", "blocks", "all")] if family.kind == "cnn"
                else [("stages", "stages", "down-up"), ("native", "stages", "native")])
        for column, mode, resize in runs:
            try:
                result = analyse_family(family, Path(tmp) / column, mode, resize=resize)
                row[column] = result["layers"]
                row[f"{column}_s"] = round(result["seconds"], 2)
            except ToolkitError as err:  # a clear refusal (a fixed-size model asked for native sizes) is a result
                row[column] = f"refused: {str(err).split(' (')[0][:80]}"
            except Exception as err:  # a row says what failed instead of stopping the table
                row[column] = f"error: {type(err).__name__}: {str(err)[:120]}"
        if family.kind == "cnn" and family.cut:
            try:
                built = build_family_msun(family, Path(tmp) / "msun")
                row["split"] = built["module"] + (f" (for {built['stands_for']})" if built.get("stands_for") else "")
                row["max_error"] = built["max_error"]
                row["exact"] = built["max_error"] <= 1e-5 * max(1.0, built["scale"])
                row["reload_exact"] = built["reload_error"] == 0.0
            except Exception as err:
                row["split"] = f"error: {type(err).__name__}: {str(err)[:120]}"
        elif family.kind == "cnn":
            row["split"] = f"refused: {family.why}"
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return row


def markdown(row: dict[str, object]) -> str:
    """One Markdown table row (transformers: layers and seconds in the two resize modes)."""
    if FAMILIES[str(row["family"])].kind == "transformer":
        return (f"| {row['family']} | {row['model']} | {row['size']} | {row.get('stages', '-')} | "
                f"{row.get('native', '-')} | {row.get('stages_s', '-')}/{row.get('native_s', '-')} | "
                f"{row['peak_rss_mb']} |")
    times = "/".join(str(row.get(f"{m}_s", "-")) for m in ("stages", "blocks", "all"))
    exact = "-" if "exact" not in row else f"{'yes' if row['exact'] else 'NO'} ({row['max_error']:.1g})"
    reload = "-" if "reload_exact" not in row else ("yes" if row["reload_exact"] else "NO")
    counts = " | ".join(str(row.get(m, "-")) for m in ("stages", "blocks", "all"))
    return (f"| {row['family']} | {row['model']} | {row['size']} | {counts} | {times} | {row['peak_rss_mb']} "
            f"| {row.get('split', '-')} | {exact} | {reload} |")


def main() -> int:
    """Run the families (each in a subprocess) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="family keys (timm module names); default: every one of --kind")
    parser.add_argument("--kind", default="cnn", choices=("cnn", "transformer"))
    parser.add_argument("--json", default=None, help="rows file, rewritten after every family; families already in it "
                        "are skipped, so a killed run resumes (default: bench/out/families-KIND.json)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one family, print its JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return 0
    keys = args.families or [k for k, f in FAMILIES.items() if f.kind == args.kind]
    out = Path(args.json or f"bench/out/families-{args.kind}.json")
    rows = {r["family"]: r for r in json.loads(out.read_text())} if out.is_file() else {}
    rows = {k: r for k, r in rows.items() if not str(r.get("split", "")).startswith("crashed")  # crashes rerun
            and (FAMILIES[k].kind == "cnn" or "native" in r)}  # rows from before the native column rerun
    skipped = [k for k in keys if k in rows]
    if skipped:
        print(f"{len(skipped)} families already in {out}, skipped (delete it to rerun them)", flush=True)
    print(HEADER if args.kind == "cnn" else HEADER_TRANSFORMER, flush=True)
    started = time.perf_counter()
    for key in keys:
        if key in rows:
            print(markdown(rows[key]), flush=True)
            continue
        done = subprocess.run([sys.executable, __file__, "--one", key], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
        lines = done.stdout.strip().splitlines()
        try:
            row = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            row = {"family": key, "model": FAMILIES[key].model, "size": FAMILIES[key].size, "peak_rss_mb": "-",
                   "split": f"crashed: {(done.stderr.strip().splitlines() or ['?'])[-1][:120]}"}
        rows[key] = row
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(list(rows.values()), indent=1))  # a killed run keeps every finished row
        print(markdown(row), flush=True)
    print(f"\n{len(keys)} families ({len(keys) - len(skipped)} run now, in {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
