"""Data loading (npz with padding, extxyz, ASE db), splits, batching and the clear errors."""

from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from efa_deploy.training.data import GraphDataset, collate, fit_energy_shifts, load_structures
from efa_deploy.graph import batch_graph

from helpers import lj_structures, write_npz

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def assert_same(loaded, reference, atol=1e-12):
    assert len(loaded) == len(reference)
    for a, b in zip(loaded, reference):
        assert a.numbers.tolist() == b.numbers.tolist()
        np.testing.assert_allclose(a.positions, b.positions, rtol=0, atol=atol)
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=atol)
        np.testing.assert_allclose(a.get_forces(), b.get_forces(), rtol=0, atol=atol)


def test_npz_drops_padded_atoms(tmp_path):
    structures = lj_structures(6)
    write_npz(tmp_path / "d.npz", structures, pad_to=8)
    loaded = load_structures(tmp_path / "d.npz")
    assert [len(a) for a in loaded] == [len(a) for a in structures]
    assert_same(loaded, structures)
    assert not loaded[0].pbc.any()


def test_npz_without_mask(tmp_path):
    structures = lj_structures(4, n_atoms=(5, 5))
    write_npz(tmp_path / "d.npz", structures, node_mask=None)
    assert_same(load_structures(tmp_path / "d.npz"), structures)


def test_padded_npz_without_mask_is_refused(tmp_path):
    """Atomic number 0 is padding, not an element: without node_mask the file is refused."""
    structures = lj_structures(4, n_atoms=(3, 5))
    write_npz(tmp_path / "d.npz", structures, pad_to=6, node_mask=None)
    with pytest.raises(ValueError, match="structure 0 has atomic number 0 and there is no node_mask"):
        load_structures(tmp_path / "d.npz")
    write_npz(tmp_path / "masked.npz", structures, pad_to=6)  # the same arrays with the mask load
    assert_same(load_structures(tmp_path / "masked.npz"), structures)


def test_atomic_number_zero_in_extxyz_is_refused(tmp_path):
    structures = lj_structures(2)
    structures[1].numbers[0] = 0
    ase.io.write(tmp_path / "x.extxyz", structures)
    with pytest.raises(ValueError, match="structure 1 has atomic number 0, not an element"):
        load_structures(tmp_path / "x.extxyz")


def test_npz_per_structure_arrays_land_in_info(tmp_path):
    structures = lj_structures(4)
    write_npz(tmp_path / "d.npz", structures, trajectory=np.array([3, 3, 5, 5]),
              system=np.array(["a", "b", "a", "b"]), per_atom_extra=np.zeros((4, 6)))
    loaded = load_structures(tmp_path / "d.npz")
    assert [a.info["trajectory"] for a in loaded] == [3, 3, 5, 5]
    assert [a.info["system"] for a in loaded] == ["a", "b", "a", "b"]
    assert all("per_atom_extra" not in a.info for a in loaded)


def test_extxyz_and_ase_db(tmp_path):
    structures = lj_structures(5)
    ase.io.write(tmp_path / "d.extxyz", structures)
    assert_same(load_structures(tmp_path / "d.extxyz"), structures, atol=1e-7)  # extxyz keeps 8 digits
    ase.io.write(tmp_path / "d.db", structures)
    assert_same(load_structures(tmp_path / "d.db"), structures)


def test_published_datasets_load():
    """The EFA paper's data sets the examples ship (two atoms, the 16-atom control, SN2)."""
    pairs = load_structures(EXAMPLES / "two_atoms" / "data" / "two_atoms.npz")
    assert len(pairs) == 10000 and {len(a) for a in pairs} == {2}
    assert pairs[0].numbers.tolist() == [1, 2]
    clusters = load_structures(EXAMPLES / "two_atoms" / "data" / "3D_cluster_16_atoms_radius_2point5.npz")
    assert len(clusters) == 2500 and {len(a) for a in clusters} == {16}
    scan = load_structures(EXAMPLES / "nonlocal" / "data" / "sn2_F_I.npz")
    assert len(scan) == 401 and sorted(scan[0].numbers.tolist()) == [1, 1, 1, 6, 9, 53]
    segments = [a.info["segment"] for a in scan]
    assert segments == sorted(segments) and len(set(segments)) == 41  # 10 consecutive frames each


def test_collate_matches_batch_graph():
    structures = lj_structures(5)
    whole = batch_graph(structures, [6, 8], 3.0)
    parts = collate([batch_graph([a], [6, 8], 3.0) for a in structures])
    for x, y in zip(whole.inputs(), parts.inputs()):
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_dataset_batches_carry_reference_values():
    structures = lj_structures(5)
    ds = GraphDataset(structures, [6, 8], 3.0)
    b = ds.batch([3, 1])
    assert b.energy.tolist() == [structures[3].get_potential_energy(), structures[1].get_potential_energy()]
    assert torch.equal(b.forces, torch.tensor(np.concatenate([structures[3].get_forces(), structures[1].get_forces()])))


def test_energy_shifts_least_squares():
    rng = np.random.default_rng(0)
    structures = []
    for _ in range(20):
        numbers = rng.choice([1, 6, 8], size=rng.integers(2, 7))
        atoms = Atoms(numbers=numbers, positions=rng.normal(size=(len(numbers), 3)))
        energy = {1: -0.5, 6: -37.8, 8: -75.0}
        atoms.calc = SinglePointCalculator(atoms, energy=sum(energy[z] for z in atoms.numbers), forces=np.zeros((len(atoms), 3)))
        structures.append(atoms)
    np.testing.assert_allclose(fit_energy_shifts(structures, [1, 6, 8]), [-0.5, -37.8, -75.0], atol=1e-10)


# ---- clear errors -------------------------------------------------------------------------

def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_structures("no/such/file.npz")


def test_structures_without_energy_or_forces(tmp_path):
    bare = [Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.2]])]
    ase.io.write(tmp_path / "bare.extxyz", bare)
    with pytest.raises(ValueError, match="no energy or forces"):
        load_structures(tmp_path / "bare.extxyz")
    energy_only = Atoms("CO", positions=[[0, 0, 0], [0, 0, 1.2]])
    energy_only.calc = SinglePointCalculator(energy_only, energy=-1.0)
    ase.io.write(tmp_path / "e.extxyz", [energy_only])
    with pytest.raises(ValueError, match="structure 0 has no forces"):
        load_structures(tmp_path / "e.extxyz")
    np.savez(tmp_path / "noforces.npz", positions=np.zeros((1, 2, 3)), atomic_numbers=np.ones((1, 2)), energy=np.zeros(1))
    with pytest.raises(ValueError, match="lacks the key.*forces"):
        load_structures(tmp_path / "noforces.npz")


@pytest.mark.parametrize("key", ["energy", "forces", "positions"])
def test_nan_values(tmp_path, key):
    structures = lj_structures(3)
    write_npz(tmp_path / "d.npz", structures, pad_to=6)
    with np.load(tmp_path / "d.npz") as f:
        arrays = dict(f)
    arrays[key][2] = np.nan
    np.savez(tmp_path / "nan.npz", **arrays)
    with pytest.raises(ValueError, match="structure 2 has (a )?NaN"):
        load_structures(tmp_path / "nan.npz")


def test_nan_in_padding_is_ignored(tmp_path):
    structures = lj_structures(3, n_atoms=(3, 3))
    write_npz(tmp_path / "d.npz", structures, pad_to=5)
    with np.load(tmp_path / "d.npz") as f:
        arrays = dict(f)
    arrays["forces"][:, 3:] = np.nan
    np.savez(tmp_path / "d.npz", **arrays)
    assert len(load_structures(tmp_path / "d.npz")) == 3


def test_unknown_element():
    structures = lj_structures(3, elements=(6, 8, 14), n_atoms=(6, 6), seed=1)
    assert 14 in {int(z) for a in structures for z in a.numbers}
    with pytest.raises(ValueError, match=r"element\(s\) Si not known to this model \(it knows C, O\)"):
        GraphDataset(structures, [6, 8], 3.0)


@pytest.mark.parametrize("name", ["d.npz", "d.extxyz"])
def test_truncated_file(tmp_path, name):
    structures = lj_structures(20)
    path = tmp_path / name
    if name.endswith(".npz"):
        write_npz(path, structures)
    else:
        ase.io.write(path, structures)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 7])
    with pytest.raises(ValueError, match="(not a readable npz|could not be read)"):
        load_structures(path)


def test_unreadable_file(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip archive")
    with pytest.raises(ValueError, match="not a readable npz"):
        load_structures(tmp_path / "junk.npz")
    (tmp_path / "junk.xyz").write_text("3\nnot a number\nX 0 0\n")
    with pytest.raises(ValueError, match="could not be read"):
        load_structures(tmp_path / "junk.xyz")
