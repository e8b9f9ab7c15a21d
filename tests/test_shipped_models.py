"""Every shipped model file (export/*.pt) loads, reproduces the test errors recorded in its
metadata on its recorded test data, is described in export/README.md, and gives the same
energy in LAMMPS as in Python on the shipped structure."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from ase.io import read

from efa_deploy.calculator import EFACalculator
from efa_deploy.training.data import GraphDataset, file_digest, load_structures
from efa_deploy.graph import system_extent
from efa_deploy.lammps import EFASimulation
from efa_deploy.training.metrics import evaluate
from efa_deploy.modelfile import load_model_file

from helpers import REPO

EXPORT = REPO / "export"
MODELS = sorted(EXPORT.glob("*.pt"))


def test_there_is_a_shipped_model():
    assert MODELS, "export/ holds no model file"


@pytest.fixture(scope="module", params=MODELS, ids=[p.name for p in MODELS])
def shipped(request):
    module, metadata = load_model_file(request.param)
    return request.param, module, metadata


def errors(module, metadata, structures) -> dict:
    dataset = GraphDataset.for_model(structures, metadata)
    return evaluate(module, dataset, 32)


def test_reproduces_its_recorded_test_errors(shipped):
    path, module, metadata = shipped
    provenance = metadata["provenance"]
    data = REPO / provenance["data_file"]
    assert data.is_file(), f"{path.name}: its test data {provenance['data_file']} is not in the repository"
    assert file_digest(data) == provenance["data_digest"], f"{data} is not the file {path.name} was tested on"
    recorded = provenance["test"]
    structures = load_structures(data)
    test = [structures[i] for i in recorded["indices"]]
    assert len(test) == recorded["structures"] >= 100
    measured = errors(module, metadata, test)
    for key, value in measured.items():
        assert value == pytest.approx(recorded[key], rel=1e-6), key
    # and the errors are those of a usable model (GFN2-xTB forces here have a spread of ~1 eV/A)
    assert recorded["forces_mae"] < 0.1 and recorded["energy_per_atom_mae"] < 0.01


def test_is_described_in_the_readme(shipped):
    path, _, metadata = shipped
    readme = (EXPORT / "README.md").read_text()
    assert path.name in readme
    section = readme[readme.index(f"`{path.name}`"):]
    test = metadata["provenance"]["test"]
    # the card quotes the recorded numbers (meV, meV/A) and the r_max
    assert f"{1000 * test['forces_mae']:.1f}" in section, "forces MAE (meV/A) not quoted"
    assert f"{1000 * test['energy_per_atom_mae']:.2f}" in section, "energy MAE per atom (meV/atom) not quoted"
    assert re.search(rf"r_max[^\n]*{metadata['efa']['r_max']:g} A", section), "r_max not quoted"


def test_lammps_equals_python_on_the_shipped_structure(shipped):
    path, _, metadata = shipped
    structure = REPO / metadata["provenance"].get("structure", "export/water16.xyz")
    atoms = read(structure)
    assert system_extent(atoms.positions) < metadata["efa"]["r_max"] - 3.0  # room to move at 300 K
    atoms.calc = EFACalculator(path)
    # float32 files: LAMMPS sums the edges in another order than the calculator
    rel, atol = (1e-12, 1e-10) if metadata["dtype"] == "float64" else (1e-6, 1e-3)
    with EFASimulation(structure, path) as sim:
        assert sim.energy() == pytest.approx(atoms.get_potential_energy(), rel=rel)
        np.testing.assert_allclose(sim.forces(), atoms.get_forces(), rtol=0, atol=atol)


def test_float32_cost_is_recorded_and_small(shipped):
    """Shipped files are float32; what that costs against the same weights in float64 (exact:
    trained in float32) is in their provenance and small beside the model's own errors."""
    path, _, metadata = shipped
    if metadata["dtype"] == "float64":
        pytest.skip(f"{path.name} is float64")
    cost = metadata["provenance"]["float32_cost"]
    test = metadata["provenance"]["test"]
    assert cost["max_force_difference"] < 0.01 * test["forces_mae"]
    assert cost["max_energy_difference_per_atom"] < 0.05 * test["energy_per_atom_mae"]
    assert abs(cost["float32_nve"]["drift"]) < 1e-4  # the bound of tests/test_driver.py


def test_the_float64_option_is_exact(shipped, tmp_path):
    """efa-export --from-model FILE --dtype float64 gives the float64 model: float32 and back is
    the identity on the weights."""
    from efa_deploy.modelfile import convert_model_file, rebuild_model

    path, _, metadata = shipped
    other = "float64" if metadata["dtype"] == "float32" else "float32"
    convert_model_file(path, tmp_path / "other.pt", dtype=other)
    convert_model_file(tmp_path / "other.pt", tmp_path / "back.pt", dtype=metadata["dtype"])
    a, b = rebuild_model(path)[0].state_dict(), rebuild_model(tmp_path / "back.pt")[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


ROTATION_DECK = """\
run             0
print           "ENERGY $(pe:%.15g)"
displace_atoms  all rotate {cx} {cy} {cz} 0.36 0.48 0.8 37.0 units box
run             0
print           "ENERGY $(pe:%.15g)"
"""


@pytest.mark.slow
@pytest.mark.mpi
def test_a_62_angstrom_droplet_is_rotation_invariant_by_default(tmp_path):
    """Issue 10's acceptance: 64 copies of water16.xyz (3,072 atoms, bounding-box diagonal 62.8 A,
    three times r_max): rigid rotations change the energy by <= 1e-9 eV/atom, in the calculator
    and in LAMMPS on 2 ranks, with no option given. Measured: 3e-14 eV/atom (266 or 230 points
    chosen); the 50-point training grid spreads 1e-4 eV/atom over the same rotations."""
    from efa_deploy.structures import rotated, tile_cluster
    from helpers import FINITE_SETUP, run_lammps, write_data

    from efa_deploy.modelfile import convert_model_file

    path = tmp_path / "water_efa_f64.pt"  # exactness to 1e-9 eV/atom is a float64 property
    convert_model_file(EXPORT / "water_efa.pt", path, dtype="float64")
    droplet = tile_cluster(read(EXPORT / "water16.xyz"), 64, 9.6, shape="cube")
    droplet.positions += 5.0 - droplet.positions.min(axis=0)  # inside the LAMMPS box write_data makes
    assert len(droplet) == 3072 and 62.0 < np.linalg.norm(np.ptp(droplet.positions, axis=0)) < 63.0
    energies = []
    for atoms in (droplet.copy(), rotated(droplet, 1)):
        atoms.calc = EFACalculator(path)
        energies.append(atoms.get_potential_energy())
        assert atoms.calc.module.grid_size() > 50
    assert abs(energies[1] - energies[0]) / len(droplet) <= 1e-9
    write_data(droplet, tmp_path / "data.lmp", ["H", "O"])
    centre = droplet.positions.mean(axis=0)
    deck = FINITE_SETUP.format(pair_args="", model=path, elements="H O")
    out = run_lammps(deck + ROTATION_DECK.format(cx=centre[0], cy=centre[1], cz=centre[2]), tmp_path, nprocs=2)
    lammps = [float(e) for e in re.findall(r"^ENERGY (\S+)", out, re.M)]
    assert lammps[0] == pytest.approx(energies[0], rel=1e-10)
    assert abs(lammps[1] - lammps[0]) / len(droplet) <= 1e-9
