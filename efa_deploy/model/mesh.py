"""The periodic EFA stages on a mesh: smooth particle-mesh Ewald (Essmann et al., J. Chem. Phys.
103, 8577 (1995)) for the two stages of erope.py with omega = 1 and integer reciprocal-lattice
indices n_g as the directions, in O(N log N) instead of O(N G).

Positions are phase positions p_i = 2 pi s_i (s_i = r_i inv(cell), fractional, need not be
wrapped), so e^{i n.p} = e^{2 pi i n.s}. On a K1 x K2 x K3 mesh, with u_a = K_a s_a and the
cardinal B-spline M of order P,

    e^{2 pi i n_a s_a} ~= b_a(n_a) sum_k M(u_a - k) e^{2 pi i n_a k / K_a},
    b_a(m) = 1 / sum_{t=1}^{P-1} M(t) e^{-2 pi i m t / K_a}          (Euler exponential spline)

  stage 1  KV_b,mg = sum_j conj(k_j^m) v_j e^{-i n_g.p_j}
                   ~= conj(b(n_g)) FFT[Q_b](n_g),   Q_b(k) = sum_{owned j of b} W_j(k) conj(k_j) v_j
  stage 2  y_i = sum_m Re(q_i^m Z_i^m),   Z_i = sum_k W_i(k) Phi_b(i)(k),
           Phi_b(k) = sum_g b(n_g) KV_b,g e^{2 pi i n_g.k / K}   (an unnormalised inverse FFT)

with W_j(k) = prod_a M(u_ja - k_a) (P^3 mesh points per atom, periodic). The same conventions as
erope.key_value_sums / query_contraction with omega = ones(M): KV (B, M, G, 2D) as [Re | Im]
columns, the owned mask on the values, n_structures == 1 ignores batch, empty structures and N = 0.

Accuracy (float64, max |mesh - direct| / max |direct|, worst of 4 random cells (2 triclinic), 300
atoms, all |n| < 2.0 1/A; stage 1 KV / stage 2 y from the exact KV; benchmarks/periodic_mesh.py
--accuracy, benchmarks/results/periodic_mesh.md):

    oversampling      1.5               2                 2.5               3
    order 4      2.6e-2 / 1.1e-2   1.0e-2 / 4.2e-3   3.1e-3 / 1.7e-3   1.6e-3 / 7.5e-4
    order 5      9.0e-3 / 2.7e-3   2.6e-3 / 8.9e-4   4.4e-4 / 1.8e-4   2.0e-4 / 6.7e-5
    order 6      3.5e-3 / 1.0e-3   7.9e-4 / 2.6e-4   1.1e-4 / 4.6e-5   4.3e-5 / 1.6e-5
    order 8      5.2e-4 / 1.2e-4   6.3e-5 / 1.9e-5   4.2e-6 / 1.5e-6   1.2e-6 / 4.0e-7

Default: order 6, oversampling 2 (about 1e-3 relative; float32 adds ~1e-6). At 1e4 atoms it was
also the fastest of the settings near 1e-3 (order 5 / 2.5 and order 4 / 3 were 7 % and 17 % slower:
their smaller stencils do not pay for the larger mesh). The error is aliasing: for
x = |n_a| / K_a it falls like (x / (1 - x))^P, largest for the outermost n_g; the 2-3-5 rounding
of mesh_size makes the effective oversampling vary.

Derivatives. Stage 1 is differentiated by autograd through the spline weights (any order).
Stage 2 would save the P^3 gathered mesh values of every atom and channel for the gradient of the
weights (N P^3 M 2D numbers); instead it contracts the gathered values at once with the weights
and their first and second derivatives (separably, axis by axis) and adds the Taylor terms
delta Z' + delta^2 Z'' / 2 with delta = u - u.detach() = 0: the value is unchanged and all
derivatives up to second order in the positions (and all orders in queries, KV and mixed
position-parameter second derivatives for force training) are exact. Third and higher
derivatives in the positions of stage 2 are not (they are zero). When the positions do not
require grad only the weights themselves are used.

Memory: the channels (M x D complex) are processed in chunks whose mesh stays within
MESH_ELEMENTS reals, and the atoms in chunks whose P^3-stencil values stay within ATOM_ELEMENTS
(stage 2: at least one mesh's worth of stencil rows per chunk, since each chunk's gather costs a
zero mesh in backward). Saved for backward: spline weights (N P^3), mesh rows (N P^3 int64), and
in stage 2 the 10 Taylor contractions per atom and channel (N x 10 x M 2D). A double backward
(force training) additionally keeps the stage-1 gathered gradients, N P^3 M 2D numbers: fine for
training structures, not for 1e5 atoms.
"""

import math
from typing import List, Optional

import torch
from torch import Tensor

DEFAULT_ORDER = 6
DEFAULT_OVERSAMPLING = 2.0
MESH_ELEMENTS = 1 << 26  # the literals in _chunks (TorchScript reads no module globals)
ATOM_ELEMENTS = 1 << 25


def mesh_size(max_index: List[int], oversampling: float = DEFAULT_OVERSAMPLING, order: int = DEFAULT_ORDER) -> List[int]:
    """Mesh sizes K_a: the smallest products of 2, 3, 5 with K_a >= oversampling (2 max|n_a| + 1),
    K_a > 2 max|n_a| (so every |n_a| < K_a / 2) and K_a >= order."""
    sizes: List[int] = []
    for n in max_index:
        n = abs(n)
        target = max(int(math.ceil(oversampling * (2 * n + 1) - 1e-9)), 2 * n + 1, order, 1)
        k = target
        while True:
            r = k
            for f in [2, 3, 5]:
                while r % f == 0:
                    r = r // f
            if r == 1:
                break
            k += 1
        sizes.append(k)
    return sizes


def _levels(f: Tensor, order: int) -> List[Tensor]:
    """B-spline values A_k[..., j] = M_k(f + j), j = 0 .. k-1, for k = 1 .. order (list index k-1);
    f (...,) in [0, 1). Differentiable in f."""
    a = torch.ones_like(f).unsqueeze(-1)
    out: List[Tensor] = [a]
    for k in range(2, order + 1):
        x = f.unsqueeze(-1) + torch.arange(k, dtype=f.dtype, device=f.device)
        zero = torch.zeros_like(a[..., :1])
        prev = torch.cat([a, zero], dim=-1)  # A_{k-1}[j]
        prev_m1 = torch.cat([zero, a], dim=-1)  # A_{k-1}[j-1]
        a = (x * prev + (k - x) * prev_m1) / (k - 1)
        out.append(a)
    return out


def _shift(a: Tensor, by: int) -> Tensor:
    """a[..., j - by] with zeros, length len + by."""
    rest: List[int] = list(a.shape[:-1])
    z = a.new_zeros(rest + [by])
    return torch.cat([z, a], dim=-1)


def _taylor_weights(f: Tensor, order: int, derivatives: int) -> Tensor:
    """(..., derivatives + 1, order): M(f + j) and its first / second derivatives in f."""
    lv = _levels(f, order)
    rows: List[Tensor] = [lv[order - 1]]
    if derivatives >= 1:
        a = torch.cat([lv[order - 2], torch.zeros_like(lv[order - 2][..., :1])], dim=-1)
        rows.append(a - _shift(lv[order - 2], 1))
    if derivatives >= 2:
        a = lv[order - 3]
        z2 = torch.zeros_like(a[..., :2])
        rows.append(torch.cat([a, z2], dim=-1) - 2.0 * torch.cat([_shift(a, 1), z2[..., :1]], dim=-1) + _shift(a, 2))
    return torch.stack(rows, dim=-2)


def _euler_factors(n: Tensor, mesh: List[int], order: int, dtype: torch.dtype) -> Tensor:
    """b(n_g) = prod_a b_a(n_ga) (G,) complex; n (G, 3) integer valued."""
    m = _levels(torch.zeros(1, dtype=torch.float64, device=n.device), order)[order - 1].reshape(order)
    t = torch.arange(order, dtype=torch.float64, device=n.device)
    k = torch.tensor(mesh, dtype=torch.float64, device=n.device)
    angle = 2.0 * math.pi * n.to(torch.float64).unsqueeze(-1) * t / k.unsqueeze(-1)  # (G, 3, P)
    den = torch.complex(torch.sum(m * torch.cos(angle), dim=-1), -torch.sum(m * torch.sin(angle), dim=-1))
    b = 1.0 / den
    b = b[:, 0] * b[:, 1] * b[:, 2]
    return b.to(torch.complex64 if dtype == torch.float32 else torch.complex128)


def mesh_holds(mesh: List[int], n: Tensor) -> bool:
    """Whether a K1 x K2 x K3 mesh carries every index n (G, 3) without aliasing: |n_a| < K_a / 2."""
    if len(mesh) != 3:
        return False
    if n.shape[0] == 0:
        return True
    largest = n.abs().max(dim=0).values
    return bool(torch.all(2 * largest < torch.tensor(mesh, dtype=largest.dtype, device=largest.device)))


def _integer_directions(directions: Tensor, mesh: List[int]) -> tuple[Tensor, Tensor]:
    """Integer indices (G, 3) and their flat rows n mod K in the K1 x K2 x K3 mesh (G,)."""
    if len(mesh) != 3:
        raise RuntimeError("mesh must have 3 sizes")
    n = torch.round(directions).to(torch.long)
    if not mesh_holds(mesh, n):
        raise RuntimeError("mesh too small: every direction index needs |n_a| < K_a / 2 (see mesh_size)")
    k1, k2, k3 = mesh[0], mesh[1], mesh[2]
    flat = (torch.remainder(n[:, 0], k1) * k2 + torch.remainder(n[:, 1], k2)) * k3 + torch.remainder(n[:, 2], k3)
    return n, flat


def _mesh_coordinates(p: Tensor, mesh: List[int]) -> Tensor:
    """u_a = K_a p_a / (2 pi) (N, 3)."""
    k = torch.tensor(mesh, dtype=p.dtype, device=p.device)
    return p * (k / (2.0 * math.pi))


def row_offsets(batch: Tensor, n_structures: int, mesh: List[int]) -> Tensor:
    """The first mesh row of every atom's structure (N,): structure b owns rows b K1 K2 K3 ..."""
    if n_structures > 1:
        return batch * (mesh[0] * mesh[1] * mesh[2])
    return torch.zeros_like(batch)


def _stencil(u: Tensor, offset: Tensor, mesh: List[int], order: int) -> tuple[Tensor, Tensor]:
    """Fractional offsets f = u - floor(u) (N, 3) (differentiable) and the flat mesh rows
    (N, P1, P2, P3) (axis 3 fastest: neighbouring rows) of the points k_a = floor(u_a) - j_a, plus
    the atom's row offset."""
    base = torch.floor(u.detach())
    f = u - base
    j = torch.arange(order, device=u.device)
    ks = torch.tensor(mesh, dtype=torch.long, device=u.device)
    k = torch.remainder(base.to(torch.long).unsqueeze(-1) - j, ks.unsqueeze(-1))  # (N, 3, P)
    k2, k3 = mesh[1], mesh[2]
    n = u.shape[0]
    rows = (k[:, 0].reshape(n, order, 1, 1) * k2 + k[:, 1].reshape(n, 1, order, 1)) * k3 + k[:, 2].reshape(n, 1, 1, order)
    return f, rows + offset.reshape(n, 1, 1, 1)


def _spline_weights(f: Tensor, order: int) -> Tensor:
    """W_j(k) = prod_a M(f_a + i_a) of the P^3 stencil points (N, P^3), differentiable in f."""
    w = _levels(f, order)[order - 1]  # (N, 3, P)
    n = f.shape[0]
    weight = w[:, 0].reshape(n, order, 1, 1) * w[:, 1].reshape(n, 1, order, 1) * w[:, 2].reshape(n, 1, 1, order)
    return weight.reshape(n, order * order * order)


def spread_reference(u: Tensor, values: Tensor, offset: Tensor, mesh: List[int], rows: int, order: int) -> Tensor:
    """efa::mesh_spread in torch: Q (rows, C), Q[offset_j + row(k)] += W_j(k) values_j over the P^3
    stencil of mesh coordinates u_j (ops/fused_mesh.cpp); differentiable to any order. Atoms go in
    chunks whose stencil values stay within ATOM_ELEMENTS (_chunks)."""
    atoms, c, stencil = u.shape[0], values.shape[1], order * order * order
    f, index = _stencil(u, offset, mesh, order)
    weight = _spline_weights(f, order).unsqueeze(2)  # (N, P^3, 1)
    index = index.reshape(atoms, stencil)
    out = values.new_zeros(rows, c)
    atom_step = _chunks(max(1, c // 2), rows, stencil)[1]
    for a0 in range(0, atoms, atom_step):
        a1 = min(atoms, a0 + atom_step)
        picked: List[Optional[Tensor]] = [index[a0:a1].reshape(-1)]
        out.index_put_(picked, (weight[a0:a1] * values[a0:a1].unsqueeze(1)).reshape((a1 - a0) * stencil, c),
                       accumulate=True)
    return out


def _taylor_gather(u: Tensor, grid: Tensor, offset: Tensor, mesh: List[int], order: int, derivatives: int) -> Tensor:
    """Z_j = sum_k W_j(k) grid[offset_j + row(k)] (N, C) from the gathered values contracted with
    the weights and their first (and second) derivatives in u, separably, axis by axis, plus the
    Taylor terms delta Z' (+ delta^2 Z'' / 2), delta = u - u.detach() = 0 (module docstring): exact
    in value and in position derivatives up to `derivatives` (0, 1 or 2) without keeping the
    gathered values for backward; linear in grid. Atoms go in chunks (_chunks), each at least as
    large as the mesh (every chunk's gather costs a zero mesh in backward)."""
    atoms, c, stencil = u.shape[0], grid.shape[1], order * order * order
    if derivatives > 0 and order < 3:
        raise RuntimeError("position derivatives of the mesh path need order >= 3")
    f, rows = _stencil(u.detach(), offset, mesh, order)
    t = _taylor_weights(f, order, derivatives)  # (N, 3, E, P), no grad
    e = derivatives + 1
    rows = rows.reshape(atoms, stencil)
    w1 = t[:, 0].reshape(atoms, e, order)
    w2 = t[:, 1].reshape(atoms, 1, e, order)
    w3 = t[:, 2].reshape(atoms, 1, e, order)
    if derivatives == 2:
        delta = u - u.detach()
        d1, d2, d3 = delta[:, 0], delta[:, 1], delta[:, 2]
        one = torch.ones_like(d1)
        coef = torch.stack([one, d1, d2, d3, 0.5 * d1 * d1, 0.5 * d2 * d2, 0.5 * d3 * d3, d1 * d2, d1 * d3, d2 * d3], dim=1)
        coef = coef.unsqueeze(1)  # (N, 1, 10)
        # (e1, e2, e3) derivative orders of the terms below -> flat index e1 * 9 + e2 * 3 + e3
        select = torch.tensor([0, 9, 3, 1, 18, 6, 2, 12, 10, 4], device=u.device)
    elif derivatives == 1:
        delta = u - u.detach()
        coef = torch.cat([torch.ones_like(delta[:, :1]), delta], dim=1).unsqueeze(1)  # (N, 1, 4)
        select = torch.tensor([0, 4, 2, 1], device=u.device)  # e1 * 4 + e2 * 2 + e3
    else:
        coef = torch.ones_like(u[:, :1]).unsqueeze(1)
        select = torch.zeros(1, dtype=torch.long, device=u.device)
    atom_step = max(_chunks(max(1, c // 2), grid.shape[0], stencil)[1], (grid.shape[0] + stencil - 1) // stencil)
    pieces: List[Tensor] = []
    for a0 in range(0, atoms, atom_step):
        a1 = min(atoms, a0 + atom_step)
        na = a1 - a0
        x = grid.index_select(0, rows[a0:a1].reshape(-1)).reshape(na, order, order * order * c)
        x = torch.bmm(w1[a0:a1], x).reshape(na, e, order, order * c)  # (N, E1, P2, P3 C)
        x = torch.matmul(w2[a0:a1], x).reshape(na, e * e, order, c)  # (N, E1 E2, P3, C)
        x = torch.matmul(w3[a0:a1], x)  # (N, E1 E2, E3, C)
        x = x.reshape(na, e * e * e, c).index_select(1, select)
        pieces.append(torch.matmul(coef[a0:a1], x).reshape(na, c))
    return torch.cat(pieces, dim=0)


def gather_reference(u: Tensor, grid: Tensor, offset: Tensor, mesh: List[int], order: int) -> Tensor:
    """efa::mesh_gather in torch: Z_j = sum_k W_j(k) grid[offset_j + row(k)] (N, C), exact in value
    and in position derivatives to second order (_taylor_gather)."""
    return _taylor_gather(u, grid, offset, mesh, order, 2 if u.requires_grad else 0)


def _chunks(channels: int, mesh_rows: int, stencil: int) -> tuple[int, int]:
    """(complex channels, atoms) per chunk: the mesh of a chunk within MESH_ELEMENTS reals and the
    stencil values of a chunk of atoms within ATOM_ELEMENTS (the literals below)."""
    most = max(1, (1 << 26) // max(2 * mesh_rows, 1))
    pieces = (channels + most - 1) // most
    width = max(1, (channels + pieces - 1) // max(pieces, 1))
    return width, max(1, (1 << 25) // (2 * width * stencil))


def mesh_key_value_sums(p: Tensor, keys: Tensor, values: Tensor, owned: Tensor, batch: Tensor, n_structures: int,
                        directions: Tensor, mesh: List[int], order: int = DEFAULT_ORDER, fused: bool = False) -> Tensor:
    """Stage 1 on the mesh: KV (B, M, G, 2D) ~= erope.key_value_sums(p, keys, values, owned, batch,
    n_structures, ones(M), directions). fused: spread with efa::mesh_spread (inference: first
    derivatives, nothing per atom x stencil kept) instead of the reference."""
    m, d, g = keys.shape[1], values.shape[1], directions.shape[0]
    if n_structures == 0:
        return values.new_zeros(0, m, g, 2 * d)
    n, flat = _integer_directions(directions, mesh)
    k1, k2, k3 = mesh[0], mesh[1], mesh[2]
    cells = k1 * k2 * k3
    u = _mesh_coordinates(p, mesh)
    offset = row_offsets(batch, n_structures, mesh)
    atoms = p.shape[0]
    # conj(k) v (owned): (N, M, D, 2) real pairs
    v = values * owned.unsqueeze(1)
    c = torch.stack([keys[:, :, 0:1] * v.unsqueeze(1), -keys[:, :, 1:2] * v.unsqueeze(1)], dim=-1)
    c = c.reshape(atoms, m * d * 2)
    factor = torch.conj(_euler_factors(n, mesh, order, values.dtype))  # (G,)
    channels = m * d
    step = _chunks(channels, n_structures * cells, order * order * order)[0]
    parts: List[Tensor] = []
    for start in range(0, channels, step):
        width = min(step, channels - start)
        chunk = c[:, 2 * start:2 * (start + width)]
        if fused:
            q = torch.ops.efa.mesh_spread(u, chunk.contiguous(), offset, mesh, n_structures * cells, order)
        else:
            q = spread_reference(u, chunk, offset, mesh, n_structures * cells, order)
        q = torch.view_as_complex(q.reshape(n_structures * cells, width, 2)).t().contiguous()
        spectrum = torch.fft.fftn(q.reshape(width, n_structures, k1, k2, k3), dim=[2, 3, 4])
        parts.append(spectrum.reshape(width, n_structures, cells).index_select(2, flat))  # (W, B, G)
    kv = torch.view_as_real(torch.cat(parts, dim=0) * factor)  # (M D, B, G, 2)
    return kv.reshape(m, d, n_structures, g, 2).permute(2, 0, 3, 4, 1).reshape(n_structures, m, g, 2 * d)


def mesh_query_contraction(p: Tensor, queries: Tensor, kv: Tensor, batch: Tensor, directions: Tensor,
                           mesh: List[int], order: int = DEFAULT_ORDER, second_order: bool = True,
                           fused: bool = False) -> Tensor:
    """Stage 2 on the mesh: y (N, D) ~= erope.query_contraction(p, queries, kv, batch, ones(M), directions).
    second_order=False (inference: energy, forces, stress) carries position derivatives to first
    order only, which is cheaper; fused (inference) interpolates with efa::mesh_gather instead."""
    n_structures, m, g, d = kv.shape[0], kv.shape[1], kv.shape[2], kv.shape[3] // 2
    atoms = p.shape[0]
    if n_structures == 0 or atoms == 0:
        return kv.new_zeros(atoms, d)
    n, flat = _integer_directions(directions, mesh)
    k1, k2, k3 = mesh[0], mesh[1], mesh[2]
    cells = k1 * k2 * k3
    u = _mesh_coordinates(p, mesh)
    offset = row_offsets(batch, n_structures, mesh)
    derivatives = (2 if second_order else 1) if u.requires_grad else 0
    factor = _euler_factors(n, mesh, order, kv.dtype)  # (G,)
    # channel-first, as the meshes: (M D, B, G)
    spectrum = torch.view_as_complex(kv.reshape(n_structures, m, g, 2, d).permute(1, 4, 0, 2, 3).contiguous())
    spectrum = spectrum.reshape(m * d, n_structures, g) * factor
    channels = m * d
    step = _chunks(channels, n_structures * cells, order * order * order)[0]
    parts: List[Tensor] = []
    for start in range(0, channels, step):
        width = min(step, channels - start)
        grid = spectrum.new_zeros(width, n_structures, cells)
        grid.index_add_(2, flat, spectrum[start:start + width])
        phi = torch.fft.ifftn(grid.reshape(width, n_structures, k1, k2, k3), dim=[2, 3, 4], norm="forward")
        phi = torch.view_as_real(phi.reshape(width, n_structures * cells).t().contiguous())
        phi = phi.reshape(n_structures * cells, 2 * width)
        if fused:
            z = torch.ops.efa.mesh_gather(u, phi, offset, mesh, order)
        else:
            z = _taylor_gather(u, phi, offset, mesh, order, derivatives)
        parts.append(z.reshape(atoms, width, 2))
    z = torch.cat(parts, dim=1).reshape(atoms, m, d, 2)
    return torch.sum(queries[:, :, 0:1] * z[..., 0] - queries[:, :, 1:2] * z[..., 1], dim=1)
