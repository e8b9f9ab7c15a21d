"""efa_deploy/structures.py and graph.system_extent: tiled droplets, rigid rotations, and the
extent measure the grid selection relies on (an upper bound on every interatomic distance)."""

import numpy as np
import pytest
from ase import Atoms
from scipy.spatial.distance import pdist

from efa_deploy.graph import system_extent
from efa_deploy.structures import random_rotation, rotated, tile_cluster

from helpers import jittered_cluster


def test_tiling_copies_the_cluster_on_lattice_sites():
    cluster = jittered_cluster(12, seed=3)
    for shape, copies in (("cube", 27), ("sphere", 19)):
        droplet = tile_cluster(cluster, copies, 9.0, shape=shape)
        assert len(droplet) == copies * len(cluster) and not droplet.pbc.any()
        blocks = droplet.positions.reshape(copies, len(cluster), 3)
        # every copy is the cluster translated by a lattice vector of 9 A
        shifts = blocks - blocks[:, :1]
        np.testing.assert_allclose(shifts, np.broadcast_to(shifts[0], shifts.shape), atol=1e-12)
        offsets = (blocks[:, 0] - blocks[0, 0]) / 9.0
        np.testing.assert_allclose(offsets, np.round(offsets), atol=1e-12)
    with pytest.raises(ValueError, match="cube number"):
        tile_cluster(cluster, 10, 9.0, shape="cube")


def test_rotations_are_proper_and_rigid():
    for seed in range(5):
        q = random_rotation(seed)
        np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(q) == pytest.approx(1.0)
    atoms = jittered_cluster(30, seed=1)
    np.testing.assert_allclose(pdist(rotated(atoms, 7).positions), pdist(atoms.positions), atol=1e-10)


def test_extent_bounds_every_distance_and_is_tight_for_a_pair():
    rng = np.random.default_rng(0)
    for n in (2, 5, 50, 400):
        positions = rng.normal(size=(n, 3)) * rng.uniform(0.5, 20.0)
        extent = system_extent(positions)
        assert pdist(positions).max() <= extent + 1e-12
        assert extent <= np.linalg.norm(np.ptp(positions, axis=0)) + 1e-12  # never above the box diagonal
    pair = np.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])
    assert system_extent(pair) == pytest.approx(5.0)
    assert system_extent(np.zeros((0, 3))) == 0.0
    droplet = tile_cluster(Atoms("H", positions=[[0, 0, 0]]), 123, 3.0)
    # a round droplet: about sqrt(3) below its bounding-box diagonal
    assert system_extent(droplet.positions) < 0.75 * np.linalg.norm(np.ptp(droplet.positions, axis=0))
