"""Checkpoint I/O: atomic writes, clear errors, non-finite detection, and inference without training."""

import subprocess
import sys

import pytest
import torch

from efa_deploy.checkpoint import CHECKPOINT_KEYS, load_checkpoint, non_finite_tensors, save_atomic


def test_save_atomic_round_trip(tmp_path):
    ckpt = {key: 1 for key in CHECKPOINT_KEYS} | {"model": {"w": torch.arange(3.0)}}
    save_atomic(ckpt, tmp_path / "a.ckpt")
    assert torch.equal(load_checkpoint(tmp_path / "a.ckpt")["model"]["w"], torch.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .*none.ckpt does not exist"):
        load_checkpoint(tmp_path / "none.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.ckpt")
    torch.save({"model": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="is not an efa-train checkpoint: missing config, dtype, ema"):
        load_checkpoint(tmp_path / "other.ckpt")


def test_non_finite_tensors():
    state = {"a": torch.zeros(3), "b": torch.tensor([1.0, float("nan")]), "c": torch.tensor([float("inf")]),
             "n": torch.tensor([1, 2])}
    assert non_finite_tensors(state) == ["b", "c"]


def test_inference_does_not_import_training():
    """The model and deployment side load without the training subpackage (efa_deploy.training)."""
    code = ("import sys; import efa_deploy.calculator, efa_deploy.modelfile, efa_deploy.lammps, efa_deploy.graph, "
            "efa_deploy.model, efa_deploy.cli.export, efa_deploy.cli.eval, efa_deploy.cli.md; "
            "print(sorted(m for m in sys.modules if m.startswith('efa_deploy.training') or m == 'efa_deploy.cli.train'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
