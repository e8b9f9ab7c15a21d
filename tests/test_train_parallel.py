"""Data-parallel training under torchrun: 2 ranks with half of every batch each take the step one
process takes (local and EFA models), a resumed torchrun run continues bit-identically, a
failure on one rank ends the job with its message, and CUDA steps equal CPU steps."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from efa_deploy.checkpoint import load_checkpoint
from efa_deploy.training.distributed import FAIL_ENV
from efa_deploy.training.train import Run, train

from helpers import lj_structures, tiny_config, write_npz

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
MODELS = {"local": {"use_efa": False}, "efa": {"use_efa": True, "value_tensors": 1, "value_vectors": 1}}


def torchrun(*args, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--standalone", "--no-python", str(BIN / "efa-train"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})})


def config_file(tmp: Path, name: str, data: Path, model: dict, **training) -> Path:
    config = tiny_config(data, tmp / name, **{"epochs": 2, "batch_size": 6, "checkpoint_every": 4, **training})
    config["model"].update(model)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """Both models trained for 2 epochs by 1 process and by 2 ranks (local: 8 steps of 6 structures,
    3 per rank; EFA: 10 steps of 5, uneven shards of 3 and 2)."""
    tmp = tmp_path_factory.mktemp("parallel")
    data = tmp / "lj.npz"
    write_npz(data, lj_structures(40, seed=3), pad_to=6)
    runs = {}
    for name, model in MODELS.items():
        path = config_file(tmp, name, data, model, batch_size=5 if name == "efa" else 6)  # 5: uneven shards 3 + 2
        single = yaml.safe_load(path.read_text())
        single["output"] = str(tmp / f"{name}_single")
        train(single)
        result = torchrun(path, "--device", "cpu")
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = (path, tmp / f"{name}_single", tmp / name)
    return runs


@pytest.mark.mpi
@pytest.mark.parametrize("name", list(MODELS))
def test_two_ranks_take_the_single_process_step(two_rank_runs, name):
    _, single, parallel = two_rank_runs[name]
    a, b = load_checkpoint(single / "last.ckpt"), load_checkpoint(parallel / "last.ckpt")
    assert a["step"] == b["step"] == (10 if name == "efa" else 8)
    for key in ("model", "ema"):
        for k, v in a[key].items():
            if v.is_floating_point():
                assert torch.allclose(v, b[key][k], rtol=0, atol=1e-10), (key, k, (v - b[key][k]).abs().max())
    moved = max((v - w).abs().max() for v, w in zip(a["model"].values(), build_initial(single).values())
                if v.is_floating_point())
    assert moved > 1e-3  # the weights really trained
    assert (parallel / "metrics.csv").read_text().count("\n") == 3  # rank 0 alone writes: header + 2 epochs


def build_initial(run_folder: Path) -> dict:
    config = load_checkpoint(run_folder / "last.ckpt")["train_config"]
    config = copy.deepcopy(config)
    config["output"] = str(run_folder.parent / "never_written")
    return Run(config).model.state_dict()


@pytest.fixture(scope="module")
def failed_run(two_rank_runs, tmp_path_factory):
    """The EFA run of two_rank_runs under torchrun with rank 1 failing before step 7 (the test
    hook EFA_TEST_FAIL_AT): last.ckpt is the one of step 4."""
    path, _, _ = two_rank_runs["efa"]
    out = tmp_path_factory.mktemp("failed") / "run"
    start = time.monotonic()
    result = torchrun(path, "-o", out, "--device", "cpu", timeout=120, env={FAIL_ENV: "1:6"})
    return path, out, result, time.monotonic() - start


@pytest.mark.mpi
def test_a_failure_on_one_rank_ends_every_rank_with_its_message(failed_run):
    _, out, result, seconds = failed_run
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "injected failure on rank 1 at step 6" in output
    assert "efa-train: error: rank 1 failed: RuntimeError: injected failure on rank 1 at step 6" in output  # rank 0
    assert seconds < 100
    assert load_checkpoint(out / "last.ckpt")["step"] == 4


@pytest.mark.mpi
def test_resume_under_torchrun_is_bit_identical(two_rank_runs, failed_run):
    path, out, _, _ = failed_run
    resumed = torchrun(path, "-o", out, "--resume", "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_checkpoint(two_rank_runs["efa"][2] / "last.ckpt"), load_checkpoint(out / "last.ckpt")
    assert a["step"] == b["step"] == 10
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])
    for key in ("model", "ema"):
        for k, v in a[key].items():
            assert torch.equal(v, b[key][k]), (key, k)
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows == (two_rank_runs["efa"][2] / "metrics.csv").read_text().splitlines()[:1] + rows[1:] and len(rows) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_cuda_step_equals_the_cpu_step(tmp_path):
    data = tmp_path / "lj.npz"
    write_npz(data, lj_structures(20, seed=2), pad_to=6)
    states = {}
    for device in ("cpu", "cuda"):
        config = tiny_config(data, tmp_path / device, dtype="float32", device=device, epochs=1, batch_size=8)
        config["model"].update(MODELS["efa"])
        run = Run(config)
        run.train_step()
        states[device] = {k: v.cpu() for k, v in run.model.state_dict().items()}
    for k, v in states["cpu"].items():
        if v.is_floating_point():
            assert torch.allclose(v, states["cuda"][k], rtol=1e-4, atol=1e-5), k
