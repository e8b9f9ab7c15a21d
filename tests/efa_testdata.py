"""Small synthetic data sets and tiny model settings shared by the training, export and
calculator tests (reference energies and forces from ASE's Lennard-Jones calculator)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from ase import Atoms
from ase.calculators.lj import LennardJones
from ase.calculators.singlepoint import SinglePointCalculator

torch.set_num_threads(1)

TINY_MODEL = {
    "features": 8, "num_layers": 2, "cutoff": 3.0, "num_radial": 4, "use_efa": True,
    "grid_points": 50, "r_max": 8.0, "num_frequencies": 2, "value_dim": 4,
}


def lj_structures(count: int, seed: int = 0, elements=(6, 8), n_atoms=(3, 6)) -> list[Atoms]:
    """Random clusters (atoms at least 1.2 A apart, within a 4 A box) labelled by Lennard-Jones."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        n = int(rng.integers(n_atoms[0], n_atoms[1] + 1))
        pos = rng.uniform(0.0, 4.0, size=(n, 3))
        d = np.linalg.norm(pos[:, None] - pos[None], axis=-1) + 10 * np.eye(n)
        if d.min() < 1.2:
            continue
        atoms = Atoms(numbers=rng.choice(elements, size=n), positions=pos)
        atoms.calc = LennardJones(sigma=1.1, epsilon=1.0, rc=4.0, smooth=True)
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy + 0.3 * n, forces=forces)
        out.append(atoms)
    return out


def write_npz(path, structures, pad_to: int | None = None, **overrides) -> None:
    """The npz layout efa_deploy.data reads, padding every structure to pad_to atoms."""
    n = pad_to or max(len(a) for a in structures)
    s = len(structures)
    arrays = {
        "positions": np.full((s, n, 3), 99.0), "atomic_numbers": np.zeros((s, n)),
        "energy": np.zeros(s), "forces": np.full((s, n, 3), 7.0), "node_mask": np.zeros((s, n), dtype=bool),
    }
    for k, a in enumerate(structures):
        m = len(a)
        arrays["positions"][k, :m] = a.positions
        arrays["atomic_numbers"][k, :m] = a.numbers
        arrays["energy"][k] = a.get_potential_energy()
        arrays["forces"][k, :m] = a.get_forces()
        arrays["node_mask"][k, :m] = True
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


def tiny_config(data_path, output, **training) -> dict:
    """A complete efa-train config for a tiny model that trains in seconds."""
    settings = {"batch_size": 4, "epochs": 3, "checkpoint_every": 10, "progress": False, "plot_every": 0.0,
                "lr": 1e-2, "lr_final": 3e-3, "ema_decay": 0.9}
    settings.update(training)
    return {
        "data": {"path": str(data_path), "n_train": 24, "n_val": 8, "n_test": 8, "split_seed": 1},
        "model": copy.deepcopy(TINY_MODEL),
        "training": settings,
        "output": str(output),
    }
