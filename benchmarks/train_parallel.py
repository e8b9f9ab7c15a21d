"""Data-parallel training throughput: structures per second of `efa-train` on 1 process and of
`torchrun --nproc-per-node 2 efa-train` on 2 (issue 17: target >= 1.7x on 2 cores).

What is timed: whole efa-train runs (data loading, neighbour lists, steps, the end-of-epoch
validation of 16 structures, checkpoints) of an EFA model (32 features, 2 layers, float64) on 512
random Lennard-Jones clusters of 8-14 atoms, global batch 16 (8 per rank at 2 processes), one
torch thread per process; throughput = steps x 16 / the run's elapsed_s (rank 0's clock). The
1- and 2-process runs alternate for `--rounds` rounds; each takes its best round. The load
average before each round is recorded: on a shared machine the 2-process number needs two idle
cores.

Usage:  python benchmarks/train_parallel.py [--rounds 2] [--epochs 2] [--batch 16]   (about 2-4 minutes)
Writes benchmarks/results/train_parallel.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
BATCH = 16
MODEL = {"features": 32, "num_layers": 2, "cutoff": 4.0, "num_radial": 8, "use_efa": True, "r_max": 12.0,
         "grid_points": 50, "num_frequencies": 4, "value_dim": 8}


def make_data(path: Path, count: int) -> None:
    from ase import Atoms
    from ase.calculators.lj import LennardJones

    rng = np.random.default_rng(0)
    n_max = 14
    arrays = {k: [] for k in ("positions", "atomic_numbers", "energy", "forces", "node_mask")}
    while len(arrays["energy"]) < count:
        n = int(rng.integers(8, n_max + 1))
        pos = rng.uniform(0.0, 6.0, (n, 3))
        if (np.linalg.norm(pos[:, None] - pos[None], axis=-1) + 9 * np.eye(n)).min() < 1.3:
            continue
        atoms = Atoms(numbers=rng.choice([1, 6, 8], n), positions=pos)
        atoms.calc = LennardJones(sigma=1.2, epsilon=0.5, rc=4.0, smooth=True)
        pad = n_max - n
        arrays["positions"].append(np.pad(pos, ((0, pad), (0, 0))))
        arrays["atomic_numbers"].append(np.pad(atoms.numbers, (0, pad)))
        arrays["energy"].append(atoms.get_potential_energy())
        arrays["forces"].append(np.pad(atoms.get_forces(), ((0, pad), (0, 0))))
        arrays["node_mask"].append(np.arange(n_max) < n)
    np.savez(path, **{k: np.array(v) for k, v in arrays.items()})


def run(config: Path, output: Path, processes: int, batch: int = BATCH) -> dict:
    command = ([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(processes), "--no-python"]
               if processes > 1 else [])
    command += [str(BIN / "efa-train"), str(config), "-o", str(output), "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            check=False)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    return {"steps": summary["step"], "elapsed_s": summary["elapsed_s"],
            "structures_per_s": summary["step"] * batch / summary["elapsed_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=BATCH, help="global batch size (split over the processes)")
    parser.add_argument("--output", type=Path, default=None, help="default: results/train_parallel[_batchN].json")
    args = parser.parse_args()
    if args.output is None:
        args.output = RESULTS / ("train_parallel.json" if args.batch == BATCH else f"train_parallel_batch{args.batch}.json")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_data(tmp / "lj.npz", 512 + 16)
        config = {"data": {"path": str(tmp / "lj.npz"), "n_train": 512, "n_val": 16, "n_test": 0},
                  "model": MODEL,
                  "training": {"batch_size": args.batch, "epochs": args.epochs, "progress": False, "plot_every": 1e9,
                               "checkpoint_every": 10**6, "val_batch_size": 16, "threads": 1}}
        (tmp / "c.yaml").write_text(yaml.safe_dump(config))
        rounds = []
        for r in range(args.rounds):
            for processes in (1, 2):
                load = os.getloadavg()[0]
                result = run(tmp / "c.yaml", tmp / f"run{r}_{processes}", processes, args.batch)
                rounds.append({"round": r, "processes": processes, "load_before": round(load, 2), **result})
                print(json.dumps(rounds[-1]), flush=True)
    best = {p: max(x["structures_per_s"] for x in rounds if x["processes"] == p) for p in (1, 2)}
    report = {"model": MODEL, "batch": args.batch, "structures": 512, "epochs": args.epochs, "rounds": rounds,
              "best_structures_per_s": best, "speedup": best[2] / best[1], "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine()}
    args.output.write_text(json.dumps(report, indent=1))
    lines = ["# Data-parallel training throughput (benchmarks/train_parallel.py)", "",
             f"EFA model {MODEL['features']} features x {MODEL['num_layers']} layers, float64, global batch {args.batch}, "
             f"512 LJ clusters of 8-14 atoms, {args.epochs} epochs per run, 1 torch thread per process, "
             f"{os.cpu_count()} cores; whole efa-train runs (validation and checkpoints included).", "",
             "| processes | best structures/s | runs (structures/s, load average before) |", "|---|---|---|"]
    for p in (1, 2):
        runs = ", ".join(f"{x['structures_per_s']:.1f} (load {x['load_before']})" for x in rounds if x["processes"] == p)
        lines.append(f"| {p} | {best[p]:.1f} | {runs} |")
    lines += ["", f"Speed-up at 2 processes: **{report['speedup']:.2f}x**."]
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
