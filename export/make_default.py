"""Make the shipped default model, export/water_efa.pt, from nothing (GFN2-xTB reference data).

    python export/make_default.py data     # water clusters + GFN2-xTB MD -> export/data/water_clusters_gfn2.npz
    python export/make_default.py train    # efa-train export/water_efa.yaml -> runs/water_efa/
    python export/make_default.py export   # best checkpoint -> export/water_efa.pt (+ test errors)
    python export/make_default.py check    # 3 ps of MD with the model, 15 frames of it against GFN2-xTB
    python export/make_default.py all      # the four in turn
    python export/make_default.py float32  # every export/*.pt in float32, with the cost measured (below)

Shipped files are float32 (the weights were trained in float32: nothing is rounded); the same
weights in float64, where energies must be exact to round-off (rotation tests, 1e-12
comparisons), are one command away and exact:
    efa-export --from-model export/water_efa.pt --dtype float64 -o water_efa_f64.pt

Stages `data` and `check` need tblite (pip install tblite==0.8.0); `train` and `export` need
only this package.
Everything is seeded: the same versions give the same data and, on the same CPU, the same model.
Run with OMP_NUM_THREADS=1 (the timings in export/README.md are for one core).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = HERE / "data" / "water_clusters_gfn2.npz"
CONFIG = HERE / "water_efa.yaml"
MODEL = HERE / "water_efa.pt"
STRUCTURE = HERE / "water16.xyz"
RUN = REPO / "runs" / "water_efa"

# (waters per cluster, starting seeds, temperatures in K, frames kept per MD run)
PLAN = [
    (16, (0, 1, 2), (300.0, 450.0, 600.0), 100),
    (12, (0, 1), (300.0, 600.0), 50),
    (8, (0, 1), (300.0, 600.0), 50),
]
MD_TIMESTEP_FS = 1.0
MD_STRIDE = 10  # steps between kept frames (10 fs)
MD_EQUILIBRATION = 100  # steps discarded at the start of each run
MAX_EXTENT = 19.0  # A: frames whose bounding-box diagonal is larger (evaporating molecules) are dropped; r_max is 20 A


# ---- stage 1: reference data ------------------------------------------------------------------


def xtb_calculator():
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0)


def random_water_cluster(n_waters: int, seed: int):
    """n water molecules at liquid density (0.033 / A^3) in a sphere, random orientations,
    centres at least 2.7 A apart."""
    from ase import Atoms
    from ase.build import molecule
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    radius = (3 * n_waters / (4 * np.pi * 0.033)) ** (1 / 3)
    centres: list[np.ndarray] = []
    while len(centres) < n_waters:
        c = rng.uniform(-radius, radius, 3)
        if np.linalg.norm(c) <= radius and all(np.linalg.norm(c - d) > 2.7 for d in centres):
            centres.append(c)
    water = molecule("H2O")
    water.positions -= water.get_center_of_mass()
    cluster = Atoms()
    for c in centres:
        m = water.copy()
        m.positions = Rotation.random(random_state=int(rng.integers(2**31))).apply(m.positions) + c
        cluster += m
    return cluster


def relaxed_cluster(n_waters: int, seed: int):
    from ase.optimize import BFGS

    atoms = random_water_cluster(n_waters, seed)
    atoms.calc = xtb_calculator()
    BFGS(atoms, logfile=None).run(fmax=0.02, steps=1000)
    atoms.positions -= atoms.get_center_of_mass()
    return atoms


def sample_md(atoms, temperature: float, frames: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    """Langevin MD with GFN2-xTB; (numbers, positions, energy, forces) every MD_STRIDE steps."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

    atoms = atoms.copy()
    atoms.calc = xtb_calculator()
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    dyn = Langevin(atoms, MD_TIMESTEP_FS * units.fs, temperature_K=temperature, friction=0.01 / units.fs, rng=rng)
    dyn.run(MD_EQUILIBRATION)
    out = []
    for _ in range(frames):
        dyn.run(MD_STRIDE)
        out.append((atoms.positions.copy(), atoms.get_potential_energy(), atoms.get_forces().copy()))
    return out


def make_data() -> None:
    from ase.io import write

    start = time.monotonic()
    DATA.parent.mkdir(parents=True, exist_ok=True)
    rows = []  # (numbers, positions, energy, forces, n_waters, temperature, seed)
    for n_waters, seeds, temperatures, frames in PLAN:
        for seed in seeds:
            t0 = time.monotonic()
            minimum = relaxed_cluster(n_waters, seed)
            if n_waters == 16 and seed == 0:
                shipped = minimum.copy()
                shipped.calc = None
                shipped.info = {"comment": "16 water molecules, GFN2-xTB (tblite 0.8.0) local minimum; export/make_default.py"}
                write(STRUCTURE, shipped, format="extxyz")
            # the minimum itself, with its (near-zero) forces
            rows.append((minimum.numbers, minimum.positions.copy(), minimum.get_potential_energy(),
                         minimum.get_forces().copy(), n_waters, 0.0, seed))
            for temperature in temperatures:
                for positions, energy, forces in sample_md(minimum, temperature, frames, 1000 * seed + int(temperature)):
                    rows.append((minimum.numbers, positions, energy, forces, n_waters, temperature, seed))
            print(f"  {n_waters} waters, seed {seed}: {len(rows)} structures so far "
                  f"({time.monotonic() - t0:.0f} s)", flush=True)
    extents = np.array([np.linalg.norm(np.ptp(r[1], axis=0)) for r in rows])  # bounding-box diagonals
    keep = extents <= MAX_EXTENT
    print(f"dropping {int((~keep).sum())} structures with an extent above {MAX_EXTENT} A "
          f"(largest {extents.max():.2f} A)")
    rows = [r for r, k in zip(rows, keep) if k]
    n_max = max(len(r[0]) for r in rows)
    s = len(rows)
    positions = np.zeros((s, n_max, 3))
    forces = np.zeros((s, n_max, 3))
    numbers = np.zeros((s, n_max), dtype=np.int64)
    mask = np.zeros((s, n_max), dtype=bool)
    for k, (z, x, e, f, *_rest) in enumerate(rows):
        n = len(z)
        numbers[k, :n], positions[k, :n], forces[k, :n], mask[k, :n] = z, x, f, True
    np.savez_compressed(
        DATA, positions=positions, atomic_numbers=numbers, energy=np.array([r[2] for r in rows]), forces=forces,
        node_mask=mask, n_waters=np.array([r[4] for r in rows]), temperature=np.array([r[5] for r in rows]),
        seed=np.array([r[6] for r in rows]),
    )
    print(f"wrote {DATA.relative_to(REPO)}: {s} structures, largest extent {extents[keep].max():.2f} A, "
          f"{os.path.getsize(DATA) / 1e6:.1f} MB, {time.monotonic() - start:.0f} s")


# ---- stage 2: training ------------------------------------------------------------------------


def train() -> None:
    """efa-train on the YAML file beside this script (relative paths in it are relative to it)."""
    from efa_deploy.cli.train import main

    start = time.monotonic()
    code = main([str(CONFIG), "-o", str(RUN), "--no-progress"])
    if code:
        sys.exit(code)
    print(f"training took {time.monotonic() - start:.0f} s")


# ---- stage 3: export with the test errors ----------------------------------------------------


def test_split(config: dict):
    from efa_deploy.training.splits import load_splits

    splits = load_splits(config["data"])
    return splits.test, splits.indices["test"]


def model_errors(module, metadata: dict, structures) -> dict:
    """Energy (per structure and per atom, eV) and force (per component, eV/A) MAE and RMSE."""
    import torch

    from efa_deploy.training.data import GraphDataset
    from efa_deploy.training.metrics import evaluate

    dtype = getattr(torch, metadata["dtype"])
    return evaluate(module, GraphDataset(structures, metadata["atomic_numbers"], metadata["cutoff"], dtype), 32)


def export() -> None:
    export_run(RUN, MODEL, STRUCTURE, "export/make_default.py",
               "GFN2-xTB (tblite 0.8.0), water clusters of 8, 12 and 16 molecules, Langevin MD at 300-600 K")


def export_run(run: Path, model_path: Path, structure: Path, made_by: str, reference: str) -> None:
    """The best checkpoint (EMA weights) of `run` as a float64 model file with its test errors,
    then in float32 with the cost of float32 measured (ship_float32); `structure` is the one the
    shipped-model tests run in LAMMPS and Python."""
    import torch

    from efa_deploy.checkpoint import load_checkpoint, model_from_checkpoint
    from efa_deploy.training.data import file_digest
    from efa_deploy.model import build_model
    from efa_deploy.modelfile import load_model_file, save_model_file

    ckpt = load_checkpoint(run / "best.ckpt")
    trained, config = model_from_checkpoint(ckpt, "ema")
    # trained in float32 for speed; shipped in float64: LAMMPS then conserves energy to
    # round-off and 1 and N ranks agree to 1e-15 (the weights are the float32 ones, cast)
    model = build_model(config, torch.float64)
    model.load_state_dict(trained.state_dict())
    model.eval()
    train_config = ckpt["train_config"]
    structures, test_idx = test_split(train_config)
    test = model_errors(model, {"dtype": "float64", "atomic_numbers": config.atomic_numbers, "cutoff": config.cutoff},
                        structures)
    data = train_config["data"]
    provenance = {
        "data_digest": file_digest(data["path"]),
        "data_file": str(Path(data["path"]).resolve().relative_to(REPO)),
        "reference": reference,
        "structure": str(structure.resolve().relative_to(REPO)),
        "split": {k: data.get(k) for k in ("n_train", "n_val", "n_test", "split_seed")},
        "validation": ckpt.get("val_metrics", {}),
        "test": {"structures": len(test_idx), "indices": [int(i) for i in test_idx], **test},
        "step": ckpt["step"],
        "epoch": ckpt.get("epoch"),
        "training_seconds": round(float(ckpt["elapsed_s"]), 1),
        "weights": "ema, trained in float32, shipped in float64",
        "training": train_config["training"],
        "made_by": made_by,
    }
    save_model_file(model, config, model_path, provenance=provenance, overwrite=True)
    module, metadata = load_model_file(model_path)
    again = model_errors(module, metadata, structures)
    for key, value in test.items():
        assert abs(again[key] - value) <= 1e-9 * max(1.0, abs(value)), (key, again[key], value)
    print(f"wrote {model_path.relative_to(REPO)} ({os.path.getsize(model_path) / 1e3:.0f} kB)")
    shown = {k: v for k, v in provenance["test"].items() if k != "indices"}
    print(json.dumps({"test": shown, "validation": provenance["validation"],
                      "r_max": metadata["efa"]["r_max"], "elements": metadata["elements"]}, indent=1))
    ship_float32(model_path)


# ---- float32: the shipped dtype, and what it costs ------------------------------------------


def nve_drift(model_path: Path, structure: Path, steps: int = 2000) -> dict:
    """LAMMPS NVE as tests/test_driver.py runs it: 600 K velocities from `structure` (about 300 K
    after equipartition from a minimum), 0.5 fs steps; total-energy drift (eV/atom/ps, a linear
    fit) and fluctuation (eV/atom)."""
    from efa_deploy.lammps import EFASimulation

    with EFASimulation(structure, model_path) as sim:
        sim.set_velocities(600.0, seed=12345)
        thermo = sim.run(steps, ensemble="nve", timestep_fs=0.5, thermo_every=20)
        n = sim.n_atoms
    t = thermo["time"] - thermo["time"][0]
    return {"drift": float(np.polyfit(t, thermo["etotal"], 1)[0] / n), "fluctuation": float(np.std(thermo["etotal"]) / n),
            "temperature": float(thermo["temp"].mean())}


def ship_float32(model_path: Path) -> dict:
    """Rewrite a model file in float32, its test errors those of float32, with the cost of float32
    in its provenance (`float32_cost`): the float64 test errors, the largest float32 - float64
    differences of energies (per atom) and forces on the test set, and LAMMPS NVE drift in both."""
    import tempfile

    from efa_deploy.modelfile import load_model_file, rebuild_model, save_model_file
    from efa_deploy.training.data import GraphDataset, load_structures
    from efa_deploy.training.metrics import error_summary, predict

    models = {dtype: rebuild_model(model_path, dtype) for dtype in ("float64", "float32")}
    _, config, metadata = models["float64"]
    provenance = {k: v for k, v in metadata["provenance"].items() if k not in ("package_version", "float32_cost")}
    structures = load_structures(REPO / provenance["data_file"])
    test = [structures[i] for i in provenance["test"]["indices"]]
    structure = REPO / provenance.get("structure", "export/water16.xyz")
    cost: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        files, predictions = {}, {}
        for dtype, (model, _, _) in models.items():
            files[dtype] = Path(tmp) / f"{dtype}.pt"
            save_model_file(model, config, files[dtype], provenance)
            module, meta = load_model_file(files[dtype])
            dataset = GraphDataset.for_model(test, meta)
            predictions[dtype] = predict(module, dataset, 32)
            cost[f"{dtype}_test"] = error_summary(predictions[dtype])
            cost[f"{dtype}_nve"] = nve_drift(files[dtype], structure)
    p32, p64 = predictions["float32"], predictions["float64"]
    cost["max_energy_difference_per_atom"] = float(np.abs((p32.energy - p64.energy) / p32.n_atoms).max())
    cost["max_force_difference"] = float(np.abs(p32.forces - p64.forces).max())
    provenance["test"] = {**provenance["test"], **cost["float32_test"]}
    provenance["weights"] = "ema, trained in float32, shipped in float32 (efa-export --from-model --dtype float64: exact)"
    provenance["float32_cost"] = {k: v for k, v in cost.items() if k != "float32_test"}
    save_model_file(models["float32"][0], config, model_path, provenance, overwrite=True)
    print(f"wrote {model_path.relative_to(REPO)} in float32 ({os.path.getsize(model_path) / 1e3:.0f} kB)")
    print(json.dumps(cost, indent=1))
    return cost


# ---- stage 4 (optional): the model along its own MD trajectory --------------------------------


def check() -> None:
    """3 ps of NVT at 300 K from export/water16.xyz with the shipped model (LAMMPS, this
    package's driver), then GFN2-xTB on 15 frames of it: the errors where the model goes by itself."""
    from ase.io import read

    from efa_deploy.calculator import EFACalculator
    from efa_deploy.lammps import EFASimulation

    trajectory = RUN / "check_nvt.extxyz"
    RUN.mkdir(parents=True, exist_ok=True)
    with EFASimulation(STRUCTURE, MODEL) as sim:
        thermo = sim.run(6000, ensemble="nvt", temperature=300.0, timestep_fs=0.5, thermo_every=20,
                         trajectory=trajectory, trajectory_every=200, seed=1)
    frames = read(trajectory, ":")[1::2]
    calc = EFACalculator(MODEL)
    de, df, oh = [], [], []
    for atoms in frames:
        reference = atoms.copy()
        reference.calc = xtb_calculator()
        model = atoms.copy()
        model.calc = calc
        de.append(model.get_potential_energy() - reference.get_potential_energy())
        df.append(model.get_forces() - reference.get_forces())
        d = atoms.get_all_distances()
        oh.append(d[np.ix_(atoms.numbers == 1, atoms.numbers == 8)].min(axis=1).max())
    de, df = np.array(de), np.array(df)
    n = len(frames[0])
    print(f"NVT 300 K, 3 ps: mean temperature {thermo['temp'][len(thermo['temp']) // 2:].mean():.0f} K; "
          f"{len(frames)} frames against GFN2-xTB: force MAE {np.abs(df).mean():.3f} eV/A, energy error "
          f"{de.mean() / n * 1000:+.2f} +- {de.std() / n * 1000:.2f} meV/atom, longest O-H bond {max(oh):.2f} A")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["data", "train", "export", "check", "all", "float32"])
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    stages = ["data", "train", "export", "check"] if args.stage == "all" else [args.stage]
    for stage in stages:
        t0 = time.monotonic()
        print(f"== {stage}", flush=True)
        {"data": make_data, "train": train, "export": export, "check": check,
         "float32": lambda: [ship_float32(path) for path in sorted(HERE.glob("*.pt"))]}[stage]()
        print(f"== {stage} done in {time.monotonic() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
