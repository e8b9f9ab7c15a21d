"""Training data: read structures with reference energies and forces, check them, batch them.

Formats: npz (keys positions (S, N, 3), atomic_numbers (S, N), energy (S,), forces (S, N, 3),
node_mask (S, N) when structures are padded to N atoms, and any other per-structure array of
shape (S,), e.g. a trajectory id, which lands in atoms.info; total_charge (S,) lands there as
"charge", spin (S,) (the multiplicity 2S+1) as "spin") and anything ase.io reads that carries
energies and forces (extxyz, ASE db, ...; a total charge and multiplicity in the info keys
"charge" and "spin", the ASE/fairchem convention). Periodic structures: npz cell (S, 3, 3) with
pbc (S, 3), extxyz Lattice/pbc, db rows' cell/pbc; optional stress: npz stress (S, 6) Voigt or
(S, 3, 3) in eV/A^3 (ASE's convention), extxyz/db calculator results. Structures become ase.Atoms
with a SinglePointCalculator. An ASE database is read row by row on demand (DbRows), so that
training never holds it in memory. Splitting them is splits.py's job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from ..checks import CONFIG_FLAG, NEUTRAL, check_global_value
from ..graph import Graph, collate, species_index, structure_graph

if TYPE_CHECKING:
    from ..model import ModelConfig

NPZ_REQUIRED = ("positions", "atomic_numbers", "energy", "forces")
NPZ_OPTIONAL = ("node_mask", "cell", "pbc", "stress")
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


def open_structures(path: str | Path) -> Sequence[Atoms]:
    """The structures of a data file for training: an ASE database (.db) as DbRows, read row by
    row on demand; anything else read into memory by load_structures."""
    path = Path(path)
    if path.suffix == ".db" and path.is_file():
        rows = DbRows(path)
        if not len(rows):
            raise ValueError(f"{path} holds no structures")
        return rows
    return load_structures(path)


def _read_npz(path: Path) -> list[Atoms]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            arrays = {k: npz[k] for k in (*NPZ_REQUIRED, *NPZ_OPTIONAL) if k in keys}
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
    cell, pbc, stress = _npz_periodic(path, arrays, s)
    structures = []
    for k in range(s):
        m = mask[k]
        atoms = Atoms(numbers=numbers[k, m].astype(np.int64), positions=pos[k, m].astype(np.float64),
                      cell=None if cell is None else cell[k], pbc=None if pbc is None else pbc[k],
                      info={NPZ_INFO_NAMES.get(key, key): values[k].item() for key, values in extras.items()})
        results = {"energy": float(energy[k]), "forces": forces[k, m].astype(np.float64)}
        if stress is not None:
            results["stress"] = stress[k]
        atoms.calc = SinglePointCalculator(atoms, **results)
        structures.append(atoms)
    return structures


def _npz_periodic(path: Path, arrays: dict, s: int):
    """The cells (S, 3, 3), pbc (S, 3) and stresses (S, 6 Voigt or S, 3, 3) of an npz file, or None."""
    cell, pbc, stress = arrays.get("cell"), arrays.get("pbc"), arrays.get("stress")
    if cell is not None and pbc is None:
        raise ValueError(f"{path} has a 'cell' but no 'pbc': a cell alone does not say whether the structures are "
                         "periodic; add a boolean array pbc of shape (S, 3) (all true for bulk data)")
    if pbc is not None and cell is None:
        raise ValueError(f"{path} has 'pbc' but no 'cell': add the lattice vectors as cell (S, 3, 3), or drop pbc")
    if cell is not None:
        if cell.shape != (s, 3, 3):
            raise ValueError(f"{path}: cell has shape {cell.shape}, expected ({s}, 3, 3) (lattice vectors as rows)")
        pbc = np.broadcast_to(pbc, (s, 3)) if pbc.shape in ((3,), (1, 3)) else pbc
        if pbc.shape != (s, 3):
            raise ValueError(f"{path}: pbc has shape {pbc.shape}, expected ({s}, 3)")
        cell, pbc = cell.astype(np.float64), pbc.astype(bool)
    if stress is not None and stress.shape not in ((s, 6), (s, 3, 3)):
        raise ValueError(f"{path}: stress has shape {stress.shape}, expected ({s}, 6) (Voigt xx yy zz yz xz xy, "
                         "eV/A^3) or ({s}, 3, 3)")
    if stress is not None and cell is None:
        raise ValueError(f"{path} has a stress but no cell: stress needs periodic structures; add cell and pbc")
    return cell, pbc, stress


def _per_structure_arrays(npz, count: int) -> dict:
    """The optional arrays of one value per structure (group ids, charges, ...); arrays of
    Python objects (they would need pickle) are left out."""
    out = {}
    for key in npz.files:
        if key in NPZ_REQUIRED or key in NPZ_OPTIONAL:
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
        if path.suffix in (".gz", ".bz2", ".xz"):
            # ase.io seeks back to every frame it indexed; in a compressed stream each seek
            # decompresses from the start (quadratic: minutes for 2,000 frames), so read it once
            import io

            from ase.io.formats import filetype, open_with_compression

            with open_with_compression(str(path), "rb") as f:
                text = io.StringIO(f.read().decode())
            structures = ase.io.read(text, index=index, format=filetype(str(path), read=True))
        else:
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
    pbc = atoms.get_pbc()
    if pbc.any():
        cell = atoms.get_cell().array
        if not np.all(np.isfinite(cell)) or np.any(np.linalg.norm(cell[pbc], axis=1) == 0):
            raise ValueError(f"{where} is periodic (pbc={pbc.tolist()}) but its cell {cell.tolist()} has no lattice "
                             "vector in a periodic direction; give the cell or set pbc false there")
    stress = results.get("stress")
    if stress is not None:
        if np.shape(stress) not in ((6,), (3, 3)):
            raise ValueError(f"{where}: stress has shape {np.shape(stress)}, expected (6,) Voigt or (3, 3)")
        if not np.all(np.isfinite(stress)):
            raise ValueError(f"{where} has a NaN or infinite stress")
        if not pbc.all():
            raise ValueError(f"{where} has a stress but is not periodic in all directions (pbc={pbc.tolist()}); "
                             "a stress needs a periodic cell")


def global_inputs_of(structures: Sequence[Atoms], names: Sequence[str], source: str, first: int = 0) -> np.ndarray:
    """(S, 2) total charge and spin multiplicity of each structure, from atoms.info, for a model
    trained on the global inputs `names`; the inputs it does not take are left neutral. Errors
    count the structures from `first`."""
    out = np.tile([NEUTRAL["charge"], NEUTRAL["spin"]], (len(structures), 1))
    for i, atoms in enumerate(structures, first):
        for column, name in enumerate(("charge", "spin")):
            if name not in names:
                continue
            if name not in atoms.info:
                raise ValueError(f"the model config sets {CONFIG_FLAG[name]}: true but structure {i} of {source} has "
                                 f"no {name}; add the {GLOBAL_INPUT_KEYS[name]}, one value per structure")
            try:
                out[i - first, column] = check_global_value(name, atoms.info[name])
            except ValueError as err:
                raise ValueError(f"structure {i} of {source}: {err}") from None
    return out


def elements_of(structures: Sequence[Atoms]) -> list[int]:
    """Sorted atomic numbers present in the structures (read one at a time: DbRows streams)."""
    if isinstance(structures, DbRows):
        return structures.elements()
    return sorted({int(z) for atoms in structures for z in atoms.numbers})


@dataclass
class Batch:
    """Structures of one batch with their references; B structures, N atoms."""

    graph: Graph
    energy: torch.Tensor  # (B,)
    forces: torch.Tensor  # (N, 3)
    stress: torch.Tensor  # (B, 3, 3), eV/A^3; zero where has_stress is false
    has_stress: torch.Tensor  # (B,) bool
    cell: torch.Tensor  # (B, 3, 3): the cell of structures with a stress, the identity elsewhere (the volume divides)
    n_atoms: torch.Tensor  # (B,)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.graph.to(device), *(getattr(self, f.name).to(device) for f in dataclasses.fields(self)[1:]))


def structure_item(atoms: Atoms, atomic_numbers: Sequence[int], cutoff: float, dtype: torch.dtype,
                   global_inputs: Sequence[str], periodic_cell: bool, index: int, source: str) -> Batch:
    """One structure as a batch of one: its graph (neighbour list) and references."""
    charge_spin = global_inputs_of([atoms], global_inputs, source, index)[0] if global_inputs else None
    graph = structure_graph(atoms, atomic_numbers, cutoff, dtype, index, charge_spin, periodic_cell)
    results = atoms.calc.results
    stress = results.get("stress")
    has_stress = stress is not None
    stress = voigt_to_matrix(stress) if has_stress else np.zeros((3, 3))
    cell = atoms.get_cell().array if has_stress else np.eye(3)
    return Batch(graph, torch.tensor([results["energy"]], dtype=dtype),
                 torch.tensor(np.asarray(results["forces"]), dtype=dtype).reshape(-1, 3),
                 torch.tensor(stress, dtype=dtype).reshape(1, 3, 3), torch.tensor([has_stress]),
                 torch.tensor(cell, dtype=dtype).reshape(1, 3, 3), torch.tensor([len(atoms)]))


def collate_items(items: Sequence[Batch]) -> Batch | None:
    """One batch from batches (DataLoader's collate_fn); None for none (a rank's empty shard)."""
    if not items:
        return None
    return Batch(collate([b.graph for b in items]),
                 *(torch.cat([getattr(b, f.name) for b in items]) for f in dataclasses.fields(Batch)[1:]))


class GraphDataset:
    """Structures (in memory, or a lazily read sequence such as DbRows) and their graphs:
    dataset[k] is structure k as a Batch of one; batch(indices) concatenates. In-memory
    structures have their neighbour lists computed once, here; a lazy sequence is read and its
    neighbour lists built item by item (in DataLoader workers when training.workers > 0)."""

    def __init__(self, structures: Sequence[Atoms], atomic_numbers: Sequence[int], cutoff: float,
                 dtype: torch.dtype = torch.float64, global_inputs: Sequence[str] = (), source: str = "the data",
                 periodic_cell: bool = False, indices: Sequence[int] | None = None):
        """global_inputs: the model's (ModelConfig.global_inputs, metadata 'global_inputs'): every
        graph then carries its structure's charge_spin; periodic_cell: graphs carry their cell
        (models with periodic EFA); indices: the structures used (default all); source names the
        structures in errors."""
        self.lazy = not isinstance(structures, list)
        self.indices = np.arange(len(structures)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.args = (list(atomic_numbers), cutoff, dtype, list(global_inputs), periodic_cell)
        self.source = source
        if self.lazy:
            self.rows = structures
            self.items = None
        else:
            self.structures = [structures[i] for i in self.indices]
            species_index(elements_of(self.structures), atomic_numbers)  # clear error for unknown elements
            self.items = [self._item(a, k) for k, a in enumerate(self.structures)]
            self.energy = torch.cat([b.energy for b in self.items])
            self.forces = [b.forces for b in self.items]

    @classmethod
    def for_model(cls, structures: Sequence[Atoms], model: "ModelConfig | dict", dtype: torch.dtype | None = None,
                  source: str = "the data", indices: Sequence[int] | None = None) -> "GraphDataset":
        """The dataset whose graphs carry exactly the inputs a model takes (charge_spin, cell), from
        its ModelConfig or its model file's metadata: the one place that maps a model to its
        graph inputs. dtype: default the metadata's (float64 for a config)."""
        if isinstance(model, dict):
            dtype = dtype or getattr(torch, model["dtype"])
            return cls(structures, model["atomic_numbers"], model["cutoff"], dtype, model.get("global_inputs", []),
                       source, "cell" in model["inputs"], indices)
        return cls(structures, model.atomic_numbers, model.cutoff, dtype or torch.float64, model.global_inputs, source,
                   model.periodic_efa, indices)

    def _item(self, atoms: Atoms, k: int) -> Batch:
        return structure_item(atoms, *self.args, k, self.source)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> Batch:
        if self.items is not None:
            return self.items[k]
        return self._item(self.rows[int(self.indices[k])], k)

    def batch(self, indices: Sequence[int]) -> Batch:
        return collate_items([self[int(i)] for i in indices])

    def batches(self, batch_size: int):
        for start in range(0, len(self), batch_size):
            yield self.batch(range(start, min(start + batch_size, len(self))))


def voigt_to_matrix(stress) -> np.ndarray:
    """A stress as a 3x3 matrix from Voigt (xx, yy, zz, yz, xz, xy; ASE's order) or 3x3."""
    stress = np.asarray(stress, dtype=np.float64)
    if stress.shape == (3, 3):
        return stress
    xx, yy, zz, yz, xz, xy = stress.reshape(6)
    return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])


def fit_energy_shifts(structures: Sequence[Atoms], atomic_numbers: Sequence[int],
                      indices: Sequence[int] | None = None) -> np.ndarray:
    """Per-element energies e_z minimising sum_s (E_s - sum_z n_sz e_z)^2 over the structures
    (those at `indices`), minimum-norm when the composition does not determine them (e.g. every
    structure has the same composition). Streams: only the Z x Z normal equations are kept."""
    z = len(atomic_numbers)
    gram, rhs = np.zeros((z, z)), np.zeros(z)
    compositions = (structures.compositions(indices) if isinstance(structures, DbRows) else
                    ((a.numbers, a.calc.results["energy"]) for a in
                     (structures if indices is None else (structures[int(i)] for i in indices))))
    for numbers, energy in compositions:
        counts = np.bincount(species_index(numbers, atomic_numbers), minlength=z).astype(np.float64)
        gram += np.outer(counts, counts)
        rhs += counts * float(energy)
    # the minimum-norm least-squares solution of the normal equations is that of the full system
    shifts, *_ = np.linalg.lstsq(gram, rhs, rcond=1e-12)
    return shifts


class DbRows:
    """The structures of an ASE database, read one row at a time: len(rows) and rows[k] (an
    ase.Atoms with its reference energy, forces, stress, cell, pbc and the row's key-value
    pairs in info). Only the row ids are kept in memory; every process (and DataLoader worker)
    opens its own connection."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._pid, self._db = None, None
        try:
            with self._connection() as con:
                self.ids = np.array([r[0] for r in con.execute("SELECT id FROM systems ORDER BY id")], dtype=np.int64)
        except Exception as err:
            raise ValueError(f"{path} could not be read as an ASE database (truncated, corrupt or another "
                             f"format?): {type(err).__name__}: {err}") from None

    def _connection(self):
        import sqlite3

        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=60)

    def _database(self):
        import ase.db

        if self._db is None or self._pid != os.getpid():  # a fork (DataLoader worker) opens its own
            self._db, self._pid = ase.db.connect(self.path, type="db", use_lock_file=False), os.getpid()
        return self._db

    def __getstate__(self):
        return {**self.__dict__, "_db": None, "_pid": None}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, k: int) -> Atoms:
        if not 0 <= k < len(self.ids):
            raise IndexError(k)
        row = self._database().get(id=int(self.ids[k]))
        atoms = row.toatoms(add_additional_information=False)
        atoms.info.update(row.key_value_pairs)
        _check_structure(atoms, f"{self.path}: row {int(self.ids[k])}")
        return atoms

    def __iter__(self):
        return (self[k] for k in range(len(self)))

    def _columns(self, columns: str):
        """(id, columns...) of every row, streamed from SQLite (no structure is built)."""
        with self._connection() as con:
            yield from con.execute(f"SELECT id, {columns} FROM systems ORDER BY id")

    def elements(self) -> list[int]:
        found: set[int] = set()
        for _, numbers in self._columns("numbers"):
            found.update(np.unique(np.frombuffer(numbers, dtype=np.int32)).tolist())
        return sorted(found)

    def compositions(self, indices: Sequence[int] | None = None):
        """(atomic numbers, energy) of the rows at `indices` (all rows by default), streamed."""
        wanted = None if indices is None else np.zeros(len(self.ids), dtype=bool)
        if wanted is not None:
            wanted[np.asarray(indices, dtype=np.int64)] = True
        for k, (_, numbers, energy) in enumerate(self._columns("numbers, energy")):
            if wanted is None or wanted[k]:
                if energy is None:
                    raise ValueError(f"{self.path}: row {int(self.ids[k])} has no energy; training needs energies and forces")
                yield np.frombuffer(numbers, dtype=np.int32), energy

    def info_column(self, key: str) -> list:
        """The key-value pair `key` of every row (None where a row lacks it), streamed."""
        import json

        return [json.loads(pairs).get(key) for _, pairs in self._columns("key_value_pairs")]
