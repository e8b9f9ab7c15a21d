"""Periodic benchmark: the periodic form of EFA against the local model with the same backbone on
the ionic set (make_ionic.py), an equal wall-time budget per model on one core, two seeds, and the
same models at equal steps from their validation curves. The training, evaluation and reporting
are examples/nonlocal/run.py's (imported, not copied); runs go to examples/periodic/runs/, results
to examples/periodic/results/ and the table between the results markers of README.md.

    taskset -c 1 python examples/periodic/run.py ionic                  # 3 models x 2 seeds x 8 minutes
    taskset -c 1 python examples/periodic/run.py water                  # 2 models x 2 seeds x 4 minutes
    python examples/periodic/run.py ionic --evaluate-only               # re-evaluate finished runs
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _nonlocal_run():
    spec = importlib.util.spec_from_file_location("nonlocal_run", HERE.parent / "nonlocal" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["nonlocal_run"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    module.HERE, module.RESULTS = HERE, HERE / "results"  # runs/, results/ and README.md of this folder
    return module


bench = _nonlocal_run()
BOXES = ("b16", "b24", "b40")


def long_range_missed(p) -> dict:
    """Per box size: the energy MAE, and the slope of the test energy residual (model - reference)
    regressed on coulomb_far_5A, the Coulomb energy that no pair sum within 5 A holds: about -1
    if the model learned none of it, 0 if all of it."""
    box = np.array([a.info["box"] for a in p.structures])
    far = np.array([a.info["coulomb_far_5A"] for a in p.structures])
    error = p.energy - p.reference
    mae, slopes = [], []
    for b in BOXES:
        pick = box == b
        design = np.stack([np.ones(pick.sum()), far[pick]], axis=1)
        slopes.append(np.linalg.lstsq(design, error[pick], rcond=None)[0][1])
        mae.append(np.abs(error[pick]).mean())
    return {"energy MAE b16 / b24 / b40 (eV)": " / ".join(f"{m:.4f}" for m in mae),
            "long-range energy missed b16 / b24 / b40": " / ".join(f"{s:+.2f}" for s in slopes)}


def by_system(p) -> dict:
    """Test energy MAE (eV) of the pure-water boxes and of the boxes with a Na+ Cl- pair."""
    system = np.array([a.info["system"] for a in p.structures])
    error = np.abs(p.energy - p.reference)
    return {"energy MAE water / nacl (eV)": " / ".join(f"{error[system == s].mean():.4f}" for s in ("water", "nacl"))}


bench.BENCHMARKS = {
    "ionic": bench.Benchmark(
        str(HERE / "ionic.yaml"), minutes=8.0, analysis=long_range_missed,
        variants={"local": ["--no-efa", "--set", "model.periodic_efa=false"],
                  "local-6A": ["--no-efa", "--set", "model.periodic_efa=false", "--set", "model.cutoff=6.0"],
                  "efa": ["--efa"],
                  # block sizes (frequency channels x values; benchmarks/periodic_step.py's variants): ionic.yaml's
                  # 4 x 4 since 2026-12-06 (efa-tiny names it too), 4 x 8, and 8 x 16 (ionic.yaml's until then)
                  "efa-tiny": ["--efa", "--set", "model.num_frequencies=4", "--set", "model.value_dim=4"],
                  "efa-small": ["--efa", "--set", "model.num_frequencies=4", "--set", "model.value_dim=8"],
                  "efa-large": ["--efa", "--set", "model.num_frequencies=8", "--set", "model.value_dim=16"],
                  # the periodic form with its k = 0 term (the first form; model.k_zero in docs/design.md)
                  "efa-k0": ["--efa", "--set", "model.k_zero=true"],
                  "efa-k0-k1.0": ["--efa", "--set", "model.k_zero=true", "--set", "model.k_max=1.0"],
                  # single-seed probes: an energy-weighted loss (the far field is mostly energy)
                  "local-ew": ["--no-efa", "--set", "model.periodic_efa=false", "--set", "training.energy_weight=0.5",
                               "--set", "training.forces_weight=0.5"],
                  "efa-k0-ew": ["--efa", "--set", "model.k_zero=true", "--set", "training.energy_weight=0.5",
                                "--set", "training.forces_weight=0.5"]},
        description="Periodic point-charge electrolyte (16, 24, 40 ions; exact Ewald, epsilon_r = 8, + Born-Mayer), "
                    "test split 400 of the 2000 independent draws, cutoff 4.5 A x 2 layers (local-6A: the local "
                    "model with a 6 A cutoff, a control for range), 8 minutes of training per model. Long-range energy missed: the slope of the test energy residual on the Coulomb "
                    "energy beyond a 5 A pair sum (coulomb_far_5A), per box size: about -1 if none of it was "
                    "learned, 0 if all."),
    "water": bench.Benchmark(
        str(HERE / "water_ions.yaml"), minutes=4.0, analysis=by_system,
        variants={"local": ["--no-efa", "--set", "model.periodic_efa=false"], "efa": ["--efa"],
                  "efa-k0": ["--efa", "--set", "model.k_zero=true"]},
        description="Periodic GFN1-xTB water, pure and with one Na+ Cl- pair (278 frames of 37 sampler runs, split "
                    "by run: 70% / 15% / 15% of the runs), cutoff 4.5 A x 2 layers, stress weight 10, 4 minutes of "
                    "training per model."),
}

if __name__ == "__main__":
    bench.__doc__ = __doc__  # main's --help
    bench.main()
