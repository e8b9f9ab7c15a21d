"""Figures written as PNG files (matplotlib, Agg): learning curves, parity plots, MD thermo."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Write to a temporary file, then rename: a reader never sees a half-written image."""
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    _pyplot().close(fig)
    os.replace(tmp, path)


def plot_learning_curve(csv_path: Path, png_path: Path) -> None:
    """Validation energy and force MAE/RMSE per epoch from a training run's metrics.csv."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    epoch = [int(r["epoch"]) for r in rows]
    fig, axes = _pyplot().subplots(1, 2, figsize=(9, 3.5))
    for ax, key, unit in ((axes[0], "energy", "eV"), (axes[1], "forces", "eV/A")):
        ax.semilogy(epoch, [float(r[f"val_{key}_mae"]) for r in rows], label="MAE")
        ax.semilogy(epoch, [float(r[f"val_{key}_rmse"]) for r in rows], label="RMSE")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {key} error ({unit})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, png_path)


def plot_parity(predictions, png_path: Path, title: str = "", report: dict | None = None) -> None:
    """Model against reference: energy per atom, and force components coloured by element
    (with the MAEs of an error report in the panel titles when one is given)."""
    from ase.data import chemical_symbols
    from matplotlib.ticker import MaxNLocator

    p = predictions
    fig, (ax1, ax2) = _pyplot().subplots(1, 2, figsize=(10, 4.5))
    ax1.scatter(p.energy_ref / p.n_atoms, p.energy / p.n_atoms, s=6, alpha=0.6)
    ax1.set_xlabel("reference energy (eV/atom)")
    ax1.set_ylabel("model energy (eV/atom)")
    for z in np.unique(p.numbers):
        sel = p.numbers == z
        ax2.scatter(p.forces_ref[sel].ravel(), p.forces[sel].ravel(), s=3, alpha=0.5, label=chemical_symbols[z])
    ax2.set_xlabel("reference force component (eV/A)")
    ax2.set_ylabel("model force component (eV/A)")
    ax2.legend(markerscale=3, fontsize=8)
    if report:
        ax1.set_title(f"MAE {report['energy_per_atom_mae']:.4g} eV/atom", fontsize=9)
        ax2.set_title(f"MAE {report['forces_mae']:.4g} eV/A", fontsize=9)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_locator(MaxNLocator(5))
        lo, hi = min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, png_path)


def plot_thermo(thermo: dict, n_atoms: int, path: Path, title: str) -> None:
    """Energies per atom and temperature along an MD run (efa-md)."""
    t = thermo["time"]
    fig, (ax1, ax2) = _pyplot().subplots(2, 1, figsize=(7, 5.5), sharex=True)
    e0 = thermo["econserve"][0]
    ax1.plot(t, (thermo["pe"] - e0) / n_atoms, label="potential")
    ax1.plot(t, (thermo["etotal"] - e0) / n_atoms, label="total")
    ax1.plot(t, (thermo["econserve"] - e0) / n_atoms, label="conserved", ls="--")
    ax1.set_ylabel(f"energy - {e0:.3f} eV (eV/atom)")
    ax1.legend(loc="best", fontsize=8)
    ax1.grid(alpha=0.3)
    ax1.set_title(title, fontsize=9)
    ax2.plot(t, thermo["temp"], color="C3")
    ax2.set_xlabel("time (ps)")
    ax2.set_ylabel("temperature (K)")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
