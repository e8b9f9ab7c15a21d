"""Run LAMMPS decks with pair_style efa under mpiexec and read back what they computed."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ase.io import write

BIN = Path(sys.executable).parent
LMP = BIN / "lmp"
MPIEXEC = BIN / "mpiexec"
NKTV2P_METAL = 1.6021765e6  # LAMMPS metal units: pressure * volume / nktv2p = energy


def write_data(atoms, path: Path, elements: list[str]) -> Path:
    """A LAMMPS data file; a structure without a cell gets a box 5 A beyond its atoms."""
    if atoms.cell.rank == 0:
        atoms = atoms.copy()
        atoms.cell = np.diag(atoms.positions.max(axis=0) + 5.0)
    write(path, atoms, format="lammps-data", specorder=elements, masses=True, units="metal")
    return path


def run_lammps(deck: str, workdir: Path, nprocs: int = 1, timeout: float = 600, env: dict | None = None) -> str:
    """Run `deck` with `mpiexec -n nprocs lmp` (extra environment variables in env); return the
    screen output, raise with it on failure."""
    (workdir / "in.deck").write_text(deck)
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    cmd = [str(MPIEXEC), "-n", str(nprocs), str(LMP), "-in", "in.deck", "-log", "log.lammps"]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


# a finite structure from data.lmp with pair_style efa: the start of a deck
FINITE_SETUP = """\
units           metal
boundary        s s s
atom_style      atomic
atom_modify     map array
read_data       data.lmp
pair_style      efa {pair_args}
pair_coeff      * * {model} {elements}
"""

STATIC_DECK = """\
units           metal
boundary        {boundary}
atom_style      atomic
atom_modify     map array
{processors}
read_data       data.lmp
pair_style      efa {pair_args}
pair_coeff      * * {model} {elements}
compute         pe_atom all pe/atom
compute         virial all pressure NULL virial
thermo_style    custom step pe
dump            forces all custom 1 forces.dump id fx fy fz c_pe_atom
dump_modify     forces sort id format float %.17g
run             0
print           "$(pe:%.17g) $(vol:%.17g) $(c_virial[1]:%.17g) $(c_virial[2]:%.17g) $(c_virial[3]:%.17g) $(c_virial[4]:%.17g) $(c_virial[5]:%.17g) $(c_virial[6]:%.17g)" file results.txt
"""


@dataclass
class StaticResult:
    energy: float
    forces: np.ndarray  # (N, 3), by atom id
    atomic_energies: np.ndarray  # (N,)
    virial: np.ndarray  # (6,) xx yy zz xy xz yz, eV


def static_run(workdir: Path, model: Path, elements: list[str], nprocs: int = 1, boundary: str = "f f f",
               processors: str = "", pair_args: str = "", env: dict | None = None) -> StaticResult:
    deck = STATIC_DECK.format(boundary=boundary, processors=processors, pair_args=pair_args, model=model,
                              elements=" ".join(elements))
    run_lammps(deck, workdir, nprocs, env=env)
    values = np.array((workdir / "results.txt").read_text().split(), dtype=float)
    dump = np.loadtxt(workdir / "forces.dump", skiprows=9)
    return StaticResult(energy=values[0], forces=dump[:, 1:4], atomic_energies=dump[:, 4],
                        virial=values[2:] * values[1] / NKTV2P_METAL)
