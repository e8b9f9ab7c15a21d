"""Shared by the fused-operator tests (test_fused.py, test_fused_efa.py): the float64 comparison,
and a model's energies and forces on its fused and its reference path."""

from __future__ import annotations

import torch
from ase.io import read

from efa_deploy.model import ModelConfig, energy_and_forces, use_fused

from conftest import REPO, randomised_model

RTOL = 1e-12
CONFIG = ModelConfig(atomic_numbers=[1, 8], features=16, num_layers=2, cutoff=4.0, r_max=30.0)
MESSAGE_OPS = {"efa::message", "efa::message_backward"}
EFA_OPS = {"efa::attention_keys", "efa::attention_keys_backward", "efa::attention_queries",
           "efa::attention_queries_backward"}


def assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float = RTOL) -> None:
    """Equal to rtol relative to each tensor's largest entry."""
    for a, b in zip(actual, expected, strict=True):
        assert a.shape == b.shape
        scale = b.abs().max().item() if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=0, atol=rtol * max(scale, 1e-300))


def water_cluster():
    water = read(REPO / "export" / "water16.xyz")
    water.center()
    return water


def model_outputs(model, graph, fused_ops: set[str]):
    """Energies, forces and per-atom energies; checks that exactly the fused operators `fused_ops` ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        energy, forces, atomic = energy_and_forces(model, *graph.inputs())
    ran = {event.name for event in profile.events()} & (MESSAGE_OPS | EFA_OPS)
    assert ran == fused_ops, (ran, fused_ops)
    return [energy.detach(), forces.detach(), atomic.detach()]


def fused_and_reference(graph, config=CONFIG, script=False, model=None):
    model = (randomised_model(config) if model is None else model).eval()  # inference, as exported files
    wrap = torch.jit.script if script else (lambda m: m)
    reference = model_outputs(wrap(use_fused(model, False)), graph, set())
    fused = model_outputs(wrap(use_fused(model, True)), graph, MESSAGE_OPS | (EFA_OPS if config.use_efa else set()))
    assert reference[0].abs().max() > 0.01 or graph.positions.shape[0] == 0  # a model that does something
    return fused, reference
