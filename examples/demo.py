"""`make demo`: LAMMPS molecular dynamics with the shipped EFA model on 2 MPI ranks.

16 water molecules (export/water16.xyz), the default model (export/water_efa.pt, trained on
GFN2-xTB data by export/make_default.py), NVT at 300 K with a 0.5 fs step, run by `efa-md`
under `mpiexec -n 2`: pair_style efa splits the cluster over the ranks and sums the global
attention term across them. Prints live progress and a summary; the trajectory, thermo table,
plot and summary go to runs/demo/.

    python examples/demo.py [--steps 2000] [--ranks 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "export" / "water_efa.pt"
STRUCTURE = REPO / "export" / "water16.xyz"
OUT = REPO / "runs" / "demo"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--ranks", type=int, default=2)
    args = p.parse_args()
    for path in (MODEL, STRUCTURE):
        if not path.is_file():
            print(f"demo: {path.relative_to(REPO)} is missing; it is part of the repository "
                  "(python export/make_default.py all remakes the model)", file=sys.stderr)
            return 1
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.is_file():
        mpiexec = Path(shutil.which("mpiexec") or "mpiexec")
    OUT.mkdir(parents=True, exist_ok=True)
    trajectory = OUT / "water16_nvt.extxyz"
    cmd = [str(mpiexec), "-n", str(args.ranks), sys.executable, "-m", "efa_deploy.cli.md",
           str(STRUCTURE.relative_to(REPO)), "--model", str(MODEL.relative_to(REPO)),
           "--ensemble", "nvt", "--temperature", "300", "--timestep", "0.5", "--steps", str(args.steps),
           "--output", str(trajectory.relative_to(REPO)), "--output-every", "50", "--thermo-every", "20",
           "--log", str((OUT / "log.lammps").relative_to(REPO))]
    print("demo: " + " ".join(Path(c).name if i in (0, 3) else c for i, c in enumerate(cmd)), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread per rank: more is ten times slower here
    start = time.perf_counter()
    code = subprocess.call(cmd, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    if code != 0:
        print(f"demo: efa-md failed with exit code {code}", file=sys.stderr)
        return code
    s = json.loads(trajectory.with_suffix(".summary.json").read_text())
    print(f"demo: done in {wall:.0f} s (start-up included): {s['atoms']} atoms, {s['ranks']} MPI ranks, "
          f"{s['simulated_ps']:.2f} ps at {s['temperature_mean_K']:.0f} K, {s['ns_per_day']:.2f} ns/day; "
          f"outputs in {OUT.relative_to(REPO)}/ (trajectory, thermo table, plot water16_nvt.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
