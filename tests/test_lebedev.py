"""Lebedev grids and the EFA block: quadrature accuracy, and the linear-cost (Lebedev/ERoPE)
form against an independent O(N^2) pairwise reference written from DESIGN.md section 3."""

import math

import numpy as np
import pytest
import torch

from efa_deploy.model import EuclideanFastAttention, ModelConfig
from efa_deploy.model.lebedev import SAFE_B_MAX, lebedev_grid, safe_b_max

torch.set_num_threads(1)

# Lebedev-Laikov grids: number of points -> polynomial degree integrated exactly (published table).
DEGREE_BY_POINTS = {
    6: 3, 14: 5, 26: 7, 38: 9, 50: 11, 74: 13, 86: 15, 110: 17, 146: 19, 170: 21, 194: 23,
    230: 25, 266: 27, 302: 29, 350: 31, 434: 35, 590: 41, 770: 47, 974: 53, 1202: 59,
    1454: 65, 1730: 71, 2030: 77, 2354: 83, 2702: 89, 3074: 95, 3470: 101, 3890: 107,
    4334: 113, 4802: 119, 5294: 125, 5810: 131,
}

# Worst quadrature error of the sinc kernel over omega*r in [0, b_max] and all directions,
# measured (direction search + Nelder-Mead refinement) for the SAFE_B_MAX table: 50 points
# 5.8e-7, 86-302 points 2.4e-6 to 5.0e-6, 350: 2.1e-5, 434: 1.8e-5, 590: 9.4e-6, 770: 2.5e-5,
# 974: 1.2e-5, 5810: 2.6e-6. The "about 1.5e-5" of DESIGN.md is exceeded by 350, 434 and 770,
# so the bound asserted here is 3e-5.
SINC_TOLERANCE = 3e-5


def random_directions(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(n, 3))
    special = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 1, 1], [1, 2, 3]], dtype=float)
    d = np.concatenate([special, d])
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def sphere_mean_of_monomial(a: int, b: int, c: int) -> float:
    """Mean of x^a y^b z^c over the unit sphere: 2 G(A) G(B) G(C) / G(A+B+C) / (4 pi), A = (a+1)/2."""
    if a % 2 or b % 2 or c % 2:
        return 0.0
    alpha, beta, gamma = (a + 1) / 2, (b + 1) / 2, (c + 1) / 2
    log = math.lgamma(alpha) + math.lgamma(beta) + math.lgamma(gamma) - math.lgamma(alpha + beta + gamma)
    return 2.0 * math.exp(log) / (4.0 * math.pi)


def monomial_errors(points: np.ndarray, weights: np.ndarray, degree: int) -> np.ndarray:
    """Errors of the grid's mean of every monomial x^a y^b z^c with a + b + c = degree, relative to
    the exact mean (high-degree means are tiny); odd monomials average to 0 and get absolute errors."""
    powers = points[:, :, None] ** np.arange(degree + 1)  # (G, 3, degree + 1)
    errors = []
    for a in range(degree + 1):
        b = np.arange(degree + 1 - a)
        grid = (weights * powers[:, 0, a]) @ (powers[:, 1, b] * powers[:, 2, degree - a - b])
        exact = np.array([sphere_mean_of_monomial(a, int(bb), degree - a - int(bb)) for bb in b])
        errors.append(np.abs(grid - exact) / np.where(exact == 0.0, 1.0, exact))
    return np.concatenate(errors)


# ---------------------------------------------------------------------------------------------
# the grid itself


@pytest.mark.parametrize("num_points", sorted(DEGREE_BY_POINTS))
def test_grid_shape_weights_and_unit_points(num_points):
    points, weights = lebedev_grid(num_points)
    assert points.shape == (num_points, 3)
    assert weights.shape == (num_points,)
    assert abs(weights.sum() - 1.0) < 1e-13
    np.testing.assert_allclose(np.linalg.norm(points, axis=1), 1.0, atol=1e-13)
    assert len({tuple(np.round(p, 10)) for p in points}) == num_points  # no duplicated point


@pytest.mark.parametrize("num_points", [6, 14, 26, 38, 50, 74, 86, 110, 194, 302])
def test_grid_integrates_polynomials_up_to_its_degree_and_not_beyond(num_points):
    points, weights = lebedev_grid(num_points)
    degree = DEGREE_BY_POINTS[num_points]
    for d in range(degree + 1):
        assert max(monomial_errors(points, weights, d)) < 1e-11, f"degree {d}"
    # every grid of this family fails at the next (even) degree: shows the check has teeth
    assert max(monomial_errors(points, weights, degree + 1)) > 1e-4


def test_large_grid_integrates_high_degree_polynomials():
    points, weights = lebedev_grid(5810)
    for degree in (40, 80, 130):
        assert max(monomial_errors(points, weights, degree)) < 1e-11


@pytest.mark.parametrize("num_points", sorted(SAFE_B_MAX))
def test_sinc_kernel_accurate_up_to_safe_b_max(num_points):
    """mean_g cos(omega u_g . r) = sinc(omega r) while omega r <= b_max; not at 2 b_max."""
    points, weights = lebedev_grid(num_points)
    b_max = SAFE_B_MAX[num_points]
    assert safe_b_max(num_points) == b_max
    directions = random_directions(48 if num_points > 1000 else 150, seed=num_points)
    projections = directions @ points.T  # (directions, G)

    def worst_error(x: np.ndarray) -> float:
        grid = np.cos(x[:, None, None] * projections[None]) @ weights  # (x, directions)
        exact = np.sinc(x / np.pi)[:, None]  # numpy sinc is sin(pi t) / (pi t)
        return float(np.abs(grid - exact).max())

    assert worst_error(np.linspace(0.0, b_max, 160)) < SINC_TOLERANCE
    assert worst_error(np.linspace(1.9 * b_max, 2.0 * b_max, 40)) > 5e-4


@pytest.mark.parametrize("bad", [0, 1, 7, 51, 5811, -6])
def test_unsupported_grid_size_is_a_clear_value_error(bad):
    with pytest.raises(ValueError, match=f"no Lebedev grid has {bad} points"):
        lebedev_grid(bad)


def test_safe_b_max_outside_table_asks_for_explicit_b_max():
    with pytest.raises(ValueError, match="pass b_max explicitly"):
        safe_b_max(6)
    with pytest.raises(ValueError, match="pass b_max explicitly"):
        ModelConfig(atomic_numbers=[1], grid_points=6)
    assert ModelConfig(atomic_numbers=[1], grid_points=6, b_max=math.pi).b_max == math.pi
    with pytest.raises(ValueError, match="no Lebedev grid"):
        EuclideanFastAttention(8, grid_points=51)


# ---------------------------------------------------------------------------------------------
# the EFA block: Lebedev form vs an independent pairwise reference

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
