"""Periodic ionic data with an exact reference: a 1:1 point-charge electrolyte ("Na" +1 e, "Cl"
-1 e, charge neutral) in periodic boxes of 16, 24 and 40 ions (sides about 9.2, 10.5 and 12.5 A),
with Ewald electrostatics screened by EPSILON_R = 8 and a Born-Mayer repulsion within 4 A
(ionic_reference.py). Energy, forces and stress (eV/A^3, ASE's sign) are exact: torch-pme's Ewald
sum converged to ~1e-13 and autograd derivatives, checked against an independent Ewald sum
(tests/test_ionic_reference.py).

Every frame is an independent draw: a box (cubic, or triclinic for 20% of the frames: a random
volume-preserving shear), its volume scaled by 0.9-1.1, ions placed at random at least 2.2 A
apart, then 25 sweeps of Metropolis Monte Carlo of the reference potential at a temperature
drawn from 600-1500 K, so that the configurations are liquid-like (ion pairs, a first coordination
shell) rather than random. A random split therefore puts no correlated frames on both sides;
info['box'] (b16, b24, b40) groups the frames by box size, for a split by size (`split_by: box`).

Each frame's info also has the split of the Coulomb energy that a local model cannot see:
coulomb_far_5A / coulomb_far_9A, the Ewald energy minus the bare Coulomb energy of the pairs
within a smooth cutoff of 5 A / 9 A (switched off over the last 1 A); --report prints how much of
the energy and force variance that is.

    pip install torch-pme==0.5.0          # the optional `periodic-data` extra
    OMP_NUM_THREADS=1 python examples/periodic/make_ionic.py           # 16 minutes on a loaded core
    python examples/periodic/make_ionic.py --report                    # the long-range fractions
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy.special import erfc

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ionic_reference as ref  # noqa: E402

BOXES = {"b16": (16, 9.2, 800), "b24": (24, 10.5, 800), "b40": (40, 12.5, 400)}  # ions, side (A), frames
TRICLINIC_FRACTION, MAX_SHEAR = 0.2, 0.2
VOLUME_SCALE = (0.9, 1.1)
MIN_DISTANCE = 2.2  # A, of the random start
TEMPERATURE = (600.0, 1500.0)  # K
MC_SWEEPS, MC_STEP, MC_HARD_CORE = 25, 0.4, 1.6  # sweeps of N single-ion moves; max step (A); rejected below (A)
K_B = 8.617333262e-5  # eV/K
NEAR_CUTOFFS = (5.0, 9.0)
OUTPUT = HERE / "data" / "ionic.extxyz.gz"


def random_cell(rng: np.random.Generator, side: float, triclinic: bool) -> np.ndarray:
    """A cubic or sheared cell, at least 2 MonteCarlo.R_CUT wide in every direction."""
    while True:
        cell = np.eye(3) * side * rng.uniform(*VOLUME_SCALE) ** (1.0 / 3.0)
        if triclinic:  # lower-triangular shear, unit diagonal: the volume stays side^3
            cell[[1, 2, 2], [0, 0, 1]] = cell[0, 0] * rng.uniform(-MAX_SHEAR, MAX_SHEAR, 3)
        volume = abs(np.linalg.det(cell))
        if (volume / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)).min() > 2 * MonteCarlo.R_CUT:
            return cell


def random_start(rng: np.random.Generator, n: int, cell: np.ndarray) -> np.ndarray:
    """n positions at least MIN_DISTANCE apart (minimum image), by random sequential addition."""
    inverse = np.linalg.inv(cell)
    positions = []
    while len(positions) < n:
        trial = rng.uniform(0.0, 1.0, 3) @ cell
        if positions:
            d = (np.array(positions) - trial) @ inverse
            d = (d - np.round(d)) @ cell
            if np.linalg.norm(d, axis=1).min() < MIN_DISTANCE:
                continue
        positions.append(trial)
    return np.array(positions)


class MonteCarlo:
    """Metropolis single-ion moves under the reference potential, with an incremental Ewald sum
    of modest accuracy (~1e-6 relative: alpha r_c = 3.2 within 4 A by the minimum image,
    k^2 / 4 alpha^2 < 10): it only decides which configurations are drawn; their energies come
    from ionic_reference."""

    R_CUT = 4.0  # = the repulsion's cutoff; at most half of every cell's width

    def __init__(self, numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray, temperature: float):
        import torch

        self.q = np.array([ref.CHARGES[int(z)] for z in numbers])
        self.positions, self.cell, self.beta = positions.copy(), cell, 1.0 / (K_B * temperature)
        self.inverse = np.linalg.inv(cell)
        self.ke = ref.COULOMB_EV_A / ref.EPSILON_R
        self.alpha = 3.2 / self.R_CUT
        k = ref.kvectors(torch.tensor(cell), 2.0 * self.alpha * math.sqrt(10.0)).numpy()
        m = np.round(k @ cell.T / (2.0 * math.pi)).astype(int)  # keep one of each pair k, -k (weight 2)
        first = m[np.arange(len(m)), np.argmax(m != 0, axis=1)]
        self.k = k[first > 0]
        k2 = (self.k * self.k).sum(axis=1)
        self.weight = 4.0 * math.pi / abs(np.linalg.det(cell)) * np.exp(-k2 / (4 * self.alpha ** 2)) / k2
        self.structure = (self.q[:, None] * np.exp(1j * positions @ self.k.T)).sum(axis=0)
        self.a, self.rho, self.rc = ref.BORN_MAYER_A, ref.BORN_MAYER_RHO, ref.REPULSION_CUTOFF
        self.g_c = self.a * math.exp(-self.rc / self.rho)

    def pair_energies(self, i: int, old: np.ndarray, new: np.ndarray) -> tuple[float, float] | None:
        """Real-space Ewald and repulsion energy of ion i with every other ion, at its old and its
        new position (None: the new one is within the hard core)."""
        others = np.arange(len(self.q)) != i
        d = self.positions[others][None] - np.stack([old, new])[:, None]  # (2, others, 3)
        d = d - np.floor(d @ self.inverse + 0.5) @ self.cell  # minimum image
        r = np.linalg.norm(d, axis=-1)
        if r[1].min() < MC_HARD_CORE:
            return None
        x = np.minimum(r, self.rc) - self.rc
        repulsion = self.a * np.exp(-np.minimum(r, self.rc) / self.rho) - self.g_c * (
            1 - x / self.rho + 0.5 * (x / self.rho) ** 2)
        coulomb = self.ke * self.q[i] * self.q[others] * erfc(self.alpha * r) / r * (r < self.R_CUT)
        e = (repulsion + coulomb).sum(axis=1)
        return e[0], e[1]

    def sweep(self, rng: np.random.Generator) -> float:
        accepted = 0
        for i in rng.permutation(len(self.q)):
            old, new = self.positions[i], self.positions[i] + rng.uniform(-MC_STEP, MC_STEP, 3)
            energies = self.pair_energies(i, old, new)
            if energies is None:
                continue
            delta_s = self.q[i] * (np.exp(1j * (self.k @ new)) - np.exp(1j * (self.k @ old)))
            d_recip = self.ke * (self.weight * (np.abs(self.structure + delta_s) ** 2
                                                - np.abs(self.structure) ** 2)).sum()
            delta = energies[1] - energies[0] + d_recip
            if delta < 0 or rng.uniform() < math.exp(-self.beta * delta):
                self.positions[i] = new
                self.structure = self.structure + delta_s
                accepted += 1
        return accepted / len(self.q)


def draw(rng: np.random.Generator, box: str):
    """One independent frame of a box size: (ase.Atoms with the reference as calculator results)."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    n, side, _ = BOXES[box]
    triclinic = rng.uniform() < TRICLINIC_FRACTION
    cell = random_cell(rng, side, triclinic)
    numbers = np.array([11, 17] * (n // 2))
    temperature = rng.uniform(*TEMPERATURE)
    mc = MonteCarlo(numbers, random_start(rng, n, cell), cell, temperature)
    acceptance = np.mean([mc.sweep(rng) for _ in range(MC_SWEEPS)])
    atoms = Atoms(numbers=numbers, positions=mc.positions, cell=cell, pbc=True)
    atoms.wrap()
    atoms.positions = np.round(atoms.positions, 8)  # as extxyz writes them (%16.8f): the labels are theirs
    r = ref.reference(numbers, atoms.get_positions(), cell, near_cutoffs=NEAR_CUTOFFS)
    atoms.info.update(box=box, triclinic=bool(triclinic), temperature=round(temperature, 1),
                      mc_acceptance=round(float(acceptance), 3), coulomb_energy=r.coulomb,
                      repulsion_energy=r.repulsion,
                      **{f"coulomb_far_{r_off:g}A": r.far[r_off][0] for r_off in NEAR_CUTOFFS})
    atoms.arrays["coulomb_far_forces_5A"] = r.far[5.0][1]
    atoms.calc = SinglePointCalculator(atoms, energy=r.energy, forces=r.forces,
                                       stress=r.stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]])
    return atoms


def generate(output: Path, seed: int, scale: float) -> None:
    import torch
    from ase.io import write

    torch.set_num_threads(1)
    print(f"Ewald by torch-pme {__import__('torchpme').__version__}, EPSILON_R = {ref.EPSILON_R}", flush=True)
    rng = np.random.default_rng(seed)
    start, frames = time.monotonic(), []
    for box, (_, _, count) in BOXES.items():
        for k in range(max(1, round(count * scale))):
            atoms = draw(rng, box)
            atoms.info["draw"] = len(frames)
            frames.append(atoms)
            if (k + 1) % 200 == 0:
                print(f"{box}: {k + 1} frames, {time.monotonic() - start:.0f} s", flush=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    write(output, frames, format="extxyz")
    print(f"wrote {output}: {len(frames)} frames, {output.stat().st_size / 1e6:.1f} MB, "
          f"{time.monotonic() - start:.0f} s")


def local_descriptors(atoms, r_max: float = 5.0) -> np.ndarray:
    """Smooth radial histograms (Gaussians every 0.25 A, 1.5-5 A, times the cutoff switch) of the
    ++, --, and +- pairs within r_max: the features of the best linear pair model of that range."""
    import torch

    index, shifts = ref.pairs(atoms.get_positions(), atoms.cell.array, r_max)
    r = ref.pair_distances(torch.tensor(atoms.get_positions()), torch.tensor(atoms.cell.array), index, shifts).numpy()
    q = np.array([ref.CHARGES[int(z)] for z in atoms.numbers])
    kind = (q[index[:, 0]] + q[index[:, 1]]).astype(int)  # +2, -2, 0
    centres = np.arange(1.5, r_max + 1e-9, 0.25)
    s = ref.smooth_switch(torch.tensor(r), r_max - 1.0, r_max).numpy()
    g = np.exp(-((r[:, None] - centres[None]) / 0.25) ** 2) * s[:, None]
    return np.concatenate([g[kind == k].sum(axis=0) for k in (2, -2, 0)])


def report(path: Path) -> None:
    """How much of the energy and force variance, within each box size, comes from the Coulomb
    energy of the pairs beyond 5 A (and 9 A), and how much of that a linear pair model within
    5 A could still absorb."""
    from ase.io import read

    frames = read(path, ":")
    print("| box | frames | std E (eV) | var E_far(5 A) / var E | after the best 5 A pair fit | "
          "var E_far(9 A) / var E | <F_far(5 A)^2> / <F^2> |")
    print("|---|---|---|---|---|---|---|")
    for box in BOXES:
        pick = [a for a in frames if a.info["box"] == box]
        e = np.array([a.get_potential_energy() for a in pick])
        far = {r: np.array([a.info[f"coulomb_far_{r:g}A"] for a in pick]) for r in NEAR_CUTOFFS}
        f2 = np.mean(np.concatenate([a.get_forces() for a in pick]) ** 2)
        ff = np.mean(np.concatenate([a.arrays["coulomb_far_forces_5A"] for a in pick]) ** 2)
        x = np.array([local_descriptors(a) for a in pick])
        x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
        half = len(pick) // 2  # fit on one half, score on the other
        beta = np.linalg.lstsq(x[:half], far[5.0][:half], rcond=1e-10)[0]
        residual = far[5.0][half:] - x[half:] @ beta
        fitted = f"{residual.var() / e[half:].var():.3f}" if half >= 5 * x.shape[1] else "- (too few frames)"
        print(f"| {box} | {len(pick)} | {e.std():.3f} | {far[5.0].var() / e.var():.3f} | {fitted} | "
              f"{far[9.0].var() / e.var():.3f} | "
              f"{ff / f2:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the frames of each box to make")
    parser.add_argument("--report", action="store_true", help="only print the long-range fractions of --output")
    args = parser.parse_args()
    if not args.report:
        generate(args.output, args.seed, args.scale)
    report(args.output)


if __name__ == "__main__":
    main()
