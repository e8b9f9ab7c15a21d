"""ASE calculator for exported EFA model files (and efa-train checkpoints)."""

from __future__ import annotations

import logging
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from .checks import charge_spin_input, check_structure, takes_cell
from .graph import Graph, batch_graph, system_extent
from .model import energy_and_forces, energy_forces_stress

# Angstrom: the closest pair is named when it is this close and the results are not finite (as in the plugin)
CLOSE_CONTACT = 0.5

log = logging.getLogger("efa_deploy")
# how a user of the calculator gives the global inputs (in errors)
HOW = {"charge": 'atoms.info["charge"] or EFACalculator(..., charge=Q)',
       "spin": 'atoms.info["spin"] or EFACalculator(..., spin=M)'}


def _is_checkpoint(path: Path) -> bool:
    """A TorchScript file carries code/ and extra/ folders; a torch.save checkpoint does not."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False  # let load_model_file report what is wrong
    return not any("/code/" in n or "/extra/" in n for n in names)


def load_any(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """(module, metadata) of a model file or, through its EMA weights, of a checkpoint."""
    from .modelfile import load_model_file, model_metadata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist")
    if _is_checkpoint(path):
        from .checkpoint import load_checkpoint, model_from_checkpoint

        ckpt = load_checkpoint(path)
        model, config = model_from_checkpoint(ckpt, "ema")
        metadata = model_metadata(model, config, {"checkpoint": path.name, "data_digest": ckpt.get("data_digest")})
        return model.to(device), metadata
    return load_model_file(path, device)


class EFACalculator(Calculator):
    """Energy, forces and per-atom energies of an EFA (or local) model.

    model: path to a file written by efa-export, or to an efa-train checkpoint.
    grid: "auto" (default): before every evaluation the model chooses the smallest Lebedev rule
    it carries that keeps EFA exact for the structure's extent (with hysteresis; changes are
    logged on the "efa_deploy" logger); or a number of points: that rule, fixed.
    extent_check: what to do when the structure extends beyond the grid's exact range (beyond
    the largest rule's with grid "auto"): "warn" (once), "error" or "off"; default: "error"
    with grid "auto", "warn" with a fixed grid.
    charge, spin: the system's total charge (e) and spin multiplicity 2S+1, for models trained
    on them (metadata 'global_inputs'); atoms.info["charge"] and atoms.info["spin"] come first.
    Such a model needs them given; a model trained without them accepts only charge 0 and
    multiplicity 1 (or nothing).
    Stress is available for periodic cells with local models and models with periodic EFA
    (periodic_efa: true), which evaluate fully periodic cells only.
    kspace: for periodic EFA, "direct" (the exact sum over reciprocal-lattice vectors, O(N^2) as
    the box grows), "mesh" (smooth particle-mesh, O(N log N), about 1e-3 relative error in the
    global sums; the mesh is kept while it carries every k-vector of the cell, so energies stay
    continuous under NPT) or "auto" (default: the mesh for cells with many k-vectors, decided at
    the first evaluation and then kept), as pair_style efa kspace.
    """

    implemented_properties = ["energy", "free_energy", "forces", "energies"]

    def __init__(self, model: str | Path, device: str = "cpu", extent_check: str | None = None,
                 grid: str | int = "auto", charge: float | None = None, spin: float | None = None,
                 kspace: str = "auto", **kwargs):
        super().__init__(**kwargs)
        if kspace not in ("direct", "mesh", "auto"):
            raise ValueError(f"kspace must be 'direct', 'mesh' or 'auto', not {kspace!r}")
        if extent_check not in (None, "warn", "error", "off"):
            raise ValueError(f"extent_check must be 'warn', 'error' or 'off', not {extent_check!r}")
        self.module, self.metadata = load_any(model, device)
        self.device = device
        self.atomic_numbers = [int(z) for z in self.metadata["atomic_numbers"]]
        self.cutoff = float(self.metadata["cutoff"])
        self.dtype = getattr(torch, self.metadata["dtype"])
        self.efa = bool(self.metadata["efa"].get("enabled"))
        self.takes_cell = takes_cell(self.metadata)  # periodic EFA: no Lebedev grid to choose
        with_kspace = hasattr(self.module, "set_kspace")
        if self.takes_cell and not with_kspace and kspace == "mesh":  # a file from before the mesh
            raise ValueError(f"{model} predates the k-space mesh: re-export it (efa-export --from-model) "
                             "or use kspace='direct'")
        # None: nothing to choose (no periodic EFA, or a file that has only the direct sum)
        self.kspace = kspace if self.takes_cell and with_kspace else None
        self.global_inputs = list(self.metadata.get("global_inputs", []))
        self.charge, self.spin = charge, spin
        if charge is not None or spin is not None:
            charge_spin_input(self.global_inputs, charge, spin, HOW)  # refuse bad values now
        self.grid = grid
        if grid != "auto":
            sizes = self.module.grid_sizes()
            if not self.efa or isinstance(grid, bool) or not isinstance(grid, int) or grid not in sizes:
                raise ValueError(f"grid must be 'auto' or one of the Lebedev rules the model carries "
                                 f"({' '.join(map(str, sizes)) or 'none: it has no EFA'}), not {grid!r}")
            self.module.set_grid_size(grid)
        self.extent_check = extent_check or ("error" if grid == "auto" else "warn")
        self._warned_extent = False
        if self.metadata["periodic"]:
            self.implemented_properties = [*EFACalculator.implemented_properties, "stress"]

    def _select_grid(self, positions) -> None:
        """The grid for these positions (grid "auto"), and the extent check."""
        if not self.efa or self.takes_cell:
            return
        extent = system_extent(positions)
        before = self.module.grid_size()
        size = self.module.select_grid(extent) if self.grid == "auto" else before
        if size != before:
            log.info("EFACalculator: grid %d -> %d points, extent %.1f A", before, size, extent)
        reach = self.module.exact_extent(size)
        if self.extent_check == "off" or extent <= reach:
            return
        what = (f"the exact range of the fixed {size}-point grid, {reach:.2f} A; use grid='auto'"
                if self.grid != "auto" else
                f"{reach:.2f} A, the largest extent the model's largest grid ({size} points) keeps exact; "
                "use a model with a smaller omega_max (b_max / r_max)")
        message = f"system extent {extent:.2f} A is beyond {what}"
        if self.extent_check == "error":
            raise ValueError(message + " (extent_check='warn' goes on)")
        if not self._warned_extent:
            warnings.warn(message + ": the global term is no longer exact or rotation invariant there",
                          RuntimeWarning, stacklevel=4)
            self._warned_extent = True

    def _select_kspace(self, atoms) -> None:
        """Periodic EFA: the direct sum or the mesh for this cell (kspace "auto" is decided once)."""
        if self.kspace in (None, "direct"):  # the model starts on the direct sum
            return
        before = self.module.kspace_mesh()
        cell = torch.tensor(atoms.cell.array.reshape(1, 3, 3), dtype=torch.float64, device=self.device)
        sizes = self.module.set_kspace(self.kspace, cell)
        if self.kspace == "auto":
            self.kspace = "mesh" if sizes else "direct"
        if sizes != before:
            log.info("EFACalculator: k-space %s", "x".join(map(str, sizes)) + " mesh" if sizes else "direct sum")

    def charge_spin(self, atoms) -> tuple[float, float]:
        """(total charge, multiplicity) for atoms: atoms.info first, then the calculator's."""
        return charge_spin_input(self.global_inputs, atoms.info.get("charge", self.charge),
                                 atoms.info.get("spin", self.spin), HOW)

    def check_state(self, atoms, tol=1e-15):
        """ASE compares positions, numbers and cell; a new atoms.info charge or spin also counts."""
        changes = super().check_state(atoms, tol)
        if self.atoms is not None and not changes and any(
                self.atoms.info.get(k) != atoms.info.get(k) for k in ("charge", "spin")):
            changes.append("info")
        return changes

    def _check(self, atoms) -> tuple[float, float]:
        check_structure(atoms, self.metadata, "atoms")
        charge_spin = self.charge_spin(atoms)
        self._select_grid(atoms.positions)
        self._select_kspace(atoms)
        return charge_spin

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        charge_spin = self._check(atoms)
        graph = batch_graph([atoms], self.atomic_numbers, self.cutoff, self.dtype,
                            [charge_spin] if self.global_inputs else None, cell=self.takes_cell).to(self.device)
        want_stress = "stress" in properties
        if want_stress and not atoms.cell.rank == 3:
            raise ValueError("stress needs a three-dimensional cell")
        # the plain TorchScript executor, as pair_style efa: the optimising one re-specialises the
        # graph when a call differentiates by other inputs (stress after energy), and its stress of
        # the mesh path was then wrong (tests/test_periodic.py)
        with torch.jit.optimized_execution(False):
            if want_stress:
                cell = torch.tensor(atoms.cell.array.reshape(1, 3, 3), dtype=self.dtype, device=self.device)
                results = energy_forces_stress(self.module, *graph.inputs(), cell=cell)
            else:
                results = energy_and_forces(self.module, *graph.inputs())
        energy, forces, atomic = (t.detach() for t in results[:3])
        check_finite_results(atomic, forces, graph)
        self.results["energy"] = float(energy.sum())
        self.results["free_energy"] = self.results["energy"]
        self.results["forces"] = forces.cpu().numpy().astype(np.float64)
        self.results["energies"] = atomic.cpu().numpy().astype(np.float64)
        if want_stress:
            stress = results[3].detach()[0].cpu().numpy()
            self.results["stress"] = stress.flat[[0, 4, 8, 5, 2, 1]].astype(np.float64)


def check_finite_results(atomic: torch.Tensor, gradient: torch.Tensor, graph: Graph) -> None:
    """A ValueError naming the atoms whose energy or force is NaN or inf, and the closest pair
    when it overlaps (the usual cause)."""
    bad = ~torch.isfinite(atomic) | ~torch.isfinite(gradient).all(dim=1)
    if not bool(bad.any()):
        return
    where = " ".join(str(i) for i in torch.nonzero(bad).flatten()[:3].tolist())
    pair = ""
    if graph.edge_index.shape[1]:
        sender, receiver = graph.edge_index
        distance = (graph.positions[sender] - graph.positions[receiver] + graph.edge_shift).norm(dim=1)
        k = int(torch.argmin(distance))
        if float(distance[k]) < CLOSE_CONTACT:
            a, b = sorted((int(sender[k]), int(receiver[k])))
            pair = f"; atoms {a} and {b} are {float(distance[k]):.3g} A apart"
    raise ValueError(f"the model gave NaN or inf energies or forces (atom indices {where}){pair}; check the structure "
                     "(overlapping atoms, a blown-up run) and the model file")
