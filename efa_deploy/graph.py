"""Turn ASE structures into the flat graph tensors the model takes (neighbour lists by vesin)."""

from __future__ import annotations

import dataclasses
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
    # (n_structures, 2) total charge and spin multiplicity: only for models that take them
    charge_spin: torch.Tensor | None = None
    # (n_structures, 3, 3) lattice vectors as rows: only for models with periodic EFA (input `cell`)
    cell: torch.Tensor | None = None

    def inputs(self) -> tuple:
        """The model's forward inputs: seven, then charge_spin and cell where the graph has them."""
        inputs = (self.positions, self.species, self.edge_index, self.edge_shift, self.batch, self.n_structures,
                  self.owned)
        return inputs + tuple(t for t in (self.charge_spin, self.cell) if t is not None)

    def to(self, device: torch.device | str) -> "Graph":
        return Graph(**{f.name: getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), torch.Tensor)
                        else getattr(self, f.name) for f in dataclasses.fields(self)})


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


def structure_graph(atoms, atomic_numbers: Sequence[int], cutoff: float, dtype=torch.float64, index: int = 0,
                    charge_spin: Sequence[float] | None = None, cell: bool = False) -> Graph:
    """The graph of one ASE structure (`index` names it in errors), with its total charge and
    spin multiplicity when given (models with global inputs) and its cell when `cell` (models
    with periodic EFA, which take periodic structures only)."""
    positions = atoms.get_positions()
    if not np.all(np.isfinite(positions)):
        raise ValueError(f"structure {index} has non-finite (NaN or inf) coordinates")
    if cell:
        check_periodic_cell(atoms.get_cell().array, atoms.get_pbc(), cutoff, f"structure {index}")
    edges, shifts = neighbour_edges(positions, atoms.get_cell().array, atoms.get_pbc(), cutoff)
    n = len(atoms)
    return Graph(
        positions=torch.tensor(positions.reshape(n, 3), dtype=dtype),
        species=torch.tensor(species_index(atoms.get_atomic_numbers(), atomic_numbers), dtype=torch.long),
        edge_index=torch.tensor(edges.reshape(2, -1), dtype=torch.long),
        edge_shift=torch.tensor(shifts.reshape(-1, 3), dtype=dtype),
        batch=torch.zeros(n, dtype=torch.long),
        n_structures=1,
        owned=torch.ones(n, dtype=dtype),
        charge_spin=None if charge_spin is None else torch.tensor([list(charge_spin)], dtype=dtype),
        cell=torch.tensor(atoms.get_cell().array.reshape(1, 3, 3), dtype=dtype) if cell else None,
    )


def check_periodic_cell(cell: np.ndarray, pbc, cutoff: float, source: str = "structure") -> None:
    """What the periodic form of EFA needs of a cell: periodic in all three directions, not
    degenerate, and at least one local cutoff wide in each direction (the same rule as
    pair_style efa)."""
    pbc = np.asarray(pbc, dtype=bool).reshape(-1)
    if not pbc.all():
        raise ValueError(
            f"{source} has pbc={pbc.tolist()}, but this model's EFA term is periodic in all three directions: "
            "give a fully periodic cell (pbc=True; a slab or molecule in a vacuum-padded periodic box), or use a "
            "model with the finite form of EFA for finite structures; mixed boundaries are not supported")
    cell = np.asarray(cell, dtype=np.float64)
    volume = abs(float(np.linalg.det(cell)))
    lengths = np.linalg.norm(cell, axis=1)
    if not np.isfinite(volume) or volume <= 1e-6 * max(float(np.prod(lengths)), 1e-300):
        raise ValueError(f"{source} has a degenerate cell (volume {volume:.3g} A^3; lattice vectors "
                         f"{cell.tolist()}): give three linearly independent lattice vectors")
    widths = volume / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    if widths.min() < cutoff:
        raise ValueError(f"{source}'s cell is {widths.min():.3f} A wide (perpendicular width), less than the model's "
                         f"cutoff of {cutoff:g} A: replicate it (ase: atoms * (2, 2, 2); LAMMPS: replicate 2 2 2); "
                         "the periodic model gives the same energy per atom in any supercell")


def collate(graphs: Sequence[Graph]) -> Graph:
    """One batch graph from single-structure graphs (edges offset, structure index set)."""
    if not graphs:
        return Graph(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long),
                     torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 0, torch.zeros(0))
    offsets = np.cumsum([0] + [g.positions.shape[0] for g in graphs[:-1]])
    return Graph(
        positions=torch.cat([g.positions for g in graphs]),
        species=torch.cat([g.species for g in graphs]),
        edge_index=torch.cat([g.edge_index + int(o) for g, o in zip(graphs, offsets)], dim=1),
        edge_shift=torch.cat([g.edge_shift for g in graphs]),
        batch=torch.cat([torch.full((g.positions.shape[0],), b, dtype=torch.long) for b, g in enumerate(graphs)]),
        n_structures=len(graphs),
        owned=torch.cat([g.owned for g in graphs]),
        charge_spin=None if graphs[0].charge_spin is None else torch.cat([g.charge_spin for g in graphs]),
        cell=None if graphs[0].cell is None else torch.cat([g.cell for g in graphs]),
    )


def batch_graph(structures: Sequence, atomic_numbers: Sequence[int], cutoff: float, dtype=torch.float64,
                charge_spin: Sequence[Sequence[float]] | None = None, cell: bool = False) -> Graph:
    """Concatenate ASE Atoms into one graph; atoms stay grouped by structure. charge_spin: the
    (total charge, multiplicity) of each structure, for models with global inputs; cell: carry
    each structure's cell (models with periodic EFA)."""
    return collate([structure_graph(a, atomic_numbers, cutoff, dtype, b, None if charge_spin is None else charge_spin[b],
                                    cell) for b, a in enumerate(structures)])


def system_extent(positions: np.ndarray) -> float:
    """An upper bound on every interatomic distance, O(N), and the same measure the LAMMPS plugin
    reduces across ranks: twice the largest distance of an atom from the centre of the
    bounding box (the diameter of a sphere holding every atom; at most the box diagonal, and
    sqrt(3) times less for a round droplet)."""
    positions = np.asarray(positions, dtype=np.float64)
    if len(positions) == 0:
        return 0.0
    centre = 0.5 * (positions.max(axis=0) + positions.min(axis=0))
    return float(2.0 * np.sqrt(np.max(np.sum((positions - centre) ** 2, axis=1))))
