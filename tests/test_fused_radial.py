"""The fused radial basis torch.ops.efa.radial_basis against the reference radial_basis: float64
equality (1e-12 relative) of the basis, the envelope and the gradient of r, inside and beyond the
cutoff and with no edges; finite differences; a clear error on double backward; a negative
control. The whole model with it: test_fused.py."""

from __future__ import annotations

import math

import pytest
import torch

from efa_deploy.model.local import radial_basis
from efa_deploy.ops import RADIAL_SCHEMA
from efa_deploy.paths import OPS_LIBRARY

from helpers import assert_close

pytestmark = pytest.mark.skipif(not OPS_LIBRARY.exists(), reason="libefa_ops.so is not built (make build)")

CUTOFF = 4.0
N_PI = math.pi * torch.arange(1, 9, dtype=torch.float64) / CUTOFF


def lengths(edges: int, seed: int = 0) -> torch.Tensor:
    """Edge lengths in (0.3, 1.25 cutoff): a fifth beyond the cutoff (envelope and slope zero)."""
    g = torch.Generator().manual_seed(seed)
    return 0.3 + (1.25 * CUTOFF - 0.3) * torch.rand(edges, generator=g, dtype=torch.float64)


def outputs_and_gradient(op, r: torch.Tensor, n_pi: torch.Tensor = N_PI) -> list[torch.Tensor]:
    r = r.clone().requires_grad_(True)
    rbf, envelope = op(r, n_pi, CUTOFF)
    g = torch.Generator().manual_seed(1)
    loss = (rbf * torch.randn(rbf.shape, generator=g, dtype=r.dtype)).sum() + (
        envelope * torch.randn(envelope.shape, generator=g, dtype=r.dtype)).sum()
    (grad,) = torch.autograd.grad(loss, r)
    return [rbf, envelope, grad]


@pytest.mark.parametrize("edges", [0, 1, 500])
def test_operator_equals_reference(edges):
    r = lengths(edges)
    fused = outputs_and_gradient(torch.ops.efa.radial_basis, r)
    assert_close(fused, outputs_and_gradient(radial_basis, r))
    if edges > 1:
        beyond = r >= CUTOFF
        assert beyond.any() and (fused[1][beyond] == 0).all() and (fused[1][~beyond] > 0).all()


def test_float32_follows_the_reference():
    r = lengths(500).float()
    assert_close(outputs_and_gradient(torch.ops.efa.radial_basis, r, N_PI.float()),
                 outputs_and_gradient(radial_basis, r, N_PI.float()), rtol=1e-5)


def test_a_perturbed_length_fails_the_comparison():
    """Negative control: a 1e-9 relative change of r is caught."""
    r = lengths(200)
    with pytest.raises(AssertionError):
        assert_close(outputs_and_gradient(torch.ops.efa.radial_basis, r), outputs_and_gradient(radial_basis, r * (1 + 1e-9)))


def test_first_derivatives_match_finite_differences():
    r = lengths(20).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: torch.ops.efa.radial_basis(x, N_PI, CUTOFF), (r,))


def test_double_backward_raises():
    r = lengths(10).requires_grad_(True)
    rbf, envelope = torch.ops.efa.radial_basis(r, N_PI, CUTOFF)
    (g,) = torch.autograd.grad((rbf ** 2).sum() + envelope.sum(), r, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative.*use_fused"):
        g.sum().backward()


def test_bad_inputs_raise_clear_errors_and_meta_shapes():
    with pytest.raises(RuntimeError, match=r"r must be \(E,\)"):
        torch.ops.efa.radial_basis(lengths(6).reshape(3, 2), N_PI, CUTOFF)
    with pytest.raises(RuntimeError, match="n_pi must have r's dtype"):
        torch.ops.efa.radial_basis(lengths(6).float(), N_PI, CUTOFF)
    assert str(torch.ops.efa.radial_basis.default._schema) == "efa::" + RADIAL_SCHEMA
    rbf, envelope = torch.ops.efa.radial_basis(lengths(6).to("meta"), N_PI.to("meta"), CUTOFF)
    assert rbf.shape == (6, 8) and envelope.shape == (6, 1) and rbf.device.type == "meta"
