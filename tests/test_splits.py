"""Training/validation/test sets: random splits, group splits (split_by) that never put one
trajectory on both sides, and explicit files used exactly as given."""

import ase.io
import numpy as np
import pytest

from efa_deploy.training.splits import group_split, load_splits, split_indices
from efa_deploy.training.train import Run

from helpers import lj_structures, tiny_config, write_npz

TRAJECTORY_LENGTHS = [3, 7, 2, 5, 4, 6, 3, 8, 2, 5, 4, 1]  # 12 trajectories, 50 frames


def trajectory_ids():
    return np.repeat(np.arange(len(TRAJECTORY_LENGTHS)), TRAJECTORY_LENGTHS)


@pytest.fixture(scope="module")
def md_frames(tmp_path_factory):
    """50 frames in 12 'trajectories' of unequal length, with a per-frame trajectory id array."""
    path = tmp_path_factory.mktemp("md") / "frames.npz"
    structures = lj_structures(len(trajectory_ids()), seed=7)
    write_npz(path, structures, pad_to=6, trajectory=trajectory_ids())
    return path, structures


def energies(structures):
    return [a.get_potential_energy() for a in structures]


def groups_of(split, ids):
    return [set(ids[idx].tolist()) for idx in split]


def test_splits_are_deterministic_and_disjoint():
    a = split_indices(100, [60, 20, None], seed=3)
    b = split_indices(100, [60, 20, None], seed=3)
    c = split_indices(100, [60, 20, None], seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert [len(x) for x in a] == [60, 20, 20]
    assert len(np.unique(np.concatenate(a))) == 100
    assert [len(x) for x in split_indices(10, [0.5, 0.2, 0.3], seed=0)] == [5, 2, 3]
    with pytest.raises(ValueError, match="need 120 structures"):
        split_indices(100, [100, 20, None], seed=0)


@pytest.mark.parametrize("seed", range(5))
def test_group_split_never_straddles(seed):
    ids = trajectory_ids()
    parts = group_split(ids, [8, 2, None], seed)
    train, val, test = groups_of(parts, ids)
    assert (len(train), len(val), len(test)) == (8, 2, 2)  # sizes count groups
    assert not (train & val) and not (train & test) and not (val & test)
    # every frame of a chosen trajectory is in the set, and every frame is somewhere
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(ids)))
    for part, groups in zip(parts, (train, val, test)):
        assert len(part) == sum(TRAJECTORY_LENGTHS[g] for g in groups)


def test_random_split_does_straddle():
    """The negative control: split frame by frame, trajectories do land on both sides."""
    ids = trajectory_ids()
    train, val, test = groups_of(split_indices(len(ids), [0.8, 0.1, None], 0), ids)
    assert train & val or train & test


def test_split_by_npz_array(md_frames):
    path, structures = md_frames
    splits = load_splits({"path": str(path), "n_train": 0.6, "n_val": 3, "n_test": None, "split_by": "trajectory"})
    sets = [{a.info["trajectory"] for a in s} for s in (splits.train, splits.validation, splits.test)]
    assert [len(s) for s in sets] == [7, 3, 2]  # 0.6 of 12 groups, 3 groups, the rest
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert len(splits.train) + len(splits.validation) + len(splits.test) == len(structures)
    ids = trajectory_ids()
    for name, chosen in (("train", splits.train), ("validation", splits.validation)):
        assert sets[0 if name == "train" else 1] == set(ids[splits.indices[name]].tolist())
        assert energies(chosen) == energies([structures[i] for i in splits.indices[name]])


def test_split_by_extxyz_info_key(tmp_path):
    structures = lj_structures(30, seed=3)
    for k, atoms in enumerate(structures):
        atoms.info["system"] = f"sys{k % 7}"
    ase.io.write(tmp_path / "d.extxyz", structures)
    splits = load_splits({"path": str(tmp_path / "d.extxyz"), "n_train": 4, "n_val": 2, "split_by": "system"})
    sets = [{a.info["system"] for a in s} for s in (splits.train, splits.validation, splits.test)]
    assert [len(s) for s in sets] == [4, 2, 1]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])


def test_training_run_uses_the_group_split(md_frames, tmp_path):
    path, _ = md_frames
    config = tiny_config(path, tmp_path / "run")
    config["data"].update(n_train=8, n_val=2, n_test=None, split_by="trajectory")
    run = Run(config)
    train = {a.info["trajectory"] for a in run.train_set.structures}
    val = {a.info["trajectory"] for a in run.val_set.structures}
    assert len(train) == 8 and len(val) == 2 and not train & val


def test_explicit_files_are_used_as_given(tmp_path):
    train, val, test = lj_structures(20, seed=1), lj_structures(6, seed=2), lj_structures(5, seed=3)
    write_npz(tmp_path / "train.npz", train, pad_to=6)
    ase.io.write(tmp_path / "val.extxyz", val)
    write_npz(tmp_path / "test.npz", test)
    splits = load_splits({"path": str(tmp_path / "train.npz"), "validation": str(tmp_path / "val.extxyz"),
                          "test": str(tmp_path / "test.npz")})
    assert energies(splits.train) == energies(train)  # all of it, in file order
    assert energies(splits.validation) == pytest.approx(energies(val), abs=1e-7)
    assert energies(splits.test) == energies(test)
    np.testing.assert_array_equal(splits.train[4].positions, train[4].positions)
    run = Run(tiny_config(tmp_path / "train.npz", tmp_path / "run") | {"data": {
        "path": str(tmp_path / "train.npz"), "validation": str(tmp_path / "val.extxyz")}})
    assert len(run.train_set) == 20 and len(run.val_set) == 6


def test_explicit_test_file_splits_validation_from_the_rest(tmp_path):
    train, test = lj_structures(20, seed=1), lj_structures(5, seed=3)
    write_npz(tmp_path / "train.npz", train)
    write_npz(tmp_path / "test.npz", test)
    splits = load_splits({"path": str(tmp_path / "train.npz"), "test": str(tmp_path / "test.npz"), "n_val": 4})
    assert len(splits.validation) == 4 and len(splits.train) == 16
    assert sorted(energies(splits.train) + energies(splits.validation)) == sorted(energies(train))
    assert energies(splits.test) == energies(test)


@pytest.mark.parametrize("data, message", [
    ({"validation": "v.npz", "n_val": 5}, "data.n_val has no effect when data.validation names a file"),
    ({"validation": "v.npz", "split_by": "trajectory"}, "data.split_by has no effect"),
    ({"test": "t.npz", "n_test": 5}, "data.n_test has no effect when data.test names a file"),
    ({"split_by": "run"}, "data.split_by is 'run' but structure 0 .* has no 'run'"),
    ({"split_by": "trajectory", "n_train": 11, "n_val": 2}, "count groups with split_by, and the data has 12 groups"),
    ({"n_train": 49, "n_val": 1, "n_test": 0}, None),
    ({"n_train": 50, "n_val": 0}, "leaves 50 training and 0 validation"),
])
def test_split_errors(md_frames, data, message):
    path, _ = md_frames
    if message is None:
        assert len(load_splits({"path": str(path), **data}).validation) == 1
        return
    with pytest.raises(ValueError, match=message):
        load_splits({"path": str(path), **data})


def test_split_by_ase_db_key(tmp_path):
    import ase.db

    structures = lj_structures(12, seed=4)
    with ase.db.connect(tmp_path / "d.db") as db:
        for k, atoms in enumerate(structures):
            db.write(atoms, trajectory=k // 3)
    splits = load_splits({"path": str(tmp_path / "d.db"), "n_train": 2, "n_val": 1, "split_by": "trajectory"})
    sets = [{a.info["trajectory"] for a in s} for s in (splits.train, splits.validation, splits.test)]
    assert [len(s) for s in sets] == [2, 1, 1] and len(set.union(*sets)) == 4
    assert [len(s) for s in (splits.train, splits.validation, splits.test)] == [6, 3, 3]


def test_export_check_takes_the_held_out_set_of_the_checkpoint(tmp_path):
    from efa_deploy.checkpoint import load_checkpoint
    from efa_deploy.cli.export import held_out_structures
    from efa_deploy.training.train import train

    train_set, val = lj_structures(12, seed=1), lj_structures(4, seed=2)
    write_npz(tmp_path / "train.npz", train_set)
    write_npz(tmp_path / "val.npz", val)
    config = tiny_config(tmp_path / "train.npz", tmp_path / "run", epochs=1)
    config["data"] = {"path": str(tmp_path / "train.npz"), "validation": str(tmp_path / "val.npz")}
    train(config)
    held_out = held_out_structures(load_checkpoint(tmp_path / "run" / "last.ckpt"))
    assert energies(held_out) == energies(val)  # no test set: the validation file, as given
