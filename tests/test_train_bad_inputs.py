"""Every bad training input or config: efa-train exits non-zero with one line naming the problem
and the fix, before training starts (nothing is written to the run folder)."""

import re

import numpy as np
import pytest
import yaml

from efa_deploy.cli.train import main

from helpers import TINY_MODEL, lj_structures, write_npz


@pytest.fixture(scope="module")
def good_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    write_npz(root / "good.npz", lj_structures(20, seed=1), pad_to=6, trajectory=np.arange(20) // 4)
    return root


def npz_with(root, name, change):
    """good.npz with one array changed by change(arrays)."""
    with np.load(root / "good.npz") as f:
        arrays = dict(f)
    change(arrays)
    np.savez(root / name, **arrays)
    return str(root / name)


def drop(arrays, key):
    del arrays[key]


def nan_at(arrays, key):
    arrays[key][3, 0] = np.nan


def empty(arrays):
    for key in list(arrays):
        arrays[key] = arrays[key][:0]


def base_config(root) -> dict:
    return {"data": {"path": str(root / "good.npz"), "n_train": 12, "n_val": 4},
            "model": dict(TINY_MODEL), "training": {"epochs": 1, "batch_size": 4, "progress": False},
            "output": str(root / "run")}


# (name, change to the config dict (may write data files), pattern the message must match)
CASES = [
    ("unknown training key", lambda c, r: c["training"].update(learning_rate=1e-3),
     r"unknown setting 'training.learning_rate'; did you mean 'training.lr'"),
    ("unknown section", lambda c, r: c.update(optimiser={}), r"unknown setting 'optimiser'; known here"),
    ("unknown model key", lambda c, r: c["model"].update(layers=3), r"unknown setting 'model.layers'"),
    ("wrong type", lambda c, r: c["training"].update(lr="fast"), r"'training.lr' must be a finite number, got 'fast'"),
    ("not whole", lambda c, r: c["training"].update(batch_size=2.5), r"'training.batch_size' must be a whole number"),
    ("out of range", lambda c, r: c["training"].update(epochs=0), r"'training.epochs' must be >= 1, got 0"),
    ("bad choice", lambda c, r: c["training"].update(dtype="half"), r"'training.dtype' must be one of float64, float32"),
    ("section not a mapping", lambda c, r: c.update(training=[1, 2]), r"training must be a mapping of settings"),
    ("model type", lambda c, r: c["model"].update(use_efa="sometimes"), r"'model.use_efa' must be true or false"),
    ("model value", lambda c, r: c["model"].update(qk_activation="tanh"), r"qk_activation must be 'identity' or 'silu'"),
    ("schedule without budget", lambda c, r: c["training"].update(schedule="time"), r"needs training.time_budget"),
    ("no data path", lambda c, r: c["data"].pop("path"), r"data.path is not set: give the training data file"),
    ("missing data file", lambda c, r: c["data"].update(path=str(r / "nope.npz")), r"data file .*nope.npz does not exist"),
    ("missing validation file", lambda c, r: c["data"].update(validation=str(r / "v.npz"), n_train=0.8, n_val=0.1),
     r"data file .*v.npz does not exist"),
    ("empty data", lambda c, r: c["data"].update(path=npz_with(r, "empty.npz", empty)), r"holds no structures"),
    ("nan energy", lambda c, r: c["data"].update(path=npz_with(r, "nan_e.npz", lambda a: a["energy"].__setitem__(3, np.nan))),
     r"structure 3 has a NaN or infinite energy"),
    ("nan forces", lambda c, r: c["data"].update(path=npz_with(r, "nan_f.npz", lambda a: nan_at(a, "forces"))),
     r"structure 3 has NaN or infinite forces"),
    ("nan positions", lambda c, r: c["data"].update(path=npz_with(r, "nan_p.npz", lambda a: nan_at(a, "positions"))),
     r"structure 3 has NaN or infinite positions"),
    ("padding without mask", lambda c, r: c["data"].update(path=npz_with(r, "nomask.npz", lambda a: drop(a, "node_mask"))),
     r"atomic number 0 and there is no node_mask: .* add a boolean node_mask"),
    ("no forces", lambda c, r: c["data"].update(path=npz_with(r, "noforces.npz", lambda a: drop(a, "forces"))),
     r"lacks the key\(s\) forces"),
    ("split too large", lambda c, r: c["data"].update(n_train=30), r"split sizes \[30, 4, None\] need 34 structures, the data has 20"),
    ("bad fraction", lambda c, r: c["data"].update(n_val=1.5), r"'data.n_val' must be a count >= 0 or a fraction"),
    ("empty validation", lambda c, r: c["data"].update(n_train=None, n_val=0), r"leaves 20 training and 0 validation"),
    ("split_by unknown key", lambda c, r: c["data"].update(split_by="system"), r"data.split_by is 'system' but structure 0"),
    ("split_by too many groups", lambda c, r: c["data"].update(split_by="trajectory", n_train=4, n_val=2),
     r"count groups with split_by, and the data has 5 groups"),
    ("split sizes with a validation file", lambda c, r: c["data"].update(validation=str(r / "good.npz")),
     r"data.n_train has no effect when data.validation names a file"),
    ("zero loss weights", lambda c, r: c["training"].update(energy_weight=0, forces_weight=0), r"nothing to fit"),
]


@pytest.mark.parametrize("name, change, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_training_input(good_data, tmp_path, capsys, name, change, pattern):
    config = base_config(good_data)
    config["output"] = str(tmp_path / "run")
    change(config, good_data)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main([str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("efa-train: error: ") and "\n" not in err, err
    assert re.search(pattern, err), err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("argv, pattern", [
    (["{yaml}", "--set", "training.lr"], r"--set expects section.key=value"),
    (["{yaml}", "--set", "training.lr.x=1"], r"'training.lr' must be a finite number, got \{'x': 1\}"),
    (["{yaml}", "--set", "training.lr=[1"], r"--set 'training.lr=\[1': the value is not valid YAML; quote it"),
    (["{yaml}", "--set", "data=5", "--set", "data.path=x"], r"'data' was given a value by an earlier --set"),
    (["{root}/no.yaml"], r"cannot read config .*no.yaml"),
    (["{bad_yaml}"], r"is not valid YAML"),
    (["--resume"], r"--resume without a config file needs -o/--output"),
    ([], r"give a YAML config file"),
])
def test_bad_command_line(good_data, tmp_path, capsys, argv, pattern):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(base_config(good_data)))
    (tmp_path / "bad.yaml").write_text("training: {lr: [1, 2\n")
    argv = [a.format(yaml=tmp_path / "c.yaml", root=tmp_path, bad_yaml=tmp_path / "bad.yaml") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("efa-train: error: ") and "\n" not in err, err
    assert re.search(pattern, err), err


def test_resume_with_a_changed_setting(good_data, tmp_path, capsys):
    config = base_config(good_data) | {"output": str(tmp_path / "run")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main([str(tmp_path / "c.yaml")]) == 0
    capsys.readouterr()
    config["training"]["lr"] = 0.5
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main([str(tmp_path / "c.yaml"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(r"--resume: setting 'training.lr' is 0.5 but the checkpoint was trained", err)
