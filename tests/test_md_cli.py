"""efa-md: a short run writes trajectory, thermo, plot and summary; bad arguments give one
clear line each on stderr, exit code 2 and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase.io import read

from efa_deploy.cli.md import main
from efa_deploy.model import ModelConfig
from efa_deploy.modelfile import save_model_file

from helpers import jittered_cluster, randomised_model, write_data

EFA_MD = Path(sys.executable).parent / "efa-md"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("md")
    config = ModelConfig(atomic_numbers=[1, 6, 8], features=16, num_layers=2, cutoff=4.0, r_max=20.0)
    save_model_file(randomised_model(config, seed=4, std=0.05), config, d / "model.pt")
    cluster = jittered_cluster(20, seed=2)
    cluster.write(d / "cluster.extxyz")
    periodic = cluster.copy()
    periodic.cell, periodic.pbc = [15.0, 15.0, 15.0], True
    periodic.write(d / "periodic.extxyz")
    jittered_cluster(10, numbers=(1, 7)).write(d / "nitrogen.xyz")
    write_data(cluster, d / "cluster.data", ["H", "C", "O"])
    return d


def efa_md(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([str(EFA_MD), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_short_run_writes_everything(files, tmp_path):
    proc = efa_md(["cluster.extxyz", "--model", "model.pt", "--ensemble", "nvt", "--temperature", "300",
                   "--timestep", "0.5", "--steps", "60", "--output", str(tmp_path / "traj.extxyz"),
                   "--output-every", "20", "--thermo-every", "10", "--minimize"], files)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "minimised" in out and "steps/s" in out and "ETA" in out and "ns/day" in out and "drift" in out
    frames = read(tmp_path / "traj.extxyz", ":")
    assert [f.info["step"] for f in frames] == [0, 20, 40, 60]
    assert np.isfinite(frames[-1].get_forces()).all()
    summary = json.loads((tmp_path / "traj.summary.json").read_text())
    assert summary["steps"] == 60 and summary["atoms"] == 20 and summary["ranks"] == 1
    assert summary["ns_per_day"] > 0 and np.isfinite(summary["conserved_energy_drift_eV_per_atom_per_ps"])
    thermo = np.genfromtxt(tmp_path / "traj.thermo.csv", delimiter=",", names=True)
    np.testing.assert_array_equal(thermo["step"], np.arange(0, 61, 10))
    png = (tmp_path / "traj.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10000


def test_nve_from_a_lammps_data_file_with_a_dump(files, tmp_path, capsys):
    """In this process: a LAMMPS data file with --elements, NVE, a LAMMPS dump, no progress."""
    code = main([str(files / "cluster.data"), "-m", str(files / "model.pt"), "-e", "nve", "-T", "200", "-n", "40",
                 "--elements", "H", "C", "O", "-o", str(tmp_path / "traj.dump"), "--output-every", "20",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "step " not in out and "total energy drift" in out
    frames = read(tmp_path / "traj.dump", ":", format="lammps-dump-text")
    assert len(frames) == 3 and frames[0].get_chemical_symbols() == read(files / "cluster.extxyz").get_chemical_symbols()
    summary = json.loads((tmp_path / "traj.summary.json").read_text())
    assert abs(summary["conserved_energy_drift_eV_per_atom_per_ps"]) < 1e-3  # NVE of a smooth toy model
    assert 100 < summary["temperature_mean_K"] < 300


BAD = [
    (["missing.xyz", "-m", "model.pt"], "structure file missing.xyz does not exist"),
    (["cluster.extxyz", "-m", "missing.pt"], "model file missing.pt does not exist"),
    (["cluster.extxyz"], "the following arguments are required: -m/--model"),
    (["cluster.extxyz", "-m", "model.pt", "--ensemble", "nph"], "unknown ensemble 'nph'; choose one of nve, nvt, npt"),
    (["cluster.extxyz", "-m", "model.pt", "--thermostat", "berendsen"], "unknown thermostat 'berendsen'"),
    (["cluster.extxyz", "-m", "model.pt", "--steps", "-5"], "--steps must be >= 0, not -5"),
    (["cluster.extxyz", "-m", "model.pt", "--timestep", "-0.5"], "--timestep must be > 0 fs, not -0.5"),
    (["cluster.extxyz", "-m", "model.pt", "--timestep", "0"], "--timestep must be > 0 fs, not 0.0"),
    (["cluster.extxyz", "-m", "model.pt", "--steps", "ten"], "argument -n/--steps: invalid int value: 'ten'"),
    (["cluster.extxyz", "-m", "model.pt", "--temperature", "-10"], "--temperature must be > 0 K for nvt, not -10.0"),
    (["nitrogen.xyz", "-m", "model.pt"], "element(s) N not known to this model (it knows H, C, O)"),
    (["periodic.extxyz", "-m", "model.pt"], "is periodic (pbc=[True, True, True]) but this model's global EFA term is not"),
    (["cluster.extxyz", "-m", "model.pt", "-e", "npt"], "npt needs a periodic box and a periodic model; this model's global EFA term is in its finite form, which is not periodic"),
    (["cluster.data", "-m", "model.pt", "--elements", "H", "C"], "has 3 atom types but 2 elements were given"),
    (["cluster.data", "-m", "model.pt", "--elements", "H", "C", "Qq"], "unknown element symbol(s) Qq"),
    (["cluster.extxyz", "-m", "model.pt", "--elements", "H"], "elements are for LAMMPS data files"),
    (["cluster.extxyz", "-m", "cluster.extxyz"], "is not a readable TorchScript model file"),
    (["cluster.extxyz", "-m", "model.pt", "-o", "nofolder/traj.extxyz"], "output folder"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_arguments_give_one_line(files, capsys, args, message):
    cwd = os.getcwd()
    os.chdir(files)
    try:
        code = main(args)
    except SystemExit as exit:
        code = exit.code
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("efa-md: error: "), captured.err
    assert message in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_bad_argument_from_the_console_script(files):
    """The installed script: one line, exit code 2, also under mpiexec with 2 ranks (rank 0 speaks)."""
    proc = efa_md(["cluster.extxyz", "-m", "model.pt", "--ensemble", "nph"], files)
    assert proc.returncode == 2 and proc.stderr.strip() == "efa-md: error: unknown ensemble 'nph'; choose one of nve, nvt, npt"
    mpiexec = Path(sys.executable).parent / "mpiexec"
    proc = subprocess.run([str(mpiexec), "-n", "2", str(EFA_MD), "cluster.extxyz", "-m", "model.pt", "--steps", "-1"],
                          cwd=files, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and proc.stderr.strip() == "efa-md: error: --steps must be >= 0, not -1"
