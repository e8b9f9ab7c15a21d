"""Shared test fixtures: small exported models whose every block is active."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms

from efa_deploy.model import ModelConfig, build_model

REPO = Path(__file__).resolve().parent.parent
# one thread per process: MPI tests run up to 4 ranks on 2 cores
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def randomised_model(config: ModelConfig, seed: int = 0, dtype=torch.float64, std: float = 0.3):
    """A model with its zero-initialised residual outputs randomised, so the local and global
    updates are not identities and every test can fail."""
    torch.manual_seed(seed)
    model = build_model(config, dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mlp.2" in name:
                p.normal_(0.0, std)
        model.energy_shift.copy_(torch.linspace(-1.0, 1.0, len(config.atomic_numbers)))
    return model


def jittered_cluster(n: int, spacing: float = 1.6, seed: int = 0, numbers=(1, 6, 8), offset: float = 5.0) -> Atoms:
    """n atoms on a jittered cubic lattice (no close contacts), elements drawn from `numbers`."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(n ** (1 / 3)))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n] * spacing
    positions = grid + rng.uniform(-0.25, 0.25, (n, 3)) + offset
    return Atoms(numbers=rng.choice(numbers, n), positions=positions)
