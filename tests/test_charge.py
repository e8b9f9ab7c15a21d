"""Total charge and spin multiplicity as global model inputs: the model learns a charge
dependence that a neutral model cannot (negative control), data files carry the values, model
files record them, and every host (ASE calculator, LAMMPS at 1 and 2 ranks, the driver, efa-md)
passes them alike, with the same rule: a charge model needs a charge, a neutral model refuses one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase.io import read, write

from efa_deploy import EFACalculator
from efa_deploy.cli.eval import evaluate_file
from efa_deploy.cli.export import main as export_main
from efa_deploy.cli.md import main as efa_md_main
from efa_deploy.training.data import GraphDataset, fit_energy_shifts, load_structures
from efa_deploy.graph import batch_graph
from efa_deploy.lammps import EFASimulation
from efa_deploy.model import ChargedEnergyModel, EnergyModel, ModelConfig, build_model, energy_and_forces
from efa_deploy.modelfile import convert_model_file, load_model_file, read_metadata, rebuild_model, save_model_file
from efa_deploy.training.metrics import evaluate
from efa_deploy.training.train import Run

from helpers import (TINY_MODEL, jittered_cluster, lj_structures, randomised_model, run_lammps, static_run, tiny_config,
                     write_data, write_npz)

ELEMENTS = ["H", "C", "O"]
SETTINGS = dict(atomic_numbers=[1, 6, 8], features=8, num_layers=2, cutoff=3.5, r_max=20.0)


def charged_structures(count: int, seed: int = 0):
    """Lennard-Jones clusters with a random total charge Q in {-1, 0, 1} and multiplicity M in
    {1, 2, 3}, whose energy carries n_atoms * (0.5 Q + 0.2 (M - 1)): a dependence no function of
    the positions can fit."""
    rng = np.random.default_rng(seed + 100)
    structures = lj_structures(count, seed)
    for atoms in structures:
        q, m = int(rng.integers(-1, 2)), int(rng.integers(1, 4))
        atoms.info.update(charge=q, spin=m)
        atoms.calc.results["energy"] += len(atoms) * (0.5 * q + 0.2 * (m - 1))
    return structures


@pytest.fixture(scope="module")
def data_npz(tmp_path_factory):
    structures = charged_structures(40)
    path = tmp_path_factory.mktemp("data") / "charged.npz"
    write_npz(path, structures, total_charge=np.array([a.info["charge"] for a in structures], dtype=float),
              spin=np.array([a.info["spin"] for a in structures]))
    return path


@pytest.fixture(scope="module")
def charge_model(tmp_path_factory):
    """A float64 file of a randomised EFA model trained on charge and spin."""
    config = ModelConfig(**SETTINGS, charge_input=True, spin_input=True)
    path = tmp_path_factory.mktemp("model") / "charged.pt"
    model = randomised_model(config, seed=2)
    with torch.no_grad():
        model.global_embedding.weight.normal_(0.0, 0.5)
    save_model_file(model, config, path)
    return path


@pytest.fixture(scope="module")
def neutral_model(tmp_path_factory):
    config = ModelConfig(**SETTINGS)
    path = tmp_path_factory.mktemp("model") / "neutral.pt"
    save_model_file(randomised_model(config, seed=2), config, path)
    return path


@pytest.fixture(scope="module")
def cluster():
    return jittered_cluster(24, seed=3)


def calculator_results(model, atoms, **kwargs):
    atoms = atoms.copy()
    atoms.calc = EFACalculator(model, **kwargs)
    return atoms.get_potential_energy(), atoms.get_forces()


# ---- the model -------------------------------------------------------------------------------------


def test_neutral_model_keeps_seven_inputs_and_its_parameter_names():
    neutral = build_model(ModelConfig(**SETTINGS))
    charged = build_model(ModelConfig(**SETTINGS, spin_input=True))
    assert type(neutral) is EnergyModel and isinstance(charged, ChargedEnergyModel)
    assert set(charged.state_dict()) - set(neutral.state_dict()) == {"global_embedding.weight"}
    assert set(neutral.state_dict()) <= set(charged.state_dict())
    assert len(torch.jit.script(neutral).forward.schema.arguments) == 1 + 7
    assert len(torch.jit.script(charged).forward.schema.arguments) == 1 + 8


def test_unused_column_is_ignored_and_the_used_one_matters(cluster):
    """A charge-only model ignores the multiplicity column; its energy moves with the charge."""
    model = randomised_model(ModelConfig(**SETTINGS, charge_input=True), seed=5)
    graph = batch_graph([cluster] * 4, SETTINGS["atomic_numbers"], SETTINGS["cutoff"])
    charge_spin = torch.tensor([[0.0, 1.0], [0.0, 3.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    energy, forces, _ = energy_and_forces(model, *graph.inputs(), charge_spin)
    assert energy[1].item() == pytest.approx(energy[0].item(), abs=1e-12)
    assert abs(energy[2].item() - energy[0].item()) > 1e-3 and abs(energy[3].item() - energy[2].item()) > 1e-3
    n = len(cluster)
    assert float((forces[2 * n : 3 * n] - forces[:n]).abs().max()) > 1e-6  # the charge reaches the forces too


def fitted_energy_error(flags: dict, structures, steps: int = 100) -> float:
    """Held-out energy MAE of the tiny EFA model fitted to the energies of the first 32
    structures (Adam, full batch), with the given global-input flags."""
    config = ModelConfig(atomic_numbers=[6, 8], **TINY_MODEL, **flags)
    train_set, test_set = (GraphDataset(part, config.atomic_numbers, config.cutoff, global_inputs=config.global_inputs)
                           for part in (structures[:32], structures[32:]))
    torch.manual_seed(0)
    model = build_model(config)
    model.energy_shift.copy_(torch.from_numpy(fit_energy_shifts(train_set.structures, config.atomic_numbers)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def energies(dataset):
        graph = dataset.batch(range(len(dataset))).graph
        return torch.zeros(graph.n_structures, dtype=torch.float64).index_add(0, graph.batch, model(*graph.inputs()))

    for _ in range(steps):
        loss = (energies(train_set) - train_set.energy).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((energies(test_set) - test_set.energy).abs().mean())


def test_charge_model_learns_what_a_neutral_model_cannot():
    """The same tiny EFA model and budget on clusters whose energy depends on Q and M: with the
    global inputs the held-out energy error drops far below the negative control's."""
    structures = charged_structures(40)
    charged = fitted_energy_error({"charge_input": True, "spin_input": True}, structures)
    control = fitted_energy_error({}, structures)
    assert control > 1.0  # the signal is there: about 2 eV of Q- and M-dependent energy
    assert charged < 0.2 * control, (charged, control)


def test_training_validation_and_export_check_carry_the_charges(data_npz, tmp_path):
    """efa-train reads total_charge and spin from the npz and feeds them to training and
    validation; efa-export --check compares the file on the held-out split with its charges."""
    config = tiny_config(data_npz, tmp_path / "run")
    config["model"].update(charge_input=True, spin_input=True)
    run = Run(config)
    indices = run.batch_indices(0)
    expected = [[run.train_set.structures[i].info[k] for k in ("charge", "spin")] for i in indices]
    np.testing.assert_array_equal(run.train_set.batch(indices).graph.charge_spin.numpy(), expected)
    assert np.isfinite(float(run.train_step()[0])) and np.isfinite(evaluate(run.model, run.val_set)["energy_mae"])
    run.save("last.ckpt")
    assert export_main([str(tmp_path / "run" / "last.ckpt"), "-o", str(tmp_path / "m.pt"), "--check"]) == 0
    assert read_metadata(tmp_path / "m.pt")["global_inputs"] == ["charge", "spin"]


def test_training_refuses_data_without_the_charge(tmp_path):
    write_npz(tmp_path / "plain.npz", lj_structures(40))
    config = tiny_config(tmp_path / "plain.npz", tmp_path / "run")
    config["model"]["charge_input"] = True
    with pytest.raises(ValueError, match=r"sets charge_input: true but structure 0 of the training set has no "
                                         r"charge; add the npz key 'total_charge' or extxyz/ASE info key 'charge'"):
        Run(config)


# ---- data files ------------------------------------------------------------------------------------


def test_npz_and_extxyz_carry_charge_and_spin(data_npz, tmp_path):
    from_npz = load_structures(data_npz)
    write(tmp_path / "d.extxyz", from_npz)
    assert "charge=" in (tmp_path / "d.extxyz").read_text()
    from_extxyz = load_structures(tmp_path / "d.extxyz")
    expected = charged_structures(40)
    for structures in (from_npz, from_extxyz):
        assert [(a.info["charge"], a.info["spin"]) for a in structures] == \
               [(a.info["charge"], a.info["spin"]) for a in expected]
        dataset = GraphDataset(structures, [6, 8], 3.0, global_inputs=["charge", "spin"])
        batch = dataset.batch([0, 1, 2])
        np.testing.assert_array_equal(batch.graph.charge_spin.numpy(),
                                      [[a.info["charge"], a.info["spin"]] for a in expected[:3]])
        assert len(batch.graph.inputs()) == 8
    spin_only = GraphDataset(from_npz[:3], [6, 8], 3.0, global_inputs=["spin"]).batch([0, 1, 2]).graph
    np.testing.assert_array_equal(spin_only.charge_spin[:, 0].numpy(), 0.0)  # the unused column is neutral
    assert len(GraphDataset(from_npz[:3], [6, 8], 3.0).batch([0]).graph.inputs()) == 7


def test_missing_or_bad_values_name_the_key(tmp_path):
    plain = lj_structures(3)
    with pytest.raises(ValueError, match=r"spin_input: true but structure 0 of set.npz has no spin; add the npz key "
                                         r"'spin' or extxyz/ASE info key 'spin'"):
        GraphDataset(plain, [6, 8], 3.0, global_inputs=["spin"], source="set.npz")
    plain[1].info["spin"] = 0
    plain[0].info["spin"] = 2
    with pytest.raises(ValueError, match=r"structure 1 of set.npz: spin is the multiplicity 2S\+1, a whole number"):
        GraphDataset(plain, [6, 8], 3.0, global_inputs=["spin"], source="set.npz")


# ---- the model file --------------------------------------------------------------------------------


def test_model_file_roundtrip(charge_model, data_npz, tmp_path):
    meta = read_metadata(charge_model)
    assert meta["inputs"][-1] == "charge_spin" and meta["global_inputs"] == ["charge", "spin"]
    module, _ = load_model_file(charge_model)
    eager, config, _ = rebuild_model(charge_model)
    assert isinstance(eager, ChargedEnergyModel) and config.global_inputs == ["charge", "spin"]
    structures = load_structures(data_npz)[:6]
    batch = GraphDataset(structures, config.atomic_numbers, config.cutoff, global_inputs=config.global_inputs).batch(
        range(6))
    scripted = energy_and_forces(module, *batch.graph.inputs())
    reference = energy_and_forces(eager, *batch.graph.inputs())
    for a, b in zip(scripted, reference):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-10, atol=1e-12)
    converted = convert_model_file(charge_model, tmp_path / "converted.pt")
    assert converted["global_inputs"] == ["charge", "spin"] and converted["inputs"] == meta["inputs"]


def test_efa_eval_passes_the_charges(charge_model, data_npz):
    report, predictions = evaluate_file(charge_model, data_npz, batch_size=5)
    structures = load_structures(data_npz)
    for k in (0, 7, 13):
        energy, _ = calculator_results(charge_model, structures[k])
        assert predictions.energy[k] == pytest.approx(energy, rel=1e-10)
    assert report["structures"] == 40


# ---- hosts: calculator, LAMMPS, driver, efa-md -------------------------------------------------------


@pytest.fixture(scope="module")
def python_charged(charge_model, cluster):
    return calculator_results(charge_model, cluster, charge=1.0, spin=2)


def test_calculator_reads_atoms_info_first(charge_model, cluster, python_charged):
    energy, forces = python_charged
    atoms = cluster.copy()
    atoms.info.update(charge=1, spin=2)
    atoms.calc = EFACalculator(charge_model, charge=-1.0, spin=1)
    assert atoms.get_potential_energy() == pytest.approx(energy, rel=1e-12)
    atoms.info["charge"] = 0  # a new charge is a new calculation, although no atom moved
    neutral = atoms.get_potential_energy()
    assert abs(neutral - energy) > 1e-3
    assert neutral == pytest.approx(calculator_results(charge_model, cluster, charge=0, spin=2)[0], rel=1e-12)


@pytest.mark.mpi
def test_lammps_equals_the_calculator_at_one_and_two_ranks(tmp_path, charge_model, cluster, python_charged):
    energy, forces = python_charged
    write_data(cluster, tmp_path / "data.lmp", ELEMENTS)
    neutral = static_run(tmp_path, charge_model, ELEMENTS, pair_args="charge 0 spin 2")
    assert abs(neutral.energy - energy) > 1e-3  # the charge really reaches the model
    for nprocs in (1, 2):
        result = static_run(tmp_path, charge_model, ELEMENTS, nprocs=nprocs, pair_args="charge 1 spin 2")
        assert result.energy == pytest.approx(energy, rel=1e-10)
        np.testing.assert_allclose(result.forces, forces, rtol=0, atol=1e-10 * np.abs(forces).max())
    assert "pair_style efa: total charge 1 e, spin multiplicity 2" in (tmp_path / "log.lammps").read_text()


def test_driver_passes_the_charge(charge_model, cluster, python_charged):
    sim = EFASimulation(cluster, charge_model, charge=1.0, spin=2)
    try:
        assert sim.energy() == pytest.approx(python_charged[0], rel=1e-10)
        np.testing.assert_allclose(sim.forces(), python_charged[1], rtol=0,
                                   atol=1e-10 * np.abs(python_charged[1]).max())
    finally:
        sim.close()


def test_a_neutral_model_runs_at_charge_zero(neutral_model, cluster, tmp_path):
    reference, _ = calculator_results(neutral_model, cluster)
    assert calculator_results(neutral_model, cluster, charge=0, spin=1)[0] == reference
    write_data(cluster, tmp_path / "data.lmp", ELEMENTS)
    assert static_run(tmp_path, neutral_model, ELEMENTS, pair_args="charge 0 spin 1").energy == \
        pytest.approx(reference, rel=1e-10)


MISSING = "the model was trained on total charge: give the system's total charge in e"
REFUSED = "the model was trained without total charge (neutral, fixed-charge data) and cannot use a charge"
NO_SPIN = "the model was trained on spin multiplicity: give the system's spin multiplicity 2S+1"


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [1, 2])
@pytest.mark.parametrize("model, pair_args, message", [
    ("charge_model", "spin 2", MISSING + " (pair_style efa ... charge Q)"),
    ("charge_model", "charge 1", NO_SPIN),
    ("neutral_model", "charge -1", REFUSED + ": got charge -1; give charge 0 or none"),
    ("neutral_model", "spin 3", "trained without spin multiplicity (neutral, fixed-spin data) and cannot use a spin"),
    ("neutral_model", "spin 1.5", "spin is the multiplicity 2S+1, a whole number >= 1, not '1.5'"),
    ("neutral_model", "charge nan", "Expected floating point parameter instead of 'nan'"),
], ids=["charge missing", "spin missing", "charge refused", "spin refused", "bad spin", "bad charge"])
def test_lmp_errors(request, tmp_path, cluster, nprocs, model, pair_args, message):
    write_data(cluster, tmp_path / "data.lmp", ELEMENTS)
    deck = f"""units metal
boundary f f f
atom_style atomic
read_data data.lmp
pair_style efa {pair_args}
pair_coeff * * {request.getfixturevalue(model)} H C O
run 0
"""
    with pytest.raises(RuntimeError) as info:
        run_lammps(deck, tmp_path, nprocs, timeout=120)
    assert message in str(info.value)


def test_python_hosts_refuse_alike(charge_model, neutral_model, cluster, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"trained on total charge: .*EFACalculator\(\.\.\., charge=Q\)"):
        calculator_results(charge_model, cluster, spin=2)
    charged = cluster.copy()
    charged.info["charge"] = 1
    with pytest.raises(ValueError, match=r"trained without total charge .* got charge 1; give charge 0 or none"):
        calculator_results(neutral_model, charged)
    with pytest.raises(ValueError, match=r"charge must be a finite number of e, not nan"):
        EFACalculator(charge_model, charge=float("nan"))
    with pytest.raises(ValueError, match=r"trained on total charge: .*EFASimulation\(\.\.\., charge=Q\)"):
        EFASimulation(cluster, charge_model, spin=2)
    with pytest.raises(ValueError, match=r"trained without spin multiplicity"):
        EFASimulation(cluster, neutral_model, spin=2)
    write(tmp_path / "cluster.extxyz", cluster)
    for model, flags, expected in ((neutral_model, ["--charge", "1"], REFUSED),
                                   (charge_model, ["--spin", "2"], MISSING + " (--charge Q)")):
        code = efa_md_main([str(tmp_path / "cluster.extxyz"), "-m", str(model), "-n", "2", *flags,
                            "-o", str(tmp_path / "md.extxyz"), "--no-progress"])
        assert code == 2 and expected in capsys.readouterr().err


def test_efa_md_runs_a_charged_model(charge_model, cluster, tmp_path, capsys):
    """--charge and --spin reach the plugin: the first potential energy is the calculator's."""
    write(tmp_path / "cluster.extxyz", cluster)
    code = efa_md_main([str(tmp_path / "cluster.extxyz"), "-m", str(charge_model), "-n", "4", "--charge", "1",
                        "--spin", "2", "-e", "nve", "-T", "0", "-o", str(tmp_path / "md.extxyz"), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "md.summary.json").read_text())
    expected, _ = calculator_results(charge_model, read(tmp_path / "cluster.extxyz"), charge=1, spin=2)  # 8 digits
    assert summary["potential_energy_first_eV"] == pytest.approx(expected, rel=1e-10)
