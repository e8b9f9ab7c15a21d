"""Non-local benchmarks: EFA against the local model with the same backbone, an equal wall-time
budget per model, trained one after another on one core, two seeds.

    taskset -c 1 python examples/nonlocal/run.py cumulene     # 4 variants x 2 seeds x 8 minutes
    taskset -c 1 python examples/nonlocal/run.py sn2          # 2 variants x 2 seeds x 5 minutes
    taskset -c 1 python examples/nonlocal/run.py sn2_control  # the same with every pair within the cutoff
    taskset -c 1 python examples/nonlocal/run.py charge_transfer
    python examples/nonlocal/run.py sn2 --evaluate-only       # re-evaluate finished runs
    python examples/nonlocal/run.py cumulene --export         # runs/cumulene_efa_s0 -> export/cumulene_efa.pt

Each run's best checkpoint (EMA weights) is evaluated on the held-out test split of its config
(energy and force MAE, plus what each benchmark measures of its non-local signal); the validation
curves give the equal-steps comparison (each EFA variant at its last step against the local model
at the same step). Writes results/<benchmark>.json, .md, _curves.png and the table in README.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


@dataclass
class Prediction:
    structures: list  # the test structures (ase.Atoms, info holds the data file's per-structure arrays)
    energy: np.ndarray  # model, eV
    reference: np.ndarray
    forces: list  # per structure (n, 3), model
    metrics: dict


@dataclass
class Benchmark:
    config: str
    variants: dict  # name -> efa-train flags on top of the config
    minutes: float
    description: str
    analysis: Callable[[Prediction], dict] | None = None  # extra test columns: name -> value
    overrides: list = field(default_factory=list)  # efa-train flags for every variant


def twist_missed(p: Prediction) -> dict:
    """Slope (eV) of the energy residual on cos^2(twist), per chain length: about minus the twist
    amplitude if the model learned none of the twist energy, 0 if all."""
    twist = np.array([a.info["twist"] for a in p.structures])
    lengths = np.array([a.info["n_carbons"] for a in p.structures])
    slopes = []
    for n in np.unique(lengths):
        pick = lengths == n
        design = np.stack([np.ones(pick.sum()), np.cos(twist[pick]) ** 2], axis=1)
        slopes.append(np.linalg.lstsq(design, (p.energy - p.reference)[pick], rcond=None)[0][1])
    return {"twist energy missed (eV) C9 / C11 / C13": " / ".join(f"{s:+.2f}" for s in slopes)}


def sn2_path(p: Prediction) -> dict:
    """Energy MAE where the free ion is more than 4 A from every other atom (beyond the local
    receptive field's first hop), and the MAE of dE/dx along the reaction coordinate x: the
    model's -F . dR/dx against the slope of the reference energy profile (the data has no forces)."""
    with np.load(HERE / "data" / "sn2_F_I.npz") as npz:
        x, positions, energy = npz["reaction_coordinate"], npz["positions"], npz["energy"]
    d_energy, d_positions = np.gradient(energy, x), np.gradient(positions, x, axis=0)
    far, slope_error = [], []
    for atoms, f in zip(p.structures, p.forces):
        k = int(np.argmin(np.abs(x - atoms.info["reaction_coordinate"])))
        d = atoms.get_all_distances()
        np.fill_diagonal(d, np.inf)
        ions = [i for i, z in enumerate(atoms.numbers) if z in (9, 53)]
        far.append(max(d[i].min() for i in ions) > 4.0)
        slope_error.append(abs(-(f * d_positions[k]).sum() - d_energy[k]))
    far = np.array(far)
    error = np.abs(p.energy - p.reference)
    return {"energy MAE, ion > 4 A away (eV)": f"{error[far].mean():.4f}",
            "energy MAE, ion within 4 A (eV)": f"{error[~far].mean():.4f}",
            "dE/dx MAE along the path (eV/A)": f"{np.mean(slope_error):.4f}"}


def charge_errors(p: Prediction) -> dict:
    """Energy MAE of the neutral pairs and of the cations."""
    charge = np.array([a.info["charge"] for a in p.structures])
    error = np.abs(p.energy - p.reference)
    out = {"energy MAE, neutral (eV)": f"{error[charge == 0].mean():.4f}"} if np.any(charge == 0) else {}
    return {**out, "energy MAE, cations (eV)": f"{error[charge == 1].mean():.4f}"}


LOCAL_AND_EFA = {"local": ["--no-efa"], "efa": ["--efa"]}


def charge_transfer_with_neutrals(minutes: float, how: str = "") -> Benchmark:
    return Benchmark(
        "charge_transfer.yaml", minutes=minutes, analysis=charge_errors, variants=LOCAL_AND_EFA,
        description="Two ethylene molecules 4.5-8 A apart, neutral or radical cation (total charge a model input of "
                    f"both models), GFN2-xTB; test split 560 of the 2863 independent draws, {minutes:g} minutes of "
                    f"training per model{how}.")


BENCHMARKS = {
    "cumulene": Benchmark(
        "cumulene.yaml", minutes=8.0, analysis=twist_missed,
        variants={"local": ["--no-efa"], "efa": ["--efa"],  # tensor values (value_tensors: 4)
                  "efa_scalar_values": ["--efa", "--set", "model.value_tensors=0"],  # values before issue 11
                  "efa_l1_keys_vector_values": ["--efa", "--set", "model.value_tensors=0", "--set",
                                                "model.num_vector_frequencies=2", "--set", "model.value_vectors=4"]},
        description="Test split (700 structures of C9H4, C11H4, C13H4), 8 minutes of training per model. Twist "
                    "energy missed: the slope (eV) of the test energy residual (model - GFN2-xTB) regressed on "
                    "cos^2(twist), per chain length. A model that learned none of the twist energy has about minus "
                    "its amplitude (0.85 / 0.69 / 0.58 eV between 0 and 90 degrees on the rigid scaffold); one that "
                    "learned all of it, 0."),
    "sn2": Benchmark(
        "sn2.yaml", minutes=5.0, analysis=sn2_path, variants=LOCAL_AND_EFA,
        description="F- + CH3I -> CH3F + I- (the EFA paper's scan, 401 frames), test split = 9 of 41 segments of "
                    "0.5 A of reaction coordinate, energies only, cutoff 4 A x 2 layers, 5 minutes of training per "
                    "model."),
    "sn2_control": Benchmark(
        "sn2.yaml", minutes=5.0, analysis=sn2_path, variants=LOCAL_AND_EFA,
        overrides=["--set", "model.cutoff=15.0"],
        description="Control: the SN2 benchmark with cutoff 15 A, so every pair of atoms (at most 14.3 A apart) is "
                    "within the local model's cutoff and EFA has nothing non-local to add."),
    "charge_transfer_cations": Benchmark(
        "charge_transfer_cations.yaml", minutes=8.0, analysis=charge_errors,
        variants=LOCAL_AND_EFA,
        description="Radical cations of two ethylene molecules 4.5-8 A apart, GFN2-xTB; test split 250 of the 1363 "
                    "independent draws, 8 minutes of training per model."),
    "charge_transfer": charge_transfer_with_neutrals(8.0),
    "charge_transfer_long": charge_transfer_with_neutrals(
        15.0, " (the local and the EFA run of a seed at the same time, one on each core)"),
}


def run_dir(benchmark: str, variant: str, seed: int) -> Path:
    return HERE / "runs" / f"{benchmark}_{variant}_s{seed}"


def train(name: str, variant: str, seed: int, minutes: float) -> None:
    bench, out = BENCHMARKS[name], run_dir(name, variant, seed)
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "efa_deploy.cli.train", str(HERE / bench.config), "-o", str(out), "--resume",
           "--seed", str(seed), "--time-budget", str(60 * minutes), "--no-progress", *bench.overrides,
           *bench.variants[variant]]
    print(" ".join(cmd[1:]), flush=True)
    with open(out / "train.log", "a") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_prediction(path: Path) -> Prediction:
    from efa_deploy.checkpoint import load_checkpoint, model_from_checkpoint
    from efa_deploy.training.data import GraphDataset
    from efa_deploy.training.metrics import error_summary, predict
    from efa_deploy.training.splits import load_splits

    best = load_checkpoint(path / "best.ckpt")
    model, config = model_from_checkpoint(best, "ema")
    test = load_splits(best["train_config"]["data"]).test
    p = predict(model, GraphDataset.for_model(test, config, model.energy_shift.dtype, "the test set"))
    forces = np.split(p.forces, np.cumsum(p.n_atoms)[:-1])
    metrics = error_summary(p)
    if not np.any(p.forces_ref):  # an energy-only data set (sn2): no force errors to report
        metrics["forces_mae"] = metrics["forces_rmse"] = None
    return Prediction(test, p.energy, p.energy_ref, forces, metrics)


def curve(path: Path) -> list[dict]:
    with open(path / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def at_step(rows: list[dict], step: float) -> dict:
    """The last validation row at or before `step`."""
    before = [r for r in rows if r["step"] <= step]
    return before[-1] if before else rows[0]


def evaluate_all(name: str, seeds: list[int]) -> dict:
    import torch

    torch.set_num_threads(1)
    bench, results = BENCHMARKS[name], {}
    for variant in bench.variants:
        for seed in seeds:
            path = run_dir(name, variant, seed)
            if not (path / "best.ckpt").exists():
                continue
            p = test_prediction(path)
            rows = curve(path)
            results[f"{variant}_s{seed}"] = {
                "variant": variant, "seed": seed, **{f"test_{k}": v for k, v in p.metrics.items()},
                "steps": int(rows[-1]["step"]), "train_seconds": rows[-1]["elapsed_s"],
                "analysis": bench.analysis(p) if bench.analysis else {},
                "curve": [{k: r[k] for k in ("step", "elapsed_s", "val_energy_mae", "val_forces_mae")} for r in rows],
            }
    return results


def plot_curves(name: str, results: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, r in results.items():
        steps = [c["step"] for c in r["curve"]]
        minutes = [c["elapsed_s"] / 60 for c in r["curve"]]
        energy = [c["val_energy_mae"] for c in r["curve"]]
        style = "--" if r["variant"] == "local" else "-"
        axes[0].plot(minutes, energy, style, label=key)
        axes[1].plot(steps, energy, style, label=key)
    for ax, xlabel in zip(axes, ("training time (min, one core)", "steps")):
        ax.set(xlabel=xlabel, ylabel="validation energy MAE (eV)", yscale="log")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{name}: learning curves")
    fig.tight_layout()
    path = RESULTS / f"{name}_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def write(name: str, results: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    extra = list(next(iter(results.values()))["analysis"]) if results else []
    lines = [f"# {name} benchmark (generated by run.py)", "",
             BENCHMARKS[name].description + " Best checkpoint (EMA weights); the budget includes validation.", "",
             "| model | seed | test energy MAE (eV) | test force MAE (eV/A) | steps | " + " | ".join(extra) + " |",
             "|---" * (5 + len(extra)) + "|"]
    for r in results.values():
        lines.append(f"| {r['variant']} | {r['seed']} | {r['test_energy_mae']:.4f} | {number(r['test_forces_mae'])} | "
                     f"{r['steps']} | " + " | ".join(str(v) for v in r["analysis"].values()) + " |")
    lines += ["", "Equal steps (validation MAE of each EFA model at its last step, and of the local model at the "
              "same step):", "", "| model | seed | steps | EFA energy / forces | local energy / forces at the same step |",
              "|---|---|---|---|---|"]
    for r in results.values():
        local = results.get(f"local_s{r['seed']}")
        if r["variant"] != "local" and local:
            mine, theirs = r["curve"][-1], at_step(local["curve"], r["steps"])
            forces = r["test_forces_mae"] is not None
            lines.append(f"| {r['variant']} | {r['seed']} | {r['steps']} | {mine['val_energy_mae']:.4f} / "
                         f"{number(mine['val_forces_mae'] if forces else None)} | {theirs['val_energy_mae']:.4f} / "
                         f"{number(theirs['val_forces_mae'] if forces else None)} (step {int(theirs['step'])}) |")
    if results:
        lines += ["", f"![learning curves]({plot_curves(name, results).relative_to(HERE)})"]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    readme = HERE / "README.md"
    text, start, end = readme.read_text(), f"<!-- results:{name}:start -->", f"<!-- results:{name}:end -->"
    if start in text and end in text:  # the table (without the title) in README.md too
        head, rest = text.split(start, 1)
        readme.write_text(f"{head}{start}\n" + "\n".join(lines[2:]) + f"\n{end}{rest.split(end, 1)[1]}")
    print("\n".join(lines))


def export_model() -> None:
    """The cumulene EFA run of seed 0 as export/cumulene_efa.pt, with C11H4 (ends turned by 45
    degrees) as the structure its tests run."""
    from ase import Atoms
    from ase.io import write

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parents[1] / "export"))
    from make_cumulenes import cumulene
    from make_default import export_run

    structure = HERE.parents[1] / "export" / "cumulene_c11h4.xyz"
    numbers, positions = cumulene(11, 0.0, np.radians(45.0))
    write(structure, Atoms(numbers=numbers, positions=positions), format="extxyz")
    export_run(run_dir("cumulene", "efa", 0), HERE.parents[1] / "export" / "cumulene_efa.pt", structure,
               "examples/nonlocal/run.py cumulene --export",
               "GFN2-xTB (tblite 0.8.0), cumulenes C9H4, C11H4, C13H4 with independently twisted CH2 ends, "
               "0.03 A noise (examples/nonlocal/make_cumulenes.py)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benchmark", choices=list(BENCHMARKS))
    p.add_argument("--variants", nargs="+", help="default: every variant of the benchmark")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--minutes", type=float, help="training budget per model (default: the benchmark's)")
    p.add_argument("--evaluate-only", action="store_true")
    p.add_argument("--export", action="store_true", help="cumulene only: export the seed-0 EFA model to export/")
    args = p.parse_args()
    bench = BENCHMARKS[args.benchmark]
    if args.export:
        return export_model()
    unknown = set(args.variants or []) - set(bench.variants)
    if unknown:
        p.error(f"{args.benchmark} has no variant {', '.join(sorted(unknown))}; it has {', '.join(bench.variants)}")
    if not args.evaluate_only:
        for seed in args.seeds:
            for variant in args.variants or bench.variants:
                train(args.benchmark, variant, seed, args.minutes or bench.minutes)
    write(args.benchmark, evaluate_all(args.benchmark, args.seeds))


if __name__ == "__main__":
    main()
