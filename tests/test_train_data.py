"""Training data at scale and with periodic cells: an ASE database read row by row (peak memory
independent of its size), cells and pbc in every format, stress targets and the model's stress."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.lj import LennardJones
from ase.calculators.singlepoint import SinglePointCalculator

from efa_deploy.model import ModelConfig, build_model
from efa_deploy.training.data import DbRows, GraphDataset, load_structures, open_structures
from efa_deploy.training.metrics import predict_batch
from efa_deploy.training.train import Run

from helpers import lj_structures, randomised_model, tiny_config, write_npz


def periodic_lj(count: int, seed: int = 0) -> list[Atoms]:
    """Small periodic cells (8 atoms, about 6.5 A wide, sheared) with LJ energy, forces and stress."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        cell = np.diag(rng.uniform(6.3, 6.8, 3)) + rng.uniform(-0.3, 0.3, (3, 3)) * (1 - np.eye(3))
        frac = rng.uniform(0, 1, (8, 3))
        atoms = Atoms(numbers=rng.choice([6, 8], 8), scaled_positions=frac, cell=cell, pbc=True)
        if min(atoms.get_all_distances(mic=True)[np.triu_indices(8, 1)]) < 1.3:
            continue
        atoms.calc = LennardJones(sigma=1.1, epsilon=1.0, rc=3.0, smooth=True)
        results = {k: atoms.calc.get_property(k, atoms) for k in ("energy", "forces", "stress")}
        atoms.calc = SinglePointCalculator(atoms, **results)
        out.append(atoms)
    return out


def write_periodic_npz(path, structures, **drop):
    arrays = {"positions": np.stack([a.positions for a in structures]),
              "atomic_numbers": np.stack([a.numbers for a in structures]),
              "energy": np.array([a.get_potential_energy() for a in structures]),
              "forces": np.stack([a.get_forces() for a in structures]),
              "cell": np.stack([a.cell.array for a in structures]), "pbc": np.ones((len(structures), 3), bool),
              "stress": np.stack([a.get_stress() for a in structures])}
    np.savez(path, **{k: v for k, v in arrays.items() if k not in drop})


def test_periodic_data_keeps_its_cells_in_every_format(tmp_path):
    import ase.db
    import ase.io

    structures = periodic_lj(3)
    write_periodic_npz(tmp_path / "p.npz", structures)
    ase.io.write(tmp_path / "p.extxyz", structures)
    ase.io.write(tmp_path / "p.extxyz.gz", structures, format="extxyz")
    with ase.db.connect(tmp_path / "p.db") as db:
        for a in structures:
            db.write(a)
    edges = [len(GraphDataset([a], [6, 8], 3.0)[0].graph.edge_index[0]) for a in structures]
    for name in ("p.npz", "p.extxyz", "p.extxyz.gz", "p.db"):
        for source in (load_structures(tmp_path / name), open_structures(tmp_path / name)):
            for a, ref, n_edges in zip(source, structures, edges):
                assert a.pbc.all() and np.allclose(a.cell.array, ref.cell.array)
                assert np.allclose(a.calc.results["stress"], ref.get_stress())
                item = GraphDataset([a], [6, 8], 3.0)[0]
                assert len(item.graph.edge_index[0]) == n_edges > 0  # periodic images, not vacuum
                assert torch.allclose(item.stress[0], torch.tensor(ref.get_stress(voigt=False)))
    assert isinstance(open_structures(tmp_path / "p.db"), DbRows)


def test_npz_cell_without_pbc_is_refused(tmp_path):
    write_periodic_npz(tmp_path / "nopbc.npz", periodic_lj(2), pbc=True)
    with pytest.raises(ValueError, match="has a 'cell' but no 'pbc'.*add a boolean array pbc of shape \\(S, 3\\)"):
        load_structures(tmp_path / "nopbc.npz")


def test_model_stress_is_the_strain_derivative_of_the_energy():
    config = ModelConfig(atomic_numbers=[6, 8], cutoff=3.0, features=8, num_layers=2, num_radial=4, use_efa=False)
    model = randomised_model(config, seed=1)
    atoms = periodic_lj(1, seed=4)[0]
    batch = GraphDataset([atoms], [6, 8], 3.0)[0]
    stress = predict_batch(model, batch, stress=True)["stress"][0].detach()

    def energy(strain):
        a = atoms.copy()
        a.set_cell(atoms.cell.array @ (np.eye(3) + strain), scale_atoms=True)
        a.calc = atoms.calc
        return float(predict_batch(model, GraphDataset([a], [6, 8], 3.0)[0])["energy"][0].detach())

    h, numeric = 1e-5, np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            e = np.zeros((3, 3))
            e[i, j] = e[j, i] = h / (1 if i == j else 2)
            numeric[i, j] = (energy(e) - energy(-e)) / (2 * h) / atoms.get_volume()
    assert np.abs(stress.numpy()).max() > 1e-4
    np.testing.assert_allclose(stress.numpy(), numeric, atol=1e-8)


def test_stress_loss_trains_and_reports_stress_errors(tmp_path):
    write_periodic_npz(tmp_path / "p.npz", periodic_lj(12, seed=5))
    config = tiny_config(tmp_path / "p.npz", tmp_path / "run", epochs=2, batch_size=4, stress_weight=10.0)
    config["data"].update(n_train=8, n_val=4, n_test=0)
    config["model"]["use_efa"] = False
    run = Run(config)
    summary = run.run()
    assert {"stress_mae", "stress_rmse"} <= set(summary["val_metrics"])
    assert np.isfinite(summary["val_metrics"]["stress_rmse"])
    assert "val_stress_mae" in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]


def molecule_db(path, count: int) -> None:
    """An ASE database of `count` 3-5 atom molecules: 64 written by ASE, then copied by SQL in one
    transaction (new unique ids) until there are `count` rows."""
    import ase.db

    structures = lj_structures(64, seed=7, n_atoms=(3, 5))
    with ase.db.connect(path) as db:
        for a in structures:
            db.write(a)
    with sqlite3.connect(path) as con:
        columns = [r[1] for r in con.execute("PRAGMA table_info(systems)") if r[1] not in ("id", "unique_id")]
        names = ", ".join(columns)
        rows = 64
        while rows < count:
            take = min(rows, count - rows)
            con.execute(f"INSERT INTO systems (unique_id, {names}) SELECT lower(hex(randomblob(16))), {names} "
                        f"FROM systems ORDER BY id LIMIT {take}")
            rows += take


TRAIN_AND_MEASURE = textwrap.dedent("""
    import json, resource, sys
    from efa_deploy.training.train import train
    summary = train(json.loads(sys.argv[1]))
    print(json.dumps({"step": summary["step"], "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def in_memory_bytes(path) -> int:
    """What holding the data set in memory takes, counting only its arrays: positions, forces,
    numbers, energy, cell and pbc per structure, and the graph's species, batch, owned,
    edge_index and edge_shift (every pair within the cutoff, as these molecules have)."""
    total = 0
    with sqlite3.connect(path) as con:
        for (natoms,) in con.execute("SELECT natoms FROM systems"):
            edges = natoms * (natoms - 1)
            total += natoms * (3 * 8 + 3 * 8 + 8) + 8 + 72 + 3 + natoms * 3 * 8 + edges * (2 * 8 + 3 * 8)
    return total


@pytest.mark.slow
def test_training_from_a_database_does_not_hold_it_in_memory(tmp_path):
    peaks = {}
    for count in (1_000, 100_000):
        path = tmp_path / f"m{count}.db"
        molecule_db(path, count)
        config = tiny_config(path, tmp_path / f"run{count}", epochs=1, batch_size=4, time_budget=1.0,
                             checkpoint_every=10**6, threads=1)
        config["data"].update(n_train=None, n_val=8, n_test=0)
        config["model"]["use_efa"] = False
        out = subprocess.run([sys.executable, "-c", TRAIN_AND_MEASURE, json.dumps(config)], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["step"] >= 2
        peaks[count] = result["peak_kib"] * 1024
    size = in_memory_bytes(tmp_path / "m100000.db")
    assert size > 40e6
    # 100x the rows: the peak grows by far less than the data would take in memory
    print(f"peak RSS {peaks} bytes; in-memory arrays of 100,000 rows {size} bytes")
    assert peaks[100_000] - peaks[1_000] < 0.25 * size, (peaks, size)
