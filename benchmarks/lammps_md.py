"""MD throughput of pair_style efa in LAMMPS: ms per step and microseconds per atom-step for
1e2 .. 1e5 atoms, on 1 and 2 MPI ranks, EFA model vs the same backbone without EFA, and the
bare model call (energy + forces of the same TorchScript file, no LAMMPS).

    python benchmarks/lammps_md.py                 # CPU, writes benchmarks/results/lammps_md.{md,json}
    python benchmarks/lammps_md.py --device cuda   # GPU machine (ranks share the GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ase import Atoms
from ase.io import write

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from efa_deploy.graph import batch_graph, system_extent  # noqa: E402
from efa_deploy.model import ModelConfig, build_model, energy_and_forces  # noqa: E402
from efa_deploy.modelfile import load_model_file, save_model_file  # noqa: E402

BIN = Path(sys.executable).parent
SPACING = 2.15  # A: a jittered simple-cubic lattice at ~0.1 atoms/A^3, liquid-like
DECK = """\
units metal
boundary f f f
atom_style atomic
read_data data.lmp
pair_style efa device {device} grid 50 extent off
pair_coeff * * {model} H O
velocity all create 300 4928459 mom yes rot yes
timestep 0.0005
fix nve all nve
thermo 1000
run 2
run {steps}
"""


def lattice(n: int, seed: int = 0) -> Atoms:
    rng = np.random.default_rng(seed)
    side = int(np.ceil(n ** (1 / 3)))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n] * SPACING
    positions = grid + rng.uniform(-0.2, 0.2, (n, 3)) + 3.0
    atoms = Atoms(numbers=rng.choice([1, 8], n), positions=positions)
    atoms.cell = np.diag(positions.max(axis=0) + 3.0)
    return atoms


def export(path: Path, use_efa: bool, r_max: float) -> None:
    config = ModelConfig(atomic_numbers=[1, 8], features=32, num_layers=2, cutoff=5.0, use_efa=use_efa,
                         r_max=r_max, num_frequencies=8, value_dim=16, grid_points=50)
    save_model_file(build_model(config, torch.float32), config, path, overwrite=True)


def lammps_ms_per_step(workdir: Path, model: Path, ranks: int, steps: int, device: str) -> float:
    (workdir / "in.bench").write_text(DECK.format(device=device, model=model, steps=steps))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(BIN / "mpiexec"), "-n", str(ranks), str(BIN / "lmp"), "-in", "in.bench", "-log", "none"],
                          cwd=workdir, env=env, capture_output=True, text=True)
    out = proc.stdout
    if proc.returncode != 0:
        raise RuntimeError(f"LAMMPS failed on {ranks} rank(s):\n{out[-3000:]}\n{proc.stderr[-3000:]}")
    loop = re.findall(r"Loop time of ([\d.eE+-]+) on \d+ procs for (\d+) steps", out)[-1]
    return 1e3 * float(loop[0]) / int(loop[1])


def bare_ms_per_step(model: Path, atoms: Atoms, steps: int, device: str) -> float:
    module, meta = load_model_file(model, device=device)
    graph = batch_graph([atoms], meta["atomic_numbers"], meta["cutoff"], getattr(torch, meta["dtype"])).to(device)
    energy_and_forces(module, *graph.inputs())  # warm-up
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        energy_and_forces(module, *graph.inputs())
    sync()
    elapsed = time.perf_counter() - start
    del module, graph
    if device == "cuda":
        torch.cuda.empty_cache()  # the LAMMPS runs that follow need the GPU memory
    return 1e3 * elapsed / steps


def steps_for(n: int) -> int:
    return max(2, min(50, int(2e5 / n)))


def write_report(rows: list, args) -> str:
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if args.device == "cpu":
        cpu = [l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        machine = f"{cpu[0].split(':')[1].strip() if cpu else machine}, {os.cpu_count()} cores"
    else:
        machine = torch.cuda.get_device_name(0)
    lines = [f"# pair_style efa MD throughput ({args.device}: {machine}; torch {torch.__version__})", "",
             "Model (float32): 2 layers, 32 features, cutoff 5 A, ~50 neighbours per atom; EFA: 50-point grid, D = 16, Dv = 16.",
             "ms/step of a velocity-Verlet NVE step (Loop time after 2 warm-up steps); us/atom-step in brackets;",
             "bare = energy + forces of the same TorchScript file from Python (graph prebuilt), one CPU thread, no LAMMPS.", ""]
    head = "| atoms | model | " + " | ".join(f"LAMMPS {r} rank{'s' if r > 1 else ''}" for r in args.ranks) + " | bare model |"
    lines += [head, "|" + "---|" * (3 + len(args.ranks))]
    for row in rows:
        n = row["atoms"]
        cells = [f"{row[f'lammps_{r}']:.1f} ({1e3 * row[f'lammps_{r}'] / n:.1f})" for r in args.ranks]
        lines.append(f"| {n} | {row['model']} | " + " | ".join(cells) + f" | {row['bare']:.1f} ({1e3 * row['bare'] / n:.1f}) |")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "lammps_md" if args.device == "cpu" else "lammps_md_cuda"
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000, 100000])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in args.sizes:
            atoms = lattice(n)
            write(tmp / "data.lmp", atoms, format="lammps-data", specorder=["H", "O"], masses=True)
            r_max = 1.05 * system_extent(atoms.positions) + 1.0
            steps = steps_for(n)
            for kind in ("efa", "local"):
                model = tmp / f"{kind}.pt"
                export(model, kind == "efa", r_max)
                row = {"atoms": n, "model": kind, "steps": steps}
                for ranks in args.ranks:
                    row[f"lammps_{ranks}"] = lammps_ms_per_step(tmp, model, ranks, steps, args.device)
                row["bare"] = bare_ms_per_step(model, atoms, max(2, steps // 2), args.device)
                rows.append(row)
                print(json.dumps(row), flush=True)
                write_report(rows, args)  # a run cut short keeps what it measured
    print(write_report(rows, args))


if __name__ == "__main__":
    main()
