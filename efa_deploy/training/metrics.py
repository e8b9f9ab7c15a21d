"""Errors of a model against reference energies, forces and stresses: MAE and RMSE of the energy
per structure and per atom, of the force components, of the stress components (where the data
has stresses), and of the forces on each element."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from ase.data import chemical_symbols

from ..model import energy_and_forces, energy_forces_stress
from .data import Batch, GraphDataset
from .distributed import World, agree


def predict_batch(model: torch.nn.Module, batch: Batch, stress: bool = False, create_graph: bool = False) -> dict:
    """Energies (B,), forces (N, 3) and, with stress, stresses (B, 3, 3) of a batch: the one place
    training and evaluation call the model (stress as efa_deploy.model.energy_forces_stress:
    the strain derivative over the volume)."""
    inputs = batch.graph.inputs()
    if stress:
        energy, forces, _, stresses = energy_forces_stress(model, *inputs, cell=batch.cell, create_graph=create_graph)
        return {"energy": energy, "forces": forces, "stress": stresses}
    energy, forces, _ = energy_and_forces(model, *inputs, create_graph=create_graph)
    return {"energy": energy, "forces": forces}


@dataclass
class Predictions:
    energy: np.ndarray  # (S,) model, eV
    energy_ref: np.ndarray  # (S,) reference
    n_atoms: np.ndarray  # (S,)
    forces: np.ndarray  # (N, 3) model, eV/A
    forces_ref: np.ndarray  # (N, 3)
    numbers: np.ndarray  # (N,) atomic numbers


def predict(model: torch.nn.Module, dataset: GraphDataset, batch_size: int = 8,
            device: torch.device | str = "cpu") -> Predictions:
    """Energies and forces of every structure of a dataset (an eager model or a model file, on `device`)."""
    energy, forces = [], []
    for b in dataset.batches(batch_size):
        e, f, _ = energy_and_forces(model, *b.graph.to(device).inputs())
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


# the sums evaluate() reduces over ranks: (|x|, x^2, count) of each error, then a failure flag
ERRORS = ("energy", "energy_per_atom", "forces", "stress")


def evaluate(model: torch.nn.Module, dataset: GraphDataset, batch_size: int = 8,
             device: torch.device | str | None = None, world: World = World()) -> dict:
    """error_summary of a model on a dataset (stress errors when the data has stresses); with
    several ranks each evaluates a contiguous shard and the sums are reduced over ranks."""
    device = torch.device("cpu") if device is None else torch.device(device)
    sums = torch.zeros(3 * len(ERRORS) + 1, dtype=torch.float64, device=device)
    error = None
    try:
        shard = world.shard(np.arange(len(dataset)))
        for start in range(0, len(shard), batch_size):
            b = dataset.batch(shard[start:start + batch_size])
            with_stress = bool(b.has_stress.any())
            b = b.to(device)
            p = predict_batch(model, b, stress=with_stress)
            de = (p["energy"].detach() - b.energy).double()
            errors = [de, de / b.n_atoms.to(de), (p["forces"].detach() - b.forces).double()]
            if with_stress:
                errors.append((p["stress"].detach() - b.stress).double()[b.has_stress])
            for k, x in enumerate(errors):
                sums[3 * k: 3 * k + 3] += torch.stack([x.abs().sum(), x.square().sum(), x.new_tensor(x.numel())])
    except Exception as err:  # noqa: BLE001 - every rank must hear of it
        error = err
    sums = agree(sums if world.size == 1 or device.type == "cuda" else sums.cpu(), world, error).tolist()
    out = {}
    for k, name in enumerate(ERRORS):
        absolute, square, count = sums[3 * k: 3 * k + 3]
        if count or name != "stress":
            out[f"{name}_mae"] = absolute / count if count else math.nan
            out[f"{name}_rmse"] = math.sqrt(square / count) if count else math.nan
    return out
