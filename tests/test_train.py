"""efa-train: config handling, outputs, energy shifts, time budget and exact resumption after SIGKILL."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from efa_deploy.checkpoint import load_checkpoint, non_finite_tensors
from efa_deploy.cli.train import build_config, main, make_parser
from efa_deploy.training.data import fit_energy_shifts, load_structures
from efa_deploy.training.splits import split_indices
from efa_deploy.training.train import Run, steps_within_budget, train

from helpers import lj_structures, tiny_config, write_npz


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "lj.npz"
    write_npz(path, lj_structures(40, seed=2), pad_to=6)
    return path


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_states_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_training_writes_metrics_plot_and_checkpoints(data_file, tmp_path):
    config = tiny_config(data_file, tmp_path / "run", epochs=4)
    summary = train(config)
    out = tmp_path / "run"
    assert summary["step"] == 4 * 6  # 24 training structures, batch 4
    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])
    for key in ("val_energy_mae", "val_energy_rmse", "val_forces_mae", "val_forces_rmse"):
        assert all(np.isfinite(float(r[key])) for r in rows)
    assert (out / "learning_curve.png").stat().st_size > 1000
    ckpt = load_checkpoint(out / "last.ckpt")
    for key in ("config", "dtype", "model", "ema", "optimizer", "scheduler", "step", "epoch", "rng",
                "train_config", "data_digest", "best_val"):
        assert key in ckpt
    assert ckpt["step"] == 24 and ckpt["epoch"] == 4 and ckpt["dtype"] == "float64"
    best = load_checkpoint(out / "best.ckpt")
    assert best["best_val"] == min(float(r["val_loss"]) for r in rows)
    assert not list(out.glob("*.tmp"))
    # the learning rate decayed exponentially from lr to lr_final over the planned steps
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(3e-3, rel=1e-9)


def test_energy_shifts_are_fitted_before_training(data_file, tmp_path):
    config = tiny_config(data_file, tmp_path / "run")
    run = Run(config)
    structures = load_structures(data_file)
    train_idx, _, _ = split_indices(len(structures), [24, 8, 8], 1)
    expected = fit_energy_shifts([structures[i] for i in train_idx], run.model_config.atomic_numbers)
    np.testing.assert_allclose(run.model.energy_shift.numpy(), expected, rtol=0, atol=1e-12)
    assert run.model_config.atomic_numbers == [6, 8]


def test_time_budget_stops_training(data_file, tmp_path):
    config = tiny_config(data_file, tmp_path / "run", epochs=10_000, time_budget=1.0, schedule="time", plot_every=1e9)
    start = time.monotonic()
    summary = train(config)
    assert summary["stopped_by_time_budget"] and summary["step"] < 60_000
    assert time.monotonic() - start < 30
    ckpt = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert ckpt["step"] == summary["step"] and ckpt["elapsed_s"] >= 1.0
    # schedule "time": the learning rate decayed from 1e-2 towards 3e-3 over the budget
    assert 3e-3 <= ckpt["optimizer"]["param_groups"][0]["lr"] < 1e-2 * 0.3**0.5
    assert read_csv(tmp_path / "run" / "metrics.csv")


def test_cli_config_and_overrides(data_file, tmp_path):
    (tmp_path / "cfg").mkdir()
    cfg = {"data": {"path": os.path.relpath(data_file, tmp_path / "cfg"), "n_train": 24},
           "model": {"features": 8}, "training": {"lr": 1e-3}, "output": "out"}
    (tmp_path / "cfg" / "c.yaml").write_text(yaml.safe_dump(cfg))
    args = make_parser().parse_args([str(tmp_path / "cfg" / "c.yaml"), "--no-efa", "--epochs", "7",
                                     "--set", "training.lr=2.5e-4", "--set", "model.num_layers=3"])
    config = build_config(args)
    assert Path(config.data.path) == Path(data_file).resolve()  # relative to the YAML file
    assert Path(config.output) == (tmp_path / "cfg" / "out").resolve()
    assert config.model == {"features": 8, "use_efa": False, "num_layers": 3}
    assert config.training.epochs == 7 and config.training.lr == 2.5e-4
    bad = make_parser().parse_args([str(tmp_path / "cfg" / "c.yaml"), "--set", "training.learning_rate=1"])
    with pytest.raises(ValueError, match="unknown setting 'training.learning_rate'"):
        build_config(bad)


def test_killed_run_resumes_exactly(data_file, tmp_path):
    """A run killed with SIGKILL and resumed ends in the same state as one never interrupted."""
    epochs = 12  # 72 steps, a checkpoint every 10
    reference = tiny_config(data_file, tmp_path / "reference", epochs=epochs)
    train(reference)

    config = tiny_config(data_file, tmp_path / "killed", epochs=epochs)
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "efa_deploy.cli.train", str(tmp_path / "killed.yaml")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_path = tmp_path / "killed" / "last.ckpt"
    deadline = time.monotonic() + 120
    while not ckpt_path.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(ckpt_path)["step"]
    assert 0 < killed_at < epochs * 6 and killed_at % 10 == 0

    summary = train(config, resume=True)
    assert summary["step"] == epochs * 6
    a, b = load_checkpoint(tmp_path / "reference" / "last.ckpt"), load_checkpoint(ckpt_path)
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    assert_states_equal(a["model"], b["model"])
    assert_states_equal(a["ema"], b["ema"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    for p, q in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert_states_equal(p, q)
    assert a["scheduler"] == b["scheduler"]
    drop = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert drop(read_csv(tmp_path / "killed" / "metrics.csv")) == drop(read_csv(tmp_path / "reference" / "metrics.csv"))


def test_resume_refuses_other_settings_or_data(data_file, tmp_path):
    config = tiny_config(data_file, tmp_path / "run", epochs=1)
    train(config)
    changed = tiny_config(data_file, tmp_path / "run", epochs=1, lr=2e-2)
    with pytest.raises(ValueError, match="'training.lr' is 0.02 but the checkpoint was trained with 0.01"):
        Run(changed, resume=True)
    other = tmp_path / "other.npz"
    write_npz(other, lj_structures(40, seed=5), pad_to=6)
    with pytest.raises(ValueError, match="not the file this run was trained on"):
        Run(tiny_config(other, tmp_path / "run", epochs=1), resume=True)
    longer = tiny_config(data_file, tmp_path / "run", epochs=2)  # more epochs may be asked for
    assert train(longer, resume=True)["step"] == 12


def test_huge_learning_rate_stops_at_the_step_and_keeps_the_last_good_checkpoint(data_file, tmp_path, capsys):
    config = tiny_config(data_file, tmp_path / "run", epochs=50, lr=1e3, lr_final=1e3, checkpoint_every=1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main([str(tmp_path / "c.yaml")]) == 1
    message = capsys.readouterr().err.strip()
    assert "\n" not in message
    step = int(message.split("training diverged at step ")[1].split(":")[0])
    kept = int(message.split("(step ")[1].split(")")[0])
    assert 0 < kept < step and "lower training.lr" in message
    ckpt = load_checkpoint(tmp_path / "run" / "last.ckpt")
    assert ckpt["step"] == kept
    assert not non_finite_tensors(ckpt["model"]) and not non_finite_tensors(ckpt["ema"])
    assert train(tiny_config(data_file, tmp_path / "run", epochs=1), resume=False)  # a fresh run still trains


def test_progress_total_counts_the_time_budget():
    # 100 steps in 10 s of a 60 s budget: 500 more steps, not the epoch bound of 10^6
    assert steps_within_budget(100, 10.0, 60.0, 10**6, 0, 0.0) == 600
    assert steps_within_budget(150, 20.0, 60.0, 10**6, 100, 10.0) == 350  # the pace of this session
    assert steps_within_budget(100, 10.0, 60.0, 300, 0, 0.0) == 300  # the epoch bound comes first
    assert steps_within_budget(100, 10.0, None, 300, 0, 0.0) == 300
    assert steps_within_budget(100, 70.0, 60.0, 10**6, 0, 0.0) == 100


def test_progress_eta_of_a_budgeted_run_is_the_budget(data_file, tmp_path, capsys):
    budget = 2.0
    config = tiny_config(data_file, tmp_path / "run", epochs=100_000, time_budget=budget, progress=True,
                         plot_every=1e9, checkpoint_every=10**6)
    train(config)
    shown = capsys.readouterr().err.replace("\r", "\n").splitlines()
    etas = [line.split("<")[1].split(",")[0] for line in shown if "[" in line and "<" in line]
    seconds = [int(m) * 60 + int(s) for m, s in (t.split(":")[-2:] for t in etas if t != "?")]
    assert seconds and max(seconds) <= budget + 1, etas
