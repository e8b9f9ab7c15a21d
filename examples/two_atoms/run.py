"""Reproduce the EFA paper's two-atom experiment (and the 16-atom cluster control).

Trains the local baseline and the EFA model (same backbone; the only difference is
model.use_efa) as two processes in parallel, one torch thread each, then evaluates each run's
best checkpoint (EMA weights) on the held-out test split and writes results.json, results.md
and the table in README.md beside the published numbers.

    python examples/two_atoms/run.py                      # two_atoms, 15 min per model
    python examples/two_atoms/run.py --dataset cluster16  # the control, 10 min per model

A second call resumes unfinished runs and only re-evaluates finished ones; --fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
DATASETS = {
    "two_atoms": {"config": HERE / "two_atoms.yaml", "minutes": 15,
                  "published": {"efa": (0.00055, 0.00051), "local": (0.042, 0.0077)}},
    "cluster16": {"config": HERE / "cluster16.yaml", "minutes": 10, "published": None},
}
MARK_START, MARK_END = "<!-- results:start -->", "<!-- results:end -->"


def train_both(name: str, minutes: float, fresh: bool) -> dict:
    config = DATASETS[name]["config"]
    procs, logs, walls = {}, {}, {}
    for kind in ("local", "efa"):
        out = HERE / "runs" / f"{name}_{kind}"
        if fresh and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "efa_deploy.cli.train", str(config), "-o", str(out), "--resume",
               "--threads", "1", "--time-budget", str(60 * minutes), "--efa" if kind == "efa" else "--no-efa"]
        print(" ".join(cmd[1:]), flush=True)
        logs[kind] = open(out / "train.log", "a")
        walls[kind] = time.monotonic()
        procs[kind] = subprocess.Popen(cmd, stdout=logs[kind], stderr=subprocess.STDOUT,
                                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    for kind, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"training {name} {kind} failed: see {HERE / 'runs' / f'{name}_{kind}' / 'train.log'}")
        walls[kind] = time.monotonic() - walls[kind]
        logs[kind].close()
    return walls


def evaluate_test(name: str, kind: str) -> dict:
    import torch

    from efa_deploy.checkpoint import load_checkpoint, model_from_checkpoint
    from efa_deploy.training.data import GraphDataset
    from efa_deploy.training.metrics import evaluate
    from efa_deploy.training.splits import load_splits

    torch.set_num_threads(1)
    run = HERE / "runs" / f"{name}_{kind}"
    best, last = load_checkpoint(run / "best.ckpt"), load_checkpoint(run / "last.ckpt")
    model, config = model_from_checkpoint(best, "ema")
    data = best["train_config"]["data"]
    test = load_splits(data).test
    test_set = GraphDataset.for_model(test, config, model.energy_shift.dtype, "the test set")
    metrics = evaluate(model, test_set)
    steps_per_epoch = -(-data["n_train"] // best["train_config"]["training"]["batch_size"])
    return {
        "test_structures": len(test), **{f"test_{k}": v for k, v in metrics.items()},
        "train_seconds": round(last["elapsed_s"], 1), "steps": last["step"],
        "epochs": round(last["step"] / steps_per_epoch, 2), "best_epoch": best["epoch"],
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def local_lower_bound(name: str) -> dict:
    """The smallest test errors any model with the 5 A cutoff can reach: a structure with no pair
    inside the cutoff has no edges, so such a model gives it a constant energy (per composition)
    and zero forces. Counted over the whole test split, exact everywhere else."""
    import numpy as np

    from efa_deploy.training.splits import load_splits

    data = yaml.safe_load(DATASETS[name]["config"].read_text())
    cutoff = data["model"]["cutoff"]
    path = (DATASETS[name]["config"].parent / data["data"]["path"]).resolve()
    test = load_splits({**data["data"], "path": str(path)}).test
    energy_err, force_err, components = 0.0, 0.0, 0
    isolated: dict = {}
    for atoms in test:
        components += 3 * len(atoms)
        dist = atoms.get_all_distances() + np.eye(len(atoms)) * 1e9
        if dist.min() >= cutoff:  # no edges at all
            isolated.setdefault(tuple(sorted(atoms.numbers)), []).append(atoms.get_potential_energy())
            force_err += np.abs(atoms.get_forces()).sum()
    for energies in isolated.values():  # the best constant for MAE is the median
        energy_err += np.abs(np.array(energies) - np.median(energies)).sum()
    return {"test_energy_mae": float(energy_err / len(test)), "test_forces_mae": float(force_err / components),
            "structures_without_edges": sum(len(v) for v in isolated.values())}


def write_results(results: dict) -> None:
    (HERE / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        "| data | model | test energy MAE (eV) | test force MAE (eV/A) | published energy / force MAE | training time (1 core) | epochs |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in results.items():
        published = DATASETS[name]["published"]
        for kind in ("local", "efa"):
            r = entry[kind]
            pub = f"{published[kind][0]} / {published[kind][1]}" if published else "n/a"
            lines.append(f"| {name} | {kind} | {r['test_energy_mae']:.5f} | {r['test_forces_mae']:.5f} | {pub} | "
                         f"{r['train_seconds'] / 60:.1f} min | {r['epochs']:g} |")
        bound = entry.get("local_lower_bound")
        if bound and bound["structures_without_edges"]:
            lines.append(f"| {name} | best possible local (5 A cutoff) | {bound['test_energy_mae']:.5f} | "
                         f"{bound['test_forces_mae']:.5f} | | | |")
    ratios = []
    for name, e in results.items():
        line = (f"{name}: local / EFA energy MAE = {e['local']['test_energy_mae'] / e['efa']['test_energy_mae']:.1f}x, "
                f"force MAE = {e['local']['test_forces_mae'] / e['efa']['test_forces_mae']:.1f}x")
        bound = e.get("local_lower_bound")
        if bound and bound["structures_without_edges"]:
            line += (f"; the best possible local model / EFA energy MAE = "
                     f"{bound['test_energy_mae'] / e['efa']['test_energy_mae']:.1f}x "
                     f"({bound['structures_without_edges']} of {e['efa']['test_structures']} test structures "
                     "have no pair inside the cutoff)")
        ratios.append(line)
    table = "\n".join(lines) + "\n\n" + "\n".join(f"- {r}" for r in ratios) + "\n"
    (HERE / "results.md").write_text("# Test errors (generated by run.py)\n\n" + table)
    for readme in (HERE / "README.md", HERE.parents[1] / "README.md"):  # this folder's and the project's
        text = readme.read_text() if readme.exists() else ""
        if MARK_START in text and MARK_END in text:
            head, rest = text.split(MARK_START, 1)
            tail = rest.split(MARK_END, 1)[1]
            readme.write_text(f"{head}{MARK_START}\n{table}{MARK_END}{tail}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=list(DATASETS), default="two_atoms")
    p.add_argument("--minutes", type=float, help="training budget per model (default: 15 two_atoms, 10 cluster16)")
    p.add_argument("--fresh", action="store_true", help="delete earlier runs of this dataset first")
    p.add_argument("--evaluate-only", action="store_true", help="skip training, evaluate the existing runs")
    args = p.parse_args()
    name = args.dataset
    walls = {}
    if not args.evaluate_only:
        walls = train_both(name, args.minutes or DATASETS[name]["minutes"], args.fresh)
    path = HERE / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[name] = {kind: evaluate_test(name, kind) for kind in ("local", "efa")}
    results[name]["local_lower_bound"] = local_lower_bound(name)
    for kind, seconds in walls.items():  # includes start-up, data loading and neighbour lists
        results[name][kind]["wall_seconds"] = round(seconds, 1)
    results = {k: results[k] for k in DATASETS if k in results}
    write_results(results)
    print((HERE / "results.md").read_text())


if __name__ == "__main__":
    main()
