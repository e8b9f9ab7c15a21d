"""Model errors (efa_deploy/metrics.py): MAE and RMSE of energies, energies per atom, force
components and forces per element against numbers worked out by hand; predictions of a real
model that do not depend on how the data set is batched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from efa_deploy.training.data import GraphDataset
from efa_deploy.graph import structure_graph
from efa_deploy.training.metrics import Predictions, error_report, error_summary, evaluate, predict
from efa_deploy.model import ModelConfig, energy_and_forces

from helpers import TINY_MODEL, lj_structures, randomised_model


def hand_made() -> Predictions:
    """Two structures (2 and 1 atoms: H O | H) with errors chosen to be summed by hand."""
    return Predictions(
        energy=np.array([1.0, -2.0]), energy_ref=np.array([0.0, 1.0]),  # errors +1 and -3 eV
        n_atoms=np.array([2, 1]),
        forces=np.array([[0.1, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, -0.4, 0.0]]),
        forces_ref=np.zeros((3, 3)),
        numbers=np.array([1, 8, 1]),
    )


def test_energy_and_force_errors_match_the_hand_sums():
    summary = error_summary(hand_made())
    assert summary["energy_mae"] == pytest.approx((1 + 3) / 2)
    assert summary["energy_rmse"] == pytest.approx(math.sqrt((1 + 9) / 2))
    # per atom: +1/2 and -3/1
    assert summary["energy_per_atom_mae"] == pytest.approx((0.5 + 3) / 2)
    assert summary["energy_per_atom_rmse"] == pytest.approx(math.sqrt((0.25 + 9) / 2))
    # nine force components, two of them wrong (0.1 and 0.4)
    assert summary["forces_mae"] == pytest.approx(0.5 / 9)
    assert summary["forces_rmse"] == pytest.approx(math.sqrt(0.17 / 9))


def test_the_report_adds_counts_and_per_element_force_errors():
    report = error_report(hand_made())
    assert report["structures"] == 2 and report["atoms"] == 3
    # H: atoms 0 and 2, six components, errors 0.1 and 0.4; O: atom 1, no error
    assert report["forces_mae_by_element"] == pytest.approx({"H": 0.5 / 6, "O": 0.0})
    assert {k: report[k] for k in error_summary(hand_made())} == error_summary(hand_made())


def test_negative_control_the_element_assignment_and_exact_predictions_matter():
    """The same errors assigned to the other element move to it; exact predictions have none."""
    swapped = hand_made()
    swapped.numbers = np.array([8, 1, 8])
    assert error_report(swapped)["forces_mae_by_element"] == pytest.approx({"H": 0.0, "O": 0.5 / 6})
    exact = hand_made()
    exact.energy, exact.forces = exact.energy_ref.copy(), exact.forces_ref.copy()
    assert all(value == 0.0 for value in error_summary(exact).values())


@pytest.fixture(scope="module")
def model_and_data():
    config = ModelConfig(atomic_numbers=[6, 8], **TINY_MODEL)
    dataset = GraphDataset(lj_structures(7, seed=5), config.atomic_numbers, config.cutoff, torch.float64)
    return randomised_model(config, seed=2), dataset


def test_predictions_are_those_of_the_model_structure_by_structure(model_and_data):
    """predict batches structures together; each energy and force equals the model's on that
    structure alone, and the references are the data set's."""
    model, dataset = model_and_data
    p = predict(model, dataset, batch_size=3)
    start = 0
    for k, atoms in enumerate(dataset.structures):
        graph = structure_graph(atoms, [6, 8], TINY_MODEL["cutoff"])
        energy, forces, _ = energy_and_forces(model, *graph.inputs())
        n = len(atoms)
        assert p.energy[k] == pytest.approx(float(energy.detach()[0]), rel=1e-12, abs=1e-12)
        np.testing.assert_allclose(p.forces[start:start + n], forces.detach().numpy(), rtol=0, atol=1e-12)
        np.testing.assert_array_equal(p.forces_ref[start:start + n], atoms.get_forces())
        np.testing.assert_array_equal(p.numbers[start:start + n], atoms.numbers)
        assert p.energy_ref[k] == atoms.get_potential_energy() and p.n_atoms[k] == n
        start += n
    assert start == len(p.numbers)
    assert evaluate(model, dataset, batch_size=1) == pytest.approx(evaluate(model, dataset, batch_size=7), rel=1e-12)
