"""efa-export: the TorchScript file, its metadata, --check and the refusal to overwrite."""

import json

import pytest
import torch

from efa_deploy import __version__
from efa_deploy.checkpoint import load_checkpoint, model_from_checkpoint
from efa_deploy.cli.export import check_model_file, compare, held_out_structures, main
from efa_deploy.training.data import file_digest
from efa_deploy.modelfile import load_model_file
from efa_deploy.training.train import train

from helpers import lj_structures, tiny_config, write_npz


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = root / "lj.npz"
    write_npz(data, lj_structures(40, seed=3), pad_to=6)
    train(tiny_config(data, root / "run", epochs=2))
    return root


def test_export_round_trip(run, capsys):
    model_file = run / "model.pt"
    assert main([str(run / "run" / "best.ckpt"), "-o", str(model_file), "--check"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert report["passed"] and report["structures"] == 8  # the checkpoint's test split
    assert max(report["max_abs_diff"].values()) <= 1e-10

    scripted, meta = load_model_file(model_file)
    ckpt = load_checkpoint(run / "run" / "best.ckpt")
    assert meta["elements"] == ["C", "O"] and meta["atomic_numbers"] == [6, 8]
    assert meta["cutoff"] == 3.0 and meta["num_layers"] == 2 and meta["dtype"] == "float64"
    assert meta["units"] == {"energy": "eV", "length": "Angstrom"}
    assert meta["periodic"] is False
    efa = meta["efa"]
    assert efa["enabled"] and efa["grid_points"] == 50 and efa["r_max"] == 8.0 and efa["D"] == 4 and efa["Dv"] == 4
    assert efa["frequencies"] == pytest.approx([0.0, efa["b_max"] / 8.0])
    prov = meta["provenance"]
    assert prov["data_digest"] == file_digest(run / "lj.npz") == ckpt["data_digest"]
    assert prov["validation"] == ckpt["val_metrics"] and prov["validation"]["energy_mae"] > 0
    assert prov["package_version"] == __version__ and prov["weights"] == "ema"

    # the file holds the EMA weights, which differ from the raw ones
    ema, config = model_from_checkpoint(ckpt, "ema")
    raw, _ = model_from_checkpoint(ckpt, "model")
    structures = held_out_structures(ckpt, count=8)
    assert max(compare(scripted, ema, structures, config, torch.float64).values()) <= 1e-10
    assert compare(scripted, raw, structures, config, torch.float64)["energy"] > 1e-8


def test_export_refuses_to_overwrite(run, capsys):
    model_file = run / "again.pt"
    assert main([str(run / "run" / "last.ckpt"), "-o", str(model_file)]) == 0
    before = model_file.read_bytes()
    assert main([str(run / "run" / "best.ckpt"), "-o", str(model_file)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert model_file.read_bytes() == before
    assert main([str(run / "run" / "best.ckpt"), "-o", str(model_file), "--force", "--weights", "raw"]) == 0
    assert load_model_file(model_file)[1]["provenance"]["weights"] == "model"


def test_check_on_given_data_and_bad_checkpoint(run, tmp_path, capsys):
    other = tmp_path / "other.npz"
    write_npz(other, lj_structures(5, seed=9), pad_to=6)
    model_file = tmp_path / "m.pt"
    assert main([str(run / "run" / "best.ckpt"), "-o", str(model_file)]) == 0
    result = check_model_file(model_file, run / "run" / "best.ckpt", data_path=other)
    assert result["passed"] and result["structures"] == 5
    (tmp_path / "broken.ckpt").write_bytes((run / "run" / "best.ckpt").read_bytes()[:500])
    assert main([str(tmp_path / "broken.ckpt"), "-o", str(tmp_path / "x.pt")]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
