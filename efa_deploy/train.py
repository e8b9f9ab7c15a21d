"""The training loop behind `efa-train`: weighted energy + force loss, Adam with an
exponentially decaying learning rate, an EMA of the weights, per-epoch validation written to
CSV and a learning-curve plot, atomic checkpoints and exact resumption.

A run is described by one nested dict (see DEFAULTS); `train(config, resume=...)` runs it.
The batch order of epoch e is a permutation seeded by (seed, e), so the state after any step
is fixed by the step number and a resumed run repeats the interrupted one exactly.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .data import GraphDataset, elements_of, file_digest, fit_energy_shifts, load_structures, split_indices
from .model import ModelConfig, build_model, energy_and_forces

DEFAULTS: dict = {
    "data": {
        "path": None,  # npz, extxyz, ASE db, ... (relative paths: to the YAML file that names them)
        "n_train": 0.8,  # count, fraction, or null for all that remain
        "n_val": 0.1,
        "n_test": None,
        "split_seed": 0,
    },
    "model": {},  # ModelConfig fields; atomic_numbers default to the elements in the data
    "training": {
        "dtype": "float64",
        "seed": 0,
        "batch_size": 16,
        "epochs": 100,
        "time_budget": None,  # seconds of training (summed over resumed runs); null: no limit
        "lr": 1.0e-3,
        "lr_final": 1.0e-5,  # reached at the end (exponential decay)
        "schedule": "steps",  # decay over epochs x steps per epoch (exactly resumable), or over
        # "time": the time_budget, so a run on a busy machine still ends at lr_final
        "energy_weight": 0.01,
        "forces_weight": 0.99,
        "ema_decay": 0.999,
        "clip_grad_norm": None,
        "checkpoint_every": 500,  # steps
        "val_batch_size": 8,  # EFA work per batch grows with (atoms x structures) in it
        "threads": 1,
        "progress": True,
        "plot_every": 30.0,  # seconds between learning-curve redraws (always drawn at the end)
    },
    "output": "runs/efa",
}
# settings a resumed run may change; everything else must match the checkpoint
RESUMABLE = {("training", k) for k in ("epochs", "time_budget", "checkpoint_every", "threads", "progress", "plot_every")}
RESUMABLE.add(("data", "path"))  # the sha256 of the data is checked instead
DTYPES = {"float64": torch.float64, "float32": torch.float32}
CSV_FIELDS = ["epoch", "step", "elapsed_s", "lr", "train_loss", "val_loss",
              "val_energy_mae", "val_energy_rmse", "val_energy_per_atom_mae", "val_energy_per_atom_rmse",
              "val_forces_mae", "val_forces_rmse"]


def merge_config(base: dict, update: dict, where: str = "") -> dict:
    """Deep-merge update into a copy of base; unknown keys are an error (they are typos).
    The model section is free-form here: ModelConfig checks its keys."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        name = f"{where}{key}"
        if where == "model.":
            out[key] = value
        elif key not in out:
            raise ValueError(f"unknown setting '{name}'; known here: {', '.join(sorted(out))}")
        elif isinstance(out[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"setting '{name}' must be a mapping, got {value!r}")
            out[key] = merge_config(out[key], value, f"{name}.")
        else:
            out[key] = value
    return out


def coerce_numbers(node):
    """YAML 1.1 reads 1e-3 (no dot) as a string: turn number-like strings back into numbers."""
    if isinstance(node, dict):
        return {k: coerce_numbers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [coerce_numbers(v) for v in node]
    if isinstance(node, str):
        try:
            return float(node)
        except ValueError:
            return node
    return node


def model_config_from(config: dict, structures) -> ModelConfig:
    settings = dict(config["model"])
    settings.setdefault("atomic_numbers", elements_of(structures))
    return ModelConfig.from_dict(settings)


class EMA:
    """Exponential moving average of the weights, warmed up over the first steps."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1.0 + step) / (10.0 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


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
    missing = [k for k in ("config", "dtype", "model", "ema", "step", "train_config") if not isinstance(ckpt, dict) or k not in ckpt]
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


def evaluate(model: torch.nn.Module, dataset: GraphDataset, batch_size: int = 8) -> dict:
    """Energy (eV, per structure and per atom) and force (eV/A, per component) MAE and RMSE."""
    de, df, n_atoms = [], [], []
    for b in dataset.batches(batch_size):
        energy, forces, _ = energy_and_forces(model, *b.graph.inputs())
        de.append((energy.detach() - b.energy).double())
        df.append((forces.detach() - b.forces).double().reshape(-1))
        n_atoms.append(torch.bincount(b.graph.batch, minlength=b.graph.n_structures))
    de, df = torch.cat(de), torch.cat(df)
    per_atom = de / torch.cat(n_atoms)
    return {
        "energy_mae": float(de.abs().mean()), "energy_rmse": float(de.square().mean().sqrt()),
        "energy_per_atom_mae": float(per_atom.abs().mean()),
        "energy_per_atom_rmse": float(per_atom.square().mean().sqrt()),
        "forces_mae": float(df.abs().mean()), "forces_rmse": float(df.square().mean().sqrt()),
    }


def weighted_loss(tc: dict, metrics: dict) -> float:
    return tc["energy_weight"] * metrics["energy_rmse"] ** 2 + tc["forces_weight"] * metrics["forces_rmse"] ** 2


class Run:
    """The state of one training run: data, model, optimiser and bookkeeping."""

    def __init__(self, config: dict, resume: bool = False):
        config = {**config, "model": coerce_numbers(config["model"]), "training": coerce_numbers(config["training"])}
        out = Path(config["output"])
        ckpt = None
        if resume and (out / "last.ckpt").is_file():
            ckpt = load_checkpoint(out / "last.ckpt")
            config = self._resumed_config(ckpt["train_config"], config)
        elif resume:
            print(f"efa-train: no checkpoint in {out}; starting from the beginning")
        self.config, self.out = config, out
        tc = self.tc = config["training"]
        if tc["schedule"] not in ("steps", "time"):
            raise ValueError(f"training.schedule must be 'steps' or 'time', not {tc['schedule']!r}")
        if tc["schedule"] == "time" and not tc["time_budget"]:
            raise ValueError("training.schedule 'time' needs training.time_budget (seconds)")
        if tc["dtype"] not in DTYPES:
            raise ValueError(f"training.dtype must be one of {', '.join(DTYPES)}, not {tc['dtype']!r}")
        self.dtype = DTYPES[tc["dtype"]]
        torch.set_num_threads(int(tc["threads"]))
        out.mkdir(parents=True, exist_ok=True)

        dc = config["data"]
        if not dc.get("path"):
            raise ValueError("data.path is not set: give the training data file")
        structures = load_structures(dc["path"])
        self.digest = file_digest(dc["path"])
        if ckpt is not None and ckpt.get("data_digest") != self.digest:
            raise ValueError(f"{dc['path']} is not the file this run was trained on (sha256 differs); "
                             "resume with the original data or start a new run")
        train_idx, val_idx, _ = split_indices(len(structures), [dc["n_train"], dc["n_val"], dc["n_test"]], dc["split_seed"])
        if len(train_idx) == 0 or len(val_idx) == 0:
            raise ValueError(f"the split leaves {len(train_idx)} training and {len(val_idx)} validation structures")
        self.model_config = model_config_from(config, structures)
        torch.manual_seed(tc["seed"])
        self.model = build_model(self.model_config, self.dtype)
        train_structures = [structures[i] for i in train_idx]
        shifts = fit_energy_shifts(train_structures, self.model_config.atomic_numbers)
        self.model.energy_shift.copy_(torch.from_numpy(shifts))
        cutoff = self.model_config.cutoff
        self.train_set = GraphDataset(train_structures, self.model_config.atomic_numbers, cutoff, self.dtype)
        self.val_set = GraphDataset([structures[i] for i in val_idx], self.model_config.atomic_numbers, cutoff, self.dtype)

        self.steps_per_epoch = math.ceil(len(self.train_set) / tc["batch_size"])
        self.total_steps = int(tc["epochs"]) * self.steps_per_epoch
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=tc["lr"])
        # a resumed run keeps the decay rate it started with (the scheduler state holds it);
        # with schedule "time" the rate is set from the elapsed time before every step instead
        gamma = (tc["lr_final"] / tc["lr"]) ** (1.0 / max(self.total_steps, 1)) if tc["schedule"] == "steps" else 1.0
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=gamma)
        self.ema = EMA(self.model, tc["ema_decay"])
        self.step, self.elapsed, self.best_val = 0, 0.0, math.inf
        self.epoch_loss = [0.0, 0]  # sum and count of training losses in the current epoch
        self.val_metrics: dict = {}
        if ckpt is not None:
            self._restore(ckpt)

    @staticmethod
    def _resumed_config(saved: dict, given: dict) -> dict:
        config = copy.deepcopy(saved)
        for section, key in RESUMABLE:
            config[section][key] = given[section][key]
        for section in ("data", "model", "training"):
            for key in set(saved[section]) | set(given[section]):
                if (section, key) not in RESUMABLE and saved[section].get(key) != given[section].get(key):
                    raise ValueError(
                        f"--resume: setting '{section}.{key}' is {given[section].get(key)!r} but the checkpoint "
                        f"was trained with {saved[section].get(key)!r}; only "
                        f"{', '.join(sorted(f'{s}.{k}' for s, k in RESUMABLE))} may change on resume"
                    )
        return config

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.ema.model.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step, self.elapsed, self.best_val = ckpt["step"], ckpt["elapsed_s"], ckpt["best_val"]
        self.epoch_loss = list(ckpt["epoch_loss"])
        self.val_metrics = ckpt.get("val_metrics", {})
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        self._truncate_csv(self.step)

    def checkpoint(self) -> dict:
        return {
            "config": self.model_config.to_dict(),
            "dtype": self.tc["dtype"],
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "elapsed_s": self.elapsed,
            "epoch_loss": list(self.epoch_loss),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
            "train_config": self.config,
            "data_digest": self.digest,
            "best_val": self.best_val,
            "val_metrics": self.val_metrics,
            "package_version": __version__,
        }

    # ---- one step, one epoch ------------------------------------------------------------
    def batch_indices(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([int(self.tc["seed"]), epoch]).permutation(len(self.train_set))
        bs = self.tc["batch_size"]
        return perm[pos * bs : (pos + 1) * bs]

    def train_step(self) -> tuple[float, float, float]:
        tc = self.tc
        if tc["schedule"] == "time":
            progress = min(self.elapsed / tc["time_budget"], 1.0)
            for group in self.optimizer.param_groups:
                group["lr"] = tc["lr"] * (tc["lr_final"] / tc["lr"]) ** progress
        b = self.train_set.batch(self.batch_indices(self.step))
        energy, forces, _ = energy_and_forces(self.model, *b.graph.inputs(), create_graph=True)
        de, df = energy - b.energy, forces - b.forces
        loss = tc["energy_weight"] * de.square().mean() + tc["forces_weight"] * df.square().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc["clip_grad_norm"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc["clip_grad_norm"])
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.ema.update(self.model, self.step)
        return float(loss.detach()), float(de.detach().abs().mean()), float(df.detach().abs().mean())

    def end_epoch(self, partial: bool = False) -> None:
        self.val_metrics = evaluate(self.ema.model, self.val_set, self.tc["val_batch_size"])
        val_loss = weighted_loss(self.tc, self.val_metrics)
        row = {
            "epoch": math.ceil(self.step / self.steps_per_epoch), "step": self.step, "elapsed_s": round(self.elapsed, 2),
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": self.epoch_loss[0] / max(self.epoch_loss[1], 1), "val_loss": val_loss,
            **{f"val_{k}": v for k, v in self.val_metrics.items()},
        }
        if not partial:
            self.epoch_loss = [0.0, 0]
        path = self.out / "metrics.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        if val_loss < self.best_val:
            self.best_val = val_loss
            save_atomic(self.checkpoint(), self.out / "best.ckpt")

    def _truncate_csv(self, step: int) -> None:
        """Drop rows written after the checkpoint: the resumed run writes them again."""
        path = self.out / "metrics.csv"
        if not path.exists():
            return
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    # ---- the loop ---------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm import tqdm

        tc = self.tc
        budget = tc["time_budget"]
        start, last_plot = time.monotonic() - self.elapsed, time.monotonic()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not tc["progress"], unit="step",
                   dynamic_ncols=True, mininterval=0.5)
        running = None
        stopped_early = False
        first_step = self.step
        while self.step < self.total_steps:
            if budget is not None and self.elapsed >= budget:
                stopped_early = True
                break
            values = self.train_step()
            self.elapsed = time.monotonic() - start
            self.epoch_loss[0] += values[0]
            self.epoch_loss[1] += 1
            running = values if running is None else [0.98 * r + 0.02 * v for r, v in zip(running, values)]
            bar.update(1)
            if self.step % 20 == 0:
                shown = {"loss": f"{running[0]:.3g}", "e_mae": f"{running[1]:.3g}", "f_mae": f"{running[2]:.3g}",
                         "epoch": self.step // self.steps_per_epoch}
                if budget is not None:
                    shown["time"] = f"{self.elapsed:.0f}/{budget:.0f}s"
                bar.set_postfix(shown, refresh=False)
            if self.step % self.steps_per_epoch == 0:
                self.end_epoch()
                if time.monotonic() - last_plot >= tc["plot_every"]:
                    plot_learning_curve(self.out / "metrics.csv", self.out / "learning_curve.png")
                    last_plot = time.monotonic()
            if self.step % tc["checkpoint_every"] == 0:
                save_atomic(self.checkpoint(), self.out / "last.ckpt")
        bar.close()
        if self.step % self.steps_per_epoch and self.step > first_step:
            self.end_epoch(partial=True)  # stopped by the time budget within an epoch
        save_atomic(self.checkpoint(), self.out / "last.ckpt")
        if (self.out / "metrics.csv").exists():
            plot_learning_curve(self.out / "metrics.csv", self.out / "learning_curve.png")
        return {"step": self.step, "elapsed_s": self.elapsed, "stopped_by_time_budget": stopped_early,
                "best_val_loss": self.best_val, "val_metrics": self.val_metrics, "output": str(self.out)}


def train(config: dict, resume: bool = False) -> dict:
    """Run (or, with resume=True, continue) the training that config describes."""
    return Run(config, resume=resume).run()


def plot_learning_curve(csv_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    epoch = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, unit in ((axes[0], "energy", "eV"), (axes[1], "forces", "eV/A")):
        ax.semilogy(epoch, [float(r[f"val_{key}_mae"]) for r in rows], label="MAE")
        ax.semilogy(epoch, [float(r[f"val_{key}_rmse"]) for r in rows], label="RMSE")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {key} error ({unit})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
