"""The mesh (SPME) form of the periodic EFA stages (efa_deploy/model/mesh.py) against the direct
erope stages with omega = 1 and integer reciprocal-lattice directions."""

import math
from typing import List

import pytest
import torch
from torch import Tensor, nn

from efa_deploy.model import erope
from efa_deploy.paths import OPS_LIBRARY
from efa_deploy.model import mesh as mesh_module
from efa_deploy.model.mesh import (DEFAULT_ORDER, DEFAULT_OVERSAMPLING, mesh_key_value_sums,
                                   mesh_query_contraction, mesh_size)

torch.set_num_threads(1)
DT = torch.float64
M, D = 3, 4


def indices(cells: List[Tensor], k_max: float) -> Tensor:
    """All n (symmetric, with 0) with |2 pi n inv(cell)^T| < k_max for some cell: (G, 3) float."""
    inv = [torch.linalg.inv(c) for c in cells]
    top = max([int(math.ceil(k_max * torch.linalg.norm(c, dim=1).max().item() / (2 * math.pi))) + 1 for c in cells] + [1])
    r = torch.arange(-top, top + 1, dtype=DT)
    n = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    keep = torch.zeros(n.shape[0], dtype=torch.bool)
    for i in inv:
        keep |= torch.linalg.norm(2 * math.pi * n @ i.T, dim=1) < k_max
    return n[keep]


def system(sizes: List[int], triclinic: bool, seed: int = 0, k_max: float = 1.6):
    g = torch.Generator().manual_seed(seed)
    cells, ps, batch = [], [], []
    for b, s in enumerate(sizes):
        cell = torch.diag(6.0 + 3.0 * torch.rand(3, generator=g, dtype=DT))
        if triclinic:
            cell = cell + torch.triu(torch.rand(3, 3, generator=g, dtype=DT) * 2.0 - 1.0, 1)
        cells.append(cell)
        r = (torch.rand(s, 3, generator=g, dtype=DT) * 1.4 - 0.2) @ cell  # not wrapped
        ps.append(2 * math.pi * r @ torch.linalg.inv(cell))
        batch.append(torch.full((s,), b, dtype=torch.long))
    p = torch.cat(ps) if ps else torch.zeros(0, 3, dtype=DT)
    n_atoms = p.shape[0]
    keys = torch.randn(n_atoms, M, 2, generator=g, dtype=DT)
    queries = torch.randn(n_atoms, M, 2, generator=g, dtype=DT)
    values = torch.randn(n_atoms, D, generator=g, dtype=DT)
    owned = (torch.rand(n_atoms, generator=g) > 0.25).to(DT)
    batch = torch.cat(batch) if batch else torch.zeros(0, dtype=torch.long)
    n = indices(cells, k_max)
    return p, keys, queries, values, owned, batch, n


def mesh_for(n: Tensor, oversampling: float = DEFAULT_OVERSAMPLING, order: int = DEFAULT_ORDER) -> List[int]:
    return mesh_size([int(v) for v in n.abs().amax(0).tolist()], oversampling, order)


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def both_stages(p, keys, queries, values, owned, batch, b, n, mesh, order):
    """Direct and mesh: (KV, y from that KV)."""
    one = torch.ones(M, dtype=p.dtype)
    kv = erope.key_value_sums(p, keys, values, owned, batch, b, one, n)
    y = erope.query_contraction(p, queries, kv, batch, one, n)
    kv_m = mesh_key_value_sums(p, keys, values, owned, batch, b, n, mesh, order)
    y_m = mesh_query_contraction(p, queries, kv_m, batch, n, mesh, order)
    return kv, y, kv_m, y_m


# measured bound at the default (order 6, oversampling 2) is about 1e-3 for stage 1 (module docstring)
TOL = 3e-3


@pytest.mark.parametrize("triclinic", [False, True])
def test_mesh_matches_direct_batch(triclinic):
    p, k, q, v, owned, batch, n = system([40, 0, 70, 25], triclinic)
    mesh = mesh_for(n)
    kv, y, kv_m, y_m = both_stages(p, k, q, v, owned, batch, 4, n, mesh, DEFAULT_ORDER)
    assert kv_m.shape == kv.shape == (4, M, n.shape[0], 2 * D) and y_m.shape == y.shape
    assert rel(kv_m, kv) < TOL and rel(y_m, y) < TOL
    assert kv_m[1].abs().max() == 0  # the empty structure
    # the owned mask: unowned atoms add nothing
    kv_own = mesh_key_value_sums(p[owned > 0], k[owned > 0], v[owned > 0], owned[owned > 0], batch[owned > 0], 4,
                                 n, mesh, DEFAULT_ORDER)
    assert torch.allclose(kv_own, kv_m, atol=1e-12)


def test_single_structure_ignores_batch():
    p, k, q, v, owned, batch, n = system([60], True)
    mesh = mesh_for(n)
    kv, y, kv_m, y_m = both_stages(p, k, q, v, owned, torch.zeros_like(batch), 1, n, mesh, DEFAULT_ORDER)
    assert rel(kv_m, kv) < TOL and rel(y_m, y) < TOL


def test_empty():
    p, k, q, v, owned, batch, n = system([], False)
    n = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=DT)
    assert mesh_key_value_sums(p, k, v, owned, batch, 0, n, [8, 8, 8], 4).shape == (0, M, 3, 2 * D)
    kv0 = mesh_key_value_sums(p, k, v, owned, batch, 2, n, [8, 8, 8], 4)
    assert kv0.shape == (2, M, 3, 2 * D) and kv0.abs().max() == 0
    assert mesh_query_contraction(p, q, kv0, batch, n, [8, 8, 8], 4).shape == (0, D)
    assert mesh_query_contraction(p, q, kv0[:0], batch, n, [8, 8, 8], 4).shape == (0, D)


def test_mesh_size_rule():
    assert mesh_size([4, 0, 11], 2.0, 6) == [18, 6, 48]
    for n, s in [(3, 1.5), (7, 2.0), (23, 2.0), (13, 3.0)]:
        (kk,) = mesh_size([n], s, 4)
        r = kk
        for f in (2, 3, 5):
            while r % f == 0:
                r //= f
        assert r == 1 and kk >= s * (2 * n + 1) and 2 * n < kk
    p, k, q, v, owned, batch, n = system([10], False)
    with pytest.raises(RuntimeError, match="mesh too small"):
        mesh_key_value_sums(p, k, v, owned, batch, 1, n, [2 * int(n.abs().max()), 16, 16], 4)


def test_accuracy_improves_with_order():
    p, k, q, v, owned, batch, n = system([60, 50], True, seed=3)
    errors = []
    for order in (4, 6, 8):
        kv, y, kv_m, y_m = both_stages(p, k, q, v, owned, batch, 2, n, mesh_for(n, 2.0, order), order)
        errors.append((rel(kv_m, kv), rel(y_m, y)))
    for lo, hi in zip(errors[1:], errors[:-1]):
        assert lo[0] < hi[0] / 4 and lo[1] < hi[1] / 4, errors
    assert errors[2][0] < 2e-4


def energy(fn, p, k, q, v, owned, batch, b, n, weights):
    """A scalar through both stages, nonlinear in y (so second derivatives see both stages)."""
    if fn == "direct":
        one = torch.ones(M, dtype=p.dtype)
        kv = erope.key_value_sums(p, k, v, owned, batch, b, one, n)
        y = erope.query_contraction(p, q, kv, batch, one, n)
    else:
        mesh = mesh_for(n, 3.0, 8)
        kv = mesh_key_value_sums(p, k, v, owned, batch, b, n, mesh, 8)
        y = mesh_query_contraction(p, q, kv, batch, n, mesh, 8)
    return torch.sum(weights * torch.tanh(0.1 * y))


def test_gradients_match_direct_first_and_second_order():
    p, k, q, v, owned, batch, n = system([20, 15], True, seed=5, k_max=1.3)
    weights = torch.randn(p.shape[0], D, dtype=DT)
    direction = torch.randn_like(p)
    results = {}
    for fn in ("direct", "mesh"):
        pp, kk = p.clone().requires_grad_(True), k.clone().requires_grad_(True)
        e = energy(fn, pp, kk, q, v, owned, batch, 2, n, weights)
        gp, gk = torch.autograd.grad(e, [pp, kk], create_graph=True)
        # Hessian-vector product in positions and the mixed positions-keys derivative (force training)
        hp, hk = torch.autograd.grad(torch.sum(gp * direction), [pp, kk])
        results[fn] = (gp.detach(), gk.detach(), hp, hk)
    for a, b in zip(results["mesh"], results["direct"]):
        assert rel(a, b) < 1e-4


def test_gradcheck_mesh_path():
    """The mesh functions' own derivatives (first and second order) by finite differences."""
    p, k, q, v, owned, batch, n = system([3, 2], False, seed=7, k_max=1.0)
    k, q, v = k[:, :1], q[:, :1], v[:, :2]  # one channel, two values: small Jacobians
    mesh = mesh_for(n, 2.0, 4)
    kv = mesh_key_value_sums(p, k, v, owned, batch, 2, n, mesh, 4).detach()

    def stage1(p_, k_):
        return mesh_key_value_sums(p_, k_, v, owned, batch, 2, n, mesh, 4)

    def stage2(p_, q_):
        return mesh_query_contraction(p_, q_, kv, batch, n, mesh, 4)

    p = p.requires_grad_(True)
    k = k.requires_grad_(True)
    q = q.requires_grad_(True)
    for fn, args in ((stage1, (p, k)), (stage2, (p, q))):
        assert torch.autograd.gradcheck(fn, args, fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, args, fast_mode=True)
    kvg = kv.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: mesh_query_contraction(p, q, x, batch, n, mesh, 4), (kvg,),
                                    fast_mode=True)


def test_float32():
    p, k, q, v, owned, batch, n = system([50, 30], True, seed=2)
    mesh = mesh_for(n)
    kv = mesh_key_value_sums(p, k, v, owned, batch, 2, n, mesh, 6)
    y = mesh_query_contraction(p, q, kv, batch, n, mesh, 6)
    f = [t.float() for t in (p, k, q, v, owned, n)]
    kv32 = mesh_key_value_sums(f[0], f[1], f[3], f[4], batch, 2, f[5], mesh, 6)
    y32 = mesh_query_contraction(f[0], f[2], kv32, batch, f[5], mesh, 6)
    assert kv32.dtype == y32.dtype == torch.float32
    assert rel(kv32.double(), kv) < 1e-5 and rel(y32.double(), y) < 1e-5


class Periodic(nn.Module):
    def __init__(self, mesh: List[int], order: int):
        super().__init__()
        self.mesh = mesh
        self.order = order

    def forward(self, p: Tensor, k: Tensor, q: Tensor, v: Tensor, owned: Tensor, batch: Tensor, n_structures: int,
                n: Tensor) -> Tensor:
        kv = mesh_key_value_sums(p, k, v, owned, batch, n_structures, n, self.mesh, self.order)
        return mesh_query_contraction(p, q, kv, batch, n, self.mesh, self.order)


def test_torchscript():
    p, k, q, v, owned, batch, n = system([12, 9], True, seed=4)
    module = Periodic(mesh_for(n), 6)
    scripted = torch.jit.script(module)
    pp = p.clone().requires_grad_(True)
    y = scripted(pp, k, q, v, owned, batch, 2, n)
    (g,) = torch.autograd.grad(y.sum(), [pp])
    assert torch.allclose(y, module(p, k, q, v, owned, batch, 2, n), atol=1e-12)
    p2 = p.clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(module(p2, k, q, v, owned, batch, 2, n).sum(), [p2])
    assert torch.allclose(g, g2, atol=1e-10)


def test_chunks_over_channels_and_atoms(monkeypatch):
    """Small chunks (as a large mesh or many atoms would take) give the same values and gradients."""
    p, k, q, v, owned, batch, n = system([30, 25], True, seed=6)
    mesh = mesh_for(n)

    def run():
        pp = p.clone().requires_grad_(True)
        y = mesh_query_contraction(pp, q, mesh_key_value_sums(pp, k, v, owned, batch, 2, n, mesh, 6), batch, n, mesh, 6)
        (g,) = torch.autograd.grad(torch.sum(torch.tanh(y)), [pp])
        return y.detach(), g

    whole = run()
    monkeypatch.setattr(mesh_module, "_chunks", lambda channels, mesh_rows, stencil: (5, 7))
    chunked = run()
    for a, b in zip(chunked, whole):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_first_order_stage_two_equals_the_second_order_one_in_value_and_gradient():
    """second_order=False (inference) keeps the value and all first derivatives."""
    p, k, q, v, owned, batch, n = system([20, 15], True, seed=6, k_max=1.3)
    mesh = mesh_for(n)
    kv = mesh_key_value_sums(p, k, v, owned, batch, 2, n, mesh)
    results = []
    for second in (True, False):
        pp, qq, kk = p.clone().requires_grad_(True), q.clone().requires_grad_(True), kv.clone().requires_grad_(True)
        y = mesh_query_contraction(pp, qq, kk, batch, n, mesh, second_order=second)
        g = torch.autograd.grad(torch.sum(y * torch.linspace(-1, 1, y.numel(), dtype=DT).reshape(y.shape)), [pp, qq, kk])
        results.append([y.detach(), *g])
    for a, b in zip(*results):
        assert rel(a, b) < 1e-13 and b.abs().max() > 0


# ---- the fused atom-mesh steps (ops/fused_mesh.cpp) against their references

fused_ops = pytest.mark.skipif(not OPS_LIBRARY.exists(), reason="libefa_ops.so is not built (make build)")


def spread_gather_inputs(seed: int = 3, channels: int = 5):
    g = torch.Generator().manual_seed(seed)
    mesh, structures = [9, 8, 10], 2
    n = 23
    u = (torch.rand(n, 3, generator=g, dtype=DT) * 30.0 - 8.0)  # not wrapped, some negative
    batch = (torch.arange(n) >= 14).to(torch.long)
    offset = mesh_module.row_offsets(batch, structures, mesh)
    rows = structures * mesh[0] * mesh[1] * mesh[2]
    values = torch.randn(n, channels, generator=g, dtype=DT)
    grid = torch.randn(rows, channels, generator=g, dtype=DT)
    return u, values, grid, offset, mesh, rows


@fused_ops
@pytest.mark.parametrize("order, channels", [(4, 5), (6, 5), (6, 37)])
def test_fused_spread_and_gather_equal_their_references_with_first_derivatives(order, channels):
    """(37 channels pass every path of the kernel: 32-byte packs four at a time, one at a time and
    single channels.)"""
    u, values, grid, offset, mesh, rows = spread_gather_inputs(channels=channels)
    weights_q = torch.randn(rows, values.shape[1], dtype=DT)
    weights_z = torch.randn(u.shape[0], grid.shape[1], dtype=DT)
    for op, reference, data, w in (
            (lambda a, b: torch.ops.efa.mesh_spread(a, b, offset, mesh, rows, order),
             lambda a, b: mesh_module.spread_reference(a, b, offset, mesh, rows, order), values, weights_q),
            (lambda a, b: torch.ops.efa.mesh_gather(a, b, offset, mesh, order),
             lambda a, b: mesh_module.gather_reference(a, b, offset, mesh, order), grid, weights_z)):
        out = []
        for f in (op, reference):
            uu, dd = u.clone().requires_grad_(True), data.clone().requires_grad_(True)
            y = f(uu, dd)
            out.append([y.detach(), *torch.autograd.grad(torch.sum(y * w), [uu, dd])])
        for a, b in zip(*out):
            assert rel(a, b) < 1e-13 and b.abs().max() > 0
    # a partition of unity: spreading ones puts exactly one unit per atom on the mesh
    q = torch.ops.efa.mesh_spread(u, torch.ones(u.shape[0], 1, dtype=DT), offset, mesh, rows, order)
    assert float(q.sum()) == pytest.approx(u.shape[0], rel=1e-13)


@fused_ops
def test_fused_spread_and_gather_in_float32_equal_the_float64_reference():
    """The float32 kernel (its own packs of eight channels) against the float64 reference."""
    u, values, grid, offset, mesh, rows = spread_gather_inputs(channels=45)
    weights_q = torch.randn(rows, values.shape[1], dtype=DT)
    weights_z = torch.randn(u.shape[0], grid.shape[1], dtype=DT)
    for op, reference, data, w in (
            (lambda a, b: torch.ops.efa.mesh_spread(a, b, offset, mesh, rows, 6),
             lambda a, b: mesh_module.spread_reference(a, b, offset, mesh, rows, 6), values, weights_q),
            (lambda a, b: torch.ops.efa.mesh_gather(a, b, offset, mesh, 6),
             lambda a, b: mesh_module.gather_reference(a, b, offset, mesh, 6), grid, weights_z)):
        out = []
        for f, dtype in ((op, torch.float32), (reference, DT)):
            uu = u.to(dtype).requires_grad_(True)
            dd = data.to(dtype).requires_grad_(True)
            y = f(uu, dd)
            out.append([y.detach(), *torch.autograd.grad(torch.sum(y * w.to(dtype)), [uu, dd])])
        for a, b in zip(*out):
            assert rel(a.double(), b) < 1e-5 and b.abs().max() > 0


@fused_ops
def test_fused_mesh_stages_equal_the_reference_ones():
    """The stages with fused=True (inference) give the reference stages' values and first
    derivatives (stage 2 against its first-order form)."""
    p, k, q, v, owned, batch, n = system([20, 15], True, seed=8, k_max=1.3)
    mesh = mesh_for(n)
    results = []
    for fused in (False, True):
        pp, kk, vv, qq = (t.clone().requires_grad_(True) for t in (p, k, v, q))
        kv = mesh_key_value_sums(pp, kk, vv, owned, batch, 2, n, mesh, fused=fused)
        y = mesh_query_contraction(pp, qq, kv, batch, n, mesh, second_order=False, fused=fused)
        grads = torch.autograd.grad(torch.sum(torch.tanh(y)), [pp, kk, vv, qq])
        results.append([kv.detach(), y.detach(), *grads])
    for a, b in zip(*results):
        assert rel(a, b) < 1e-12 and b.abs().max() > 0


@fused_ops
def test_fused_mesh_steps_refuse_a_second_derivative():
    u, values, _, offset, mesh, rows = spread_gather_inputs()
    uu = u.clone().requires_grad_(True)
    q = torch.ops.efa.mesh_spread(uu, values, offset, mesh, rows, 6)
    (g,) = torch.autograd.grad(torch.sum(q * q), [uu], create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(g.sum(), [uu])
