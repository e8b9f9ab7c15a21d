"""Periodic liquid-water boxes, pure and with one Na+ Cl- pair, labelled with periodic GFN1-xTB
(tblite): energies, forces and stresses, for the periodic accuracy benchmark (issue 16 (b)).

The point of the set is what a local model cannot see: in the ion boxes the Na+ ... Cl- distance
(minimum image) is drawn across the box, 2.8 A up to about 0.8 x L, so the ion-ion and ion-dipole
interactions reach well beyond a 4-5 A cutoff, and the periodic images of the pair matter too.

Configurations come from a cheap classical sampler, not from xTB: flexible SPC/Fw water with
Joung-Cheatham Na+/Cl- (SPC/E set), damped shifted-force Coulomb (alpha 0.2 1/A, cutoff L/2,
minimum image; O-H r0 0.97 A instead of SPC/Fw's 1.012, nearer GFN1-xTB's), Langevin MD at 300 K
with hydrogen masses of 4 u and a 1.5 fs step (masses do not change the configuration distribution).
In the ion runs a harmonic restraint (1 eV/A^2, sampler only, not in the labels) pulls the Na-Cl
distance to a target redrawn uniformly in [2.8, 0.8 L] before every frame. Each run starts from its
own random box, is minimised and equilibrated for 1 ps, then gives its frames 0.5 ps apart; the run
index is stored per frame (`run`), the group key for splits. Frames with an intermolecular
heavy-atom contact < 1.6 A or H-H contact < 0.8 A would be rejected (the log counts them).

    pip install tblite==0.8.0          # the optional `data` extra
    OMP_NUM_THREADS=1 python examples/periodic/make_water_xtb.py sample   # configurations (minutes)
    OMP_NUM_THREADS=1 python examples/periodic/make_water_xtb.py label    # GFN1-xTB (10 min on an idle core)
    OMP_NUM_THREADS=1 python examples/periodic/make_water_xtb.py time     # time a few single points
    python examples/periodic/make_water_xtb.py summary                    # statistics into the .json file

Output: examples/periodic/data/water_ions_gfn1.extxyz (Lattice, pbc="T T T", energy/forces/stress
as calculator results; info keys run, system, n_waters, ion_distance, scf_seconds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
CONFIGS = DATA / "water_ions_configs.extxyz"  # sampler output (unlabelled), a scratch file
OUTPUT = DATA / "water_ions_gfn1.extxyz"

WATER_DENSITY = 0.03343  # molecules / A^3 (0.997 g/cm^3)
# (waters in the pure box, runs of pure water, runs with Na+ Cl-, frames per run); the ion boxes
# replace two waters by the ions in the same box
PLAN = [(24, 8, 20, 8), (48, 3, 6, 6)]
TEMPERATURE = 300.0
MIN_HEAVY, MIN_HH = 1.6, 0.8  # rejection thresholds, A (intermolecular contacts)
H_MASS, TIMESTEP_FS = 4.0, 1.5  # sampler only: heavy hydrogens (the configurations' distribution is mass-free)
EQUILIBRATION_PS, SPACING_PS = 1.0, 0.5

KCAL = 0.0433641  # eV per kcal/mol
COULOMB = 14.399645  # eV A / e^2
# SPC/Fw (Wu, Tepper, Voth 2006) and Joung-Cheatham 2008 ions for SPC/E; sigma in A, epsilon in eV
CHARGE = {8: -0.82, 1: 0.41, 11: 1.0, 17: -1.0}
SIGMA = {8: 3.165492, 1: 1.0, 11: 2.159538, 17: 4.830453}  # H: a small core, for robust starts only
EPSILON = {8: 0.1554253 * KCAL, 1: 0.01 * KCAL, 11: 0.3526418 * KCAL, 17: 0.0127850 * KCAL}
BOND_K, BOND_R0 = 1059.162 * KCAL, 0.97  # SPC/Fw has 1.012; 0.97 is nearer GFN1-xTB's O-H
ANGLE_K, ANGLE_T0 = 75.90 * KCAL, np.radians(113.24)
DSF_ALPHA = 0.2


def box_length(n_waters: int) -> float:
    return (n_waters / WATER_DENSITY) ** (1.0 / 3.0)


class Sampler:
    """Classical force field with analytic forces (numpy), as an ASE calculator."""

    def __init__(self, numbers: np.ndarray, molecule: np.ndarray, length: float, restraint: list | None = None):
        from math import erfc, exp, pi, sqrt

        self.n, self.length, self.cutoff = len(numbers), length, length / 2
        i, j = np.triu_indices(len(numbers), 1)
        keep = molecule[i] != molecule[j]
        self.i, self.j = i[keep], j[keep]
        charge = np.array([CHARGE[z] for z in numbers])
        sigma = np.array([SIGMA[z] for z in numbers])
        epsilon = np.array([EPSILON[z] for z in numbers])
        self.qq = COULOMB * charge[self.i] * charge[self.j]
        self.sig = (sigma[self.i] + sigma[self.j]) / 2
        self.eps = np.sqrt(epsilon[self.i] * epsilon[self.j])
        self.water = np.array([np.flatnonzero(molecule == m) for m in np.unique(molecule) if (molecule == m).sum() == 3])
        self.restraint = restraint  # [atom a, atom b, target, k] or None
        rc, a = self.cutoff, DSF_ALPHA
        self.dsf_e = erfc(a * rc) / rc
        self.dsf_f = erfc(a * rc) / rc**2 + 2 * a / sqrt(pi) * exp(-a * a * rc * rc) / rc
        s6c = (self.sig / rc) ** 6
        self.lj_c = 4 * self.eps * (s6c * s6c - s6c)

    def minimum_image(self, d: np.ndarray) -> np.ndarray:
        return d - self.length * np.round(d / self.length)

    def energy_forces(self, x: np.ndarray) -> tuple[float, np.ndarray]:
        from scipy.special import erfc

        grad = np.zeros_like(x)
        d = self.minimum_image(x[self.j] - x[self.i])
        r = np.linalg.norm(d, axis=1)
        inside = r < self.cutoff
        d, r, qq, sig, eps = d[inside], r[inside], self.qq[inside], self.sig[inside], self.eps[inside]
        a, rc = DSF_ALPHA, self.cutoff
        e_r = erfc(a * r)
        s6 = (sig / r) ** 6
        energy = np.sum(qq * (e_r / r - self.dsf_e + self.dsf_f * (r - rc)))
        energy += np.sum(4 * eps * (s6 * s6 - s6) - self.lj_c[inside])
        de_dr = qq * (-e_r / r**2 - 2 * a / np.sqrt(np.pi) * np.exp(-a * a * r * r) / r + self.dsf_f)
        de_dr += 4 * eps * (-12 * s6 * s6 + 6 * s6) / r
        g = (de_dr / r)[:, None] * d  # dE/dx_j
        for c in range(3):
            grad[:, c] += np.bincount(self.j[inside], g[:, c], self.n) - np.bincount(self.i[inside], g[:, c], self.n)
        o, h1, h2 = self.water[:, 0], self.water[:, 1], self.water[:, 2]
        b1, b2 = x[h1] - x[o], x[h2] - x[o]
        l1, l2 = np.linalg.norm(b1, axis=1), np.linalg.norm(b2, axis=1)
        energy += 0.5 * BOND_K * np.sum((l1 - BOND_R0) ** 2 + (l2 - BOND_R0) ** 2)
        g1 = (BOND_K * (l1 - BOND_R0) / l1)[:, None] * b1
        g2 = (BOND_K * (l2 - BOND_R0) / l2)[:, None] * b2
        cos = np.clip(np.sum(b1 * b2, axis=1) / (l1 * l2), -0.999999, 0.999999)
        theta = np.arccos(cos)
        energy += 0.5 * ANGLE_K * np.sum((theta - ANGLE_T0) ** 2)
        de_dc = (ANGLE_K * (theta - ANGLE_T0) * -1.0 / np.sqrt(1.0 - cos * cos))[:, None]
        g1 += de_dc * (b2 / (l1 * l2)[:, None] - cos[:, None] * b1 / (l1 * l1)[:, None])
        g2 += de_dc * (b1 / (l1 * l2)[:, None] - cos[:, None] * b2 / (l2 * l2)[:, None])
        grad[h1] += g1
        grad[h2] += g2
        grad[o] -= g1 + g2
        if self.restraint is not None:
            ia, ib, target, k = self.restraint
            dab = self.minimum_image(x[ib] - x[ia])
            rab = np.linalg.norm(dab)
            energy += 0.5 * k * (rab - target) ** 2
            grad[ib] += k * (rab - target) * dab / rab
            grad[ia] -= k * (rab - target) * dab / rab
        return float(energy), -grad

    def calculator(self):
        from ase.calculators.calculator import Calculator, all_changes

        sampler = self

        class _Calc(Calculator):
            implemented_properties = ["energy", "forces"]

            def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
                super().calculate(atoms, properties, system_changes)
                energy, forces = sampler.energy_forces(self.atoms.positions)
                self.results = {"energy": energy, "forces": forces}

        return _Calc()


def random_box(n_waters: int, ions: bool, rng: np.random.Generator):
    """n_waters on a jittered cubic lattice (ions: two of the sites are Na+ and Cl-, so n_waters - 2
    waters), random orientations; returns atoms and a molecule index per atom."""
    from ase import Atoms
    from scipy.spatial.transform import Rotation

    length = box_length(n_waters)
    n_side = int(np.ceil(n_waters ** (1 / 3)))
    sites = np.array([(a, b, c) for a in range(n_side) for b in range(n_side) for c in range(n_side)], dtype=float)
    sites = sites[rng.permutation(len(sites))[:n_waters]] * (length / n_side)
    sites += rng.uniform(-0.2, 0.2, sites.shape)
    water = np.array([[0.0, 0.0, 0.0], [0.8, 0.6, 0.0], [-0.8, 0.6, 0.0]])  # O H H, ~1 A, ~106 deg
    numbers, positions, molecule = [], [], []
    n_water_sites = n_waters - 2 if ions else n_waters
    for m, site in enumerate(sites):
        if m < n_water_sites:
            numbers += [8, 1, 1]
            positions += list(Rotation.random(random_state=rng.integers(2**31)).apply(water) + site)
            molecule += [m] * 3
        else:
            numbers.append(11 if m == n_water_sites else 17)
            positions.append(site)
            molecule.append(m)
    atoms = Atoms(numbers=numbers, positions=positions, cell=[length] * 3, pbc=True)
    return atoms, np.array(molecule)


def contacts(atoms, molecule: np.ndarray) -> tuple[float, float]:
    """Smallest intermolecular heavy-atom and H-H distances (minimum image)."""
    d = atoms.get_all_distances(mic=True)
    other = molecule[:, None] != molecule[None, :]
    heavy = atoms.numbers > 1
    hh = ~heavy[:, None] & ~heavy[None, :] & other
    hv = heavy[:, None] & heavy[None, :] & other
    return float(d[hv].min()), float(d[hh].min())


def sample(args) -> None:
    from ase import units
    from ase.io import write
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.optimize import FIRE

    frames, run, start, rejected = [], 0, time.monotonic(), 0
    for n_waters, pure_runs, ion_runs, per_run in PLAN:
        for ions in [False] * pure_runs + [True] * ion_runs:
            t0 = time.monotonic()
            rng = np.random.default_rng([args.seed, run])  # every run its own stream
            atoms, molecule = random_box(n_waters, ions, rng)
            length = atoms.cell[0, 0]
            na, cl = (len(atoms) - 2, len(atoms) - 1) if ions else (None, None)
            restraint = [na, cl, 5.0, 1.0] if ions else None
            ff = Sampler(atoms.numbers, molecule, length, restraint)
            atoms.calc = ff.calculator()
            masses = atoms.get_masses()
            masses[atoms.numbers == 1] = H_MASS
            atoms.set_masses(masses)
            FIRE(atoms, logfile=None, maxstep=0.1).run(fmax=0.5, steps=500)
            MaxwellBoltzmannDistribution(atoms, temperature_K=TEMPERATURE, rng=rng)
            Stationary(atoms)
            dyn = Langevin(atoms, TIMESTEP_FS * units.fs, temperature_K=TEMPERATURE, friction=0.02 / units.fs, rng=rng)
            dyn.run(round(EQUILIBRATION_PS * 1000 / TIMESTEP_FS))
            for _ in range(per_run):
                target = None
                if ions:  # a new Na-Cl target, then 1 ps to get there and decorrelate
                    target = float(rng.uniform(2.8, 0.8 * length))
                    ff.restraint[2] = target
                dyn.run(round(SPACING_PS * 1000 / TIMESTEP_FS))
                heavy, hh = contacts(atoms, molecule)
                if heavy < MIN_HEAVY or hh < MIN_HH:
                    rejected += 1
                    continue
                frame = atoms.copy()
                frame.calc = None
                frame.set_masses(None)
                frame.info = {"run": run, "system": "nacl" if ions else "water", "n_waters": n_waters - 2 * ions,
                              "sampler_temperature": TEMPERATURE}
                if ions:
                    frame.info["ion_distance"] = float(atoms.get_distance(na, cl, mic=True))
                    frame.info["ion_target"] = target
                frames.append(frame)
            print(f"run {run}: {n_waters - 2 * ions} waters{' + NaCl' if ions else ''}, {len(frames)} frames, "
                  f"T = {atoms.get_temperature():.0f} K, {time.monotonic() - t0:.0f} s", flush=True)
            run += 1
    CONFIGS.parent.mkdir(parents=True, exist_ok=True)
    write(CONFIGS, frames, format="extxyz")
    print(f"wrote {CONFIGS}: {len(frames)} frames from {run} runs, {rejected} rejected, "
          f"{time.monotonic() - start:.0f} s")


def xtb(method: str = "GFN1-xTB"):
    from tblite.ase import TBLite

    return TBLite(method=method, verbosity=0)


def single_point(atoms, method: str = "GFN1-xTB"):
    atoms = atoms.copy()
    atoms.calc = xtb(method)
    t0 = time.monotonic()
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    stress = atoms.get_stress()  # Voigt xx yy zz yz xz xy, eV/A^3, ASE's sign
    return energy, forces, stress, time.monotonic() - t0


def time_points(args) -> None:
    from ase.io import read

    frames = read(CONFIGS, ":")
    seen = {}
    for frame in frames:
        key = (frame.info["n_waters"], frame.info["system"])
        if seen.get(key, 0) >= args.count:
            continue
        seen[key] = seen.get(key, 0) + 1
        e, f, s, dt = single_point(frame, args.method)
        print(f"{key} {args.method}: {len(frame)} atoms, {dt:.1f} s, E = {e:.3f} eV, "
              f"|F|max = {np.abs(f).max():.2f} eV/A, p = {-s[:3].mean() * 160.2177:.2f} GPa", flush=True)


def label(args) -> None:
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import read, write

    frames = read(CONFIGS, ":")
    # a seeded shuffle, so that a --budget or --limit cut leaves every kind of box in proportion
    frames = [frames[k] for k in np.random.default_rng(args.seed).permutation(len(frames))]
    if args.limit:
        frames = frames[: args.limit]
    out, failed, start = [], [], time.monotonic()
    for k, frame in enumerate(frames):
        try:
            energy, forces, stress, dt = single_point(frame, "GFN1-xTB")
        except Exception as err:  # an SCF that does not converge: drop the frame, counted and reported
            failed.append((k, str(err).splitlines()[0] if str(err) else type(err).__name__))
            print(f"frame {k}: failed: {failed[-1][1]}", flush=True)
            continue
        labelled = frame.copy()
        labelled.info = dict(frame.info, scf_seconds=round(dt, 2))
        labelled.calc = SinglePointCalculator(labelled, energy=energy, forces=forces, stress=stress)
        out.append(labelled)
        if (k + 1) % 20 == 0:
            print(f"{k + 1}/{len(frames)} frames, {len(failed)} failed, {time.monotonic() - start:.0f} s", flush=True)
            write(args.output, out, format="extxyz")  # a partial file, rewritten as frames are added
        if args.budget and time.monotonic() - start > args.budget:
            print(f"time budget of {args.budget} s reached after {k + 1} frames", flush=True)
            break
    write(args.output, out, format="extxyz")
    elapsed = time.monotonic() - start
    summary = {"frames": len(out), "attempted": len(out) + len(failed), "failed": failed, "seconds": round(elapsed),
               "seconds_per_frame": {}, "method": "GFN1-xTB", "tblite": _version("tblite")}
    for key in sorted({(a.info["n_waters"], a.info["system"]) for a in out}):
        times = [a.info["scf_seconds"] for a in out if (a.info["n_waters"], a.info["system"]) == key]
        summary["seconds_per_frame"][f"{key[1]}_{key[0]}"] = [len(times), round(float(np.mean(times)), 2)]
    args.output.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.output}: {len(out)} frames, {len(failed)} failed SCF, {elapsed:.0f} s")


def summarise(args) -> None:
    """Per kind of box: energy spread, stress, and how much of the ion boxes' energy variance the
    Na-Cl distance explains among frames with the ions more than 5 A apart (beyond a 4.5 A cutoff):
    R^2 of a fit of E on 1/d, and its slope. Written into the JSON file beside the data."""
    from ase.io import read

    frames = read(args.output, ":")
    summary_path = args.output.with_suffix(".json")
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    kinds = {}
    for key in sorted({(a.info["system"], a.info["n_waters"]) for a in frames}):
        group = [a for a in frames if (a.info["system"], a.info["n_waters"]) == key]
        energy = np.array([a.get_potential_energy() for a in group])
        stress = np.array([a.get_stress() for a in group])
        forces = np.concatenate([a.get_forces().ravel() for a in group])
        row = {"frames": len(group), "runs": len({a.info["run"] for a in group}), "atoms": len(group[0]),
               "energy_std_eV": round(float(energy.std()), 4), "force_rms_eV_A": round(float(np.sqrt(np.mean(forces**2))), 3),
               "pressure_mean_GPa": round(float(-stress[:, :3].mean() * 160.21766), 2),
               "stress_std_eV_A3": round(float(stress.std(axis=0).mean()), 5)}
        if key[0] == "nacl":
            d = np.array([a.info["ion_distance"] for a in group])
            row["ion_distance_range_A"] = [round(float(d.min()), 2), round(float(d.max()), 2)]
            far = d > 5.0
            row["frames_beyond_5A"] = int(far.sum())
            if far.sum() >= 5:
                x, y = 1.0 / d[far], energy[far]
                slope, intercept = np.polyfit(x, y, 1)
                r2 = 1.0 - np.var(y - (slope * x + intercept)) / np.var(y)
                row["beyond_5A_energy_vs_inverse_distance"] = {"slope_eV_A": round(float(slope), 2),
                                                               "r2": round(float(r2), 3),
                                                               "energy_std_eV": round(float(y.std()), 4)}
        kinds[f"{key[0]}_{key[1]}"] = row
        print(key, row)
    summary["kinds"] = kinds
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {summary_path}")


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["sample", "label", "time", "summary"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=1, help="time: single points per kind of box")
    parser.add_argument("--method", default="GFN1-xTB", help="time: GFN1-xTB or GFN2-xTB")
    parser.add_argument("--limit", type=int, default=0, help="label: only the first N frames")
    parser.add_argument("--budget", type=float, default=0.0, help="label: stop after this many seconds")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    {"sample": sample, "label": label, "time": time_points, "summary": summarise}[args.stage](args)


if __name__ == "__main__":
    main()
