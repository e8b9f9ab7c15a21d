"""efa_deploy.EFACalculator: equals the model, forces are -dE/dr, clear errors, and NVE
molecular dynamics with ASE conserves energy."""

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.calculators.fd import calculate_numerical_stress
from ase.md.velocitydistribution import thermalize_momenta
from ase.md.verlet import VelocityVerlet

import efa_deploy
from efa_deploy.checkpoint import load_checkpoint, model_from_checkpoint
from efa_deploy.cli.export import export_checkpoint
from efa_deploy.graph import batch_graph
from efa_deploy.model import energy_and_forces
from efa_deploy.training.train import train

from helpers import lj_structures, tiny_config, write_npz


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("calc")
    data = root / "lj.npz"
    write_npz(data, lj_structures(40, seed=4), pad_to=6)
    train(tiny_config(data, root / "efa", epochs=3))
    local = tiny_config(data, root / "local", epochs=3)
    local["model"]["use_efa"] = False
    train(local)
    export_checkpoint(root / "efa" / "best.ckpt", root / "efa.pt")
    export_checkpoint(root / "local" / "best.ckpt", root / "local.pt")
    return root


def cluster(seed=0, n=5):
    atoms = lj_structures(1, seed=seed, n_atoms=(n, n))[0]
    atoms.calc = None
    return atoms


@pytest.mark.parametrize("source", ["efa.pt", "efa/best.ckpt"])
def test_calculator_equals_eager_model(models, source):
    ckpt = load_checkpoint(models / "efa" / "best.ckpt")
    model, config = model_from_checkpoint(ckpt)
    atoms = cluster()
    atoms.calc = efa_deploy.EFACalculator(models / source)
    graph = batch_graph([atoms], config.atomic_numbers, config.cutoff)
    energy, forces, atomic = energy_and_forces(model, *graph.inputs())
    assert atoms.get_potential_energy() == pytest.approx(float(energy.detach()), abs=1e-10)
    np.testing.assert_allclose(atoms.get_forces(), forces.detach().numpy(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(atoms.get_potential_energies(), atomic.detach().numpy(), rtol=0, atol=1e-10)
    assert atoms.get_potential_energies().sum() == pytest.approx(atoms.get_potential_energy(), abs=1e-12)
    assert atoms.calc.get_property("free_energy", atoms) == atoms.get_potential_energy()


def test_forces_are_minus_energy_gradient(models):
    atoms = cluster(seed=1, n=6)
    atoms.calc = efa_deploy.EFACalculator(models / "efa.pt")
    forces = atoms.get_forces()
    h = 1e-5
    numeric = np.zeros_like(forces)
    for i in range(len(atoms)):
        for k in range(3):
            energies = []
            for sign in (1, -1):
                moved = atoms.copy()
                moved.positions[i, k] += sign * h
                moved.calc = atoms.calc
                energies.append(moved.get_potential_energy())
            numeric[i, k] = -(energies[0] - energies[1]) / (2 * h)
    assert np.abs(forces).max() > 1e-3
    np.testing.assert_allclose(forces, numeric, rtol=0, atol=1e-7)  # central differences: O(h^2) + round-off/h


def test_periodic_cell_needs_local_model(models):
    atoms = cluster()
    atoms.cell = [6.0, 6.0, 6.0]
    atoms.pbc = True
    atoms.calc = efa_deploy.EFACalculator(models / "efa.pt")
    with pytest.raises(ValueError, match=r"global EFA term is not: use a finite structure \(pbc=False\), or a model with "
                       r"periodic EFA \(periodic_efa: true\) or a local model"):
        atoms.get_potential_energy()
    atoms.calc = efa_deploy.EFACalculator(models / "local.pt")
    assert np.isfinite(atoms.get_potential_energy())


def test_local_model_stress_matches_finite_differences(models):
    atoms = cluster(seed=2, n=6)
    atoms.cell = [4.5, 4.8, 5.1]
    atoms.pbc = True
    atoms.calc = efa_deploy.EFACalculator(models / "local.pt")
    stress = atoms.get_stress()
    numeric = calculate_numerical_stress(atoms, eps=1e-5)
    assert np.abs(stress).max() > 1e-5
    np.testing.assert_allclose(stress, numeric, rtol=0, atol=1e-8)


def test_extent_beyond_a_fixed_grid(models):
    """A fixed grid warns (once) or stops beyond its exact range; grid auto (tests/test_grid.py) grows."""
    atoms = Atoms("COC", positions=[[0, 0, 0], [2.0, 0, 0], [4.0, 0, 0]])  # extent 4.0
    atoms.calc = efa_deploy.EFACalculator(models / "efa.pt", grid=50)
    reach = atoms.calc.module.exact_extent(50)  # r_max 8 A: about 4.66 A
    assert 4.0 < reach < 5.0
    atoms.get_potential_energy()
    atoms.positions[2] = [6.0, 0, 0]
    with pytest.warns(RuntimeWarning, match=f"extent 6.00 A is beyond the exact range of the fixed 50-point grid, "
                                            f"{reach:.2f} A"):
        atoms.get_potential_energy()
    atoms.positions[2] = [6.5, 0, 0]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atoms.get_potential_energy()  # warned once only
    atoms.calc = efa_deploy.EFACalculator(models / "efa.pt", grid=50, extent_check="error")
    with pytest.raises(ValueError, match="beyond the exact range of the fixed 50-point grid"):
        atoms.get_potential_energy()


def test_bad_inputs(models, tmp_path):
    atoms = cluster()
    atoms.positions[1, 2] = np.nan
    atoms.calc = efa_deploy.EFACalculator(models / "efa.pt")
    with pytest.raises(ValueError, match="NaN or infinite positions"):
        atoms.get_potential_energy()
    silicon = Atoms("CSi", positions=[[0, 0, 0], [0, 0, 2.0]])
    silicon.calc = efa_deploy.EFACalculator(models / "efa.pt")
    with pytest.raises(ValueError, match=r"element\(s\) Si not known to this model"):
        silicon.get_potential_energy()
    with pytest.raises(FileNotFoundError):
        efa_deploy.EFACalculator(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable TorchScript model file"):
        efa_deploy.EFACalculator(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="extent_check"):
        efa_deploy.EFACalculator(models / "efa.pt", extent_check="maybe")


def nve_run(model_file, dt_fs: float, duration_fs: float) -> tuple[float, float]:
    """Largest deviation of the total energy from its start, and the range of the potential energy."""
    atoms = cluster(seed=3, n=6)
    atoms.calc = efa_deploy.EFACalculator(model_file)
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    total, potential = [atoms.get_total_energy()], [atoms.get_potential_energy()]

    def record():
        total.append(atoms.get_total_energy())
        potential.append(atoms.get_potential_energy())

    dyn = VelocityVerlet(atoms, timestep=dt_fs * units.fs)
    dyn.attach(record, interval=1)
    dyn.run(int(round(duration_fs / dt_fs)))
    return float(np.abs(np.array(total) - total[0]).max()), float(np.ptp(potential))


def test_nve_conserves_energy(models):
    """Velocity Verlet keeps the total energy to O(dt^2), without drift, when the forces are
    exactly -dE/dr: halving the step must cut the largest deviation four times. Forces that
    were not the gradient of the energy would leave an error that does not shrink like dt^2.
    Measured here (6 atoms, 300 K, 100 fs): the potential energy swings by 1.15 eV while the
    total stays within 4.9e-4 eV at 1 fs and 1.3e-4 eV at 0.5 fs (ratio 3.8)."""
    coarse, swing = nve_run(models / "efa.pt", 1.0, 100.0)
    fine, _ = nve_run(models / "efa.pt", 0.5, 100.0)
    assert swing > 0.3  # the atoms really exchange kinetic and potential energy
    assert coarse < 0.003 * swing  # total energy held to a fraction of a percent of the swing
    assert 3.0 < coarse / fine < 5.0  # the dt^2 signature of a conservative force field
