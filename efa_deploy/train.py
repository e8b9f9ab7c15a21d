"""The training loop behind `efa-train`: weighted energy + force loss, Adam with an
exponentially decaying learning rate, an EMA of the weights, per-epoch validation written to
CSV and a learning-curve plot, atomic checkpoints and exact resumption.

A run is described by a TrainConfig (train_config.py); `train(config, resume=...)` runs it.
The batch order of epoch e is a permutation seeded by (seed, e), so the state after any step
is fixed by the step number and a resumed run repeats the interrupted one exactly.
A NaN or infinite loss, gradient, weight or validation error stops the run (TrainingDiverged)
before anything non-finite reaches a checkpoint.
"""

from __future__ import annotations

import copy
import csv
import math
import time
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .checkpoint import DTYPES, load_checkpoint, non_finite_tensors, save_atomic
from .data import GraphDataset, elements_of, file_digest, fit_energy_shifts
from .metrics import evaluate
from .model import ModelConfig, build_model, energy_and_forces
from .plots import plot_learning_curve
from .splits import load_splits
from .train_config import RESUMABLE, TrainConfig

CSV_FIELDS = ["epoch", "step", "elapsed_s", "lr", "train_loss", "val_loss",
              "val_energy_mae", "val_energy_rmse", "val_energy_per_atom_mae", "val_energy_per_atom_rmse",
              "val_forces_mae", "val_forces_rmse"]


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient, weight or validation error: the run stops, checkpoints intact."""


def model_config_from(settings: dict, structures) -> ModelConfig:
    settings = dict(settings)
    settings.setdefault("atomic_numbers", elements_of(structures))
    return ModelConfig.from_dict(settings)


def steps_within_budget(step: int, elapsed: float, budget: float | None, total_steps: int,
                        start_step: int, start_elapsed: float) -> int:
    """The step a run will stop at: the epoch bound, or where the time budget runs out at the
    pace of this session so far (validation and checkpoints included)."""
    done, spent = step - start_step, elapsed - start_elapsed
    if budget is None or done <= 0 or spent <= 0:
        return total_steps
    return max(step, min(total_steps, step + int((budget - elapsed) * done / spent)))


def flatten(config: dict) -> dict:
    """{'training': {'lr': 1e-3}} -> {'training.lr': 1e-3} over the data, model and training sections."""
    return {f"{section}.{key}": value for section in ("data", "model", "training")
            for key, value in config[section].items()}


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


def weighted_loss(tc, metrics: dict) -> float:
    return tc.energy_weight * metrics["energy_rmse"] ** 2 + tc.forces_weight * metrics["forces_rmse"] ** 2


class Run:
    """The state of one training run: data, model, optimiser and bookkeeping."""

    def __init__(self, config: TrainConfig | dict, resume: bool = False):
        if isinstance(config, dict):
            config = TrainConfig.from_dict(config)
        out = Path(config.output)
        ckpt = None
        if resume and (out / "last.ckpt").is_file():
            ckpt = load_checkpoint(out / "last.ckpt")
            config = self._resumed_config(ckpt["train_config"], config)
        elif resume:
            print(f"efa-train: no checkpoint in {out}; starting from the beginning")
        self.config, self.out = config, out
        tc = self.tc = config.training
        self.dtype = DTYPES[tc.dtype]
        torch.set_num_threads(tc.threads)

        splits = load_splits(config.data)
        self.digest = file_digest(config.data.path)
        if ckpt is not None and ckpt.get("data_digest") != self.digest:
            raise ValueError(f"{config.data.path} is not the file this run was trained on (sha256 differs); "
                             "resume with the original data or start a new run")
        self.model_config = model_config_from(config.model, splits.train + splits.validation + splits.test)
        torch.manual_seed(tc.seed)
        self.model = build_model(self.model_config, self.dtype)
        shifts = fit_energy_shifts(splits.train, self.model_config.atomic_numbers)
        self.model.energy_shift.copy_(torch.from_numpy(shifts))
        z, cutoff, names = self.model_config.atomic_numbers, self.model_config.cutoff, self.model_config.global_inputs
        self.train_set = GraphDataset(splits.train, z, cutoff, self.dtype, names, "the training set")
        self.val_set = GraphDataset(splits.validation, z, cutoff, self.dtype, names, "the validation set")
        out.mkdir(parents=True, exist_ok=True)

        self.steps_per_epoch = math.ceil(len(self.train_set) / tc.batch_size)
        self.total_steps = tc.epochs * self.steps_per_epoch
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=tc.lr)
        # a resumed run keeps the decay rate it started with (the scheduler state holds it);
        # with schedule "time" the rate is set from the elapsed time before every step instead
        gamma = (tc.lr_final / tc.lr) ** (1.0 / max(self.total_steps, 1)) if tc.schedule == "steps" else 1.0
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=gamma)
        self.ema = EMA(self.model, tc.ema_decay)
        self.step, self.elapsed, self.best_val = 0, 0.0, math.inf
        self.saved_step: int | None = None  # step of the last checkpoint written (or resumed from)
        self.epoch_loss = [0.0, 0]  # sum and count of training losses in the current epoch
        self.val_metrics: dict = {}
        if ckpt is not None:
            self._restore(ckpt)

    @staticmethod
    def _resumed_config(saved: dict, given: TrainConfig) -> TrainConfig:
        old, new = flatten(TrainConfig.from_dict(saved).to_dict()), flatten(given.to_dict())
        for key in sorted(set(old) | set(new)):
            if key not in RESUMABLE and old.get(key) != new.get(key):
                raise ValueError(
                    f"--resume: setting '{key}' is {new.get(key)!r} but the checkpoint was trained with "
                    f"{old.get(key)!r}; only {', '.join(RESUMABLE)} may change on resume"
                )
        return given

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.ema.model.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step, self.elapsed, self.best_val = ckpt["step"], ckpt["elapsed_s"], ckpt["best_val"]
        self.saved_step = self.step
        self.epoch_loss = list(ckpt["epoch_loss"])
        self.val_metrics = ckpt.get("val_metrics", {})
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        self._truncate_csv(self.step)

    def checkpoint(self) -> dict:
        return {
            "config": self.model_config.to_dict(),
            "dtype": self.tc.dtype,
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "elapsed_s": self.elapsed,
            "epoch_loss": list(self.epoch_loss),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
            "train_config": self.config.to_dict(),
            "data_digest": self.digest,
            "best_val": self.best_val,
            "val_metrics": self.val_metrics,
            "package_version": __version__,
        }

    def save(self, name: str) -> None:
        """Write a checkpoint, unless a weight is NaN or infinite (then the run has diverged)."""
        ckpt = self.checkpoint()
        bad = non_finite_tensors(ckpt["model"]) + non_finite_tensors(ckpt["ema"])
        if bad:
            self.diverged(f"weight {bad[0]} is not finite")
        save_atomic(ckpt, self.out / name)
        if name == "last.ckpt":
            self.saved_step = self.step

    def diverged(self, what: str, step: int | None = None) -> None:
        kept = (f"the last good checkpoint {self.out / 'last.ckpt'} (step {self.saved_step}) is kept"
                if self.saved_step is not None else "it stopped before the first checkpoint")
        raise TrainingDiverged(f"training diverged at step {self.step if step is None else step}: {what}; {kept}; "
                               "lower training.lr or set training.clip_grad_norm")

    # ---- one step, one epoch ------------------------------------------------------------
    def batch_indices(self, step: int) -> np.ndarray:
        epoch, pos = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.tc.seed, epoch]).permutation(len(self.train_set))
        bs = self.tc.batch_size
        return perm[pos * bs : (pos + 1) * bs]

    def train_step(self) -> tuple[float, float, float]:
        tc = self.tc
        if tc.schedule == "time":
            progress = min(self.elapsed / tc.time_budget, 1.0)
            for group in self.optimizer.param_groups:
                group["lr"] = tc.lr * (tc.lr_final / tc.lr) ** progress
        b = self.train_set.batch(self.batch_indices(self.step))
        energy, forces, _ = energy_and_forces(self.model, *b.graph.inputs(), create_graph=True)
        de, df = energy - b.energy, forces - b.forces
        loss = tc.energy_weight * de.square().mean() + tc.forces_weight * df.square().mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if tc.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, tc.clip_grad_norm)
        # the loss is finite exactly when every predicted energy and force is; the largest |gradient|
        # when every gradient is. With both finite, an Adam step (at most about lr per weight) keeps
        # the weights finite, so they are checked only before each checkpoint is written.
        largest_grad = torch.nn.utils.get_total_norm([p.grad for p in params], float("inf"))
        if not bool(torch.isfinite(torch.stack([loss.detach(), largest_grad])).all()):
            for label, value in (("the predicted energies are", energy), ("the predicted forces are", forces),
                                 ("the gradient is", largest_grad)):
                if not bool(torch.isfinite(value.detach()).all()):
                    self.diverged(f"{label} not finite", self.step + 1)
            self.diverged("the loss is not finite", self.step + 1)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.ema.update(self.model, self.step)
        return float(loss.detach()), float(de.detach().abs().mean()), float(df.detach().abs().mean())

    def end_epoch(self, partial: bool = False) -> None:
        self.val_metrics = evaluate(self.ema.model, self.val_set, self.tc.val_batch_size)
        bad = [k for k, v in self.val_metrics.items() if not math.isfinite(v)]
        if bad:
            self.diverged(f"the validation {bad[0]} is {self.val_metrics[bad[0]]}")
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
            self.save("best.ckpt")

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
        budget = tc.time_budget
        start, last_plot = time.monotonic() - self.elapsed, time.monotonic()
        first_step, first_elapsed = self.step, self.elapsed
        # with a time budget the bar's total is where the budget will run out (not the epoch bound),
        # re-estimated every step, so its ETA is the budget left
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not tc.progress, unit="step",
                   dynamic_ncols=True, mininterval=0.5)
        running = None
        stopped_early = False
        try:
            while self.step < self.total_steps:
                if budget is not None and self.elapsed >= budget:
                    stopped_early = True
                    break
                values = self.train_step()
                self.elapsed = time.monotonic() - start
                self.epoch_loss[0] += values[0]
                self.epoch_loss[1] += 1
                running = values if running is None else [0.98 * r + 0.02 * v for r, v in zip(running, values)]
                bar.total = steps_within_budget(self.step, self.elapsed, budget, self.total_steps,
                                                first_step, first_elapsed)
                bar.update(1)
                if self.step % 20 == 0:
                    shown = {"loss": f"{running[0]:.3g}", "e_mae": f"{running[1]:.3g}", "f_mae": f"{running[2]:.3g}",
                             "epoch": self.step // self.steps_per_epoch}
                    if budget is not None:
                        shown["time"] = f"{self.elapsed:.0f}/{budget:.0f}s"
                    bar.set_postfix(shown, refresh=False)
                if self.step % self.steps_per_epoch == 0:
                    self.end_epoch()
                    if time.monotonic() - last_plot >= tc.plot_every:
                        plot_learning_curve(self.out / "metrics.csv", self.out / "learning_curve.png")
                        last_plot = time.monotonic()
                if self.step % tc.checkpoint_every == 0:
                    self.save("last.ckpt")
        finally:
            bar.close()
        if self.step % self.steps_per_epoch and self.step > first_step:
            self.end_epoch(partial=True)  # stopped by the time budget within an epoch
        self.save("last.ckpt")
        if (self.out / "metrics.csv").exists():
            plot_learning_curve(self.out / "metrics.csv", self.out / "learning_curve.png")
        return {"step": self.step, "elapsed_s": self.elapsed, "stopped_by_time_budget": stopped_early,
                "best_val_loss": self.best_val, "val_metrics": self.val_metrics, "output": str(self.out)}


def train(config: TrainConfig | dict, resume: bool = False) -> dict:
    """Run (or, with resume=True, continue) the training that config describes."""
    return Run(config, resume=resume).run()
