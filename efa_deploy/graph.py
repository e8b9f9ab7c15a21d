"""Turn ASE structures into the flat graph tensors the model takes (neighbour lists by vesin)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from vesin import NeighborList


@dataclass
class Graph:
    positions: torch.Tensor  # (N, 3)
    species: torch.Tensor  # (N,) model species index
    edge_index: torch.Tensor  # (2, E): sender, receiver
    edge_shift: torch.Tensor  # (E, 3) Cartesian periodic shift of the sender
    batch: torch.Tensor  # (N,) structure index
    n_structures: int
    owned: torch.Tensor  # (N,) 1 for real atoms

    def inputs(self) -> tuple:
        return (self.positions, self.species, self.edge_index, self.edge_shift, self.batch, self.n_structures, self.owned)

    def to(self, device: torch.device | str) -> "Graph":
        return Graph(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in self.inputs()))


def species_index(numbers: Sequence[int], atomic_numbers: Sequence[int]) -> np.ndarray:
    """Map atomic numbers to model species indices; unknown elements raise a clear error."""
    from ase.data import chemical_symbols

    lookup = {int(z): s for s, z in enumerate(atomic_numbers)}
    unknown = sorted({int(z) for z in numbers} - set(lookup))
    if unknown:
        names = ", ".join(chemical_symbols[z] for z in unknown)
        known = ", ".join(chemical_symbols[z] for z in atomic_numbers)
        raise ValueError(f"element(s) {names} not known to this model (it knows {known})")
    return np.array([lookup[int(z)] for z in numbers], dtype=np.int64)


def neighbour_edges(positions: np.ndarray, cell: np.ndarray, pbc, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Full neighbour list: edge_index (2, E) sender/receiver and Cartesian shifts (E, 3)."""
    periodic = np.asarray(pbc, dtype=bool)
    box = np.asarray(cell, dtype=np.float64) if periodic.any() else np.zeros((3, 3))
    nl = NeighborList(cutoff=cutoff, full_list=True)
    i, j, shifts = nl.compute(points=np.asarray(positions, dtype=np.float64), box=box, periodic=periodic, quantities="ijS")
    # vector r_ij = x_j - x_i + S @ cell: j sends to i
    return np.stack([j, i]).astype(np.int64), shifts.astype(np.float64) @ box


def batch_graph(structures: Sequence, atomic_numbers: Sequence[int], cutoff: float, dtype=torch.float64) -> Graph:
    """Concatenate ASE Atoms into one graph; atoms stay grouped by structure."""
    positions, species, edges, shifts, batch = [], [], [], [], []
    offset = 0
    for b, atoms in enumerate(structures):
        pos = atoms.get_positions()
        if not np.all(np.isfinite(pos)):
            raise ValueError(f"structure {b} has non-finite (NaN or inf) coordinates")
        e, s = neighbour_edges(pos, atoms.get_cell().array, atoms.get_pbc(), cutoff)
        positions.append(pos)
        species.append(species_index(atoms.get_atomic_numbers(), atomic_numbers))
        edges.append(e + offset)
        shifts.append(s)
        batch.append(np.full(len(atoms), b))
        offset += len(atoms)
    n = offset
    return Graph(
        positions=torch.tensor(np.concatenate(positions) if n else np.zeros((0, 3)), dtype=dtype),
        species=torch.tensor(np.concatenate(species) if n else np.zeros(0), dtype=torch.long),
        edge_index=torch.tensor(np.concatenate(edges, axis=1) if structures else np.zeros((2, 0)), dtype=torch.long),
        edge_shift=torch.tensor(np.concatenate(shifts) if structures else np.zeros((0, 3)), dtype=dtype),
        batch=torch.tensor(np.concatenate(batch) if n else np.zeros(0), dtype=torch.long),
        n_structures=len(structures),
        owned=torch.ones(n, dtype=dtype),
    )


def system_extent(positions: np.ndarray) -> float:
    """Diagonal of the axis-aligned bounding box: an upper bound on every interatomic
    distance, O(N), and the same measure the LAMMPS plugin reduces across ranks."""
    positions = np.asarray(positions, dtype=np.float64)
    if len(positions) == 0:
        return 0.0
    return float(np.linalg.norm(positions.max(axis=0) - positions.min(axis=0)))
