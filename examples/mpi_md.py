"""The Python driver on several MPI ranks: every rank runs this script, LAMMPS splits the domain,
results arrive on every rank, rank 0 prints and writes (runs/examples/water16_mpi.extxyz).

    mpiexec -n 2 python examples/mpi_md.py
    python examples/mpi_md.py            # the same numbers on one rank

Energies, forces and NVE / Nose-Hoover trajectories equal the single-rank run to round-off
(tests/test_driver.py checks 1e-10); Langevin noise is drawn per rank, so Langevin runs differ.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank

from pathlib import Path

import numpy as np
from mpi4py import MPI

from efa_deploy.lammps import EFASimulation

REPO = Path(__file__).resolve().parent.parent
comm = MPI.COMM_WORLD
OUT = REPO / "runs" / "examples"
if comm.Get_rank() == 0:
    OUT.mkdir(parents=True, exist_ok=True)
comm.Barrier()
say = print if comm.Get_rank() == 0 else (lambda *a, **k: None)

with EFASimulation(REPO / "export" / "water16.xyz", REPO / "export" / "water_efa.pt", comm=comm) as sim:
    forces = sim.forces()  # gathered on every rank, ordered as the input structure
    say(f"{comm.Get_size()} rank(s): energy {sim.energy():.10f} eV, |F| sum {np.abs(forces).sum():.10f} eV/A")
    sim.set_velocities(300.0, seed=2024)  # the same velocities for any rank count
    thermo = sim.run(1000, ensemble="nvt", thermostat="nose-hoover", temperature=300.0, timestep_fs=0.5,
                     thermo_every=250, trajectory=OUT / "water16_mpi.extxyz", trajectory_every=100)
    for step, temp, pe, econs in zip(thermo["step"], thermo["temp"], thermo["pe"], thermo["econserve"]):
        say(f"  step {step:5d}  T {temp:6.1f} K  Epot {pe:.8f} eV  conserved {econs:.8f} eV")
    final = sim.positions()
    spread = comm.allreduce(float(np.abs(final).sum()), op=MPI.MAX) - comm.allreduce(float(np.abs(final).sum()), op=MPI.MIN)
    say(f"final positions identical on every rank: {spread == 0.0}; "
        f"{1000 / thermo['wall'][-1]:.0f} steps/s; wrote {OUT / 'water16_mpi.extxyz'}")
