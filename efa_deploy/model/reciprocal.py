"""The periodic (reciprocal-lattice) form of EFA: the kernel, its k-vectors and weights.

Under periodic boundaries a plane wave exp(i k . r) is periodic only for reciprocal-lattice
vectors k = 2 pi n inv(cell)^T (n integer), so the sphere of Lebedev directions x frequencies
is replaced by the lattice points inside |k| < k_max. Channel m has the kernel

    K_m(r) = (1/V) sum_k g_m(|k|) exp(i k . r)      (sum over all lattice k, |k| < k_max)

with a fixed, smooth, band-limited weight

    g_m(k) = A_m exp(-(k l_m)^2 / 2) c(k / k_max),   c(x) = exp(1 - 1 / (1 - x^2)) for x < 1, else 0,

a Gaussian of real-space width l_m times a C-infinity bump that vanishes with all its
derivatives at k_max. By Poisson summation K_m(r) = sum_L h_m(r + L), the periodised
real-space kernel h_m(r) = (2 pi)^-3 int g_m(|k|) exp(i k . r) d^3k, and A_m makes h_m(0) = 1
(as sinc(0) = 1 for the finite form). Because g_m is smooth in k (even, analytic at 0, all
derivatives zero at k_max), h_m decays faster than any power of r and the image sum converges
absolutely. Consequences (docs/design.md, tests/test_periodic.py):
- a supercell gives the same energy per atom to rounding: its extra lattice points carry
  structure factors that vanish;
- as the cell changes, a k-vector crosses |k| = k_max with zero weight and zero derivatives,
  so energy, forces and stress are smooth under NPT;
- the 1/V normalisation makes the sums per atom intensive, the energy extensive.

The attention itself is the ERoPE machinery of erope.py unchanged: the "directions" are the
integer indices n (a set symmetric under n -> -n, so the imaginary cross terms cancel exactly),
the "positions" are phase positions p_i = 2 pi s_i (s_i = r_i inv(cell), fractional
coordinates, not wrapped), every frequency is 1, and the weights depend on the channel:
w_bmg = g_m(|k_bg|) / V_b. Under a strain of cell and positions together p is unchanged, so
the stress of this term comes from g(|k|) / V alone, and forces from p.
"""

import math
from typing import List, Tuple

import numpy as np
import torch
from torch import Tensor


def length_scales(num_channels: int, k_max: float, r_max: float) -> List[float]:
    """Real-space widths l_m of the channels, geometric from 3 / k_max (the shortest the band
    limit carries: its Gaussian has fallen to exp(-4.5) = 1% at k_max, so the cut rings little)
    to r_max / 2 (the longest)."""
    shortest = 3.0 / k_max
    longest = max(r_max / 2.0, shortest)
    if num_channels == 1:
        return [longest]
    return [float(shortest * (longest / shortest) ** (m / (num_channels - 1))) for m in range(num_channels)]


def bump(x2: Tensor) -> Tensor:
    """c(x) = exp(1 - 1 / (1 - x^2)) for x^2 < 1, else 0, of x^2: 1 at 0, zero with every
    derivative at 1 (a function of x^2, so smooth at k = 0 too)."""
    inside = x2 < 1.0
    safe = torch.where(inside, x2, torch.zeros_like(x2))
    return torch.where(inside, torch.exp(1.0 - 1.0 / (1.0 - safe)), torch.zeros_like(x2))


def kernel_weights(k2: Tensor, lengths: Tensor, norms: Tensor, k_max: float) -> Tensor:
    """g_m(|k|) (..., M) of squared wave numbers k2 (...) for widths `lengths` (M,) and
    normalisers (M,)."""
    k2 = k2.unsqueeze(-1)
    return norms * torch.exp(-0.5 * k2 * lengths * lengths) * bump(k2 / (k_max * k_max))


def normalisers(lengths: List[float], k_max: float) -> List[float]:
    """A_m with h_m(0) = (2 pi^2)^-1 int_0^k_max g_m(k) k^2 dk = 1 (composite Simpson rule on
    20001 points: the integrand is smooth, the error is far below float64 rounding of the
    result)."""
    k = np.linspace(0.0, k_max, 20001)
    x = k[:-1] / k_max
    c = np.zeros_like(k)
    c[:-1] = np.exp(1.0 - 1.0 / (1.0 - x * x))
    out = []
    for length in lengths:
        f = np.exp(-0.5 * (k * length) ** 2) * c * k * k
        h = k[1] - k[0]
        integral = h / 3.0 * (f[0] + f[-1] + 4.0 * f[1:-1:2].sum() + 2.0 * f[2:-1:2].sum())
        out.append(float(2.0 * math.pi ** 2 / integral))
    return out


def lattice_indices(cell: Tensor, k_max: float) -> Tensor:
    """Integer indices n (G, 3) of every k = 2 pi n inv(cell_b)^T with |k| < k_max in any of
    the cells (B, 3, 3) (the union; ordered by n, symmetric under n -> -n, n = 0 included).
    |n_a| = |k . a| / 2 pi <= k_max |a| / 2 pi bounds the search for any cell basis."""
    with torch.no_grad():
        c = cell.detach().to(torch.float64)
        bound = torch.floor(k_max * torch.linalg.norm(c, dim=2).max(dim=0).values / (2.0 * math.pi)).to(torch.long)
        axes = [torch.arange(-int(b), int(b) + 1, dtype=torch.float64, device=cell.device) for b in bound]
        grid = torch.stack(torch.meshgrid(axes[0], axes[1], axes[2], indexing="ij"), dim=-1).reshape(-1, 3)
        reciprocal = 2.0 * math.pi * torch.linalg.inv(c).transpose(1, 2)  # (B, 3, 3), rows b_a
        k = torch.linalg.norm(grid.unsqueeze(0) @ reciprocal, dim=2)  # (B, G)
        keep = torch.any(k < k_max, dim=0)
        return grid[keep]


def reciprocal_terms(positions: Tensor, cell: Tensor, batch: Tensor, lengths: Tensor, norms: Tensor,
                     k_max: float, k_zero: bool = True) -> Tuple[Tensor, Tensor, Tensor]:
    """The periodic EFA inputs: phase positions p = 2 pi r inv(cell_b) (N, 3), indices n (G, 3)
    and weights g_m(|k_bg|) / V_b (B, M, G), all differentiable in positions and cell; without
    k_zero the weight of n = 0 is zero (the index stays, so the set remains symmetric)."""
    n = lattice_indices(cell, k_max).to(positions.dtype)
    inverse = torch.linalg.inv(cell)  # (B, 3, 3)
    phase = 2.0 * math.pi * torch.bmm(positions.unsqueeze(1), inverse[batch]).squeeze(1)
    k = 2.0 * math.pi * (n.unsqueeze(0) @ inverse.transpose(1, 2))  # (B, G, 3)
    volume = torch.abs(torch.linalg.det(cell))
    weights = kernel_weights(torch.sum(k * k, dim=2), lengths.to(k.dtype), norms.to(k.dtype), k_max) / volume.reshape(-1, 1, 1)
    if not k_zero:
        weights = weights * (torch.sum(n * n, dim=1) > 0).to(weights.dtype).reshape(1, -1, 1)
    return phase, n, weights.transpose(1, 2)
