"""Issue 16's speed benchmark: one energy + forces + stress call of a periodic model, one thread,
float32, the local backbone against the same backbone with the periodic EFA term on the direct
sum over k-vectors and on the k-space mesh (kspace direct / mesh), for water boxes of about 1e3,
1e4 and 1e5 atoms (the first frame of examples/periodic/data/water_ions_gfn1.extxyz, 24 H2O in 8.95 A,
replicated). The model is the ionic benchmark's size (examples/periodic/ionic.yaml: 32 features,
2 layers, 4.5 A cutoff, k_max 1.5 1/A) with an EFA block of 8 frequency channels x 16 values
(efa-direct, efa-mesh: ionic.yaml's block until 2026-12-06, run.py's efa-large), 4 x 8 (*-small)
or 4 x 4 (*-tiny: ionic.yaml's and the shipped model's block now), randomised weights (speed does
not depend on them), fused inference operators.

Each (variant, size) runs in a fresh process: the graph is built, one warm-up call, then the
minimum CPU time (time.process_time) of the repeats, and the peak resident growth per atom
(VmHWM after the calls minus VmRSS before them, graph included). --rounds R runs R such processes
per variant, interleaved with the other variants, and reports the median time and the median of
the rounds' EFA / local ratios (this VM's speed drifts between minutes). A call that would take
longer than --skip-over seconds (estimated from the smaller sizes) is skipped and said so.

    taskset -c 1 python benchmarks/periodic_step.py      # writes benchmarks/results/periodic_step.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SIZES = {"1e3": (3, 2, 2), "3e3": (4, 3, 3), "1e4": (5, 5, 6), "1e5": (11, 11, 11)}
VARIANTS = ("local", "efa-direct", "efa-mesh")
# --variants may also name efa-direct-small / efa-mesh-small (4 x 8) and *-tiny (4 x 4)
BLOCKS = {"": dict(num_frequencies=8, value_dim=16), "-small": dict(num_frequencies=4, value_dim=8),
          "-tiny": dict(num_frequencies=4, value_dim=4)}


def status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise KeyError(key)


def measure(variant: str, size: str, repeats: int) -> dict:
    """One process: time and memory of one variant at one size."""
    import torch
    from ase.io import read

    from efa_deploy.graph import batch_graph
    from efa_deploy.model import ModelConfig, build_model, energy_forces_stress, use_fused

    torch.set_num_threads(1)
    suffix = next((k for k in BLOCKS if k and variant.endswith(k)), "")
    variant = variant.removesuffix(suffix)
    frame = read(REPO / "examples" / "periodic" / "data" / "water_ions_gfn1.extxyz", index=0)
    atoms = frame * SIZES[size]
    config = ModelConfig(atomic_numbers=[1, 8, 11, 17], features=32, num_layers=2, cutoff=4.5, num_radial=16,
                         use_efa=variant != "local", periodic_efa=variant != "local", k_max=1.5, **BLOCKS[suffix])
    torch.manual_seed(0)
    model = use_fused(build_model(config, torch.float32).eval(), True)
    for p in model.parameters():
        p.requires_grad_(False)
    rss_before = status_kb("VmRSS:")
    graph = batch_graph([atoms], config.atomic_numbers, config.cutoff, torch.float32, cell=variant != "local")
    cell = torch.tensor(atoms.cell.array.reshape(1, 3, 3), dtype=torch.float32)
    mesh, kvectors = [], 0
    if variant != "local":
        from efa_deploy.model.reciprocal import lattice_indices

        mesh = model.set_kspace("mesh" if variant == "efa-mesh" else "direct", cell.double())
        kvectors = int(lattice_indices(cell.double(), config.k_max).shape[0])
    inputs = graph.inputs()
    times = []
    for r in range(repeats + 1):
        t0 = time.process_time()
        energy, forces, _, stress = energy_forces_stress(model, *inputs, cell=None if variant != "local" else cell)
        if r > 0:
            times.append(time.process_time() - t0)
    peak = status_kb("VmHWM:")
    return {"variant": variant + suffix, "size": size, "atoms": len(atoms),
            "edges": int(graph.edge_index.shape[1]),
            "kvectors": kvectors, "mesh": mesh, "seconds": min(times),
            "us_per_atom": 1e6 * min(times) / len(atoms), "kb_per_atom": (peak - rss_before) / len(atoms),
            "energy": float(energy.detach().sum())}


def estimate_skip(previous: dict | None, variant: str, size: str, args) -> str:
    """Why a call is skipped (estimated from the last smaller size), or ''."""
    if previous is None:
        return ""
    growth = SIZES[size][0] * SIZES[size][1] * SIZES[size][2] / previous["cells"]
    # direct: N x G, quadratic in N; others about linear
    estimate = previous["seconds"] * growth ** (2 if variant.startswith("efa-direct") else 1)
    memory = previous["kb_per_atom"] * previous["atoms"] * growth / 1e6
    if estimate > args.skip_over or memory > args.skip_memory:
        return f"estimated {estimate:.0f} s and {memory:.0f} GB per call"
    return ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1,
                   help="fresh processes per variant and size, interleaved; s/call is their median and "
                        "x local the median of the rounds' ratios (this VM drifts by 20%% between minutes)")
    p.add_argument("--skip-over", type=float, default=300.0, help="skip calls estimated to take longer (s)")
    p.add_argument("--skip-memory", type=float, default=16.0, help="skip calls estimated to need more (GB)")
    p.add_argument("--one", nargs=2, metavar=("VARIANT", "SIZE"), help=argparse.SUPPRESS)
    p.add_argument("--name", default="periodic_step")
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1], args.repeats)))
        return
    rows, last = [], {}
    for size in args.sizes:
        runs = {}  # variant -> one result per round
        for rnd in range(args.rounds):
            for variant in args.variants:
                if rnd == 0:
                    skipped = estimate_skip(last.get(variant), variant, size, args)
                    if skipped:
                        rows.append({"variant": variant, "size": size, "skipped": skipped})
                        print(rows[-1], flush=True)
                        continue
                elif variant not in runs:
                    continue
                out = subprocess.run([sys.executable, __file__, "--one", variant, size, "--repeats", str(args.repeats)],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    rows.append({"variant": variant, "size": size, "failed": out.stderr.strip().splitlines()[-1]})
                    print(rows[-1], flush=True)
                    runs.pop(variant, None)
                    continue
                runs.setdefault(variant, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(runs[variant][-1], flush=True)
        for variant, results in runs.items():
            row = dict(results[0])
            times = [r["seconds"] for r in results]
            row["seconds"] = statistics.median(times)
            row["us_per_atom"] = 1e6 * row["seconds"] / row["atoms"]
            row["rounds"] = times
            if "local" in runs and len(runs["local"]) == len(results):
                row["x_local"] = statistics.median(r["seconds"] / l["seconds"] for r, l in zip(results, runs["local"]))
            rows.append(row)
            cells = SIZES[size][0] * SIZES[size][1] * SIZES[size][2]
            last[variant] = {"seconds": row["seconds"], "cells": cells, "atoms": row["atoms"],
                             "kb_per_atom": row["kb_per_atom"]}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one thread, torch float32"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    lines = [f"# Periodic step: local vs periodic EFA (direct, mesh)\n", f"Machine: {machine}. "
             "One energy + forces + stress call, minimum CPU time of the repeats in a process; with rounds, "
             "the median over the rounds' processes and x local the median of the rounds' ratios; peak resident "
             "growth per atom (graph included); malloc policy " + (os.environ.get("EFA_DEPLOY_MALLOC") or "lean") +
             ". `python benchmarks/periodic_step.py " + " ".join(sys.argv[1:]) + "`\n",
             "| variant | size | atoms | k-vectors | mesh | s/call | us/atom | x local | KB/atom |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "seconds" not in r:
            lines.append(f"| {r['variant']} | {r['size']} | | | | {r.get('skipped') or r.get('failed')} | | | |")
            continue
        ratio = r.get("x_local", float("nan"))
        mesh = "x".join(map(str, r["mesh"])) or "-"
        lines.append(f"| {r['variant']} | {r['size']} | {r['atoms']} | {r['kvectors']} | {mesh} | {r['seconds']:.3f} "
                     f"| {r['us_per_atom']:.1f} | {ratio:.2f} | {r['kb_per_atom']:.1f} |")
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
