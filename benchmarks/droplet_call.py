"""Issue 18's CPU targets: one energy + forces call of a shipped model on the 3,072-atom droplet of
examples/large_droplet (64 copies of export/water16.xyz 11 A apart, 62 A across, grid auto),
one thread, as a multiple of a 2048^3 float32 matmul timed in the same process (target <= 4),
and its peak resident growth per atom (target <= 32 KB).

Time: the model call and the matmul interleaved in one process, the minimum of the repeats, CPU
time (time.process_time: one thread, so other jobs on a shared core do not count; wall time is
reported too). Memory: a fresh process per model and allocator setting: the model loaded and
profiled on a small droplet, then VmHWM (reset) after three calls on the droplet minus VmRSS
before them: what an MD run holds at its peak, the allocator's free lists included.

    taskset -c 1 python benchmarks/droplet_call.py MODEL.pt [MODEL.pt ...] [--malloc system keep ...]
        # writes benchmarks/results/droplet_call.{md,json} (--name changes the name)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MATMUL = 2048


def droplet(copies: int = 64, spacing: float = 11.0):
    """examples/large_droplet/make_droplet.py's droplet: `copies` water16.xyz clusters."""
    from ase.io import read

    from efa_deploy.structures import tile_cluster

    return tile_cluster(read(REPO / "export" / "water16.xyz"), copies, spacing)


def prepared(model_path: str, copies: int):
    """The scripted model with the grid for the droplet installed, and the droplet's graph inputs."""
    import torch

    from efa_deploy.graph import structure_graph, system_extent
    from efa_deploy.modelfile import load_model_file

    module, metadata = load_model_file(model_path)
    atoms = droplet(copies)
    dtype = getattr(torch, metadata["dtype"])
    if metadata["efa"]["enabled"]:
        module.select_grid(system_extent(atoms.positions))
    graph = structure_graph(atoms, metadata["atomic_numbers"], metadata["cutoff"], dtype)
    return module, graph, metadata


def call(module, graph) -> None:
    from efa_deploy.model import energy_and_forces

    energy_and_forces(module, *graph.inputs())


def timings(models: list[str], repeats: int, copies: int) -> dict:
    """Model calls and float32 matmuls interleaved in this process; minimum CPU and wall seconds."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(MATMUL, MATMUL)
    b = torch.randn(MATMUL, MATMUL)
    runs = {path: prepared(path, copies) for path in models}
    for module, graph, _ in runs.values():  # TorchScript profiles and optimises in its first calls
        for _ in range(3):
            call(module, graph)
    best = {key: {"cpu_s": float("inf"), "wall_s": float("inf")} for key in ["matmul", *models]}

    def measure(key: str, fn) -> None:
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        best[key]["cpu_s"] = min(best[key]["cpu_s"], time.process_time() - c0)
        best[key]["wall_s"] = min(best[key]["wall_s"], time.perf_counter() - w0)

    for _ in range(repeats):
        measure("matmul", lambda: torch.mm(a, b))
        for path, (module, graph, _) in runs.items():
            measure(path, lambda m=module, g=graph: call(m, g))
            measure("matmul", lambda: torch.mm(a, b))
    out = {"matmul": best["matmul"], "models": {}}
    for path, (module, graph, metadata) in runs.items():
        out["models"][path] = {**best[path], "atoms": graph.positions.shape[0], "edges": graph.edge_index.shape[1],
                               "dtype": metadata["dtype"], "grid": module.grid_size(), "ops": metadata.get("ops"),
                               "matmul_multiple": best[path]["cpu_s"] / best["matmul"]["cpu_s"]}
    return out


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_probe(model_path: str, copies: int, calls: int = 3) -> dict:
    """Peak resident growth over `calls` calls on the droplet (this process must be fresh)."""
    import resource

    import torch

    torch.set_num_threads(1)
    small, small_graph, _ = prepared(model_path, 2)
    for _ in range(3):
        call(small, small_graph)
    module, graph, _ = prepared(model_path, copies)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu = []
    for _ in range(calls):
        t0 = time.process_time()
        call(module, graph)
        cpu.append(time.process_time() - t0)
    n = graph.positions.shape[0]
    return {"kb_per_atom": (_status_kb("VmHWM") - before) / n, "after_kb_per_atom": (_status_kb("VmRSS") - before) / n,
            "faults_per_call": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / calls, "atoms": n,
            "cpu_s": min(cpu)}


PROBE = "import json, sys; sys.path.insert(0, sys.argv[1]); from droplet_call import memory_probe; " \
        "print(json.dumps(memory_probe(sys.argv[2], int(sys.argv[3]))))"


def fresh_memory(model_path: str, copies: int, malloc: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", EFA_DEPLOY_MALLOC=malloc)
    out = subprocess.run([sys.executable, "-c", PROBE, str(Path(__file__).parent), model_path, str(copies)],
                         env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model files (label=PATH names a row)")
    parser.add_argument("--malloc", nargs="+", default=["system", "keep", "lean"],
                        help="EFA_DEPLOY_MALLOC settings for the memory probes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--copies", type=int, default=64, help="water16 clusters (64: 3,072 atoms)")
    parser.add_argument("--name", default="droplet_call")
    args = parser.parse_args()
    labels = dict(m.split("=", 1) if "=" in m else (Path(m).name, m) for m in args.models)
    paths = list(labels.values())
    report = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, 1 thread, "
                         f"cores allowed {sorted(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.1f}",
              "torch": __import__("torch").__version__, "labels": labels}
    report["time"] = timings(paths, args.repeats, args.copies)
    report["memory"] = {label: {m: fresh_memory(path, args.copies, m) for m in args.malloc}
                        for label, path in labels.items()}
    report["load_average_after"] = os.getloadavg()[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    t = report["time"]
    lines = [f"# One energy + forces call on the {args.copies * 48}-atom droplet, 1 thread", "",
             f"Machine: {report['machine']} (load average {report['load_average_after']:.1f} after); "
             f"torch {report['torch']}. Minimum of {args.repeats} interleaved repeats, CPU time.", "",
             f"2048^3 float32 matmul: {t['matmul']['cpu_s']:.3f} s CPU ({t['matmul']['wall_s']:.3f} s wall, "
             f"{2 * MATMUL ** 3 / t['matmul']['cpu_s'] / 1e9:.0f} GFLOP/s)", "",
             "| model | dtype | grid | s per call (CPU) | wall | x matmul (target <= 4) | " +
             " | ".join(f"peak KB/atom, {m}" for m in args.malloc) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(args.malloc)]
    for label, path in labels.items():
        r = t["models"][path]
        mem = " | ".join(f"{report['memory'][label][m]['kb_per_atom']:.1f}" for m in args.malloc)
        lines.append(f"| {label} | {r['dtype']} | {r['grid']} | {r['cpu_s']:.3f} | {r['wall_s']:.3f} | "
                     f"{r['matmul_multiple']:.2f} | {mem} |")
    lines += ["", "Page faults per call (memory probe): " + "; ".join(
        f"{label} {m} {report['memory'][label][m]['faults_per_call']:.0f}" for label in labels for m in args.malloc)]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
