"""Periodic EFA stages: the direct structure-factor sums (erope.key_value_sums / query_contraction
with omega = 1 and integer reciprocal-lattice directions) vs the SPME mesh (efa_deploy/model/mesh.py).

What is timed: stage 1 (KV) + stage 2 (y) forward, then the backward of sum(w * y) (w random) to the
positions, keys, queries and values: one thread, float32, M = 8 complex channels, D = 16 (2D = 32
columns), one cubic box at liquid-water density (0.1 atoms/A^3), random positions, all n with
|2 pi n / L| < k_max = 1.5 1/A (G grows with the volume, so the direct sums are O(N^2)).
The mesh uses mesh_size(max|n|, oversampling, order) with the defaults unless told otherwise.
Each case runs in a fresh process with EFA_DEPLOY_MALLOC=keep (as pair_style efa does); "peak
memory" is the growth of its peak resident set size (ru_maxrss) over the timed passes: saved
activations, temporaries and the allocator's cache. The direct form is run only where its time
(extrapolated from the largest measured size in proportion to N G) stays under --direct-limit
seconds and its per-atom x G phase tensors stay under 2 GB; elsewhere the extrapolation is
reported and marked as such.

--accuracy: float64 max relative errors of the mesh vs the direct sums (stage 1: KV, stage 2: y
from the exact KV) for orders x oversamplings, over random orthogonal and triclinic cells.

Usage (as run for the results):
  taskset -c 1 nice -n 5 .venv/bin/python benchmarks/periodic_mesh.py
  taskset -c 1 nice -n 5 .venv/bin/python benchmarks/periodic_mesh.py --accuracy
Writes benchmarks/results/periodic_mesh.{json,md} (the accuracy run merges into them).
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
M, D, DENSITY, K_MAX = 8, 16, 0.1, 1.5


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def box_indices(torch, length: float, k_max: float, dtype):
    top = int(k_max * length / (2 * math.pi)) + 1
    r = torch.arange(-top, top + 1, dtype=dtype)
    n = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    return n[torch.linalg.norm(2 * math.pi * n / length, dim=1) < k_max]


def run_case(form: str, atoms: int, order: int, oversampling: float, repeats: int) -> dict:
    import torch

    import efa_deploy.ops  # noqa: F401  (EFA_DEPLOY_MALLOC=keep)
    from efa_deploy.model import erope
    from efa_deploy.model.mesh import mesh_key_value_sums, mesh_query_contraction, mesh_size

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dt = torch.float32
    length = (atoms / DENSITY) ** (1 / 3)
    n = box_indices(torch, length, K_MAX, dt)
    mesh = mesh_size([int(n.abs().max())] * 3, oversampling, order)
    p = (2 * math.pi * torch.rand(atoms, 3, dtype=dt)).requires_grad_(True)
    k = torch.randn(atoms, M, 2, dtype=dt, requires_grad=True)
    q = torch.randn(atoms, M, 2, dtype=dt, requires_grad=True)
    v = torch.randn(atoms, D, dtype=dt, requires_grad=True)
    w = torch.randn(atoms, D, dtype=dt)
    owned = torch.ones(atoms, dtype=dt)
    batch = torch.zeros(atoms, dtype=torch.long)
    one = torch.ones(M, dtype=dt)

    def step():
        if form == "direct":
            kv = erope.key_value_sums(p, k, v, owned, batch, 1, one, n)
            y = erope.query_contraction(p, q, kv, batch, one, n)
        else:
            kv = mesh_key_value_sums(p, k, v, owned, batch, 1, n, mesh, order)
            y = mesh_query_contraction(p, q, kv, batch, n, mesh, order)
        torch.autograd.grad(torch.sum(w * y), [p, k, q, v])
        return y.detach()

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    y = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        y = step()
        times.append(time.perf_counter() - t0)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"form": form, "atoms": atoms, "box_A": length, "G": int(n.shape[0]), "max_index": int(n.abs().max()),
           "seconds": min(times), "all_seconds": times, "peak_memory_MB": (rss1 - rss0) / 2**20}
    if form == "mesh":
        out.update(mesh=mesh, order=order, oversampling=oversampling)
        if atoms <= 3000:  # float32 mesh vs float32 direct y, same inputs
            with torch.no_grad():
                kv = erope.key_value_sums(p, k, v, owned, batch, 1, one, n)
                ref = erope.query_contraction(p, q, kv, batch, one, n)
            out["max_rel_error_y_vs_direct"] = float((y - ref).abs().max() / ref.abs().max())
    return out


def subprocess_case(form: str, atoms: int, order: int, oversampling: float, repeats: int) -> dict:
    env = dict(os.environ, EFA_DEPLOY_MALLOC="keep", OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--case", form, str(atoms), str(order), str(oversampling), str(repeats)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def accuracy(orders, oversamplings) -> list[dict]:
    import torch

    from efa_deploy.model import erope
    from efa_deploy.model.mesh import mesh_key_value_sums, mesh_query_contraction, mesh_size

    torch.set_num_threads(1)
    dt = torch.float64
    g = torch.Generator().manual_seed(1)
    cases = []
    for triclinic in (False, True):
        for seed in range(2):
            cell = torch.diag(12.0 + 4.0 * torch.rand(3, generator=g, dtype=dt))
            if triclinic:
                cell = cell + torch.triu(torch.rand(3, 3, generator=g, dtype=dt) * 6.0 - 3.0, 1)
            atoms = 300
            r = torch.rand(atoms, 3, generator=g, dtype=dt) @ cell
            p = 2 * math.pi * r @ torch.linalg.inv(cell)
            inv = torch.linalg.inv(cell)
            top = 12
            a = torch.arange(-top, top + 1, dtype=dt)
            n = torch.stack(torch.meshgrid(a, a, a, indexing="ij"), -1).reshape(-1, 3)
            n = n[torch.linalg.norm(2 * math.pi * n @ inv.T, dim=1) < 2.0]
            keys = torch.randn(atoms, M, 2, generator=g, dtype=dt)
            queries = torch.randn(atoms, M, 2, generator=g, dtype=dt)
            values = torch.randn(atoms, D, generator=g, dtype=dt)
            cases.append((p, keys, queries, values, n))
    rows = []
    for order in orders:
        for over in oversamplings:
            e1 = e2 = 0.0
            for p, keys, queries, values, n in cases:
                one = torch.ones(M, dtype=dt)
                owned = torch.ones(p.shape[0], dtype=dt)
                batch = torch.zeros(p.shape[0], dtype=torch.long)
                mesh = mesh_size([int(x) for x in n.abs().amax(0).tolist()], over, order)
                kv = erope.key_value_sums(p, keys, values, owned, batch, 1, one, n)
                y = erope.query_contraction(p, queries, kv, batch, one, n)
                kv_m = mesh_key_value_sums(p, keys, values, owned, batch, 1, n, mesh, order)
                y_m = mesh_query_contraction(p, queries, kv, batch, n, mesh, order)
                e1 = max(e1, float((kv_m - kv).abs().max() / kv.abs().max()))
                e2 = max(e2, float((y_m - y).abs().max() / y.abs().max()))
            rows.append({"order": order, "oversampling": over, "stage1_max_rel_error": e1, "stage2_max_rel_error": e2})
            print(rows[-1], flush=True)
    return rows


def write(results: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "periodic_mesh.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = ["# Periodic EFA stages: direct structure-factor sums vs SPME mesh", "",
             f"CPU: {results.get('cpu', '?')}; 1 thread (taskset -c 1), float32, M = {M}, D = {D} (2D = {2 * D} "
             f"columns), 0.1 atoms/A^3, k_max = {K_MAX} 1/A. Timed: stage 1 + stage 2 forward and the backward to "
             "positions, keys, queries, values (minimum over repeats; 1e5 atoms: one pass). The machine was "
             f"shared (2 cores; 1-minute load average {results.get('load_average', '?')} at the end of the "
             "timing run), so absolute times are inflated; ratios within one table are fairer.", ""]
    if "timing" in results:
        t = results["timing"]
        lines += [f"Mesh: order {t['order']}, oversampling {t['oversampling']}.", "",
                  "| atoms | box A | G | mesh | mesh s | mesh us/atom | mesh peak MB | direct s | direct us/atom | "
                  "direct peak MB | speed-up | f32 max rel err y |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in t["rows"]:
            mesh, direct = row["mesh"], row["direct"]
            d_s = f"{direct['seconds']:.3g}" + ("" if direct["measured"] else " (extrapolated)")
            d_mb = f"{direct['peak_memory_MB']:.0f}" if direct["measured"] else "-"
            err = mesh.get("max_rel_error_y_vs_direct")
            lines.append(
                f"| {row['atoms']} | {mesh['box_A']:.1f} | {mesh['G']} | {'x'.join(map(str, mesh['mesh']))} | "
                f"{mesh['seconds']:.3g} | {1e6 * mesh['seconds'] / row['atoms']:.0f} | {mesh['peak_memory_MB']:.0f} | "
                f"{d_s} | {1e6 * direct['seconds'] / row['atoms']:.0f} | {d_mb} | "
                f"{direct['seconds'] / mesh['seconds']:.2g} | {'-' if err is None else f'{err:.1e}'} |")
        lines += ["", f"Mesh scaling exponent (time ~ N^a) from {t['exponent_range'][0]} to "
                  f"{t['exponent_range'][1]} atoms: a = {t['mesh_exponent']:.3f}.", ""]
    if "accuracy" in results:
        acc = results["accuracy"]
        overs = sorted({r["oversampling"] for r in acc})
        lines += ["## Accuracy (float64, max |mesh - direct| / max |direct|; 4 random cells, 2 triclinic, "
                  "300 atoms, |n| up to 2.0 1/A)", "",
                  "stage 1 (KV) / stage 2 (y from the exact KV):", "",
                  "| order | " + " | ".join(f"oversampling {o}" for o in overs) + " |",
                  "|---" * (len(overs) + 1) + "|"]
        for order in sorted({r["order"] for r in acc}):
            cells = []
            for o in overs:
                r = next(x for x in acc if x["order"] == order and x["oversampling"] == o)
                cells.append(f"{r['stage1_max_rel_error']:.1e} / {r['stage2_max_rel_error']:.1e}")
            lines.append(f"| {order} | " + " | ".join(cells) + " |")
        lines.append("")
    (RESULTS / "periodic_mesh.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", nargs=5)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000, 100000])
    ap.add_argument("--order", type=int, default=6)
    ap.add_argument("--oversampling", type=float, default=2.0)
    ap.add_argument("--direct-limit", type=float, default=60.0)
    ap.add_argument("--accuracy", action="store_true")
    ap.add_argument("--rewrite", action="store_true")
    args = ap.parse_args()
    if args.rewrite:  # the tables again from the json
        write(json.loads((RESULTS / "periodic_mesh.json").read_text()))
        return
    if args.case:
        form, atoms, order, over, repeats = args.case
        print(json.dumps(run_case(form, int(atoms), int(order), float(over), int(repeats))))
        return
    path = RESULTS / "periodic_mesh.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["cpu"] = cpu_model()
    if args.accuracy:
        results["accuracy"] = accuracy([4, 5, 6, 8], [1.5, 2.0, 2.5, 3.0])
        write(results)
        return
    rows = []
    direct_ref = None  # (atoms * G, seconds) of the largest measured direct case
    for atoms in args.sizes:
        repeats = 3 if atoms <= 10000 else 1
        mesh = subprocess_case("mesh", atoms, args.order, args.oversampling, repeats)
        print(json.dumps(mesh), flush=True)
        work = atoms * mesh["G"]
        phase_bytes = atoms * M * 2 * mesh["G"] * 4
        predicted = None if direct_ref is None else direct_ref[1] * work / direct_ref[0]
        if (predicted is None or predicted < args.direct_limit) and phase_bytes < 2 * 2**30:
            direct = subprocess_case("direct", atoms, args.order, args.oversampling, repeats)
            direct["measured"] = True
            direct_ref = (work, direct["seconds"])
        else:
            direct = {"seconds": direct_ref[1] * work / direct_ref[0], "measured": False,
                      "note": f"extrapolated from {direct_ref[0]} atom*G in proportion to N G"}
        print(json.dumps(direct), flush=True)
        rows.append({"atoms": atoms, "mesh": mesh, "direct": direct})
    first, last = rows[0], rows[-1]
    exponent = math.log(last["mesh"]["seconds"] / first["mesh"]["seconds"]) / math.log(last["atoms"] / first["atoms"])
    results["load_average"] = round(os.getloadavg()[0], 1)
    results["timing"] = {"order": args.order, "oversampling": args.oversampling, "rows": rows,
                         "mesh_exponent": exponent, "exponent_range": [first["atoms"], last["atoms"]]}
    write(results)
    print(f"mesh exponent {exponent:.3f}")


if __name__ == "__main__":
    main()
