"""The training loop behind `efa-train`: weighted energy + force loss, Adam with an
exponentially decaying learning rate, an EMA of the weights, per-epoch validation written to
CSV and a learning-curve plot, atomic checkpoints and exact resumption.

A run is described by a TrainConfig (train_config.py); `train(config, resume=...)` runs it.
The batch order of epoch e is a permutation seeded by (seed, e), so the state after any step
is fixed by the step number and a resumed run repeats the interrupted one exactly.
A NaN or infinite loss, gradient, weight or validation error stops the run (TrainingDiverged)
before anything non-finite reaches a checkpoint.

Device and processes (distributed.py): the run takes training.device (auto: a GPU when torch
sees one); under `torchrun --nproc-per-node N efa-train ...` each rank takes a contiguous shard
of every global batch (training.batch_size structures), the loss terms are normalised by the
global counts and gradients summed over ranks, so N processes take the step one process would.
Rank 0 alone writes checkpoints, metrics.csv, plots and the progress bar; its clock decides the
time budget. A step keeps its values on the device: the loss, errors and finiteness are read on
the host only for the progress bar (every 20 steps), at checkpoints and at the end of an epoch.
"""

from __future__ import annotations

import copy
import csv
import math
import time
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..checkpoint import DTYPES, load_checkpoint, non_finite_tensors, save_atomic
from ..model import ModelConfig, build_model
from ..ops import set_malloc_policy
from ..plots import plot_learning_curve
from .config import RESUMABLE, TrainConfig
from .data import DbRows, GraphDataset, collate_items, elements_of, file_digest, fit_energy_shifts
from .distributed import World, agree, finish, init, injected_failure, resolve_device, world_from_env
from .metrics import evaluate, predict_batch
from .splits import plan_splits

# A training step allocates tensors of the same sizes every step: glibc keeps the freed blocks
# for the next one instead of the page faults of the lean policy (ops/malloc_policy.cpp), which
# cost a third of a step (benchmarks/train_step.py). EFA_DEPLOY_MALLOC still decides when set.
TRAINING_MALLOC_POLICY = "keep"

CSV_FIELDS = ["epoch", "step", "elapsed_s", "lr", "train_loss", "val_loss",
              "val_energy_mae", "val_energy_rmse", "val_energy_per_atom_mae", "val_energy_per_atom_rmse",
              "val_forces_mae", "val_forces_rmse", "val_stress_mae", "val_stress_rmse"]
# what a non-finite step had first: the codes of Run.first_bad
NON_FINITE = {1: "the predicted energies are", 2: "the predicted forces are", 3: "the gradient is",
              4: "the loss is"}


class TrainingDiverged(RuntimeError):
    """A non-finite loss, gradient, weight or validation error: the run stops, checkpoints intact."""


def model_config_from(settings: dict, sets) -> ModelConfig:
    """The model config; atomic_numbers default to the elements of the sets ((structures, indices)
    pairs; a database's elements are those of all its rows, streamed)."""
    settings = dict(settings)
    if "atomic_numbers" not in settings:
        found: set[int] = set()
        for structures, indices in sets:
            chosen = structures if isinstance(structures, DbRows) else [structures[int(i)] for i in indices]
            found.update(elements_of(chosen) if len(indices) else [])
        settings["atomic_numbers"] = sorted(found)
    return ModelConfig.from_dict(settings)


def to_cpu(state):
    """A (nested) state dict with every tensor on the CPU: checkpoints do not depend on the device."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(to_cpu(v) for v in state)
    return state


class StepShards:
    """DataLoader batch_sampler: this rank's shard of the global batch of every step from `start`."""

    def __init__(self, run: "Run", start: int):
        self.run, self.start = run, start

    def __iter__(self):
        for step in range(self.start, self.run.total_steps):
            yield self.run.world.shard(self.run.batch_indices(step)).tolist()

    def __len__(self) -> int:
        return max(self.run.total_steps - self.start, 0)


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
    return (tc.energy_weight * metrics["energy_rmse"] ** 2 + tc.forces_weight * metrics["forces_rmse"] ** 2
            + tc.stress_weight * metrics.get("stress_rmse", 0.0) ** 2)


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
        set_malloc_policy(TRAINING_MALLOC_POLICY)
        self.world = world_from_env()
        self.device = resolve_device(tc.device, self.world)
        init(self.world, self.device)

        plan = plan_splits(config.data)
        self.digest = file_digest(config.data.path)
        if ckpt is not None and ckpt.get("data_digest") != self.digest:
            raise ValueError(f"{config.data.path} is not the file this run was trained on (sha256 differs); "
                             "resume with the original data or start a new run")
        self.model_config = model_config_from(config.model, [plan[k] for k in ("train", "validation", "test")])
        torch.manual_seed(tc.seed)
        self.model = build_model(self.model_config, self.dtype)
        shifts = fit_energy_shifts(plan["train"][0], self.model_config.atomic_numbers, plan["train"][1])
        self.model.energy_shift.copy_(torch.from_numpy(shifts))
        self.model.to(self.device)
        mc = self.model_config
        self.train_set = GraphDataset.for_model(plan["train"][0], mc, self.dtype, "the training set", plan["train"][1])
        self.val_set = GraphDataset.for_model(plan["validation"][0], mc, self.dtype, "the validation set",
                                              plan["validation"][1])
        if self.world.main:
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
        # the first non-finite step and what was not finite (NON_FINITE), kept on the device
        self.first_bad = torch.full((2,), -1, dtype=torch.long, device=self.device)
        self.comm_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.clock_start = time.monotonic()
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
        if self.world.main:
            self._truncate_csv(self.step)

    def checkpoint(self) -> dict:
        return {
            "config": self.model_config.to_dict(),
            "dtype": self.tc.dtype,
            "model": to_cpu(self.model.state_dict()),
            "ema": to_cpu(self.ema.model.state_dict()),
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "elapsed_s": self.elapsed,
            "epoch_loss": [float(self.epoch_loss[0]), self.epoch_loss[1]],
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
            "train_config": self.config.to_dict(),
            "data_digest": self.digest,
            "best_val": self.best_val,
            "val_metrics": self.val_metrics,
            "package_version": __version__,
        }

    def save(self, name: str) -> None:
        """Write a checkpoint (rank 0), unless the run has diverged: a non-finite step since the
        last check, or a NaN or infinite weight."""
        self.check_finite()
        if not self.world.main:
            return
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

    def loader(self, start: int):
        """This rank's batches of the steps from `start` (neighbour lists built in training.workers processes)."""
        return torch.utils.data.DataLoader(self.train_set, batch_sampler=StepShards(self, start),
                                           collate_fn=collate_items, num_workers=self.tc.workers)

    def begin_step(self, batch_or_error) -> tuple[float, float, float] | None:
        """Counts of the global batch (structures, atoms, structures with a stress) summed over
        ranks, with rank 0's clock (self.elapsed); None when the time budget is spent. Raises
        on every rank when loading failed on one."""
        error = batch_or_error if isinstance(batch_or_error, BaseException) else None
        batch = None if error is not None else batch_or_error
        counts = torch.zeros(5, dtype=torch.float64)
        if batch is not None:
            counts[:3] = torch.tensor([len(batch.energy), len(batch.forces), int(batch.has_stress.sum())])
        if self.world.main:
            counts[3] = time.monotonic() - self.clock_start
        counts = agree(counts.to(self.comm_device), self.world, error).cpu()
        self.elapsed = float(counts[3])
        budget = self.tc.time_budget
        if budget is not None and self.elapsed >= budget:
            return None
        return float(counts[0]), float(counts[1]), float(counts[2])

    def train_step(self, batch=None, counts: tuple[float, float, float] | None = None) -> torch.Tensor:
        """One optimiser step on this rank's shard of the global batch (by default, read here
        with its counts); returns (loss, energy MAE, force MAE) of the global batch as a tensor
        on the device."""
        tc = self.tc
        if batch is None:
            batch = collate_items([self.train_set[int(i)] for i in self.world.shard(self.batch_indices(self.step))])
        if counts is None:
            counts = self.begin_step(batch)
        if tc.schedule == "time":
            progress = min(self.elapsed / tc.time_budget, 1.0)
            for group in self.optimizer.param_groups:
                group["lr"] = tc.lr * (tc.lr_final / tc.lr) ** progress
        n_structures, n_atoms, n_stress = counts
        params = list(self.model.parameters())
        self.optimizer.zero_grad(set_to_none=True)
        # loss, sum |dE|, sum |dF|, non-finite energies, non-finite forces, then the failure flag
        stats = torch.zeros(6, dtype=self.dtype, device=self.device)
        error = None
        try:
            injected_failure(self.world, self.step)
            if batch is not None:
                b = batch.to(self.device)
                use_stress = tc.stress_weight > 0 and n_stress > 0
                p = predict_batch(self.model, b, stress=use_stress, create_graph=True)
                de, df = p["energy"] - b.energy, p["forces"] - b.forces
                loss = (tc.energy_weight * de.square().sum() / n_structures
                        + tc.forces_weight * df.square().sum() / (3 * n_atoms))
                if use_stress:
                    ds = (p["stress"] - b.stress) * b.has_stress.to(self.dtype).reshape(-1, 1, 1)
                    loss = loss + tc.stress_weight * ds.square().sum() / (9 * n_stress)
                # parameters only: the positions' second derivatives would be computed and dropped
                loss.backward(inputs=params)
                stats[:5] = torch.stack([loss.detach(), de.detach().abs().sum(), df.detach().abs().sum(),
                                         (~torch.isfinite(p["energy"].detach())).sum().to(self.dtype),
                                         (~torch.isfinite(p["forces"].detach())).sum().to(self.dtype)])
        except Exception as err:  # noqa: BLE001 - every rank must hear of it (distributed.agree)
            error = err
        if self.world.size > 1:
            # gradients, then which parameters have one on any rank (unused ones keep None, as in one
            # process), then the stats and the failure flag: one all_reduce
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            used = torch.tensor([p.grad is not None for p in params], dtype=self.dtype, device=self.device)
            flat = torch.cat([g.reshape(-1) for g in grads] + [used, stats])
            flat = agree(flat.to(self.comm_device), self.world, error).to(self.device)
            offset, used = 0, flat[-6 - len(params):-6].tolist()
            for p, g, u in zip(params, grads, used):
                p.grad = flat[offset: offset + g.numel()].view_as(g) if u > 0 else None
                offset += g.numel()
        elif error is not None:
            raise error
        else:
            flat = stats
        params = [p for p in params if p.grad is not None]
        stats = flat[-6:]
        if tc.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, tc.clip_grad_norm)
        # the first non-finite step is recorded on the device and read at the next check (check_finite);
        # nothing is written before that check
        largest_grad = torch.nn.utils.get_total_norm([p.grad for p in params], float("inf"))
        codes = torch.stack([stats[3] > 0, stats[4] > 0, ~torch.isfinite(largest_grad), ~torch.isfinite(stats[0])])
        code = torch.where(codes.any(), torch.argmax(codes.to(torch.long)) + 1, 0)
        fresh = (self.first_bad[0] < 0) & (code > 0)
        self.first_bad = torch.where(fresh, torch.stack([torch.full_like(code, self.step + 1), code]), self.first_bad)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.ema.update(self.model, self.step)
        return torch.stack([stats[0], stats[1] / n_structures, stats[2] / (3 * n_atoms)])

    def check_finite(self) -> None:
        """TrainingDiverged when a step since the start had a non-finite loss, prediction or gradient."""
        step, code = self.first_bad.tolist()
        if step >= 0:
            self.diverged(f"{NON_FINITE[code]} not finite", step)

    def end_epoch(self, partial: bool = False) -> None:
        self.check_finite()
        self.val_metrics = evaluate(self.ema.model, self.val_set, self.tc.val_batch_size, self.device, self.world)
        bad = [k for k, v in self.val_metrics.items() if not math.isfinite(v)]
        if bad:
            self.diverged(f"the validation {bad[0]} is {self.val_metrics[bad[0]]}")
        val_loss = weighted_loss(self.tc, self.val_metrics)
        row = {
            "epoch": math.ceil(self.step / self.steps_per_epoch), "step": self.step, "elapsed_s": round(self.elapsed, 2),
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": float(self.epoch_loss[0]) / max(self.epoch_loss[1], 1), "val_loss": val_loss,
            **{f"val_{k}": v for k, v in self.val_metrics.items()},
        }
        if not partial:
            self.epoch_loss = [0.0, 0]
        if self.world.main:
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

        tc, world = self.tc, self.world
        budget = tc.time_budget
        self.clock_start, last_plot = time.monotonic() - self.elapsed, time.monotonic()
        first_step, first_elapsed = self.step, self.elapsed
        # with a time budget the bar's total is where the budget will run out (not the epoch bound),
        # re-estimated every step, so its ETA is the budget left
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (tc.progress and world.main), unit="step",
                   dynamic_ncols=True, mininterval=0.5)
        running = None
        stopped_early = False
        batches = iter(self.loader(self.step))
        try:
            while self.step < self.total_steps:
                try:
                    batch = next(batches)
                except Exception as err:  # noqa: BLE001 - a bad row on one rank ends every rank (begin_step)
                    batch = err
                counts = self.begin_step(batch)
                if counts is None:
                    stopped_early = True
                    break
                values = self.train_step(batch, counts)
                self.epoch_loss[0] += values[0]
                self.epoch_loss[1] += 1
                running = values if running is None else 0.98 * running + 0.02 * values
                bar.total = steps_within_budget(self.step, self.elapsed, budget, self.total_steps,
                                                first_step, first_elapsed)
                bar.update(1)
                if self.step % 20 == 0:
                    self.check_finite()
                    shown = dict(zip(("loss", "e_mae", "f_mae"), (f"{v:.3g}" for v in running.tolist())))
                    shown["epoch"] = self.step // self.steps_per_epoch
                    if budget is not None:
                        shown["time"] = f"{self.elapsed:.0f}/{budget:.0f}s"
                    bar.set_postfix(shown, refresh=False)
                if self.step % self.steps_per_epoch == 0:
                    self.end_epoch()
                    if world.main and time.monotonic() - last_plot >= tc.plot_every:
                        plot_learning_curve(self.out / "metrics.csv", self.out / "learning_curve.png")
                        last_plot = time.monotonic()
                if self.step % tc.checkpoint_every == 0:
                    self.save("last.ckpt")
        finally:
            bar.close()
        self.elapsed = (time.monotonic() - self.clock_start) if world.main else self.elapsed
        if self.step % self.steps_per_epoch and self.step > first_step:
            self.end_epoch(partial=True)  # stopped by the time budget within an epoch
        self.save("last.ckpt")
        if world.main and (self.out / "metrics.csv").exists():
            plot_learning_curve(self.out / "metrics.csv", self.out / "learning_curve.png")
        return {"step": self.step, "elapsed_s": self.elapsed, "stopped_by_time_budget": stopped_early,
                "best_val_loss": self.best_val, "val_metrics": self.val_metrics, "output": str(self.out)}


def train(config: TrainConfig | dict, resume: bool = False) -> dict:
    """Run (or, with resume=True, continue) the training that config describes; under torchrun
    every rank calls it (rank 0 writes)."""
    world = world_from_env()
    try:
        return Run(config, resume=resume).run()
    finally:
        finish(world)
