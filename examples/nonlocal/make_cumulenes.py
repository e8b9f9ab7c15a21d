"""GFN2-xTB data for cumulenes H2C=(C=)n-2CH2 whose two CH2 ends are twisted independently.

The energy depends on the relative twist of the two ends, 10-16 A apart, far beyond a local
model's receptive field; the geometry is a rigid scaffold plus independent Gaussian noise
(no relaxation, no MD), so no local bond length gives the twist away and no two frames are
correlated (a random split cannot put near-copies on both sides).

    pip install tblite==0.8.0          # the optional `data` extra
    python examples/nonlocal/make_cumulenes.py      # about 2 minutes on one core
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CC_BOND, CH_BOND, HCC_ANGLE = 1.28, 1.09, np.radians(121.5)


def cumulene(n_carbons: int, twist_a: float, twist_b: float) -> tuple[np.ndarray, np.ndarray]:
    """Atomic numbers and positions: carbons on the z axis, each CH2 plane turned about z."""
    z = CC_BOND * np.arange(n_carbons)
    carbons = np.stack([np.zeros(n_carbons), np.zeros(n_carbons), z], axis=1)
    radial, axial = CH_BOND * np.sin(np.pi - HCC_ANGLE), CH_BOND * np.cos(np.pi - HCC_ANGLE)
    hydrogens = []
    for twist, z_end, outward in ((twist_a, z[0], -1.0), (twist_b, z[-1], 1.0)):
        for sign in (1.0, -1.0):
            hydrogens.append([sign * radial * np.cos(twist), sign * radial * np.sin(twist), z_end + outward * axial])
    numbers = np.array([6] * n_carbons + [1] * 4)
    return numbers, np.concatenate([carbons, np.array(hydrogens)])


def relative_twist(positions: np.ndarray, n_carbons: int) -> float:
    """Angle between the two H-H axes projected on the xy plane, in [0, pi)."""
    h = positions[n_carbons:]
    a, b = h[0, :2] - h[1, :2], h[2, :2] - h[3, :2]
    angle = np.arctan2(a[0] * b[1] - a[1] * b[0], a @ b)
    return float(np.mod(angle, np.pi))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[9, 11, 13], help="numbers of carbon atoms")
    parser.add_argument("--per-length", type=int, default=1000, help="structures per chain length")
    parser.add_argument("--noise", type=float, default=0.03, help="Gaussian noise on every coordinate, A")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=HERE / "data" / "cumulenes_gfn2.npz")
    args = parser.parse_args()

    from ase import Atoms
    from tblite.ase import TBLite

    rng = np.random.default_rng(args.seed)
    rows = []
    start = time.monotonic()
    for n in args.lengths:
        failed = 0
        for _ in range(args.per_length):
            numbers, positions = cumulene(n, *rng.uniform(0.0, np.pi, 2))
            positions = positions + rng.normal(0.0, args.noise, positions.shape)
            atoms = Atoms(numbers=numbers, positions=positions)
            atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
            try:
                energy, forces = atoms.get_potential_energy(), atoms.get_forces()
            except Exception:  # an SCF that does not converge: drop the frame
                failed += 1
                continue
            rows.append((numbers, positions, energy, forces, n, relative_twist(positions, n)))
        print(f"C{n}H4: {args.per_length - failed} structures ({failed} failed), {time.monotonic() - start:.0f} s", flush=True)

    n_max = max(len(r[0]) for r in rows)
    s = len(rows)
    arrays = {"positions": np.zeros((s, n_max, 3)), "forces": np.zeros((s, n_max, 3)),
              "atomic_numbers": np.zeros((s, n_max), dtype=np.int64), "node_mask": np.zeros((s, n_max), dtype=bool)}
    for k, (z, x, _e, f, *_rest) in enumerate(rows):
        m = len(z)
        arrays["atomic_numbers"][k, :m], arrays["positions"][k, :m], arrays["forces"][k, :m] = z, x, f
        arrays["node_mask"][k, :m] = True
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output, energy=np.array([r[2] for r in rows]), n_carbons=np.array([r[4] for r in rows]),
                        twist=np.array([r[5] for r in rows]), **arrays)
    print(f"wrote {args.output}: {s} structures, {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
