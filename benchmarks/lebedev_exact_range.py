"""How far each Lebedev rule integrates the EFA kernel exactly: the measurement behind
efa_deploy/model/grid.py's EXACT_B_MAX table.

EFA averages exp(i b u.n) over the sphere with a Lebedev rule {u_g, w_g} (b = omega r, n the unit
pair direction); the exact average is sinc(b). The quadrature error

    err(b, n) = sum_g w_g exp(i b u_g.n) - sinc(b) = sum_{l > L, l even} (2l + 1) (-1)^(l/2) j_l(b) e_l(n)

(Rayleigh expansion; e_l(n) = sum_g w_g P_l(u_g.n); a rule of degree L has e_l = 0 for 0 < l <= L,
and odd l vanish as every rule is centrosymmetric) is measured here two ways, for every rule:

- measured: max over directions n of |err(b, n)|: 2000 quasi-uniform directions, the rule's own
  points and the symmetry axes (in the 1/48 of the sphere that the octahedral symmetry leaves), then Nelder-Mead refinement from the 4 worst directions at the
  threshold (the error is largest near the rule's points and axes; refinement changes b_max by
  less than 0.1%);
- bound: sum_{l > L, l even} (2l + 1) |j_l(b)| sum_g |w_g|, which holds for every direction
  (|P_l| <= 1).

For a tolerance tol, b_max(tol) is the largest b with err(b', n) <= tol for every b' <= b (on a
grid of b spaced 2e-4 times the rule's degree). The table in efa_deploy/model/grid.py (EXACT_B_MAX) is the measured b_max at
grid.EXACT_TOLERANCE = 1e-9.

    python benchmarks/lebedev_exact_range.py          (about 3 minutes on one core)

writes benchmarks/results/lebedev_exact_range.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import jv

from efa_deploy.model.lebedev import _ORDER_BY_POINTS, lebedev_grid

RESULTS = Path(__file__).resolve().parent / "results"
TOLERANCES = (1e-5, 1e-7, 1e-9, 1e-11, 1e-12, 1e-13)
DB = 2e-4  # spacing of the b grid, per degree of the rule
EXTRA_DEGREES = 120  # l runs to L + this: j_l(b) < 1e-40 beyond it wherever the error is below 1


def fibonacci_directions(n: int) -> np.ndarray:
    k = np.arange(n) + 0.5
    z = 1.0 - 2.0 * k / n
    phi = math.pi * (1.0 + 5.0**0.5) * k
    s = np.sqrt(1.0 - z * z)
    return np.stack([s * np.cos(phi), s * np.sin(phi), z], axis=1)


def fundamental(d: np.ndarray) -> np.ndarray:
    """Directions in x >= y >= z >= 0: every Lebedev rule has the octahedral symmetry, so e_l(n)
    over this 1/48 of the sphere is e_l over all of it."""
    return d[(d[:, 0] >= d[:, 1] - 1e-12) & (d[:, 1] >= d[:, 2] - 1e-12) & (d[:, 2] >= -1e-12)]


def candidate_directions(points: np.ndarray, count: int) -> np.ndarray:
    """`count` quasi-uniform directions, the rule's points and the symmetry axes, all in the
    fundamental domain."""
    axes = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1], [2, 1, 0], [2, 1, 1], [3, 2, 1]], dtype=float)
    d = np.concatenate([fundamental(fibonacci_directions(48 * count)), fundamental(points), axes])
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def legendre_moments(points: np.ndarray, weights: np.ndarray, directions: np.ndarray, l_max: int) -> np.ndarray:
    """e_l(n) = sum_g w_g P_l(u_g . n) for l = 0 .. l_max: (l_max + 1, directions)."""
    out = np.empty((l_max + 1, len(directions)))
    for start in range(0, len(directions), 256):
        t = directions[start : start + 256] @ points.T
        p_prev, p = np.ones_like(t), t.copy()
        out[0, start : start + 256] = p_prev @ weights
        out[1, start : start + 256] = p @ weights
        for l in range(1, l_max):
            p_prev, p = p, ((2 * l + 1) * t * p - l * p_prev) / (l + 1)
            out[l + 1, start : start + 256] = p @ weights
    return out


def spherical_jn(l: np.ndarray, b: np.ndarray) -> np.ndarray:
    """j_l(b) through J_{l+1/2} (Amos), accurate where j_l is tiny; (len(l), len(b))."""
    b = np.maximum(b, 1e-300)
    return np.sqrt(math.pi / (2 * b))[None] * jv(l[:, None] + 0.5, b[None])


def error_terms(degree: int, l_max: int, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Even l above the degree and the coefficients (2l + 1) (-1)^(l/2) j_l(b): (l, b)."""
    ls = np.arange(degree + 1, l_max + 1)
    ls = ls[ls % 2 == 0]
    coef = (2 * ls + 1)[:, None] * np.where(ls % 4 == 0, 1.0, -1.0)[:, None] * spherical_jn(ls, b)
    return ls, coef


def first_crossing(b: np.ndarray, err: np.ndarray, tol: float) -> float:
    """Largest b such that err <= tol on [0, b] (err sampled on b)."""
    above = np.nonzero(err > tol)[0]
    return float(b[-1]) if len(above) == 0 else float(b[above[0] - 1]) if above[0] > 0 else 0.0


def direct_error(points, weights, b: float, n: np.ndarray) -> float:
    """The quadrature error by direct summation (cross-check of the expansion)."""
    return float(weights @ np.cos(b * (points @ n)) - np.sinc(b / math.pi))


def measure_rule(num_points: int, directions: int) -> dict:
    degree = _ORDER_BY_POINTS[num_points]
    points, weights = lebedev_grid(num_points)
    l_max = degree + EXTRA_DEGREES
    dirs = candidate_directions(points, directions)
    moments = legendre_moments(points, weights, dirs, l_max)
    # the b grid ends where even the smallest error over directions is large
    db = DB * degree
    b = np.arange(0.0, degree + 10.0, db)
    ls, coef = error_terms(degree, l_max, b)
    end = len(b)
    for start in range(0, len(b), 1000):
        if np.abs(coef[:, start : start + 1].T @ moments[ls]).max() > 1e-2:
            end = start + 1
            break
    b, coef = b[:end], coef[:, :end]
    err = np.abs(coef.T @ moments[ls])  # (b, directions)
    envelope = err.max(axis=1)
    bound = np.abs(coef).sum(axis=0) * np.abs(weights).sum()  # |e_l(n)| <= sum_g |w_g|

    # refine: maximise |err(b, n)| over n from the worst directions at the tightest threshold
    b_star = first_crossing(b, envelope, min(TOLERANCES))
    k = int(round(b_star / db)) + 1
    extra = []
    worst = np.argsort(err[k])[-4:]
    for i in worst:
        def negative(v, k=k):
            n = v / np.linalg.norm(v)
            m = legendre_moments(points, weights, n[None], l_max)
            return -abs(float(coef[:, k] @ m[ls, 0]))
        res = minimize(negative, dirs[i], method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-20, "maxiter": 150})
        extra.append(res.x / np.linalg.norm(res.x))
    extra = np.array(extra)
    m_extra = legendre_moments(points, weights, extra, l_max)
    envelope_refined = np.maximum(envelope, np.abs(coef.T @ m_extra[ls]).max(axis=1))

    # cross-check the expansion against direct summation at the worst direction
    i = int(np.argmax(err[k]))
    check = abs(direct_error(points, weights, float(b[k]), dirs[i]) - float(coef[:, k] @ moments[ls, i]))
    return {
        "points": num_points, "degree": degree,
        "b_max": {f"{t:g}": first_crossing(b, envelope_refined, t) for t in TOLERANCES},
        "b_max_unrefined": {f"{t:g}": first_crossing(b, envelope, t) for t in TOLERANCES},
        "b_max_bound": {f"{t:g}": first_crossing(b, bound, t) for t in TOLERANCES},
        "expansion_vs_direct": check,
        "negative_weights": int((weights < 0).sum()),
        "curve": {"b": b[::50].tolist(), "error": envelope_refined[::50].tolist()},
    }


def markdown(rows: list[dict]) -> str:
    tols = [f"{t:g}" for t in TOLERANCES]
    lines = [
        "# Exact range of the Lebedev rules for the EFA kernel",
        "",
        "`python benchmarks/lebedev_exact_range.py`. b_max(tol): the largest b = omega r such that the rule's",
        "average of exp(i b u.n) differs from sinc(b) by at most tol for every b' <= b and every direction n",
        "(measured: 2000 quasi-uniform directions plus the rule's points and symmetry axes, refined by",
        "Nelder-Mead; in brackets, the direction-free bound). b_max / pi in the table.",
        "",
        "| points | degree | " + " | ".join(f"tol {t}" for t in tols) + " |",
        "|---|---|" + "---|" * len(tols),
    ]
    for r in rows:
        cells = [f"{r['b_max'][t] / math.pi:.3f} ({r['b_max_bound'][t] / math.pi:.3f})" for t in tols]
        lines.append(f"| {r['points']} | {r['degree']} | " + " | ".join(cells) + " |")
    worst = max(r["expansion_vs_direct"] for r in rows)
    lines += ["", f"Expansion vs direct summation at the threshold: largest difference {worst:.1e}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, nargs="*", default=sorted(_ORDER_BY_POINTS))
    p.add_argument("--directions", type=int, default=2000, help="quasi-uniform directions in the fundamental domain")
    args = p.parse_args()
    rows = []
    for n in args.points:
        t0 = time.perf_counter()
        row = measure_rule(n, args.directions)
        rows.append(row)
        cells = " ".join(f"{t}:{row['b_max'][t] / math.pi:.3f}" for t in row["b_max"])
        print(f"{n:5d} points ({time.perf_counter() - t0:5.1f} s): b_max/pi {cells}; "
              f"bound at 1e-12 {row['b_max_bound']['1e-12'] / math.pi:.3f}; "
              f"check {row['expansion_vs_direct']:.1e}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lebedev_exact_range.json").write_text(json.dumps(rows, indent=1) + "\n")
    (RESULTS / "lebedev_exact_range.md").write_text(markdown(rows))


if __name__ == "__main__":
    main()
