"""The exact reference of the periodic ionic benchmark: point charges +1 e ("Na") and -1 e ("Cl")
in a periodic box, Ewald electrostatics screened by a dielectric constant, plus a short-range
Born-Mayer repulsion between every pair of ions:

    E = (k_e / EPSILON_R) * Ewald(q_i, r_i, cell) + sum_{i<j, images} u(r_ij)
    u(r) = A exp(-r/rho) - (its value, slope and curvature at r_c, a quadratic in r - r_c),  r < r_c

so u and its first two derivatives vanish at r_c = 4 A (below the model's local cutoff). The Ewald
part comes from torch-pme (`torchpme.EwaldCalculator`, converged to ~1e-13 relative); forces and the
stress (eV/A^3, ASE's sign: (1/V) dE/d(strain)) are autograd derivatives with respect to the
positions and a homogeneous strain of positions and cell. `ewald_plain` is an independent
Ewald sum in plain torch (another splitting parameter, its own image and k-vector enumeration),
against which tests/test_ionic_reference.py checks torch-pme. `coulomb_near` is the best local
(damped shifted force) form of the Coulomb energy within a cutoff: the rest is what a local model
of that range cannot see.

    pip install torch-pme==0.5.0      # the optional `periodic-data` extra
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

COULOMB_EV_A = 14.399645478425667  # e^2 / (4 pi eps0) in eV A (torchpme.prefactors.eV_A)
EPSILON_R = 8.0  # relative permittivity: scales the Coulomb energy down to a molten-salt-in-solvent size
CHARGES = {11: 1.0, 17: -1.0}  # "Na" +1 e, "Cl" -1 e
BORN_MAYER_A, BORN_MAYER_RHO = 600.0, 0.30  # eV, A: Na-Cl contact (pair minimum) at about 2.5 A
REPULSION_CUTOFF = 4.0  # A
# torch-pme's parameters: real-space cutoff 10 A, Gaussian smearing sigma with erfc(10 / (sqrt(2) sigma))
# ~ 1e-13, and the reciprocal vectors with |k| < EWALD_K_MAX, where exp(-sigma^2 k^2 / 2) ~ 1e-14
EWALD_CUTOFF = 10.0
EWALD_SMEARING = EWALD_CUTOFF / (math.sqrt(2.0) * 5.3)
EWALD_K_MAX = math.sqrt(2.0 * 32.2) / EWALD_SMEARING  # 6.0 1/A
# Given to torch-pme explicitly (the sphere |k| < EWALD_K_MAX, half the vectors of its default box).
# Its own choice from lr_wavelength keeps m_i = -n_i/2 .. n_i/2 with n_i = ceil(|a_i| / lr_wavelength),
# so |k| up to pi / lr_wavelength, half of what its docstring suggests: lr_wavelength = 2 pi / k_max
# left the energy 1e-5 relative off.
EWALD_LR_WAVELENGTH = math.pi / EWALD_K_MAX
NEAR_ALPHA = 0.2  # 1/A, the damping of coulomb_near


@dataclass
class Reference:
    energy: float  # eV
    forces: np.ndarray  # (N, 3) eV/A
    stress: np.ndarray  # (3, 3) eV/A^3, ASE's sign (negative under positive pressure)
    coulomb: float  # the Ewald part of the energy, eV
    repulsion: float
    far: dict = field(default_factory=dict)  # r_off -> (energy, forces) of the Coulomb part beyond r_off


def charges_of(numbers) -> torch.Tensor:
    return torch.tensor([CHARGES[int(z)] for z in numbers], dtype=torch.float64)


def pairs(positions: np.ndarray, cell: np.ndarray, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Half neighbour list (each pair once, periodic images included): (P, 2) indices i, j and
    (P, 3) integer cell shifts S, so that r_ij = r_j - r_i + S @ cell."""
    from vesin import NeighborList

    i, j, shifts = NeighborList(cutoff=cutoff, full_list=False).compute(
        points=positions, box=cell, periodic=True, quantities="ijS")
    return torch.tensor(np.stack([i, j], axis=1), dtype=torch.long), torch.tensor(shifts, dtype=torch.float64)


def pair_distances(positions: torch.Tensor, cell: torch.Tensor, index: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    return torch.linalg.norm(positions[index[:, 1]] - positions[index[:, 0]] + shifts @ cell, dim=1)


def repulsion(positions: torch.Tensor, cell: torch.Tensor, index: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """The Born-Mayer repulsion of every pair within REPULSION_CUTOFF (index/shifts may reach further)."""
    r = pair_distances(positions, cell, index, shifts)
    a, rho, rc = BORN_MAYER_A, BORN_MAYER_RHO, REPULSION_CUTOFF
    x = r - rc
    g_c = a * math.exp(-rc / rho)  # value at r_c; slope -g_c/rho, curvature g_c/rho^2
    u = a * torch.exp(-r / rho) - g_c * (1.0 - x / rho + 0.5 * (x / rho) ** 2)
    return torch.where(r < rc, u, torch.zeros_like(u)).sum()


def ewald_torchpme(positions: torch.Tensor, cell: torch.Tensor, charges: torch.Tensor, index: torch.Tensor,
                   shifts: torch.Tensor) -> torch.Tensor:
    """The screened Coulomb energy (eV) by torch-pme's Ewald sum; index/shifts: pairs within EWALD_CUTOFF."""
    import torchpme

    calculator = torchpme.EwaldCalculator(
        torchpme.CoulombPotential(smearing=EWALD_SMEARING, prefactor=COULOMB_EV_A / EPSILON_R),
        lr_wavelength=EWALD_LR_WAVELENGTH, full_neighbor_list=False).to(torch.float64)
    q = charges.reshape(-1, 1)
    potentials = calculator(q, cell, positions, index, pair_distances(positions, cell, index, shifts),
                            kvectors=kvectors(cell, EWALD_K_MAX))
    return (q * potentials).sum()


def kvectors(cell: torch.Tensor, k_max: float) -> torch.Tensor:
    """The reciprocal-lattice vectors 2 pi m @ inverse(cell).T with 0 < |k| < k_max, differentiable
    in the cell (k = 0 is in the list, as in torch-pme's own: its potential gives it weight 0)."""
    c = cell.detach().numpy()
    reciprocal = 2.0 * np.pi * np.linalg.inv(c).T
    m_max = [int(math.ceil(k_max * np.linalg.norm(c[i]) / (2.0 * math.pi))) + 1 for i in range(3)]
    m = np.stack(np.meshgrid(*[np.arange(-x, x + 1) for x in m_max], indexing="ij"), axis=-1).reshape(-1, 3)
    m = m[np.linalg.norm(m @ reciprocal, axis=1) < k_max]
    return 2.0 * math.pi * torch.tensor(m, dtype=torch.float64) @ torch.linalg.inv(cell).T


def ewald_plain(positions: torch.Tensor, cell: torch.Tensor, charges: torch.Tensor, alpha: float = 0.6,
                accuracy: float = 36.0) -> torch.Tensor:
    """An independent Ewald sum (eV) of a neutral periodic system in plain torch:

        E = 1/2 sum_{i,j,n}' q_i q_j erfc(alpha r)/r + (2 pi / V) sum_{k != 0} exp(-k^2/4alpha^2)/k^2 |S(k)|^2
            - alpha/sqrt(pi) sum_i q_i^2,

    times k_e / EPSILON_R; real space to alpha r = sqrt(accuracy), reciprocal space to
    k^2 / (4 alpha^2) = accuracy (both terms below exp(-accuracy) ~ 2e-16 relative)."""
    r_cut = math.sqrt(accuracy) / alpha
    k_cut = 2.0 * alpha * math.sqrt(accuracy)
    c = cell.detach().numpy()
    volume = abs(float(np.linalg.det(c)))
    widths = volume / np.linalg.norm(np.cross(c[[1, 2, 0]], c[[2, 0, 1]]), axis=1)
    # real space: every image within r_cut of the home cell
    n = [int(math.ceil(r_cut / w)) + 1 for w in widths]
    grid = torch.stack(torch.meshgrid(*[torch.arange(-m, m + 1, dtype=torch.float64) for m in n], indexing="ij"),
                       dim=-1).reshape(-1, 3)
    d = positions[None, :, None, :] - positions[:, None, None, :] + (grid @ cell)[None, None]  # (i, j, n, 3)
    home = (grid == 0).all(dim=1)
    same = torch.eye(len(positions), dtype=torch.bool)[:, :, None] & home[None, None, :]
    r = torch.linalg.norm(torch.where(same[..., None], torch.ones_like(d), d), dim=-1)
    qq = (charges[:, None] * charges[None, :])[:, :, None]
    term = torch.where(same | (r > r_cut), torch.zeros_like(r), qq * torch.special.erfc(alpha * r) / r)
    real = 0.5 * term.sum()
    # reciprocal space: k = 2 pi m @ inverse(cell).T, |k| < k_cut, m != 0
    reciprocal_cell = 2.0 * math.pi * torch.linalg.inv(cell).T  # rows b_i with a_i . b_j = 2 pi delta_ij
    m_max = [int(math.ceil(k_cut * np.linalg.norm(c[i]) / (2.0 * math.pi))) + 1 for i in range(3)]
    m = torch.stack(torch.meshgrid(*[torch.arange(-x, x + 1, dtype=torch.float64) for x in m_max], indexing="ij"),
                    dim=-1).reshape(-1, 3)
    m = m[~(m == 0).all(dim=1)]
    k = m @ reciprocal_cell
    k2 = (k * k).sum(dim=1)
    keep = k2 < k_cut ** 2
    k, k2 = k[keep], k2[keep]
    phase = positions @ k.T  # (N, K)
    s_re, s_im = (charges[:, None] * torch.cos(phase)).sum(0), (charges[:, None] * torch.sin(phase)).sum(0)
    recip = (2.0 * math.pi / torch.abs(torch.linalg.det(cell))) * (
        torch.exp(-k2 / (4.0 * alpha ** 2)) / k2 * (s_re ** 2 + s_im ** 2)).sum()
    self_term = -alpha / math.sqrt(math.pi) * (charges ** 2).sum()
    return COULOMB_EV_A / EPSILON_R * (real + recip + self_term)


def smooth_switch(r: torch.Tensor, r_on: float, r_off: float) -> torch.Tensor:
    """1 below r_on, 0 above r_off, (1 + cos)/2 between (continuous slope)."""
    t = ((r - r_on) / (r_off - r_on)).clamp(0.0, 1.0)
    return 0.5 * (1.0 + torch.cos(math.pi * t))


def coulomb_near(positions: torch.Tensor, cell: torch.Tensor, charges: torch.Tensor, index: torch.Tensor,
                 shifts: torch.Tensor, r_cut: float, alpha: float = NEAR_ALPHA) -> torch.Tensor:
    """The best-known local form of the screened Coulomb energy: the damped shifted force sum
    (Fennell and Gezelter, J. Chem. Phys. 124, 234104 (2006)) of the pairs within r_cut,

        sum_{i<j} q_i q_j [erfc(a r)/r - erfc(a r_c)/r_c + (erfc(a r_c)/r_c^2 + 2a/sqrt(pi) exp(-a^2 r_c^2)/r_c)(r - r_c)]
        - (erfc(a r_c)/(2 r_c) + a/sqrt(pi)) sum_i q_i^2,

    energy and force continuous at r_c (alpha = 0: the shifted-force bare Coulomb sum); index/shifts:
    the pairs within r_cut. A sum of pair terms within r_cut, so a local model of that range can
    represent it exactly; the Ewald energy minus this is what it has to get from further away."""
    r = pair_distances(positions, cell, index, shifts)
    qq = charges[index[:, 0]] * charges[index[:, 1]]
    erfc_c = math.erfc(alpha * r_cut)
    slope = erfc_c / r_cut ** 2 + 2.0 * alpha / math.sqrt(math.pi) * math.exp(-(alpha * r_cut) ** 2) / r_cut
    pair = qq * (torch.special.erfc(alpha * r) / r - erfc_c / r_cut + slope * (r - r_cut))
    pair = torch.where(r < r_cut, pair, torch.zeros_like(pair)).sum()
    self_term = -(erfc_c / (2.0 * r_cut) + alpha / math.sqrt(math.pi)) * (charges ** 2).sum()
    return COULOMB_EV_A / EPSILON_R * (pair + self_term)


def with_derivatives(energy_fn, positions: np.ndarray, cell: np.ndarray):
    """energy_fn(positions, cell) -> scalar tensor (or a tuple whose first element is the total),
    evaluated under a homogeneous strain: (values, forces (N, 3), stress (3, 3), the positions
    tensor for further gradients), with stress = (1/V) dE/d(strain) (ASE's sign)."""
    strain = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor(positions, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(cell, dtype=torch.float64)
    deformation = torch.eye(3, dtype=torch.float64) + strain
    values = energy_fn(pos @ deformation, c @ deformation)
    total = values[0] if isinstance(values, tuple) else values
    d_pos, d_strain = torch.autograd.grad(total, (pos, strain), retain_graph=isinstance(values, tuple))
    volume = abs(float(np.linalg.det(cell)))
    stress = d_strain.numpy() / volume
    return values, -d_pos.numpy(), 0.5 * (stress + stress.T), pos


def reference(numbers, positions: np.ndarray, cell: np.ndarray, coulomb=ewald_torchpme,
              near_cutoffs: tuple = (), alpha: float = NEAR_ALPHA) -> Reference:
    """Energy, forces and stress of one periodic structure (pbc in all three directions); with
    near_cutoffs, also the Coulomb energy and forces that a local model of each range r_off misses:
    Reference.far[r_off] = (energy, forces) of the Ewald sum minus coulomb_near(r_off, alpha)."""
    charges = charges_of(numbers)
    index, shifts = pairs(positions, cell, max(EWALD_CUTOFF, REPULSION_CUTOFF))
    near_pairs = {r_off: pairs(positions, cell, r_off) for r_off in near_cutoffs}

    def energy(pos, c):
        e_coulomb = (coulomb(pos, c, charges, index, shifts) if coulomb is ewald_torchpme
                     else coulomb(pos, c, charges))
        e_repulsion = repulsion(pos, c, index, shifts)
        near = [coulomb_near(pos, c, charges, *near_pairs[r_off], r_off, alpha) for r_off in near_cutoffs]
        return e_coulomb + e_repulsion, e_coulomb, e_repulsion, *near

    (total, e_coulomb, e_repulsion, *near), forces, stress, pos = with_derivatives(energy, positions, cell)
    result = Reference(total.item(), forces, stress, e_coulomb.item(), e_repulsion.item())
    if near_cutoffs:
        coulomb_forces = -torch.autograd.grad(e_coulomb, pos, retain_graph=True)[0].numpy()
        for r_off, e_near in zip(near_cutoffs, near):
            near_forces = -torch.autograd.grad(e_near, pos, retain_graph=True)[0].numpy()
            result.far[r_off] = (e_coulomb.item() - e_near.item(), coulomb_forces - near_forces)
    return result
