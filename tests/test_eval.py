"""efa-eval: its errors against numbers computed independently, through the ASE calculator and numpy."""

import json
import re

import numpy as np
import pytest
import yaml

from efa_deploy.calculator import EFACalculator
from efa_deploy.cli.eval import main
from efa_deploy.cli.export import export_checkpoint
from efa_deploy.model import ModelConfig
from efa_deploy.modelfile import save_model_file
from efa_deploy.training.splits import split_indices
from efa_deploy.training.train import train

from helpers import TINY_MODEL, lj_structures, randomised_model, tiny_config, write_npz


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    config = ModelConfig(atomic_numbers=[6, 8], **TINY_MODEL)
    save_model_file(randomised_model(config, seed=3, std=0.05), config, root / "model.pt")
    structures = lj_structures(12, seed=9)
    write_npz(root / "data.npz", structures, pad_to=6)
    return root, structures


def reference_errors(model_file, structures) -> dict:
    """MAE/RMSE written out with numpy over per-structure calculator results."""
    calc = EFACalculator(model_file)
    de, dea, df, numbers = [], [], [], []
    for atoms in structures:
        ref_e, ref_f = atoms.get_potential_energy(), atoms.get_forces()
        atoms = atoms.copy()
        atoms.calc = calc
        de.append(atoms.get_potential_energy() - ref_e)
        dea.append(de[-1] / len(atoms))
        df.append(atoms.get_forces() - ref_f)
        numbers.append(atoms.numbers)
    de, dea, df, numbers = np.array(de), np.array(dea), np.concatenate(df), np.concatenate(numbers)
    out = {"structures": len(structures), "atoms": len(numbers)}
    for name, err in (("energy", de), ("energy_per_atom", dea), ("forces", df)):
        out[f"{name}_mae"] = np.mean(np.abs(err))
        out[f"{name}_rmse"] = np.sqrt(np.mean(err**2))
    out["forces_mae_by_element"] = {"C": np.mean(np.abs(df[numbers == 6])), "O": np.mean(np.abs(df[numbers == 8]))}
    return out


def run_json(capsys, *args) -> dict:
    assert main([*map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_errors_match_an_independent_computation(files, capsys, tmp_path):
    root, structures = files
    report = run_json(capsys, root / "model.pt", root / "data.npz", "--plot", tmp_path / "parity.png",
                      "--batch-size", 5)
    expected = reference_errors(root / "model.pt", structures)
    assert report.keys() == expected.keys()
    assert report["structures"] == 12 and report["atoms"] == sum(len(a) for a in structures)
    for key in ("energy_mae", "energy_rmse", "energy_per_atom_mae", "energy_per_atom_rmse", "forces_mae", "forces_rmse"):
        assert report[key] == pytest.approx(expected[key], rel=1e-10), key
        assert report[key] > 1e-3  # a random model: the errors are far from zero
    for element in ("C", "O"):
        assert report["forces_mae_by_element"][element] == pytest.approx(expected["forces_mae_by_element"][element],
                                                                          rel=1e-10)
    assert report["forces_mae_by_element"]["C"] != pytest.approx(report["forces_mae_by_element"]["O"], rel=1e-3)
    png = (tmp_path / "parity.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_text_output(files, capsys):
    root, _ = files
    assert main([str(root / "model.pt"), str(root / "data.npz")]) == 0
    out = capsys.readouterr().out
    assert "12 structures" in out and "energy/atom" in out and "force MAE by element (eV/A): C " in out


def test_checkpoint_and_its_export_give_the_same_errors(files, capsys, tmp_path):
    root, _ = files
    train(tiny_config(root / "data.npz", tmp_path / "run", epochs=1) | {
        "data": {"path": str(root / "data.npz"), "n_train": 8, "n_val": 4}})
    export_checkpoint(tmp_path / "run" / "best.ckpt", tmp_path / "trained.pt")
    a = run_json(capsys, tmp_path / "run" / "best.ckpt", root / "data.npz")
    b = run_json(capsys, tmp_path / "trained.pt", root / "data.npz")
    for key in ("energy_mae", "forces_rmse"):
        assert a[key] == pytest.approx(b[key], rel=1e-10)


def test_a_set_of_a_training_config(files, capsys, tmp_path):
    """--split test of a YAML config evaluates exactly the structures its split holds out."""
    root, structures = files
    (tmp_path / "cfg").mkdir()
    config = {"data": {"path": "../data.npz", "n_train": 6, "n_val": 2, "n_test": None, "split_seed": 5}}
    (tmp_path / "cfg" / "c.yaml").write_text(yaml.safe_dump(config))  # relative to the YAML file
    test = split_indices(12, [6, 2, None], 5)[2]
    write_npz(tmp_path / "data.npz", structures)
    write_npz(tmp_path / "test.npz", [structures[i] for i in test])
    by_config = run_json(capsys, root / "model.pt", tmp_path / "cfg" / "c.yaml", "--split", "test")
    by_file = run_json(capsys, root / "model.pt", tmp_path / "test.npz")
    assert by_config["structures"] == len(test) == 4
    for key, value in by_file.items():
        assert by_config[key] == pytest.approx(value, rel=1e-12), key
    validation = run_json(capsys, root / "model.pt", tmp_path / "cfg" / "c.yaml", "--split", "validation")
    assert validation["structures"] == 2 and validation["energy_mae"] != pytest.approx(by_config["energy_mae"])


@pytest.mark.parametrize("args, message", [
    (["missing.pt", "{data}"], "model file missing.pt does not exist"),
    (["{model}", "missing.npz"], "data file missing.npz does not exist"),
    (["{model}", "{data}", "--plot", "no/such/dir/p.png"], "the folder no/such/dir does not exist"),
    (["{model}", "{data}", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["{model}", "{other}"], r"element\(s\) H not known to this model"),
    (["{model}", "{data}", "--split", "test"], r"--split test picks a set of a training config's split"),
])
def test_bad_inputs(files, capsys, args, message):
    root, _ = files
    write_npz(root / "other.npz", lj_structures(3, elements=(1,)))
    args = [a.format(model=root / "model.pt", data=root / "data.npz", other=root / "other.npz") for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("efa-eval: error: ") and "\n" not in err
    assert re.search(message, err), err
