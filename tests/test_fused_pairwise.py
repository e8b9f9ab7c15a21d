"""efa::pairwise_attention (ops/fused_pairwise.cpp), the exact pairwise form training takes for
small structures, against its pure-torch reference (pairwise.pairwise_attention_reference) in float64:
outputs, first derivatives and the second derivatives force training takes (1e-12 relative), on
several structures of different sizes with a zero frequency, pairs closer than the sinc series'
threshold and ghosts; gradcheck and gradgradcheck against finite differences; a whole training
step (parameters after Adam) equal on both paths; a negative control; clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from efa_deploy.model import ModelConfig, build_model, energy_and_forces
from efa_deploy.model.efa import frequencies
from efa_deploy.model.pairwise import pairwise_attention_reference
from efa_deploy.model.erope import padded_slots
from efa_deploy.paths import OPS_LIBRARY

from helpers import assert_close, water_cluster

pytestmark = pytest.mark.skipif(not OPS_LIBRARY.exists(), reason="libefa_ops.so is not built (make build)")

# the model's evenly spaced frequencies (one sin/cos per pair and the angle-addition recurrence) with
# l = 1 channels repeating them, and uneven ones (sin/cos per distinct frequency)
LADDER = torch.cat([frequencies(6, math.pi, 10.0), frequencies(3, math.pi, 10.0).repeat(3)]).double()
UNEVEN = torch.cat([frequencies(4, math.pi, 10.0), torch.tensor([0.37, 2.5, 0.37])]).double()
OMEGA = UNEVEN
R_MAX = 12.0  # the random structures below are at most 6 sqrt(3) A across


def inputs(sizes=(5, 1, 7), seed=0, close_pair=True, omega=OMEGA):
    g = torch.Generator().manual_seed(seed)
    n, m = sum(sizes), omega.numel()
    positions = torch.rand(n, 3, generator=g, dtype=torch.float64) * 6.0
    if close_pair:  # omega r below 0.5 for every channel: the sinc series
        positions[1] = positions[0] + torch.tensor([0.05, -0.02, 0.03], dtype=torch.float64)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    slot, n_max = padded_slots(batch, len(sizes))
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return [positions, rand(n, m, 2), rand(n, m, 2), rand(n, 4)], (omega, slot, len(sizes), n_max, R_MAX)


def first_and_second(op, leaves, constants, seed=1):
    """y, the gradients of a random functional of y, and the gradients of a random functional of
    those (what force training differentiates), with respect to every input."""
    leaves = [t.clone().requires_grad_(True) for t in leaves]
    y = op(*leaves, *constants)
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(y.shape, generator=g, dtype=y.dtype, requires_grad=True)
    first = torch.autograd.grad((y * weights).sum(), leaves, create_graph=True)
    second = torch.autograd.grad(sum((f * torch.randn(f.shape, generator=g, dtype=f.dtype)).sum() for f in first),
                                 leaves + [weights])
    return [y.detach()] + [f.detach() for f in first] + list(second)


@pytest.mark.parametrize("omega", [LADDER, UNEVEN], ids=["ladder", "uneven"])
@pytest.mark.parametrize("sizes", [(5, 1, 7), (6,), (3, 0, 4)], ids=["three structures", "one", "an empty one"])
def test_operator_equals_reference_with_first_and_second_derivatives(sizes, omega):
    leaves, constants = inputs(sizes if 0 not in sizes else (3, 4), omega=omega)
    if 0 in sizes:  # an empty structure in the middle: slots of structure 2 follow an empty one
        batch = torch.tensor([0] * 3 + [2] * 4)
        slot, n_max = padded_slots(batch, 3)
        constants = (omega, slot, 3, n_max, R_MAX)
    fused = first_and_second(torch.ops.efa.pairwise_attention, leaves, constants)
    reference = first_and_second(pairwise_attention_reference, leaves, constants)
    assert_close(fused, reference)
    assert all(float(t.abs().max()) > 0 for t in fused)


@pytest.mark.parametrize("omega", [LADDER, UNEVEN], ids=["ladder", "uneven"])
def test_gradcheck_and_gradgradcheck(omega):
    leaves, constants = inputs((4, 3), seed=3, omega=omega)
    leaves = [t.requires_grad_(True) for t in leaves]
    op = lambda *x: torch.ops.efa.pairwise_attention(*x, *constants)  # noqa: E731
    assert torch.autograd.gradcheck(op, leaves)
    assert torch.autograd.gradgradcheck(op, leaves)


def test_negative_control_a_wrong_frequency_is_seen():
    leaves, (omega, *rest) = inputs()
    shifted = omega.clone()
    shifted[2] *= 1.0 + 1e-6
    fused = first_and_second(torch.ops.efa.pairwise_attention, leaves, (shifted, *rest))
    reference = first_and_second(pairwise_attention_reference, leaves, (omega, *rest))
    with pytest.raises(AssertionError):
        assert_close(fused, reference)


def test_a_third_derivative_raises():
    leaves, constants = inputs((3,))
    leaves = [t.requires_grad_(True) for t in leaves]
    y = torch.ops.efa.pairwise_attention(*leaves, *constants)
    (gp,) = torch.autograd.grad(y.sum(), leaves[:1], create_graph=True)
    (hp,) = torch.autograd.grad(gp.square().sum(), leaves[:1], create_graph=True)
    with pytest.raises(RuntimeError, match="third derivative"):
        torch.autograd.grad(hp.sum(), leaves[:1])


def test_bad_inputs_raise_clear_errors():
    (positions, q, k, v), (omega, slot, b, n_max, r_max) = inputs((3, 4))
    with pytest.raises(RuntimeError, match="keys must have the queries' shape"):
        torch.ops.efa.pairwise_attention(positions, q, k[:, :2], v, omega, slot, b, n_max, r_max)
    with pytest.raises(RuntimeError, match="one frequency per channel"):
        torch.ops.efa.pairwise_attention(positions, q, k, v, omega[:2], slot, b, n_max, r_max)
    with pytest.raises(RuntimeError, match="shared with another atom"):
        torch.ops.efa.pairwise_attention(positions, q, k, v, omega, torch.zeros_like(slot), b, n_max, r_max)


@pytest.mark.parametrize("op", [torch.ops.efa.pairwise_attention, pairwise_attention_reference],
                         ids=["operator", "reference"])
def test_atoms_farther_apart_than_r_max_are_refused(op):
    """The grid form a model is exported with would alias them; a structure that fits passes, one
    whose farthest pair is 1e-6 beyond r_max is refused, naming the distance and the fix."""
    (positions, q, k, v), (omega, slot, b, n_max, _) = inputs((3, 4), close_pair=False)
    farthest = max(float(torch.cdist(part, part).max()) for part in (positions[:3], positions[3:]))
    op(positions, q, k, v, omega, slot, b, n_max, farthest + 1e-6)
    with pytest.raises(ValueError, match=r"atoms .* apart, more than r_max = .*model.train_pairwise_max_atoms: 0"):
        op(positions, q, k, v, omega, slot, b, n_max, farthest - 1e-6)


@pytest.mark.parametrize("options", [dict(), dict(value_tensors=2, num_vector_frequencies=2, value_vectors=2)],
                         ids=["scalar values", "l = 1 channels, vector and tensor values"])
def test_a_training_step_equals_the_reference_path(monkeypatch, options):
    """Energy + force loss, backward, Adam: the parameters after two steps are the same whether the
    blocks take the operator or the reference (the reference's registration replaced for the run)."""
    from efa_deploy.graph import batch_graph

    config = ModelConfig(atomic_numbers=[1, 8], features=8, num_layers=2, cutoff=3.0, r_max=30.0,
                         train_pairwise_max_atoms=64, **options)
    water = water_cluster()
    structures = [water[:9], water[9:21]]  # 3 and 4 molecules
    graph = batch_graph(structures, config.atomic_numbers, config.cutoff, torch.float64)

    def train(op):
        monkeypatch.setattr(torch.ops.efa, "pairwise_attention", op, raising=False)
        torch.manual_seed(0)
        model = build_model(config, torch.float64).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(2):
            energy, forces, _ = energy_and_forces(model, *graph.inputs(), create_graph=True)
            loss = energy.square().sum() + forces.square().sum()
            optimizer.zero_grad()
            loss.backward(inputs=list(model.parameters()))  # as efa-train: no second derivative of positions
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()]

    fused = train(torch.ops.efa.pairwise_attention)
    reference = train(pairwise_attention_reference)
    assert_close(fused, reference, rtol=1e-10)
