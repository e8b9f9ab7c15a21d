"""GFN2-xTB data for charge transfer between two ethylene molecules 4.5-8 A apart: neutral pairs
and radical cations (total charge +1, doublet) in equal numbers. Each molecule has its own C=C
length and twist about the C=C bond (twisting lowers its ionisation energy by up to ~2 eV), so in
the cation the hole goes mostly to the molecule that is easier to ionise, and the energy of a pair
is not the sum of two one-molecule terms. No atom of one molecule is within 4.5 A of the other, so
a local model with a 4 A cutoff has no edge between them, at any number of layers: it sees the
total charge (a global input) but not which molecule holds it.

Every frame is an independent draw (random geometry, orientation and separation, 0.03 A noise),
so a random split puts no correlated frames on both sides.

    pip install tblite==0.8.0          # the optional `data` extra
    OMP_NUM_THREADS=1 python examples/nonlocal/make_charge_transfer.py   # 10-30 minutes on one core
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CH_BOND, HCC_ANGLE = 1.09, np.radians(121.5)
MIN_GAP, MAX_GAP = 4.5, 8.0  # closest approach of the two molecules, A


def ethylene(cc_bond: float, twist: float) -> tuple[np.ndarray, np.ndarray]:
    """Atomic numbers and positions: C=C on the z axis, the second CH2 turned by `twist` about it."""
    carbons = np.array([[0.0, 0.0, -cc_bond / 2], [0.0, 0.0, cc_bond / 2]])
    radial, axial = CH_BOND * np.sin(np.pi - HCC_ANGLE), CH_BOND * np.cos(np.pi - HCC_ANGLE)
    hydrogens = [[sign * radial * np.cos(t), sign * radial * np.sin(t), z + outward * axial]
                 for t, z, outward in ((0.0, -cc_bond / 2, -1.0), (twist, cc_bond / 2, 1.0)) for sign in (1.0, -1.0)]
    return np.array([6, 6, 1, 1, 1, 1]), np.concatenate([carbons, np.array(hydrogens)])


def random_pair(rng: np.random.Generator, noise: float) -> tuple[np.ndarray, np.ndarray, dict]:
    from scipy.spatial.transform import Rotation

    parts, twists = [], rng.uniform(0.0, np.pi / 2, 2)
    for twist in twists:
        numbers, positions = ethylene(rng.uniform(1.30, 1.42), twist)
        parts.append((numbers, Rotation.random(random_state=rng).apply(positions)))
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    target = rng.uniform(MIN_GAP, MAX_GAP)
    a, b = parts[0][1], parts[1][1]
    # slide b along `direction` until its closest approach to a is the target gap
    shift = target + 3.0
    for _ in range(50):
        gap = np.linalg.norm(a[:, None] - (b + shift * direction)[None], axis=-1).min()
        shift += target - gap
    positions = np.concatenate([a, b + shift * direction])
    positions += rng.normal(0.0, noise, positions.shape)
    gap = np.linalg.norm(positions[:6, None] - positions[None, 6:], axis=-1).min()
    return np.concatenate([parts[0][0], parts[1][0]]), positions, {"twist_a": twists[0], "twist_b": twists[1], "gap": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000, help="structures (half neutral, half cations)")
    parser.add_argument("--noise", type=float, default=0.03, help="Gaussian noise on every coordinate, A")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=HERE / "data" / "ethylene_pairs_gfn2.npz")
    args = parser.parse_args()

    from ase import Atoms
    from tblite.ase import TBLite

    rng = np.random.default_rng(args.seed)
    rows, failed, start = [], 0, time.monotonic()
    for k in range(args.count):
        charge = k % 2
        numbers, positions, info = random_pair(rng, args.noise)
        if info["gap"] < MIN_GAP - 0.2:  # the noise must not bring the molecules within the cutoff
            continue
        atoms = Atoms(numbers=numbers, positions=positions)
        atoms.calc = TBLite(method="GFN2-xTB", charge=charge, multiplicity=1 + charge, verbosity=0)
        try:
            energy, forces = atoms.get_potential_energy(), atoms.get_forces()
            charge_a = float(atoms.calc.results["charges"][:6].sum())
        except Exception:  # an SCF that does not converge: drop the frame (counted below)
            failed += 1
            continue
        rows.append((positions, energy, forces, charge, charge_a, info))
        if (k + 1) % 500 == 0:
            print(f"{k + 1} structures, {failed} failed, {time.monotonic() - start:.0f} s", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.output,
        positions=np.array([r[0] for r in rows]), atomic_numbers=np.tile(numbers, (len(rows), 1)),
        energy=np.array([r[1] for r in rows]), forces=np.array([r[2] for r in rows]),
        total_charge=np.array([r[3] for r in rows], dtype=float), spin=np.array([1 + r[3] for r in rows], dtype=float),
        charge_on_first=np.array([r[4] for r in rows]),  # Mulliken charge of the first molecule
        **{key: np.array([r[5][key] for r in rows]) for key in ("twist_a", "twist_b", "gap")},
    )
    print(f"wrote {args.output}: {len(rows)} structures ({failed} failed SCF), {time.monotonic() - start:.0f} s")
    write_cations(args.output, args.output.with_name(args.output.stem + "_cations.npz"))


def write_cations(source: Path, output: Path) -> None:
    """The cations alone: the charge_transfer_cations benchmark, which needs no charge input."""
    with np.load(source) as npz:
        pick = npz["total_charge"] == 1
        np.savez_compressed(output, **{key: npz[key][pick] for key in npz.files})
    print(f"wrote {output}: {int(pick.sum())} cations")


if __name__ == "__main__":
    main()
