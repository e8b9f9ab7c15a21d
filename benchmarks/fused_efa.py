"""The EFA block alone, reference path vs fused operators (ops/fused_efa.cpp), one thread.

What is timed: forward plus backward (gradient of sum(y) with respect to positions and input
features, as in a force evaluation) of one EuclideanFastAttention block with the settings of
benchmarks/efa_scaling.py (features 64, 8 frequency pairs, Dv = 16, 50-point grid, b_max = pi,
float32), N random atoms in a cube at 0.1 atoms/A^3, r_max = the cube's diagonal. Each case runs in
a fresh process: one warm-up pass, then the minimum and median of repeated passes.

Memory: "saved" is what autograd keeps for backward, measured with
torch.autograd.graph.saved_tensors_hooks: the distinct storages saved during the forward pass,
less those of the inputs (features, positions, ...) and of the block's parameters and buffers,
which exist anyway. "peak RSS" is the growth of the process's peak resident set during the
passes (includes temporaries and allocator caching; OS granularity).

The matmul rate: the same process times a float32 (2048 x 2048) @ (2048 x 2048) product; the
fused block's share is the FLOPs of its six BLAS products per pass over that rate.

Usage:  taskset -c 0 python benchmarks/fused_efa.py [--sizes 1000 10000 100000 1000000] [--malloc keep]
Writes benchmarks/results/fused_efa_<date>[_keep].md and .json. `--malloc keep` runs the cases with
EFA_DEPLOY_MALLOC=keep (glibc keeps large freed blocks: no page faults for every big tensor).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efa_scaling import (DENSITY, FEATURES, GRID_POINTS, NUM_FREQUENCIES, VALUE_DIM, cpu_model,  # noqa: E402
                         repeat_timed)

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = [1000, 10000, 100000, 1000000]
PATHS = ["reference", "fused"]
REFERENCE_BYTES_PER_ATOM = 30e3  # the reference's peak at 1e5 atoms, float32, rounded up: skips what will not fit
CASE_TIMEOUT = 580


def matmul_rate() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048 ** 3 / best


def run_case(path: str, n: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from efa_deploy.model import EuclideanFastAttention

    edge = (n / DENSITY) ** (1.0 / 3.0)
    torch.manual_seed(0)
    block = EuclideanFastAttention(FEATURES, num_frequencies=NUM_FREQUENCIES, value_dim=VALUE_DIM,
                                   grid_points=GRID_POINTS, r_max=edge * math.sqrt(3.0), b_max=math.pi).float()
    block.fused = path == "fused"
    positions = (torch.rand(n, 3) * edge).requires_grad_(True)
    x = torch.randn(n, FEATURES).requires_grad_(True)
    vec = torch.zeros(n, 3, FEATURES)
    batch, owned = torch.zeros(n, dtype=torch.long), torch.ones(n)
    existing = {t.untyped_storage().data_ptr() for t in [positions, x, vec, batch, owned, *block.parameters(),
                                                         *block.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in existing:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def step(record: bool = False) -> None:
        if record:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = block(x, vec, positions, batch, 1, owned)
        else:
            y = block(x, vec, positions, batch, 1, owned)
        torch.autograd.grad(y.sum(), [positions, x])

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step(record=True)  # warm-up, and what is saved for backward
    times = repeat_timed(step)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    m, g, d = NUM_FREQUENCIES, GRID_POINTS, VALUE_DIM
    return {"path": path, "n": n, "min_s": times[0], "median_s": times[len(times) // 2], "repeats": len(times),
            "saved_bytes": sum(saved.values()), "peak_bytes": max(rss_after - rss_before, 0),
            "blas_flops": 6 * 2 * (2 * m * g) * d * n, "matmul_flops_per_s": matmul_rate()}


def run_in_subprocess(path: str, n: int, malloc: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--case", path, str(n)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", EFA_DEPLOY_MALLOC=malloc)
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CASE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return {"path": path, "n": n, "status": f"timeout (> {CASE_TIMEOUT} s)"}
    if done.returncode != 0:
        return {"path": path, "n": n, "status": "failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), status="ok")


def available_memory() -> float:
    with open("/proc/meminfo") as f:
        return next(float(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def markdown(results: list[dict], load: tuple, elapsed: float, malloc: str) -> str:
    def find(path, n):
        return next((r for r in results if r["path"] == path and r["n"] == n), None)

    def us(r):
        return f"{r['min_s'] / r['n'] * 1e6:.2f} ({r['median_s'] / r['n'] * 1e6:.2f})" if r and r["status"] == "ok" else (
            r["status"] if r else "-")

    def per_atom(r, key):
        return f"{r[key] / r['n']:.0f}" if r and r["status"] == "ok" else "-"

    sizes = sorted({r["n"] for r in results})
    lines = [
        "# EFA block alone: reference path vs fused operators",
        "",
        f"One `EuclideanFastAttention` block (features {FEATURES}, {NUM_FREQUENCIES} frequency pairs, Dv = {VALUE_DIM}, "
        f"{GRID_POINTS}-point grid, b_max = pi, float32), N random atoms at {DENSITY} atoms/A^3, r_max = cube diagonal; "
        "forward + backward (gradients of sum(y) with respect to positions and features), one thread, `taskset -c 0`, "
        "a fresh process per case. Time: minimum (median) over repeated passes after a warm-up. Saved: bytes per "
        "atom that autograd keeps for backward (saved_tensors_hooks; distinct storages, less inputs, parameters and "
        "buffers). Peak: growth of the peak resident set during the passes, per atom. BLAS share: the fused path's six "
        "products per pass (12 x 2MG x Dv FLOPs per atom) over its time, as a fraction of the same process's float32 "
        f"2048^3 matmul rate. Allocator: EFA_DEPLOY_MALLOC={malloc}"
        + (" (glibc keeps large freed blocks)." if malloc == "keep" else " (glibc's default: blocks above 32 MB are "
           "unmapped when freed and fault in again on the next pass)."),
        "",
        "| N | reference us/atom | fused us/atom | speed-up | reference saved B/atom | fused saved B/atom "
        "| reference peak B/atom | fused peak B/atom | fused BLAS share of matmul rate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        a, b = find("reference", n), find("fused", n)
        ok = a and b and a["status"] == "ok" and b["status"] == "ok"
        share = (f"{b['blas_flops'] / b['min_s'] / b['matmul_flops_per_s'] * 100:.0f}% "
                 f"(matmul {b['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s)" if b and b["status"] == "ok" else "-")
        lines.append(f"| {n} | {us(a)} | {us(b)} | {a['min_s'] / b['min_s']:.1f}x |" if ok else f"| {n} | {us(a)} | {us(b)} | - |")
        lines[-1] += (f" {per_atom(a, 'saved_bytes')} | {per_atom(b, 'saved_bytes')} | {per_atom(a, 'peak_bytes')} | "
                      f"{per_atom(b, 'peak_bytes')} | {share} |")
    fused = [r for r in results if r["path"] == "fused" and r["status"] == "ok"]
    if len(fused) > 1:
        per = [r["min_s"] / r["n"] for r in fused]
        lines += ["", f"Fused us/atom, largest over smallest across N = {fused[0]['n']} .. {fused[-1]['n']}: "
                      f"{max(per) / min(per):.2f}x."]
    import torch

    lines += [
        "", "## Machine", "",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores; torch {torch.__version__}",
        f"- load average (1/5/15 min) at the start: {' / '.join(f'{v:.2f}' for v in load)}; at the end: "
        f"{' / '.join(f'{v:.2f}' for v in os.getloadavg())}",
        "- other processes (other sessions' builds, tests and training runs) share this machine: absolute times "
        "carry their load; reference and fused run back to back per size",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; whole run {elapsed:.0f} s",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--malloc", choices=["system", "keep"], default="system", help="EFA_DEPLOY_MALLOC of the cases")
    parser.add_argument("--case", nargs=2, metavar=("PATH", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case[0], int(args.case[1]))))
        return
    start, load = time.perf_counter(), os.getloadavg()
    results = []
    for n in sorted(args.sizes):
        for path in PATHS:
            if path == "reference" and n * REFERENCE_BYTES_PER_ATOM > 0.6 * available_memory():
                result = {"path": path, "n": n, "status": f"skipped (needs ~{n * REFERENCE_BYTES_PER_ATOM / 1e9:.0f} GB)"}
            else:
                result = run_in_subprocess(path, n, args.malloc)
            print(json.dumps(result), flush=True)
            results.append(result)
    report = markdown(results, load, time.perf_counter() - start, args.malloc)
    print(report)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"fused_efa_{time.strftime('%Y-%m-%d')}{'_keep' if args.malloc == 'keep' else ''}"
    stem.with_suffix(".md").write_text(report)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
