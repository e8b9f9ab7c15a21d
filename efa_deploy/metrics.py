"""Errors of a model against reference energies and forces: MAE and RMSE of the energy per
structure and per atom, of the force components, and of the forces on each element."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ase.data import chemical_symbols

from .data import GraphDataset
from .model import energy_and_forces


@dataclass
class Predictions:
    energy: np.ndarray  # (S,) model, eV
    energy_ref: np.ndarray  # (S,) reference
    n_atoms: np.ndarray  # (S,)
    forces: np.ndarray  # (N, 3) model, eV/A
    forces_ref: np.ndarray  # (N, 3)
    numbers: np.ndarray  # (N,) atomic numbers


def predict(model: torch.nn.Module, dataset: GraphDataset, batch_size: int = 8) -> Predictions:
    """Energies and forces of every structure of a dataset (an eager model or a model file)."""
    energy, forces = [], []
    for b in dataset.batches(batch_size):
        e, f, _ = energy_and_forces(model, *b.graph.inputs())
        energy.append(e.detach().double().cpu().numpy())
        forces.append(f.detach().double().cpu().numpy())
    return Predictions(
        energy=np.concatenate(energy), energy_ref=dataset.energy.double().numpy(),
        n_atoms=np.array([len(a) for a in dataset.structures]),
        forces=np.concatenate(forces), forces_ref=torch.cat(dataset.forces).double().numpy(),
        numbers=np.concatenate([a.numbers for a in dataset.structures]),
    )


def _mae_rmse(error: np.ndarray) -> tuple[float, float]:
    return float(np.abs(error).mean()), float(np.sqrt(np.square(error).mean()))


def error_summary(p: Predictions) -> dict:
    """Energy (eV, per structure and per atom) and force (eV/A, per component) MAE and RMSE."""
    de = p.energy - p.energy_ref
    out = {}
    for name, error in (("energy", de), ("energy_per_atom", de / p.n_atoms), ("forces", p.forces - p.forces_ref)):
        out[f"{name}_mae"], out[f"{name}_rmse"] = _mae_rmse(error)
    return out


def error_report(p: Predictions) -> dict:
    """error_summary plus the counts and the force MAE on each element."""
    df = np.abs(p.forces - p.forces_ref)
    by_element = {chemical_symbols[z]: float(df[p.numbers == z].mean()) for z in np.unique(p.numbers)}
    return {"structures": len(p.energy), "atoms": len(p.numbers), **error_summary(p),
            "forces_mae_by_element": by_element}


def evaluate(model: torch.nn.Module, dataset: GraphDataset, batch_size: int = 8) -> dict:
    return error_summary(predict(model, dataset, batch_size))
