"""The EFA block (efa_deploy/model/efa.py): the linear-cost (Lebedev/ERoPE) form against an
independent O(N^2) pairwise reference written from the math in docs/design.md."""

import math

import numpy as np
import pytest
import torch

from efa_deploy.model import EuclideanFastAttention

torch.set_num_threads(1)

FEATURES = 16


def random_block(num_frequencies=4, num_vector_frequencies=0, grid_points=50, r_max=10.0, b_max=math.pi,
                 qk_activation="identity", seed=0) -> EuclideanFastAttention:
    torch.manual_seed(seed)
    block = EuclideanFastAttention(
        FEATURES, num_frequencies=num_frequencies, value_dim=8, grid_points=grid_points, r_max=r_max,
        b_max=b_max, num_vector_frequencies=num_vector_frequencies, qk_activation=qk_activation,
    ).double()
    with torch.no_grad():
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.5)
    return block


def block_inputs(n: int, size: float, seed: int):
    """Features, vector features and positions of n atoms spread over a cube of edge `size`, with two
    atoms on opposite corners so the largest distance is exactly size * sqrt(3)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, FEATURES, generator=g, dtype=torch.float64)
    vec = torch.randn(n, 3, FEATURES, generator=g, dtype=torch.float64)
    pos = torch.rand(n, 3, generator=g, dtype=torch.float64) * size
    pos[0] = 0.0
    pos[1] = size
    return x, vec, pos


def run_block(block, x, vec, pos, batch=None, n_structures=1, owned=None, exact=False):
    n = x.shape[0]
    batch = torch.zeros(n, dtype=torch.long) if batch is None else batch
    owned = torch.ones(n, dtype=torch.float64) if owned is None else owned
    block.exact = exact
    try:
        return block(x, vec, pos, batch, n_structures, owned)
    finally:
        block.exact = False


def reference_pairwise(block, x, vec, pos, b_max, r_max, batch=None, owned=None) -> np.ndarray:
    """DESIGN.md 3: y_i = 1/sqrt(D) sum_j sum_f (q_i^f . k_j^f) sinc(omega_f r_ij) v_j over owned j of
    i's structure, omega_f = (b_max / r_max) f / (K - 1). Vector channels: pair f of each Cartesian
    component, dotted over components, with the vector frequencies. D counts every real channel."""
    t = lambda a: a.detach().numpy()
    x, vec, pos = t(x), t(vec), t(pos)
    n = len(x)
    batch = np.zeros(n, int) if batch is None else t(batch)
    owned = np.ones(n) if owned is None else t(owned)
    wq, wk = t(block.query.weight), t(block.key.weight)
    q, k = x @ wq.T, x @ wk.T
    if block.use_silu:
        q, k = q / (1 + np.exp(-q)), k / (1 + np.exp(-k))
    v = x @ t(block.value.weight).T + t(block.value.bias)
    kq = q.shape[1] // 2

    def omegas(pairs):
        return np.zeros(1) if pairs == 1 else (b_max / r_max) * np.arange(pairs) / (pairs - 1)

    kv = block.num_vector_frequencies
    qv = np.einsum("ncf,hf->nch", vec, t(block.vector_query.weight))[:, :, : 2 * kv] if kv else None
    kv_ = np.einsum("ncf,hf->nch", vec, t(block.vector_key.weight))[:, :, : 2 * kv] if kv else None
    d = 2 * kq + 3 * 2 * kv
    y = np.zeros((n, v.shape[1]))
    for i in range(n):
        for j in range(n):
            if batch[i] != batch[j] or owned[j] == 0:
                continue
            r = np.linalg.norm(pos[i] - pos[j])
            weight = 0.0
            for f, w in enumerate(omegas(kq)):
                weight += (q[i, 2 * f] * k[j, 2 * f] + q[i, 2 * f + 1] * k[j, 2 * f + 1]) * np.sinc(w * r / np.pi)
            for f, w in enumerate(omegas(kv) if kv else []):
                dot = np.sum(qv[i, :, 2 * f] * kv_[j, :, 2 * f] + qv[i, :, 2 * f + 1] * kv_[j, :, 2 * f + 1])
                weight += dot * np.sinc(w * r / np.pi)
            y[i] += weight * v[j]
    return y / math.sqrt(d)


def relative_error(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize(
    "options",
    [dict(), dict(num_vector_frequencies=2), dict(qk_activation="silu"), dict(num_frequencies=1)],
    ids=["scalar", "vector", "silu", "one-frequency"],
)
def test_exact_form_equals_independent_reference(options):
    block = random_block(**options)
    x, vec, pos = block_inputs(9, 7.0, seed=1)
    y = run_block(block, x, vec, pos, exact=True)
    ref = reference_pairwise(block, x, vec, pos, b_max=math.pi, r_max=10.0)
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("options", [dict(), dict(num_vector_frequencies=2)], ids=["scalar", "vector"])
def test_lebedev_block_matches_pairwise_within_r_max_and_degrades_beyond(options):
    r_max = 10.0
    block = random_block(r_max=r_max, **options)
    inside = block_inputs(20, 0.99 * r_max / math.sqrt(3), seed=2)  # largest distance 0.99 r_max
    outside = block_inputs(20, 2.0 * r_max / math.sqrt(3), seed=2)  # same shape, twice the size
    errors = []
    for (x, vec, pos), largest in ((inside, 0.99 * r_max), (outside, 2.0 * r_max)):
        assert abs(torch.cdist(pos, pos).max().item() - largest) < 1e-9
        fast = run_block(block, x, vec, pos).detach().numpy()
        errors.append(relative_error(fast, reference_pairwise(block, x, vec, pos, math.pi, r_max)))
    # measured: about 5e-9 inside, 1e-5 to 2e-5 at twice the size
    assert errors[0] < 1e-4
    assert errors[1] > 100 * errors[0]


def test_lebedev_block_with_batches_and_owned_mask_matches_reference():
    block = random_block()
    x, vec, pos = block_inputs(12, 5.0, seed=3)
    batch = torch.tensor([0] * 5 + [1] * 4 + [2] * 3)
    owned = torch.tensor([1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.float64)
    fast = run_block(block, x, vec, pos, batch=batch, n_structures=3, owned=owned).detach().numpy()
    ref = reference_pairwise(block, x, vec, pos, math.pi, 10.0, batch=batch, owned=owned)
    assert relative_error(fast, ref) < 1e-6


def test_block_positions_gradient_matches_exact_form():
    """The backward pass of the Lebedev form (what forces use) agrees with the pairwise form."""
    block = random_block(num_vector_frequencies=1)
    x, vec, pos = block_inputs(10, 5.0, seed=4)
    weights = torch.randn(10, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = []
    for exact in (False, True):
        p = pos.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((run_block(block, x, vec, p, exact=exact) * weights).sum(), p)
        grads.append(g.numpy())
    assert relative_error(grads[0], grads[1]) < 1e-5


def test_symmetric_product_components_equal_the_symmetrised_outer_product():
    from efa_deploy.model.efa import symmetric_product

    gen = torch.Generator().manual_seed(3)
    a, b = (torch.randn(7, 3, 5, dtype=torch.float64, generator=gen) for _ in range(2))
    full = 0.5 * (torch.einsum("nkc,nlc->nckl", a, b) + torch.einsum("nlc,nkc->nckl", a, b))
    rows, cols = [0, 1, 2, 0, 1, 2], [0, 1, 2, 1, 2, 0]  # xx, yy, zz, xy, yz, zx
    expected = full[:, :, rows, cols].transpose(1, 2)  # (N, 6, C)
    assert torch.allclose(symmetric_product(a, b), expected, rtol=0, atol=1e-15)
    assert torch.allclose(torch.jit.script(symmetric_product)(a, b), expected, rtol=0, atol=1e-15)
    doubled = expected.clone()
    doubled[:, 3:] *= 2.0
    assert torch.allclose(symmetric_product(a, b, 1.0), doubled, rtol=0, atol=1e-15)
    assert not torch.allclose(symmetric_product(a, b), symmetric_product(a, b.flip(1)))  # negative control
