"""Large finite test systems from a small cluster: copies on a cubic lattice."""

from __future__ import annotations

import itertools

import numpy as np
from ase import Atoms


def tile_cluster(cluster: Atoms, copies: int, spacing: float, shape: str = "sphere") -> Atoms:
    """`copies` copies of `cluster` (its bounding-box centre on the sites of a simple cubic
    lattice of `spacing` A): the sites nearest the centre ("sphere", a round droplet) or a
    cube of side copies^(1/3) ("cube"). Non-periodic, no cell."""
    if shape not in ("sphere", "cube"):
        raise ValueError(f"shape must be 'sphere' or 'cube', not {shape!r}")
    side = int(round(copies ** (1 / 3)))
    if shape == "cube" and side**3 != copies:
        raise ValueError(f"a cube needs a cube number of copies, not {copies}")
    if shape == "cube":
        sites = np.array(list(itertools.product(range(side), repeat=3)), dtype=float)
    else:
        half = side // 2 + 2
        grid = np.array(list(itertools.product(range(-half, half + 1), repeat=3)), dtype=float)
        order = np.lexsort((grid[:, 2], grid[:, 1], grid[:, 0], np.round(np.sum(grid**2, axis=1), 9)))
        sites = grid[order[:copies]]
    positions = cluster.positions - 0.5 * (cluster.positions.max(axis=0) + cluster.positions.min(axis=0))
    tiled = (sites[:, None, :] * spacing + positions[None]).reshape(-1, 3)
    return Atoms(numbers=np.tile(cluster.numbers, copies), positions=tiled, pbc=False)


def random_rotation(seed: int) -> np.ndarray:
    """A uniformly random proper rotation matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def rotated(atoms: Atoms, seed: int) -> Atoms:
    """A rigid random rotation of `atoms` about its centroid."""
    out = atoms.copy()
    centre = atoms.positions.mean(axis=0)
    out.positions = (atoms.positions - centre) @ random_rotation(seed).T + centre
    return out
