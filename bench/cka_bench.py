"""Benchmark: the all-pairs CKA matrix of 16 layers, this engine against a float64 NumPy reference and public peers.

Features (``make_layers`` below, seeded): a random ReLU network from a 128-d Gaussian input, 16 layers of widths 64
to 2048, noise 0.25 and per-layer scales 0.1 to 10, float32. For each n, kernel (linear, RBF with the median rule) and
HSIC estimator (biased, unbiased), the table gives the time and the max |difference| to the reference for this engine,
for its floor (the time to form the Gram matrices alone), and for every peer. Peers live in a throw-away venv at
bench/.peers-venv (it sees this venv's torch and numpy through a .pth file, so nothing large is downloaded) and run in
subprocesses of it on the same features, saved to a temporary .npz. Times are the median of 3 runs, or 1 run when the
first takes more than 30 s; torch threads are left at their default.

``--engine-shape`` times the shape of the analysis engine instead (issue 11): ``cka_matrix`` (linear, unbiased) over
16 float32 feature sets of 1024 images, widths 256/1024/4096/2048 four times each, against the 16 bare Gram GEMMs
``x @ x.T`` (best of 3 each, alternating), for each torch thread count given and ``--rounds`` times.

Usage:
    .venv/bin/python bench/cka_bench.py --results bench/RESULTS.md
    .venv/bin/python bench/cka_bench.py --ns 512 --no-peers
    .venv/bin/python bench/cka_bench.py --engine-shape --threads 2,1 --rounds 3 --results bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
PEERS_VENV = HERE / ".peers-venv"
SECTION = "## CKA engine (bench/cka_bench.py)"
SHAPE_SECTION = "## CKA engine, analysis shape (bench/cka_bench.py --engine-shape)"
SHAPE_WIDTHS = (256, 1024, 4096, 2048) * 4
# name -> (pip requirement, rows it supports as (kernel, unbiased), entry point used and what explains its max|Δ|)
PEERS: dict[str, tuple[str, set[tuple[str, bool]], str]] = {
    "torch-cka": ("torch-cka==0.21", {("linear", True)},
                  "`torch_cka.CKA.compare` (hooks on a feature bank, one full batch); float32 uncentred Grams in the "
                  "algebraic unbiased formula, `trace(K @ L)` per pair"),
    "ckatorch": ("ckatorch==1.0.3", {("linear", False), ("linear", True), ("rbf", False), ("rbf", True)},
                 "`ckatorch.cka_base` over the 136 pairs i <= j (its hook API takes only 3-D outputs); float64; RBF "
                 "bandwidth from `torch.median`, the lower of the two middle values"),
    "cka-pytorch": ("cka-pytorch==1.1.3", {("linear", True)},
                    "`cka_pytorch.cka.CKACalculator.calculate_cka_matrix` (hooks on a feature bank, 1 epoch); its "
                    "default `epsilon=1e-4` inside the square root of the denominator breaks scale invariance"),
    "pytorch-cka": ("pytorch-cka==1.1.3", {("linear", True)},
                    "`cka.cka_from_features`; float32 uncentred Grams in the algebraic unbiased formula, result "
                    "clamped to [0, 1]"),
    "repsim": ("repsim==0.1.5", {("linear", False), ("linear", True), ("rbf", False), ("rbf", True)},
               "`repsim.cka` (estimator `gretton` / `song`), C++ float64; RBF median over off-diagonal distances "
               "only; `song` is divided by the biased (Gretton) self-HSIC"),
}


def make_layers(n: int, seed: int = 0) -> list[np.ndarray]:
    """16 related float32 layers: ReLU(h W / sqrt(d)) + 0.25 noise from a 128-d Gaussian input, scaled 0.1..10."""
    rng = np.random.default_rng(seed)
    widths = np.geomspace(64, 2048, 16).round().astype(int)
    scales = np.geomspace(0.1, 10.0, 16)
    h = rng.standard_normal((n, 128))
    out = []
    for width, scale in zip(widths, scales, strict=True):
        h = np.maximum(h @ rng.standard_normal((h.shape[1], width)) / np.sqrt(h.shape[1]), 0.0)
        h = h + 0.25 * rng.standard_normal((n, width))
        out.append((scale * h).astype(np.float32))
    return out


def timed(fn: Callable[[], object], repeats: int = 3, sync: Callable[[], None] = lambda: None) -> tuple[float, object]:
    """Median wall time of ``repeats`` runs (1 run when the first exceeds 30 s), and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - start)
        if times[0] > 30.0:
            break
    return statistics.median(times), result


# ----------------------------------------------------------------------------- peers (run inside the peers venv)
class _Emit(nn.Module):
    def __init__(self, feats: torch.Tensor) -> None:
        super().__init__()
        self.feats = feats

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.feats[idx]


class _Bank(nn.Module):
    """A 'model' whose sub-modules f00..f15 emit the stored features of the samples in the batch."""

    def __init__(self, feats: list[torch.Tensor]) -> None:
        super().__init__()
        self.names = [f"f{i:02d}" for i in range(len(feats))]
        for name, f in zip(self.names, feats, strict=True):
            self.add_module(name, _Emit(f))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            getattr(self, name)(idx)
        return idx


def _peer_fn(name: str, arrays: list[np.ndarray], kernel: str, unbiased: bool) -> Callable[[], object]:
    from torch.utils.data import DataLoader, TensorDataset

    ts = [torch.from_numpy(a) for a in arrays]
    n = ts[0].shape[0]
    idx = torch.arange(n)
    if name == "torch-cka":
        from torch_cka import CKA

        def run() -> object:
            b1, b2 = _Bank(ts), _Bank(ts)
            cka = CKA(b1, b2, model1_name="a", model2_name="b", model1_layers=b1.names, model2_layers=b2.names)
            cka.compare(DataLoader(TensorDataset(idx), batch_size=n))
            return cka.export()["CKA"]
        return run
    if name == "cka-pytorch":
        from cka_pytorch.cka import CKACalculator

        def run() -> object:
            b1, b2 = _Bank(ts), _Bank(ts)
            calc = CKACalculator(b1, b2, model1_layers=b1.names, model2_layers=b2.names, device=torch.device("cpu"),
                                 verbose=False)
            return calc.calculate_cka_matrix(DataLoader(TensorDataset(idx, idx), batch_size=n), num_epochs=1)
        return run
    if name == "pytorch-cka":
        from cka import cka_from_features

        return lambda: cka_from_features(ts, ts)
    if name == "ckatorch":
        from ckatorch import cka_base

        def run() -> object:
            out = np.empty((len(ts), len(ts)))
            for i in range(len(ts)):
                for j in range(i, len(ts)):
                    out[i, j] = out[j, i] = float(cka_base(ts[i], ts[j], kernel=kernel, unbiased=unbiased))
            return out
        return run
    if name == "repsim":
        import repsim

        return lambda: repsim.cka(arrays, kernel_type=kernel, estimator="song" if unbiased else "gretton")
    raise SystemExit(f"unknown peer {name}")


def peer_main(args: argparse.Namespace) -> None:
    """Inside the peers venv: time one peer on the saved features, save its matrix, print the time as JSON."""
    with np.load(args.features) as data:
        arrays = [data[f"f{i:02d}"] for i in range(len(data.files))]
    fn = _peer_fn(args.peer, arrays, args.kernel, args.estimator == "unbiased")
    seconds, result = timed(fn)
    result = result.detach().cpu().numpy() if isinstance(result, torch.Tensor) else np.asarray(result)
    np.save(args.out, result.astype(np.float64))
    print(json.dumps({"seconds": seconds}))


def ensure_peers_venv() -> tuple[Path, dict[str, str]]:
    """Create bench/.peers-venv if needed and install each peer; return its python and the peers that failed."""
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        import sysconfig

        Path(purelib, "_main_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    failed = {}
    for name, (requirement, _, _) in PEERS.items():
        check = subprocess.run([str(python), "-m", "pip", "show", "-q", requirement.split("==")[0]],
                               capture_output=True)
        if check.returncode == 0:
            continue
        done = subprocess.run([str(python), "-m", "pip", "install", "-q", requirement], capture_output=True,
                              text=True)
        if done.returncode != 0:
            reason = (done.stderr.strip().splitlines() or ["pip failed"])[-1][:60]
            failed[name] = f"error: not installable ({reason})"
    return python, failed


def run_peer(python: Path, name: str, npz: Path, kernel: str, unbiased: bool,
             timeout: float) -> tuple[str, float, np.ndarray | None]:
    """Run one peer on one row in the peers venv: (status, seconds, CKA matrix or None)."""
    out = npz.with_name(f"{name}-{kernel}-{unbiased}.npy")
    cmd = [str(python), str(Path(__file__).resolve()), "--peer", name, "--features", str(npz), "--kernel", kernel,
           "--estimator", "unbiased" if unbiased else "biased", "--out", str(out)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"error: timeout > {timeout:.0f} s", float("nan"), None
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()] or [f"exit {done.returncode}"]
        return "error: " + lines[-1].strip()[:70].replace("|", "/"), float("nan"), None
    return "ok", json.loads(done.stdout.strip().splitlines()[-1])["seconds"], np.load(out)


# ----------------------------------------------------------------------------- this engine and the reference
def engine_times(arrays: list[np.ndarray], kernel: str, unbiased: bool, device: str) -> tuple[float, float, np.ndarray]:
    """Median times of the engine and of its floor (Grams alone), run alternately so both see the same load."""
    from cka_scale.functional import cka_matrix, gram

    xs = [torch.from_numpy(a).to(device) for a in arrays]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    floors, engines, result = [], [], None
    for _ in range(3):
        floors.append(timed(lambda: [gram(x, kernel) for x in xs], repeats=1, sync=sync)[0])
        seconds, result = timed(lambda: cka_matrix(xs, kernel=kernel, unbiased=unbiased), repeats=1, sync=sync)
        engines.append(seconds)
        if seconds > 30.0:
            break
    return statistics.median(engines), statistics.median(floors), result.cpu().numpy()


def reference(arrays: list[np.ndarray], kernel: str, unbiased: bool) -> tuple[float, np.ndarray]:
    sys.path.insert(0, str(HERE.parent / "tests"))
    import cka_reference

    return timed(lambda: cka_reference.cka_matrix([a.astype(np.float64) for a in arrays], None, kernel, unbiased,
                                                  large=True))


def best_of(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """Shortest wall time of ``repeats`` runs (the least disturbed by other jobs)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def engine_shape(device: str = "cpu", n: int = 1024, repeats: int = 3, seed: int = 0) -> dict[str, float]:
    """``cka_matrix`` (linear, unbiased) on 16 float32 feature sets vs their 16 bare Gram GEMMs, best of ``repeats``.

    The floor is ``x @ x.T`` per set in IEEE float32 (as the engine's Grams); engine and floor alternate.
    """
    from cka_scale.functional import cka_matrix
    from cka_scale.kernels import true_float32

    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 64, generator=gen)
    xs = [torch.relu(base @ torch.randn(64, w, generator=gen)).to(device) for w in SHAPE_WIDTHS]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def floor() -> None:
        with true_float32():
            for x in xs:
                x @ x.T

    def engine() -> None:
        cka_matrix(xs, unbiased=True)

    engine()  # warm up
    floors, engines = [], []
    for _ in range(repeats):
        floors.append(best_of(floor, 1, sync))
        engines.append(best_of(engine, 1, sync))
    f, e = min(floors), min(engines)
    return {"engine_s": e, "floor_s": f, "ratio": e / f, "n": n, "sets": len(xs)}


def shape_main(args: argparse.Namespace) -> None:
    """Run :func:`engine_shape` for every thread count and round; print (and optionally save) the table."""
    load_start = os.getloadavg()
    rows = []
    for r in range(args.rounds):
        for threads in [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]:
            torch.set_num_threads(threads)
            out = engine_shape(args.device)
            ok = "yes" if out["ratio"] <= 1.3 else "no"
            rows.append([str(r + 1), str(threads), f"{out['engine_s']:.3f}", f"{out['floor_s']:.3f}",
                         f"{out['ratio']:.2f}", ok])
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    load_end = os.getloadavg()
    header = ["round", "torch threads", "cka_matrix s", "16 Gram GEMMs s", "engine / floor", "<= 1.3"]
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join(r) + " |" for r in rows])
    print(table)
    if args.results:
        body = (f"{SHAPE_SECTION}\n\nCommand: `{' '.join(['.venv/bin/python', 'bench/cka_bench.py', *sys.argv[1:]])}`"
                f"\n\nMachine: {_machine(args.device)}; load average {load_start[0]:.1f} at the start, "
                f"{load_end[0]:.1f} at the end.\n\n`cka_matrix(xs, unbiased=True)` (linear) over 16 float32 feature "
                "sets of 1024 images with widths 256/1024/4096/2048 (four times each; ReLU of a random projection), "
                "against the 16 bare Gram GEMMs `x @ x.T` in IEEE float32; best of 3 for each, alternating. Target: "
                f"<= 1.3x the floor on every row.\n\n{table}\n")
        _replace_section(args.results, SHAPE_SECTION, body)


def _machine(device: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    where = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, engine on {where}"


def _replace_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) one ``## `` section of a Markdown file, leaving the others alone."""
    from scale_common.files import atomic_write_text

    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if title in text:
        start = text.index(title)
        end = text.find("\n## ", start + len(title))
        text = text[:start] + body + (text[end + 1 :] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    atomic_write_text(path, text)


def fmt_time(seconds: float) -> str:
    return f"{seconds:.3f}" if seconds < 10 else f"{seconds:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", default="512,2048", help="sample counts, comma-separated")
    parser.add_argument("--device", default="cpu", help="device for this engine (peers and reference run on the CPU)")
    parser.add_argument("--no-peers", action="store_true", help="skip the public libraries")
    parser.add_argument("--peer-timeout", type=float, default=1200.0, help="seconds per peer and row")
    parser.add_argument("--results", type=Path, help="write the table into this Markdown file's CKA section")
    parser.add_argument("--engine-shape", action="store_true", help="time the analysis engine's shape (issue 11)")
    parser.add_argument("--threads", help="--engine-shape: torch thread counts, comma-separated (default: torch's)")
    parser.add_argument("--rounds", type=int, default=1, help="--engine-shape: repeat the whole measurement")
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--features", help=argparse.SUPPRESS)
    parser.add_argument("--kernel", help=argparse.SUPPRESS)
    parser.add_argument("--estimator", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        peer_main(args)
        return
    if args.engine_shape:
        shape_main(args)
        return
    load_start = os.getloadavg()
    from cka_scale.functional import cka_matrix

    cka_matrix([torch.randn(64, 32), torch.randn(64, 8)], kernel="rbf", unbiased=True)  # warm up the thread pools
    python, failed = (None, {}) if args.no_peers else ensure_peers_venv()
    peer_names = [] if args.no_peers else list(PEERS)
    header = ["n", "kernel", "HSIC", "NumPy f64 ref s", "engine s", "Gram floor s", "engine / floor",
              "engine max\\|Δ\\|"] + [f"{p} s / max\\|Δ\\|" for p in peer_names] + ["targets met"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(v) for v in args.ns.split(",")]:
            arrays = make_layers(n)
            npz = Path(tmp) / f"features-{n}.npz"
            np.savez(npz, **{f"f{i:02d}": a for i, a in enumerate(arrays)})
            for kernel in ("linear", "rbf"):
                for unbiased in (False, True):
                    ref_s, ref_m = reference(arrays, kernel, unbiased)
                    eng_s, floor_s, eng_m = engine_times(arrays, kernel, unbiased, args.device)
                    eng_err = float(np.max(np.abs(eng_m - ref_m)))
                    cells, fastest = [], None
                    for name in peer_names:
                        if name in failed:
                            cells.append(failed[name])
                            continue
                        if (kernel, unbiased) not in PEERS[name][1]:
                            cells.append("n/a")
                            continue
                        status, secs, mat = run_peer(python, name, npz, kernel, unbiased, args.peer_timeout)
                        if mat is None:
                            cells.append(status)
                            continue
                        fastest = (fastest is not False) and eng_s < secs
                        cells.append(f"{fmt_time(secs)} / {float(np.max(np.abs(mat - ref_m))):.1e}")
                        print(f"  n={n} {kernel} unbiased={unbiased} {name}: {cells[-1]}", file=sys.stderr, flush=True)
                    verdict = "n/a" if fastest is None else "yes" if fastest else "no"
                    ok = [f"floor {'yes' if eng_s <= 1.3 * floor_s else 'no'}", f"fastest {verdict}",
                          f"Δ≤1e-5 {'yes' if eng_err <= 1e-5 else 'no'}"]
                    rows.append([str(n), kernel, "unbiased" if unbiased else "biased", fmt_time(ref_s),
                                 fmt_time(eng_s), fmt_time(floor_s), f"{eng_s / floor_s:.2f}", f"{eng_err:.1e}",
                                 *cells, ", ".join(ok)])
                    print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    load_end = os.getloadavg()
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join(r) + " |" for r in rows])
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    machine = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
               f"engine on {args.device}; load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end")
    print(table)
    print(f"\n{machine}")
    if args.results:
        python = Path(sys.executable)
        python = python.relative_to(Path.cwd()) if python.is_relative_to(Path.cwd()) else python
        write_section(args.results, table, machine, " ".join([str(python), "bench/cka_bench.py", *sys.argv[1:]]),
                      peer_names)


def write_section(path: Path, table: str, machine: str, command: str, peer_names: list[str]) -> None:
    """Replace (or append) this script's section of a Markdown results file, leaving the other sections alone."""
    from scale_common.files import atomic_write_text

    peers = "\n".join(f"- {name}: {PEERS[name][2]}" for name in peer_names)
    body = (f"{SECTION}\n\nCommand: `{command}`\n\nMachine: {machine}. This 2-core machine is shared with other jobs, "
            "so the times are noisy (a load average above ~2 means they competed for the cores; a rerun on a quiet "
            "machine may differ); the errors are not affected. Times are the median of 3 runs (1 run when the first "
            "takes more than 30 s); the engine and its floor run alternately.\n\n"
            f"{table}\n\nmax|Δ| is against the float64 NumPy reference (tests/cka_reference.py: explicit double "
            "centring for biased HSIC, Song et al. eq. 5 term by term for unbiased, RBF sigma^2 = median of all n^2 "
            "squared distances). The engine's floor is the time to form the 16 Gram matrices alone "
            "(`cka_scale.functional.gram`). Targets: engine <= 1.3x floor, faster than every peer on the row, "
            "max|Δ| <= 1e-5 (float32 features).\n\nPeers (each in a subprocess of bench/.peers-venv; n/a: the peer "
            f"has no such estimator), the entry point used and what explains its difference:\n{peers}\n")
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION in text:
        start = text.index(SECTION)
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + body + (text[end + 1 :] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + body
    atomic_write_text(path, text)


if __name__ == "__main__":
    main()
