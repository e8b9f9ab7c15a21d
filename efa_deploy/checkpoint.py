"""Training checkpoints: atomic writes, validated reads, and the eager model they hold.

Inference (the calculator, efa-export, efa-eval) reads checkpoints through this module and
never imports the training loop.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .model import ModelConfig, build_model

DTYPES = {"float64": torch.float64, "float32": torch.float32}
CHECKPOINT_KEYS = ("config", "dtype", "model", "ema", "step", "train_config")


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ValueError(f"{path} is not a readable checkpoint (truncated or not written by efa-train?): {err}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not an efa-train checkpoint: missing {', '.join(missing)}")
    return ckpt


def model_from_checkpoint(ckpt: dict, weights: str = "ema") -> tuple[torch.nn.Module, ModelConfig]:
    """The eager model of a checkpoint with its EMA ("ema") or raw ("model") weights."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', not {weights!r}")
    config = ModelConfig.from_dict(ckpt["config"])
    model = build_model(config, DTYPES[ckpt["dtype"]])
    model.load_state_dict(ckpt[weights])
    return model.eval(), config


def non_finite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or inf."""
    return [name for name, t in state.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
