"""The exact reference of the periodic ionic set (examples/periodic/ionic_reference.py): torch-pme's
Ewald sum against an independent plain Ewald sum, forces against finite differences of the energy,
the stress against a finite strain, and the shipped data against the reference."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torchpme")  # the optional `periodic-data` extra (`make` installs it)

PERIODIC = Path(__file__).resolve().parents[1] / "examples" / "periodic"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, PERIODIC / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ref = load("ionic_reference")

SHEAR = np.array([[1.0, 0.0, 0.0], [0.15, 1.0, 0.0], [-0.1, 0.2, 1.0]])


def box(n: int, side: float, triclinic: bool, seed: int):
    """n ions (+1, -1 alternating) at random, at least 2 A apart, in a cubic or sheared cell."""
    rng = np.random.default_rng(seed)
    cell = side * (SHEAR if triclinic else np.eye(3))
    positions = []
    while len(positions) < n:
        trial = rng.uniform(0.0, 1.0, 3) @ cell
        d = (np.array(positions).reshape(-1, 3) - trial) @ np.linalg.inv(cell)
        if not positions or np.linalg.norm((d - np.round(d)) @ cell, axis=1).min() > 2.0:
            positions.append(trial)
    return np.array([11, 17] * (n // 2)), np.array(positions), cell


BOXES = [(8, 6.5, False, 0), (8, 7.0, True, 1), (16, 9.2, False, 2)]


@pytest.mark.parametrize("n, side, triclinic, seed", BOXES)
def test_torchpme_matches_plain_ewald(n, side, triclinic, seed):
    numbers, positions, cell = box(n, side, triclinic, seed)
    a = ref.reference(numbers, positions, cell)
    b = ref.reference(numbers, positions, cell, coulomb=ref.ewald_plain)
    assert abs(a.coulomb) > 0.5 and abs(a.repulsion) > 1e-3  # both terms present
    assert abs(a.coulomb - b.coulomb) <= 1e-10 * abs(b.coulomb)
    assert np.abs(a.forces - b.forces).max() <= 1e-9 * np.abs(b.forces).max()
    assert np.abs(a.stress - b.stress).max() <= 1e-9 * np.abs(b.stress).max()


def test_plain_ewald_converged_in_its_splitting_parameter():
    import torch

    numbers, positions, cell = box(8, 7.0, True, 1)
    args = torch.tensor(positions), torch.tensor(cell), ref.charges_of(numbers)
    energies = [ref.ewald_plain(*args, alpha=alpha).item() for alpha in (0.4, 0.6, 0.9)]
    assert np.ptp(energies) <= 1e-12 * abs(energies[0])


@pytest.mark.parametrize("n, side, triclinic, seed", BOXES[:2])
def test_forces_and_stress_are_derivatives_of_the_energy(n, side, triclinic, seed):
    numbers, positions, cell = box(n, side, triclinic, seed)
    r = ref.reference(numbers, positions, cell)
    h = 1e-4
    for atom, axis in ((0, 0), (3, 2), (n - 1, 1)):
        step = np.zeros_like(positions)
        step[atom, axis] = h
        plus = ref.reference(numbers, positions + step, cell).energy
        minus = ref.reference(numbers, positions - step, cell).energy
        assert -(plus - minus) / (2 * h) == pytest.approx(r.forces[atom, axis], rel=1e-6, abs=1e-7)
    volume = abs(np.linalg.det(cell))
    for a, b in ((0, 0), (1, 2), (2, 2), (0, 1)):
        strain = np.zeros((3, 3))
        strain[a, b] = strain[b, a] = h if a == b else h / 2  # symmetric, d(strain_ab)/dh = 1 in sum_ij
        energies = [ref.reference(numbers, positions @ (np.eye(3) + s * strain), cell @ (np.eye(3) + s * strain)).energy
                    for s in (1.0, -1.0)]
        assert (energies[0] - energies[1]) / (2 * h * volume) == pytest.approx(r.stress[a, b], rel=1e-6, abs=1e-9)


def test_repulsion_is_smooth_at_its_cutoff():
    import torch

    cell = torch.eye(3, dtype=torch.float64) * 20.0
    index, shifts = torch.tensor([[0, 1]]), torch.zeros(1, 3, dtype=torch.float64)
    rc = ref.REPULSION_CUTOFF
    for r in (rc - 1e-6, rc + 1e-6):
        pos = torch.tensor([[0.0, 0.0, 0.0], [r, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
        e = ref.repulsion(pos, cell, index, shifts)
        (force,) = torch.autograd.grad(e, pos)
        assert abs(e.item()) < 1e-12 and abs(force[1, 0].item()) < 1e-10


def test_shipped_data_matches_the_reference():
    from ase.io import read

    path = PERIODIC / "data" / "ionic.extxyz.gz"
    if not path.exists():
        pytest.skip(f"{path} not made (examples/periodic/make_ionic.py)")
    frames = read(path, "::700")
    assert len(frames) >= 3
    for atoms in frames:
        assert atoms.pbc.all() and {"box", "draw", "coulomb_far_5A"} <= set(atoms.info)
        r = ref.reference(atoms.numbers, atoms.get_positions(), atoms.cell.array)
        assert atoms.get_potential_energy() == pytest.approx(r.energy, rel=1e-10, abs=1e-10)
        np.testing.assert_allclose(atoms.get_forces(), r.forces, atol=1e-8)
        np.testing.assert_allclose(atoms.get_stress(voigt=False), r.stress, atol=1e-10)
        assert sum(ref.CHARGES[int(z)] for z in atoms.numbers) == 0
