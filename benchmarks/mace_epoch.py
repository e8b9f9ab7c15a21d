"""Epoch time of efa-train against MACE's own trainer (mace_run_train, mace-torch) on the same data
(issue 17: target, the EFA model at least 3x faster per epoch on the CPU).

The data: train_parallel.py's 512 + 16 random Lennard-Jones clusters of 8-14 atoms (H, C, O),
written once as npz (efa-train) and as extxyz (mace_run_train). Models of matched width: EFA
32 features x 2 layers (train_parallel.MODEL, with its EFA block), MACE 32 channels, max_L 0,
correlation 3, 2 interactions; cutoff 4 A, 8 radial functions, batch 16, float64, energy + force
loss, validation on the 16 held-out structures every epoch, one thread, one process, the CPU.
Each trainer runs for 1 and for 1 + `--epochs` epochs; time per epoch = the difference of the
two wall times / `--epochs`, so imports, data loading and neighbour lists drop out. The two
trainers alternate for `--rounds` rounds; each keeps its best round.

Usage:  taskset -c 1 python benchmarks/mace_epoch.py [--rounds 2] [--epochs 3]   (about 5 minutes)
Writes benchmarks/results/mace_epoch.md and .json. Needs mace-torch (the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_parallel import BATCH, MODEL, make_data  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
TRAIN, VALID = 512, 16
MACE = {"model": "MACE", "num_channels": 32, "max_L": 0, "correlation": 3, "num_interactions": 2,
        "r_max": MODEL["cutoff"], "num_radial_basis": MODEL["num_radial"]}


def write_extxyz(npz: Path, out: Path) -> None:
    """The npz clusters as extxyz with REF_energy / REF_forces (mace_run_train's default keys)."""
    from ase import Atoms
    from ase.io import write

    data = np.load(npz)
    frames = []
    for pos, z, e, f, mask in zip(data["positions"], data["atomic_numbers"], data["energy"], data["forces"],
                                  data["node_mask"]):
        atoms = Atoms(numbers=z[mask], positions=pos[mask])
        atoms.info["REF_energy"] = float(e)
        atoms.arrays["REF_forces"] = f[mask]
        frames.append(atoms)
    write(out / "train.xyz", frames[:TRAIN])
    write(out / "valid.xyz", frames[TRAIN:])


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    if result.returncode:
        raise RuntimeError(" ".join(command) + "\n" + (result.stdout + result.stderr)[-3000:])
    return time.perf_counter() - start


def efa_command(tmp: Path, epochs: int, tag: str) -> list[str]:
    config = {"data": {"path": str(tmp / "lj.npz"), "n_train": TRAIN, "n_val": VALID, "n_test": 0},
              "model": MODEL,
              "training": {"batch_size": BATCH, "epochs": epochs, "progress": False, "plot_every": 1e9,
                           "checkpoint_every": 10**6, "val_batch_size": VALID, "threads": 1, "dtype": "float64"}}
    path = tmp / f"efa_{tag}.yaml"
    path.write_text(yaml.safe_dump(config))
    return [str(BIN / "efa-train"), str(path), "-o", str(tmp / f"efa_{tag}"), "--device", "cpu"]


def mace_command(tmp: Path, epochs: int, tag: str) -> list[str]:
    options = {**MACE, "name": f"mace_{tag}", "work_dir": str(tmp / f"mace_{tag}"), "train_file": "train.xyz",
               "valid_file": "valid.xyz", "E0s": "average", "batch_size": BATCH, "valid_batch_size": VALID,
               "max_num_epochs": epochs, "eval_interval": 1, "device": "cpu", "default_dtype": "float64",
               "loss": "weighted", "energy_weight": 1.0, "forces_weight": 10.0, "num_workers": 0, "seed": 0}
    return [str(BIN / "mace_run_train")] + [f"--{k}={v}" for k, v in options.items()]


def parameters(mace_model: Path) -> dict:
    import torch

    from efa_deploy.model import ModelConfig, build_model

    efa = build_model(ModelConfig(atomic_numbers=[1, 6, 8], **MODEL))
    mace = torch.load(mace_model, map_location="cpu", weights_only=False)
    return {"efa": sum(p.numel() for p in efa.parameters()), "mace": sum(p.numel() for p in mace.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="extra epochs of the longer run")
    parser.add_argument("--output", type=Path, default=RESULTS / "mace_epoch.json")
    args = parser.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_data(tmp / "lj.npz", TRAIN + VALID)
        write_extxyz(tmp / "lj.npz", tmp)
        for r in range(args.rounds):
            for name, command in (("efa", efa_command), ("mace", mace_command)):
                load = os.getloadavg()[0]
                short = timed(command(tmp, 1, f"{r}_short"), tmp)
                long = timed(command(tmp, 1 + args.epochs, f"{r}_long"), tmp)
                rounds.append({"round": r, "trainer": name, "load_before": round(load, 2), "wall_1_epoch_s": short,
                               f"wall_{1 + args.epochs}_epochs_s": long, "s_per_epoch": (long - short) / args.epochs})
                print(json.dumps(rounds[-1]), flush=True)
        counts = parameters(next((tmp / "mace_0_short").rglob("*.model")))
    best = {t: min(x["s_per_epoch"] for x in rounds if x["trainer"] == t) for t in ("efa", "mace")}
    report = {"efa_model": MODEL, "mace_model": MACE, "parameters": counts, "batch": BATCH, "train": TRAIN,
              "valid": VALID, "dtype": "float64", "rounds": rounds, "best_s_per_epoch": best,
              "mace_over_efa": best["mace"] / best["efa"], "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count()}
    args.output.write_text(json.dumps(report, indent=1))
    lines = ["# Epoch time: efa-train against mace_run_train (benchmarks/mace_epoch.py)", "",
             f"{TRAIN} LJ clusters of 8-14 atoms (+{VALID} validated every epoch), batch {BATCH}, float64, one thread, "
             f"CPU ({report['machine']}, {report['cpus']} cores). EFA: {MODEL}. MACE: {MACE}. Parameters: {counts}.", "",
             "| trainer | best s per epoch | rounds (s per epoch, load average before) |", "|---|---|---|"]
    for t in ("efa", "mace"):
        runs = ", ".join(f"{x['s_per_epoch']:.2f} (load {x['load_before']})" for x in rounds if x["trainer"] == t)
        lines.append(f"| {t} | {best[t]:.2f} | {runs} |")
    lines += ["", f"MACE's epoch takes **{report['mace_over_efa']:.1f}x** EFA's (target >= 3x)."]
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
