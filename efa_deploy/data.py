"""Training data: read structures with reference energies and forces, check them, batch them.

Formats: npz (keys positions (S, N, 3), atomic_numbers (S, N), energy (S,), forces (S, N, 3),
node_mask (S, N) when structures are padded to N atoms, and any other per-structure array of
shape (S,), e.g. a trajectory id, which lands in atoms.info; total_charge (S,) lands there as
"charge", spin (S,) (the multiplicity 2S+1) as "spin") and anything ase.io reads that carries
energies and forces (extxyz, ASE db, ...; a total charge and multiplicity in the info keys
"charge" and "spin", the ASE/fairchem convention). Structures become ase.Atoms with a
SinglePointCalculator. Splitting them is splits.py's job.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from .checks import CONFIG_FLAG, NEUTRAL, check_global_value
from .graph import Graph, collate, species_index, structure_graph

NPZ_REQUIRED = ("positions", "atomic_numbers", "energy", "forces")
# npz arrays stored in atoms.info under another name: the ASE/fairchem info keys
NPZ_INFO_NAMES = {"total_charge": "charge"}
# where a data file holds each global input
GLOBAL_INPUT_KEYS = {"charge": "npz key 'total_charge' or extxyz/ASE info key 'charge'",
                     "spin": "npz key 'spin' or extxyz/ASE info key 'spin' (the multiplicity 2S+1)"}


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes: identifies the training data in checkpoints and model files."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_structures(path: str | Path, index: str = ":") -> list[Atoms]:
    """Every structure of a data file, each with its reference energy and forces."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    structures = _read_npz(path) if path.suffix == ".npz" else _read_ase(path, index)
    if not structures:
        raise ValueError(f"{path} holds no structures")
    for i, atoms in enumerate(structures):
        _check_structure(atoms, f"{path}: structure {i}")
    return structures


def _read_npz(path: Path) -> list[Atoms]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            arrays = {k: npz[k] for k in (*NPZ_REQUIRED, "node_mask") if k in keys}
            extras = _per_structure_arrays(npz, len(arrays["positions"]) if "positions" in arrays else 0)
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path} is not a readable npz file (truncated or corrupt?): {err}") from None
    missing = [k for k in NPZ_REQUIRED if k not in keys]
    if missing:
        raise ValueError(
            f"{path} lacks the key(s) {', '.join(missing)}; an npz data file needs "
            f"{', '.join(NPZ_REQUIRED)} (and optionally node_mask): training needs energies and forces"
        )
    pos, numbers, energy, forces = (arrays[k] for k in NPZ_REQUIRED)
    s = len(pos)
    if pos.ndim != 3 or pos.shape[2] != 3 or numbers.shape != pos.shape[:2] or forces.shape != pos.shape:
        raise ValueError(
            f"{path}: inconsistent shapes positions {pos.shape}, atomic_numbers {numbers.shape}, "
            f"forces {forces.shape}; expected (S, N, 3), (S, N), (S, N, 3)"
        )
    if energy.reshape(-1).shape != (s,):
        raise ValueError(f"{path}: energy has shape {energy.shape}, expected ({s},)")
    if "node_mask" not in arrays and np.any(numbers == 0):
        k = int(np.flatnonzero((numbers == 0).any(axis=1))[0])
        raise ValueError(f"{path}: structure {k} has atomic number 0 and there is no node_mask: if structures are "
                         "padded, add a boolean node_mask array (S, N) that is true for real atoms")
    mask = arrays.get("node_mask", np.ones(numbers.shape, dtype=bool))
    if mask.shape != numbers.shape:
        raise ValueError(f"{path}: node_mask has shape {mask.shape}, expected {numbers.shape}")
    mask = mask.astype(bool)
    energy = energy.reshape(-1).astype(np.float64)
    if not np.all(np.isfinite(numbers[mask])) or np.any(numbers[mask] != np.round(numbers[mask])):
        raise ValueError(f"{path}: atomic_numbers must be whole numbers")
    structures = []
    for k in range(s):
        m = mask[k]
        atoms = Atoms(numbers=numbers[k, m].astype(np.int64), positions=pos[k, m].astype(np.float64),
                      info={NPZ_INFO_NAMES.get(key, key): values[k].item() for key, values in extras.items()})
        atoms.calc = SinglePointCalculator(atoms, energy=float(energy[k]), forces=forces[k, m].astype(np.float64))
        structures.append(atoms)
    return structures


def _per_structure_arrays(npz, count: int) -> dict:
    """The optional arrays of one value per structure (group ids, charges, ...); arrays of
    Python objects (they would need pickle) are left out."""
    out = {}
    for key in npz.files:
        if key in NPZ_REQUIRED or key == "node_mask":
            continue
        try:
            values = npz[key]
        except ValueError:
            continue
        if values.shape == (count,):
            out[key] = values
    return out


def _read_ase(path: Path, index: str) -> list[Atoms]:
    import ase.io

    try:
        structures = ase.io.read(path, index=index)
        structures = list(structures) if isinstance(structures, list) else [structures]
        if path.suffix == ".db":  # ase.io leaves out the rows' key-value pairs (group ids, ...)
            import ase.db
            from ase.io.formats import string2index

            with ase.db.connect(path) as db:
                pairs = [row.key_value_pairs for row in db.select()][string2index(index)]
            for atoms, info in zip(structures, pairs if isinstance(pairs, list) else [pairs]):
                atoms.info.update(info)
    except Exception as err:  # ase raises many kinds for truncated or foreign files
        raise ValueError(f"{path} could not be read by ase.io (truncated, corrupt or unknown format?): "
                         f"{type(err).__name__}: {err}") from None
    return structures


def _check_structure(atoms: Atoms, where: str) -> None:
    if len(atoms) == 0:
        raise ValueError(f"{where} has no atoms")
    if atoms.calc is None:
        raise ValueError(f"{where} has no energy or forces; training needs both")
    results = atoms.calc.results
    for name in ("energy", "forces"):
        if results.get(name) is None:
            raise ValueError(f"{where} has no {name}; training needs energies and forces")
    bad = [int(z) for z in atoms.numbers if not 1 <= z <= 118]
    if bad:
        raise ValueError(f"{where} has atomic number {bad[0]}, not an element; remove it (padding? use node_mask)")
    if not np.all(np.isfinite(atoms.positions)):
        raise ValueError(f"{where} has NaN or infinite positions")
    if not np.isfinite(results["energy"]):
        raise ValueError(f"{where} has a NaN or infinite energy")
    if np.shape(results["forces"]) != (len(atoms), 3):
        raise ValueError(f"{where}: forces have shape {np.shape(results['forces'])}, expected ({len(atoms)}, 3)")
    if not np.all(np.isfinite(results["forces"])):
        raise ValueError(f"{where} has NaN or infinite forces")


def global_inputs_of(structures: Sequence[Atoms], names: Sequence[str], source: str) -> np.ndarray:
    """(S, 2) total charge and spin multiplicity of each structure, from atoms.info, for a model
    trained on the global inputs `names`; the inputs it does not take are left neutral."""
    out = np.tile([NEUTRAL["charge"], NEUTRAL["spin"]], (len(structures), 1))
    for i, atoms in enumerate(structures):
        for column, name in enumerate(("charge", "spin")):
            if name not in names:
                continue
            if name not in atoms.info:
                raise ValueError(f"the model config sets {CONFIG_FLAG[name]}: true but structure {i} of {source} has "
                                 f"no {name}; add the {GLOBAL_INPUT_KEYS[name]}, one value per structure")
            try:
                out[i, column] = check_global_value(name, atoms.info[name])
            except ValueError as err:
                raise ValueError(f"structure {i} of {source}: {err}") from None
    return out


def elements_of(structures: Sequence[Atoms]) -> list[int]:
    """Sorted atomic numbers present in the structures."""
    return sorted({int(z) for atoms in structures for z in atoms.numbers})


@dataclass
class Batch:
    graph: Graph
    energy: torch.Tensor  # (B,)
    forces: torch.Tensor  # (N, 3)


class GraphDataset:
    """Structures with their neighbour lists computed once; batch(indices) concatenates them."""

    def __init__(self, structures: Sequence[Atoms], atomic_numbers: Sequence[int], cutoff: float,
                 dtype: torch.dtype = torch.float64, global_inputs: Sequence[str] = (), source: str = "the data"):
        """global_inputs: the model's (ModelConfig.global_inputs, metadata 'global_inputs'): every
        graph then carries its structure's charge_spin; source names the structures in errors."""
        self.structures = list(structures)
        species_index(elements_of(self.structures), atomic_numbers)  # clear error for unknown elements
        charge_spin = global_inputs_of(self.structures, global_inputs, source) if global_inputs else None
        self.graphs = [structure_graph(a, atomic_numbers, cutoff, dtype, i, None if charge_spin is None else charge_spin[i])
                       for i, a in enumerate(self.structures)]
        self.energy = torch.tensor([a.calc.results["energy"] for a in self.structures], dtype=dtype)
        self.forces = [torch.tensor(np.asarray(a.calc.results["forces"]), dtype=dtype) for a in self.structures]

    def __len__(self) -> int:
        return len(self.graphs)

    def batch(self, indices: Sequence[int]) -> Batch:
        indices = [int(i) for i in indices]
        return Batch(collate([self.graphs[i] for i in indices]), self.energy[indices],
                     torch.cat([self.forces[i] for i in indices]))

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self.batch(range(start, min(start + batch_size, len(self))))


def fit_energy_shifts(structures: Sequence[Atoms], atomic_numbers: Sequence[int]) -> np.ndarray:
    """Per-element energies e_z minimising sum_s (E_s - sum_z n_sz e_z)^2 (minimum-norm when
    the composition does not determine them, e.g. every structure has the same composition)."""
    counts = np.zeros((len(structures), len(atomic_numbers)))
    for s, atoms in enumerate(structures):
        np.add.at(counts[s], species_index(atoms.numbers, atomic_numbers), 1.0)
    energy = np.array([a.calc.results["energy"] for a in structures], dtype=np.float64)
    shifts, *_ = np.linalg.lstsq(counts, energy, rcond=None)
    return shifts
