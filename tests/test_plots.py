"""Figures (efa_deploy/plots.py): each writes a complete PNG of its size with the Agg backend,
leaves no temporary file, and plots exactly the data it was given."""

from __future__ import annotations

import csv

import matplotlib
import numpy as np
import pytest

from efa_deploy import plots
from efa_deploy.training.metrics import Predictions

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def figures(monkeypatch):
    """Every figure the module saves, kept for inspection (and still written)."""
    saved = []
    save = plots._save

    def keep(fig, path):
        saved.append(fig)
        save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return saved


def image_size(path) -> tuple[int, int]:
    """(width, height) in pixels from the PNG header."""
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")


def written(path, size: tuple[int, int]) -> None:
    assert image_size(path) == size  # figsize x dpi 100: the whole image was written
    assert path.stat().st_size > 5000
    assert [p.name for p in path.parent.iterdir() if ".tmp" in p.name] == []
    assert matplotlib.get_backend().lower() == "agg"


def test_learning_curve_plots_the_validation_errors_per_epoch(tmp_path, figures):
    rows = [{"epoch": e, "val_energy_mae": 1.0 / e, "val_energy_rmse": 2.0 / e, "val_forces_mae": 0.1 * e,
             "val_forces_rmse": 0.3 * e} for e in (1, 2, 5)]
    with open(tmp_path / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plots.plot_learning_curve(tmp_path / "metrics.csv", tmp_path / "curve.png")
    written(tmp_path / "curve.png", (900, 350))
    energy, forces = figures[0].axes
    for ax, key in ((energy, "energy"), (forces, "forces")):
        mae, rmse = ax.get_lines()
        np.testing.assert_array_equal(mae.get_xdata(), [1, 2, 5])
        np.testing.assert_allclose(mae.get_ydata(), [r[f"val_{key}_mae"] for r in rows], rtol=1e-15)
        np.testing.assert_allclose(rmse.get_ydata(), [r[f"val_{key}_rmse"] for r in rows], rtol=1e-15)
        assert ax.get_yscale() == "log"


def test_learning_curve_of_an_empty_run_writes_nothing(tmp_path, figures):
    (tmp_path / "metrics.csv").write_text("epoch,val_energy_mae,val_energy_rmse,val_forces_mae,val_forces_rmse\n")
    plots.plot_learning_curve(tmp_path / "metrics.csv", tmp_path / "curve.png")
    assert not (tmp_path / "curve.png").exists() and figures == []


def test_parity_points_are_the_predictions_and_references(tmp_path, figures):
    rng = np.random.default_rng(0)
    p = Predictions(energy=rng.normal(size=4), energy_ref=rng.normal(size=4), n_atoms=np.array([2, 3, 1, 4]),
                    forces=rng.normal(size=(10, 3)), forces_ref=rng.normal(size=(10, 3)),
                    numbers=np.array([1, 8, 1, 1, 8, 8, 1, 6, 6, 1]))
    report = {"energy_per_atom_mae": 0.01234, "forces_mae": 0.5678}
    plots.plot_parity(p, tmp_path / "parity.png", title="test set", report=report)
    written(tmp_path / "parity.png", (1000, 450))
    energy_ax, force_ax = figures[0].axes
    np.testing.assert_array_equal(energy_ax.collections[0].get_offsets(),
                                  np.stack([p.energy_ref / p.n_atoms, p.energy / p.n_atoms], axis=1))
    by_label = {c.get_label(): c.get_offsets() for c in force_ax.collections}
    assert sorted(by_label) == ["C", "H", "O"]
    for symbol, z in (("H", 1), ("C", 6), ("O", 8)):
        sel = p.numbers == z
        np.testing.assert_array_equal(by_label[symbol], np.stack([p.forces_ref[sel].ravel(), p.forces[sel].ravel()], 1))
    assert energy_ax.get_title() == "MAE 0.01234 eV/atom" and force_ax.get_title() == "MAE 0.5678 eV/A"
    # the diagonal spans both axes alike, so that points off it are errors
    for ax in (energy_ax, force_ax):
        assert ax.get_xlim() == ax.get_ylim()
        (diagonal,) = ax.get_lines()
        np.testing.assert_array_equal(diagonal.get_xdata(), diagonal.get_ydata())


def test_thermo_plots_energies_per_atom_from_the_first_conserved_energy(tmp_path, figures):
    thermo = {"time": np.array([0.0, 0.5, 1.0]), "pe": np.array([-10.0, -10.5, -10.2]),
              "etotal": np.array([-9.0, -9.1, -9.05]), "econserve": np.array([-8.0, -8.01, -8.02]),
              "temp": np.array([300.0, 310.0, 290.0])}
    plots.plot_thermo(thermo, 4, tmp_path / "md.png", "NVT")
    written(tmp_path / "md.png", (700, 550))
    energies, temperature = figures[0].axes
    potential, total, conserved = energies.get_lines()
    np.testing.assert_allclose(potential.get_ydata(), [-0.5, -0.625, -0.55], rtol=1e-14)
    np.testing.assert_allclose(total.get_ydata(), [-0.25, -0.275, -0.2625], rtol=1e-14)
    np.testing.assert_allclose(conserved.get_ydata(), [0.0, -0.0025, -0.005], atol=1e-15)
    np.testing.assert_array_equal(temperature.get_lines()[0].get_ydata(), thermo["temp"])
    np.testing.assert_array_equal(potential.get_xdata(), thermo["time"])
