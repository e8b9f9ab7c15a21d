"""The Lebedev grid follows the system, so EFA stays exact at any size.

A trained model fixes the kernel sum_m (q_i^m . k_j^m) sinc(omega_m r_ij); the learned weights
do not depend on the grid, which is only a quadrature of that kernel. A Lebedev rule integrates
it to within EXACT_TOLERANCE while omega_max * r stays below the rule's exact b_max
(EXACT_B_MAX). The model carries the rules as buffers (LebedevRules, saved in the model file,
so the LAMMPS plugin needs no scipy) and chooses one from the system's extent at run time
(EnergyModel.select_grid): the same TorchScript code in Python and in LAMMPS.
"""

import math
from typing import List, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .lebedev import lebedev_grid

# Largest b = omega r for which the rule's average of exp(i b u.n) equals sinc(b) to within
# EXACT_TOLERANCE for every direction n and every b' <= b. Measured by
# benchmarks/lebedev_exact_range.py (max over directions, refined; results/lebedev_exact_range.md).
EXACT_TOLERANCE = 1e-9
EXACT_B_MAX = {
    6: 0.0204, 14: 0.1780, 26: 0.5306, 38: 1.0926, 50: 1.8282, 74: 2.6624, 86: 3.7740, 110: 4.8178,
    146: 6.0382, 170: 7.6104, 194: 8.4962, 230: 9.8400, 266: 11.2482, 302: 12.6324, 350: 14.1484,
    434: 17.0380, 590: 21.6562, 770: 26.4234, 974: 31.3018, 1202: 36.2850, 1454: 41.3400,
    1730: 46.4624, 2030: 51.6362, 2354: 56.8550, 2702: 62.1220, 3074: 67.4310, 3470: 72.7604,
    3890: 78.1314, 4334: 83.5296, 4802: 88.9406, 5294: 94.3750, 5810: 99.8220,
}
SMALLEST_CARRIED = 50  # smaller rules are exact only below b ~ 1 (under one radian of phase)
# hysteresis: grow to a rule that covers GROW_MARGIN more than the extent needs; shrink only
# to a rule that covers SHRINK_MARGIN more (so the grid changes rarely)
GROW_MARGIN = 0.05
SHRINK_MARGIN = 0.25


def carried_rules(training_grid: int) -> List[int]:
    """The rules a model file carries: its training grid, and every rule of 50 to 5810 points
    that reaches further than all smaller ones."""
    kept: List[int] = []
    reach = -1.0
    for n in sorted(set(EXACT_B_MAX) | {training_grid}):
        if n == training_grid or (n >= SMALLEST_CARRIED and EXACT_B_MAX[n] > reach):
            kept.append(n)
            reach = max(reach, EXACT_B_MAX[n])
    return kept


class LebedevRules(nn.Module):
    """Lebedev rules (points and weights, concatenated) with their exact ranges, and the
    choice among them. Buffers are not persistent: checkpoints (state_dicts) stay as they
    were, while torch.jit.save stores them in the model file."""

    sizes: List[int]
    b_max: List[float]
    offsets: List[int]

    def __init__(self, sizes: List[int], omega_max: float, size: int):
        super().__init__()
        self.sizes = [int(n) for n in sizes]
        self.b_max = [float(EXACT_B_MAX[n]) for n in self.sizes]
        self.offsets = [int(o) for o in np.cumsum([0] + self.sizes[:-1])]
        self.omega_max = float(omega_max)
        self.size = int(size) if self.sizes else 0  # the rule in use (0: no EFA)
        self.grow_margin = GROW_MARGIN
        self.shrink_margin = SHRINK_MARGIN
        rules = [lebedev_grid(n) for n in self.sizes]
        self.register_buffer("points", torch.from_numpy(np.concatenate([p for p, _ in rules] or [np.zeros((0, 3))])),
                             persistent=False)
        self.register_buffer("weights", torch.from_numpy(np.concatenate([w for _, w in rules] or [np.zeros(0)])),
                             persistent=False)

    def index(self, n: int) -> int:
        for i, m in enumerate(self.sizes):
            if m == n:
                return i
        raise ValueError("no carried Lebedev rule has " + str(n) + " points; the model carries " + str(self.sizes))

    def rule(self, n: int) -> Tuple[Tensor, Tensor]:
        i = self.index(n)
        return (self.points.narrow(0, self.offsets[i], n).clone(),
                self.weights.narrow(0, self.offsets[i], n).clone())

    @torch.jit.unused
    def adopt(self, n: int, points: Tensor, weights: Tensor) -> None:
        """Carry these values as the n-point rule (a model file's training grid, which may be
        rounded to float32 when the model was trained in float32)."""
        i = self.index(n)
        self.points.narrow(0, self.offsets[i], n).copy_(points)
        self.weights.narrow(0, self.offsets[i], n).copy_(weights)

    def exact_extent(self, n: int) -> float:
        """The largest extent (A) the n-point rule integrates exactly."""
        b = self.b_max[self.index(n)]
        return b / self.omega_max if self.omega_max > 0.0 else math.inf

    def choose(self, extent: float) -> int:
        """The rule for this extent: the current one while it is exact there and no smaller
        rule is exact with room to spare, else the smallest rule exact with a margin (the
        largest when none is)."""
        if len(self.sizes) == 0:
            return 0
        b = self.omega_max * extent
        current = self.index(self.size)
        if b > self.b_max[current]:
            for i in range(len(self.sizes)):
                if self.b_max[i] >= b * (1.0 + self.grow_margin):
                    return self.sizes[i]
            for i in range(len(self.sizes)):
                if self.b_max[i] >= b:
                    return self.sizes[i]
            return self.sizes[len(self.sizes) - 1]
        for i in range(current):
            if self.b_max[i] >= b * (1.0 + self.shrink_margin):
                return self.sizes[i]
        return self.size
