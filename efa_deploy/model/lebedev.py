"""Lebedev quadrature on the unit sphere, indexed by number of points."""

import functools
import math

import numpy as np
from scipy.integrate import lebedev_rule

# number of points -> quadrature order (degree) accepted by scipy.integrate.lebedev_rule
_ORDER_BY_POINTS = {
    6: 3, 14: 5, 26: 7, 38: 9, 50: 11, 74: 13, 86: 15, 110: 17, 146: 19, 170: 21, 194: 23,
    230: 25, 266: 27, 302: 29, 350: 31, 434: 35, 590: 41, 770: 47, 974: 53, 1202: 59,
    1454: 65, 1730: 71, 2030: 77, 2354: 83, 2702: 89, 3074: 95, 3470: 101, 3890: 107,
    4334: 113, 4802: 119, 5294: 125, 5810: 131,
}

# Largest omega * r for which the grid integrates the sinc kernel to about 1.5e-5 (DESIGN.md): the
# design value that sets a new model's frequencies (ModelConfig.b_max). At run time the grid is
# chosen from the stricter exact ranges of grid.EXACT_B_MAX (1e-9).
SAFE_B_MAX = {
    50: math.pi, 86: 2 * math.pi, 110: 2.5 * math.pi, 146: 3 * math.pi, 194: 4 * math.pi,
    230: 4.5 * math.pi, 266: 5 * math.pi, 302: 5.5 * math.pi, 350: 6.5 * math.pi,
    434: 7.5 * math.pi, 590: 9 * math.pi, 770: 11 * math.pi, 974: 12.5 * math.pi,
    5810: 35 * math.pi,
}


def lebedev_grid(num_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Points (G, 3) on the unit sphere and weights (G,) that sum to 1."""
    order = _ORDER_BY_POINTS.get(int(num_points))
    if order is None:
        sizes = ", ".join(str(n) for n in sorted(_ORDER_BY_POINTS))
        raise ValueError(f"no Lebedev grid has {num_points} points; choose one of: {sizes}")
    points, weights = _rule(order)
    return points.copy(), weights.copy()


@functools.lru_cache(maxsize=None)
def _rule(order: int) -> tuple[np.ndarray, np.ndarray]:
    points, weights = lebedev_rule(order)
    return np.ascontiguousarray(points.T), weights / weights.sum()


def safe_b_max(num_points: int) -> float:
    """The largest b_max the grid resolves; grids outside the table have no safe value."""
    if num_points not in SAFE_B_MAX:
        sizes = ", ".join(str(n) for n in sorted(SAFE_B_MAX))
        raise ValueError(
            f"no measured safe b_max for a {num_points}-point grid; use one of: {sizes}, "
            "or pass b_max explicitly"
        )
    return SAFE_B_MAX[num_points]
