"""The periodic form of EFA (efa_deploy/model/reciprocal.py) against independent references:
supercells, equivalent cells, finite differences of positions and strain, the O(N^2) pairwise
form, a brute-force real-space image sum of the kernel, the stress work along a strain path on
which k-vectors cross the cutoff, and LAMMPS at 1-4 ranks (triclinic, empty domains, NPT,
restarts, bad input)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.io import read, write
from scipy.spatial.transform import Rotation

from efa_deploy.calculator import EFACalculator
from efa_deploy.graph import batch_graph
from efa_deploy.model import ModelConfig, energy_forces_stress, use_fused
from efa_deploy.model.reciprocal import kernel_weights, lattice_indices, reciprocal_terms
from efa_deploy.modelfile import read_metadata, save_model_file
from helpers import randomised_model, run_lammps, static_run, write_data

REPO = Path(__file__).resolve().parents[1]
CONFIG = ModelConfig(atomic_numbers=[1, 8], features=8, num_layers=2, cutoff=3.0, num_radial=4, periodic_efa=True,
                     k_max=1.6, r_max=8.0, num_frequencies=3, value_dim=4, value_tensors=2, value_vectors=2,
                     num_vector_frequencies=1)
CELL = np.array([[6.5, 0.0, 0.0], [1.2, 7.0, 0.0], [0.7, -0.9, 6.8]])


def crystal(n: int = 12, cell=CELL, seed: int = 0) -> Atoms:
    rng = np.random.default_rng(seed)
    return Atoms(numbers=rng.choice([1, 8], n), scaled_positions=rng.uniform(0, 1, (n, 3)), cell=cell, pbc=True)


@pytest.fixture(scope="module")
def model():
    return randomised_model(CONFIG)


def evaluate(model, atoms):
    graph = batch_graph([atoms], CONFIG.atomic_numbers, CONFIG.cutoff, cell=True)
    energy, forces, _, stress = (t.detach() for t in energy_forces_stress(model, *graph.inputs()))
    return float(energy.sum()), forces.numpy(), stress[0].numpy()


def set_exact(model, exact: bool):
    for block in model.modules():
        if hasattr(block, "exact"):
            block.exact = exact


# ---- symmetries and consistency

def test_supercell_gives_the_same_energy_per_atom_forces_and_stress(model):
    atoms = crystal()
    e, f, s = evaluate(model, atoms)
    for reps in ((2, 2, 2), (1, 3, 1)):
        big = atoms * reps
        e2, f2, s2 = evaluate(model, big)
        count = int(np.prod(reps))
        assert abs(e2 / (count * len(atoms)) - e / len(atoms)) < 1e-10
        for image in range(count):  # ase repeats the atoms block by block
            np.testing.assert_allclose(f2[image * len(atoms):(image + 1) * len(atoms)], f, rtol=0, atol=1e-10)
        np.testing.assert_allclose(s2, s, rtol=0, atol=1e-12)
    assert abs(e) > 1e-3 and np.abs(f).max() > 1e-3  # the numbers compared are not trivially zero


def test_equivalent_cells_rotations_wrapping_and_translations_change_nothing(model):
    atoms = crystal()
    e, f, _ = evaluate(model, atoms)
    c = atoms.cell.array
    skewed = atoms.copy()
    skewed.set_cell(np.array([c[0], c[1] + c[0], c[2] - c[1]]), scale_atoms=False)  # the same lattice
    assert abs(evaluate(model, skewed)[0] - e) < 1e-10
    rotation = Rotation.random(random_state=1).as_matrix()
    rotated = atoms.copy()
    rotated.set_cell(c @ rotation.T)
    rotated.positions = atoms.positions @ rotation.T
    e_rot, f_rot, _ = evaluate(model, rotated)
    assert abs(e_rot - e) < 1e-10
    np.testing.assert_allclose(f_rot, f @ rotation.T, rtol=0, atol=1e-10)
    moved = atoms.copy()
    moved.positions += np.array([0.3, -2.0, 5.1])
    assert abs(evaluate(model, moved)[0] - e) < 1e-10
    moved.positions += 3 * c[0] - 2 * c[2]  # whole lattice vectors: the same crystal, atoms far outside the cell
    assert abs(evaluate(model, moved)[0] - e) < 1e-10
    moved.wrap()
    assert abs(evaluate(model, moved)[0] - e) < 1e-10
    other = atoms.copy()
    other.positions[0] += 0.3  # negative control: a changed crystal changes the energy
    assert abs(evaluate(model, other)[0] - e) > 1e-6


def test_forces_and_stress_match_finite_differences(model):
    atoms = crystal()
    e, f, s = evaluate(model, atoms)
    h = 1e-5
    for atom, axis in ((3, 1), (7, 0), (10, 2)):
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, axis] += h
        minus.positions[atom, axis] -= h
        numeric = -(evaluate(model, plus)[0] - evaluate(model, minus)[0]) / (2 * h)
        assert abs(numeric - f[atom, axis]) < 1e-7 * max(1.0, abs(f[atom, axis]))
    for a, b in ((0, 0), (1, 2), (0, 1), (2, 2)):
        strain = np.zeros((3, 3))
        strain[a, b] = strain[b, a] = h
        scale = 0.5 if a != b else 1.0  # a symmetric off-diagonal strain moves both entries

        def strained(sign):
            deformed = atoms.copy()
            deformed.set_cell(atoms.cell.array @ (np.eye(3) + sign * strain), scale_atoms=True)
            return evaluate(model, deformed)[0]

        numeric = scale * (strained(1) - strained(-1)) / (2 * h) / atoms.get_volume()
        assert abs(numeric - s[a, b]) < 1e-7 * max(1e-3, abs(s[a, b]))


def test_linear_form_equals_the_pairwise_form_and_the_fused_operators(model):
    atoms = crystal(n=15, seed=2)
    reference = evaluate(model, atoms)
    set_exact(model, True)
    try:
        pairwise = evaluate(model, atoms)
    finally:
        set_exact(model, False)
    use_fused(model.eval(), True)
    try:
        fused = evaluate(model, atoms)
    finally:
        use_fused(model, False)
    for other in (pairwise, fused):
        assert abs(other[0] - reference[0]) < 1e-11
        np.testing.assert_allclose(other[1], reference[1], rtol=0, atol=1e-11)
        np.testing.assert_allclose(other[2], reference[2], rtol=0, atol=1e-13)


def test_a_batch_of_cells_equals_each_cell_alone(model):
    structures = [crystal(seed=3), crystal(n=9, cell=CELL * 1.2, seed=4), crystal(n=14, cell=np.diag([7.0, 8.0, 9.0]))]
    graph = batch_graph(structures, CONFIG.atomic_numbers, CONFIG.cutoff, cell=True)
    energy, forces, _, stress = (t.detach().numpy() for t in energy_forces_stress(model, *graph.inputs()))
    start = 0
    for b, atoms in enumerate(structures):
        e, f, s = evaluate(model, atoms)
        assert abs(energy[b] - e) < 1e-11
        np.testing.assert_allclose(forces[start:start + len(atoms)], f, rtol=0, atol=1e-11)
        np.testing.assert_allclose(stress[b], s, rtol=0, atol=1e-13)
        start += len(atoms)


# ---- the kernel

def real_space_kernel(r: np.ndarray, model) -> np.ndarray:
    """h_m(r) = (2 pi^2 r)^-1 int_0^k_max g_m(k) k sin(k r) dk (h_m(0) = (2 pi^2)^-1 int g k^2 dk),
    by Simpson's rule on a fine grid: (len(r), M)."""
    k = np.linspace(0.0, model.k_max, 8001)
    g = kernel_weights(torch.tensor(k * k), model.kernel_lengths, model.kernel_norms, model.k_max).numpy()  # (K, M)
    simpson = np.full(len(k), 2.0)
    simpson[1:-1:2], simpson[[0, -1]] = 4.0, 1.0
    weighted = g * (k * k * simpson * (k[1] - k[0]) / 3 / (2 * math.pi ** 2))[:, None]
    out = []
    for chunk in np.array_split(r, max(1, len(r) // 500)):
        kr = np.outer(chunk, k)
        out.append(np.where(kr > 0, np.sin(kr) / np.where(kr > 0, kr, 1.0), 1.0) @ weighted)
    return np.concatenate(out)


def test_direct_sum_equals_the_real_space_image_sum(model):
    """Poisson summation: (1/V) sum_k g(|k|) cos(k.r) = sum_L h(r + L), h decaying faster than
    any power (slowly at first for the narrowest channel, which the band limit cuts most)."""
    cell = torch.tensor(CELL.reshape(1, 3, 3))
    r = torch.tensor([[0.0, 0.0, 0.0], [1.3, -2.2, 4.1]], dtype=torch.float64)
    phase, n, weights = reciprocal_terms(r, cell, torch.zeros(2, dtype=torch.long), model.kernel_lengths,
                                         model.kernel_norms, model.k_max)
    direct = (weights[0] * torch.cos(n @ (phase[1] - phase[0]))).sum(dim=1).numpy()  # (M,)
    shifts = np.stack(np.meshgrid(*[np.arange(-17, 18)] * 3, indexing="ij"), -1).reshape(-1, 3) @ CELL
    distances = np.linalg.norm(r[1].numpy() - r[0].numpy() + shifts, axis=1)
    images = real_space_kernel(distances[distances < 100.0], model).sum(axis=0)
    np.testing.assert_allclose(direct, images, rtol=1e-6, atol=1e-9)
    assert real_space_kernel(np.array([0.0]), model)[0] == pytest.approx(np.ones(len(direct)), abs=1e-9)
    assert np.abs(real_space_kernel(np.linspace(95.0, 100.0, 11), model)).max() < 1e-8  # the image sum converged
    assert np.abs(direct - real_space_kernel(distances[distances < 20.0], model).sum(axis=0)).max() > 1e-6  # images matter


def test_without_the_k_zero_term_every_channel_kernel_averages_to_zero_over_the_cell(model):
    """k_zero: false (the default) removes the cell mean g_m(0)/V of every kernel, and only that:
    averaged over a uniform 12^3 grid of points in the cell (which cancels every k with
    |n_a| < 12), K_m is g_m(0)/V with the k = 0 term and 0 without it, and the two kernels differ
    by that constant at any separation."""
    cell = torch.tensor(CELL.reshape(1, 3, 3))
    axis = torch.arange(12, dtype=torch.float64) / 12
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3) @ cell[0]
    points = torch.cat([torch.tensor([[0.4, -1.1, 2.3]], dtype=torch.float64), grid])
    batch = torch.zeros(len(points), dtype=torch.long)
    kernels = {}
    for k_zero in (True, False):
        phase, n, weights = reciprocal_terms(points, cell, batch, model.kernel_lengths, model.kernel_norms,
                                             model.k_max, k_zero)
        assert n.abs().max() < 12
        kernels[k_zero] = (weights[0] @ torch.cos(n @ (phase[1:] - phase[0]).T)).numpy()  # (M, grid)
    mean = (kernel_weights(torch.zeros(1, dtype=torch.float64), model.kernel_lengths, model.kernel_norms,
                           model.k_max)[0] / abs(np.linalg.det(CELL))).numpy()
    np.testing.assert_allclose(kernels[True].mean(axis=1), mean, rtol=1e-12)
    assert np.abs(kernels[False].mean(axis=1)).max() < 1e-14
    np.testing.assert_allclose(kernels[True] - kernels[False], np.repeat(mean[:, None], len(grid), 1), rtol=1e-11)
    assert kernels[False].std(axis=1).min() > 1e-6  # not a trivial kernel


def test_energy_change_along_a_strain_path_equals_the_stress_work(model):
    """As the cell grows, k-vectors leave the sphere |k| < k_max; with zero weight, so the energy
    change equals the integral of the stress (no jump) and the k-set really changes."""
    atoms = crystal(n=10, cell=CELL * 1.4, seed=5)
    direction = np.diag([1.0, 0.6, -0.3]) + 0.2 * (np.ones((3, 3)) - np.eye(3))
    ts = np.linspace(0.0, 0.2, 161)
    energies, work_rates, counts = [], [], []
    for t in ts:
        deform = np.eye(3) + t * direction
        strained = atoms.copy()
        strained.set_cell(atoms.cell.array @ deform, scale_atoms=True)
        e, _, s = evaluate(model, strained)
        energies.append(e)
        # d(strain) = dt F^-1 A (F and A commute): dE/dt = V sigma : F^-1 A
        work_rates.append(strained.get_volume() * np.sum(s * np.linalg.solve(deform, direction)))
        counts.append(len(lattice_indices(torch.tensor(strained.cell.array.reshape(1, 3, 3)), model.k_max)))
    assert len(set(counts)) > 3  # vectors crossed the cutoff on the way
    dt = ts[1] - ts[0]
    w = np.array(work_rates)
    work = dt / 3 * (w[0] + w[-1] + 4 * w[1:-1:2].sum() + 2 * w[2:-1:2].sum())
    assert abs((energies[-1] - energies[0]) - work) < 1e-6 * max(1.0, abs(energies[-1] - energies[0]))
    # and no step of the path jumps: each energy change is the local stress work to O(dt^3)
    steps = np.diff(energies) - 0.5 * dt * (w[1:] + w[:-1])
    assert np.abs(steps).max() < 1e-6


# ---- the calculator and bad input

@pytest.fixture(scope="module")
def model_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("periodic") / "periodic.pt"
    save_model_file(model, CONFIG, path)
    return path


def test_model_file_says_which_form_it_carries(model_file):
    metadata = read_metadata(model_file)
    assert metadata["periodic"] is True and metadata["inputs"][-1] == "cell"
    assert metadata["efa"]["k_max"] == CONFIG.k_max


def test_a_trained_periodic_model_exports_with_check_and_evaluates_as_the_calculator(tmp_path):
    """efa-train -> efa-export --check -> efa-eval on periodic data: every tool builds graphs with
    the model's cell input (GraphDataset.for_model), and efa-eval's energies and forces are the
    calculator's."""
    from helpers import TINY_MODEL, tiny_config

    from efa_deploy.cli import export as export_cli
    from efa_deploy.cli.eval import evaluate_file
    from efa_deploy.training.data import load_structures
    from efa_deploy.training.train import train

    frames = load_structures(REPO / "examples" / "periodic" / "data" / "ionic.extxyz.gz", ":40")
    data = tmp_path / "ionic40.extxyz"
    write(data, frames)
    config = tiny_config(data, tmp_path / "run", epochs=1)
    config["model"] = {**TINY_MODEL, "cutoff": 4.0, "periodic_efa": True, "k_max": 1.0}
    train(config)
    model = tmp_path / "m.pt"
    assert export_cli.main([str(tmp_path / "run" / "best.ckpt"), "-o", str(model), "--check"]) == 0
    report, predictions = evaluate_file(model, data)
    assert report["structures"] == 40
    for k in (0, 17, 39):
        atoms = frames[k].copy()
        atoms.calc = EFACalculator(model)
        assert predictions.energy[k] == pytest.approx(atoms.get_potential_energy(), rel=1e-10)
    assert not np.allclose(predictions.energy, predictions.energy_ref)  # a trained model, not the labels


def test_calculator_equals_the_model_with_stress(model, model_file):
    atoms = crystal(seed=6)
    e, f, s = evaluate(model, atoms)
    atoms.calc = EFACalculator(model_file)
    assert abs(atoms.get_potential_energy() - e) < 1e-10
    np.testing.assert_allclose(atoms.get_forces(), f, rtol=0, atol=1e-10)
    np.testing.assert_allclose(atoms.get_stress(voigt=False), s, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case, message", [
    ("finite", "pbc=\\[False, False, False\\].*periodic in all three directions"),
    ("slab", "mixed boundaries are not supported"),
    ("small", "less than the model's cutoff.*replicate"),
    ("degenerate", "degenerate cell"),
])
def test_calculator_refuses_cells_the_periodic_form_cannot_use(model_file, case, message):
    atoms = crystal()
    if case == "finite":
        atoms.pbc = False
    elif case == "slab":
        atoms.pbc = [True, True, False]
    elif case == "small":
        atoms.set_cell(np.diag([6.5, 7.0, 2.5]), scale_atoms=True)
    else:
        atoms.set_cell([[6.5, 0, 0], [0, 7.0, 0], [6.5, 7.0, 0]], scale_atoms=False)
    atoms.calc = EFACalculator(model_file)
    with pytest.raises(ValueError, match=message):
        atoms.get_potential_energy()


# ---- LAMMPS

def lammps_frame(tmp_path, atoms):
    """The data file LAMMPS reads and the same structure in LAMMPS's (restricted triclinic) frame."""
    write_data(atoms, tmp_path / "data.lmp", ["H", "O"])
    framed = read(tmp_path / "data.lmp", format="lammps-data", units="metal")
    framed.numbers = np.where(framed.numbers == 1, 1, 8)  # types 1, 2 -> H, O
    framed.pbc = True
    return framed


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs, processors", [(1, ""), (2, ""), (3, "processors 3 1 1"), (4, "processors 1 1 4")])
def test_lammps_equals_the_calculator_at_every_rank_count(model, model_file, tmp_path, nprocs, processors):
    atoms = crystal(n=20, cell=np.array([[9.0, 0, 0], [1.5, 8.0, 0], [-0.8, 1.1, 8.5]]), seed=7)
    scaled = atoms.get_scaled_positions()
    scaled[:, 2] *= 0.3  # atoms in the lower third of the box: 4 z-slabs leave a rank empty
    atoms.set_scaled_positions(scaled)
    framed = lammps_frame(tmp_path, atoms)
    e, f, s = evaluate(model, framed)
    result = static_run(tmp_path, model_file, ["H", "O"], nprocs=nprocs, boundary="p p p", processors=processors)
    assert abs(result.energy - e) < 1e-10 * max(1.0, abs(e))
    np.testing.assert_allclose(result.forces, f, rtol=0, atol=1e-10)
    virial = -s * framed.get_volume()
    np.testing.assert_allclose(result.virial, virial.flat[[0, 4, 8, 1, 2, 5]], rtol=0, atol=1e-9)


NPT_DECK = """\
units           metal
boundary        p p p
atom_style      atomic
atom_modify     map array
{start}
pair_style      efa
pair_coeff      * * {model} H O
{velocity}
fix             npt all npt temp 300 300 0.05 tri 0.0 0.0 0.5
timestep        0.0005
thermo_style    custom step pe press vol pxy
thermo_modify   format float %.15g
thermo          10
run             {steps}
{after}
print           "$(pe:%.15g) $(press:%.15g) $(vol:%.15g)" file final.txt
"""


@pytest.mark.mpi
def test_npt_runs_identically_at_one_and_two_ranks_and_through_a_restart(model_file, tmp_path):
    atoms = crystal(n=24, cell=np.array([[8.0, 0, 0], [0.8, 8.0, 0], [0.4, -0.5, 8.2]]), seed=8)
    write_data(atoms, tmp_path / "data.lmp", ["H", "O"])
    finals = {}
    for nprocs in (1, 2):
        work = tmp_path / f"np{nprocs}"
        work.mkdir()
        shutil.copy(tmp_path / "data.lmp", work)
        out = run_lammps(NPT_DECK.format(start="read_data data.lmp", model=model_file, steps=40,
                                         velocity="velocity all create 300 4 mom yes rot no",
                                         after="write_restart half.restart"), work, nprocs)
        assert "ERROR" not in out
        finals[nprocs] = np.array((work / "final.txt").read_text().split(), dtype=float)
        volumes = [float(line.split()[3]) for line in out.splitlines()
                   if line.strip()[:1].isdigit() and len(line.split()) == 5]
        assert max(volumes) - min(volumes) > 1e-3  # the cell really changed under the barostat
    np.testing.assert_allclose(finals[2], finals[1], rtol=1e-8)
    # the restart goes on as an uninterrupted run: 40 + 40 steps against 80 in one go
    work = tmp_path / "np1"
    run_lammps(NPT_DECK.format(start="read_restart half.restart", model=model_file, steps=40, velocity="",
                               after=""), work, 1)
    resumed = np.array((work / "final.txt").read_text().split(), dtype=float)
    whole = tmp_path / "whole"
    whole.mkdir()
    shutil.copy(tmp_path / "data.lmp", whole)
    run_lammps(NPT_DECK.format(start="read_data data.lmp", model=model_file, steps=80,
                               velocity="velocity all create 300 4 mom yes rot no", after=""), whole, 1)
    straight = np.array((whole / "final.txt").read_text().split(), dtype=float)
    np.testing.assert_allclose(resumed, straight, rtol=1e-6)


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [1, 2])
@pytest.mark.parametrize("boundary, cell, message", [
    ("f f f", CELL, "needs 'boundary p p p'"),
    ("p p f", CELL, "mixed boundaries"),
    ("p p p", np.diag([6.5, 7.0, 2.6]), "less than the model's cutoff"),
])
def test_lammps_refuses_boxes_the_periodic_form_cannot_use(model_file, tmp_path, nprocs, boundary, cell, message):
    atoms = crystal(n=6, cell=cell, seed=9)
    write_data(atoms, tmp_path / "data.lmp", ["H", "O"])
    with pytest.raises(RuntimeError, match=message):
        static_run(tmp_path, model_file, ["H", "O"], nprocs=nprocs, boundary=boundary)


# ---- LAMMPS in this Python process (the `lammps` module)

def host_lammps(data, model_file, boundary="p p p"):
    from efa_deploy.lammps import start_lammps

    lmp = start_lammps(("-screen", "none", "-log", "none"))
    lmp.commands_string(f"units metal\nboundary {boundary}\natom_style atomic\natom_modify map array sort 0 0.0\n"
                        f"read_data {data}\npair_style efa\npair_coeff * * {model_file} H O\n"
                        "compute virial all pressure NULL virial\nthermo_style custom step pe\n")
    return lmp


def test_lammps_virial_is_minus_the_derivative_for_a_strained_box(model_file, tmp_path):
    """The virial pair_style efa reports against finite changes of the box (change_box ... remap):
    scaling z by 1 + h and a tilt xz of h lz, which moves x by h (z - zlo): LAMMPS keeps the
    fractional coordinates, so these two are pure strains (scaling x or tilting xy would also
    shear by the other tilts)."""
    from helpers import NKTV2P_METAL

    atoms = crystal(n=16, cell=np.array([[8.0, 0, 0], [0.9, 7.5, 0], [-0.6, 0.8, 7.8]]), seed=10)
    write_data(atoms, tmp_path / "data.lmp", ["H", "O"])
    lmp = host_lammps(tmp_path / "data.lmp", model_file)
    lmp.command("run 0")
    virial = np.array(lmp.numpy.extract_compute("virial", 0, 1)) * lmp.get_thermo("vol") / NKTV2P_METAL
    h = 1e-5

    def energy_after(change):
        lmp.command(f"change_box all {change} remap units box")
        lmp.command("run 0")
        return lmp.get_thermo("pe")

    e_plus = energy_after(f"z scale {1 + h}")
    e_minus = energy_after(f"z scale {(1 - h) / (1 + h)}")
    energy_after(f"z scale {1 / (1 - h)}")
    assert abs(-(e_plus - e_minus) / (2 * h) - virial[2]) < 1e-6 * max(1.0, abs(virial[2]))
    lz = lmp.get_thermo("lz")
    e_plus = energy_after(f"xz delta {h * lz}")
    e_minus = energy_after(f"xz delta {-2 * h * lz}")
    assert abs(-(e_plus - e_minus) / (2 * h) - virial[4]) < 1e-6 * max(1e-2, abs(virial[4]))
    assert abs(virial[4]) > 1e-3
    lmp.close()


def test_python_host_survives_a_periodic_model_on_a_finite_box(model_file, tmp_path):
    atoms = crystal(n=6, seed=11)
    write_data(atoms, tmp_path / "data.lmp", ["H", "O"])
    lmp = host_lammps(tmp_path / "data.lmp", model_file, boundary="f f f")
    with pytest.raises(Exception, match="needs 'boundary p p p'"):
        lmp.command("run 0")
    lmp.close()
    lmp = host_lammps(tmp_path / "data.lmp", model_file)  # the process goes on: a good box runs
    lmp.command("run 0")
    assert np.isfinite(lmp.get_thermo("pe"))
    lmp.close()


# ---- the k-space mesh (mesh.py) in the model, the calculator and LAMMPS

MESH_CELL = np.array([[11.0, 0, 0], [1.5, 10.0, 0], [-0.8, 1.1, 10.5]])


def efa_part(model, atoms, kspace):
    """Energy, forces and stress of the periodic EFA path alone: the model's minus the same
    model's with the EFA invariants cut off (dense weights zero), on kspace direct or mesh."""
    cell = torch.tensor(atoms.cell.array.reshape(1, 3, 3))
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    sizes = model.set_kspace(kspace, cell)
    try:
        full = evaluate(model, atoms)
        for layer in model.layers:
            layer.global_update.dense.weight.data.zero_()
        local = evaluate(model, atoms)
    finally:
        model.load_state_dict(saved)
        model.set_kspace("direct", cell)
    return sizes, [a - b for a, b in zip(full, local)]


def test_mesh_path_equals_the_direct_sum_to_its_stated_accuracy(model):
    atoms = crystal(n=40, cell=MESH_CELL, seed=11)
    none, direct = efa_part(model, atoms, "direct")
    sizes, mesh = efa_part(model, atoms, "mesh")
    assert none == [] and len(sizes) == 3
    # mesh.py: about 1e-3 relative error in the global sums (order 6, oversampling 2)
    for a, b in zip(mesh, direct):
        scale = np.abs(b).max()
        assert scale > 1e-6  # the EFA part is not negligible: a real comparison
        assert 1e-12 * scale < np.abs(a - b).max() < 3e-3 * scale  # a different path, within its accuracy


def test_mesh_path_forces_and_stress_are_the_derivatives_of_its_energy(model):
    atoms = crystal(n=30, cell=MESH_CELL, seed=12)
    cell = torch.tensor(atoms.cell.array.reshape(1, 3, 3))
    model.set_kspace("mesh", cell)
    try:
        e, f, s = evaluate(model, atoms)
        h = 1e-5
        for i, a in [(3, 0), (17, 2)]:
            moved = [atoms.copy(), atoms.copy()]
            moved[0].positions[i, a] += h
            moved[1].positions[i, a] -= h
            fd = -(evaluate(model, moved[0])[0] - evaluate(model, moved[1])[0]) / (2 * h)
            assert abs(fd - f[i, a]) < 1e-7
        strained = []
        for sign in (1, -1):
            other = atoms.copy()
            eps = np.zeros((3, 3))
            eps[0, 2] = eps[2, 0] = sign * h / 2
            other.set_cell(atoms.cell.array @ (np.eye(3) + eps), scale_atoms=True)
            strained.append(evaluate(model, other)[0])
        fd = (strained[0] - strained[1]) / (2 * h) / atoms.get_volume()
        assert abs(fd - (s[0, 2] + s[2, 0]) / 2) < 1e-9
    finally:
        model.set_kspace("direct", cell)


def test_mesh_is_kept_while_it_carries_the_cell_and_auto_keeps_small_cells_direct(model):
    cell = torch.tensor(MESH_CELL.reshape(1, 3, 3))
    try:
        first = model.set_kspace("mesh", cell)
        assert model.set_kspace("mesh", cell * 1.1) == first  # NPT breathing: the same mesh
        grown = model.set_kspace("mesh", cell * 2.5)  # k-vectors the mesh cannot carry: a new mesh
        assert all(g > f for g, f in zip(grown, first))
        assert model.set_kspace("auto", cell) == []  # a few hundred k-vectors: the direct sum is cheaper
        assert model.set_kspace("auto", cell * 6.0) != []
        with pytest.raises(RuntimeError, match="kspace must be direct, mesh or auto"):
            model.set_kspace("fft", cell)
    finally:
        model.set_kspace("direct", cell)


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [1, 2])
def test_lammps_mesh_equals_the_calculator_mesh_at_one_and_two_ranks(model_file, tmp_path, nprocs):
    atoms = crystal(n=40, cell=MESH_CELL, seed=13)
    framed = lammps_frame(tmp_path, atoms)
    calc = EFACalculator(model_file, kspace="mesh")
    framed.calc = calc
    e, f = framed.get_potential_energy(), framed.get_forces()
    s = framed.get_stress(voigt=False)
    assert len(calc.module.kspace_mesh()) == 3
    result = static_run(tmp_path, model_file, ["H", "O"], nprocs=nprocs, boundary="p p p", pair_args="kspace mesh")
    assert abs(result.energy - e) < 1e-10 * max(1.0, abs(e))
    np.testing.assert_allclose(result.forces, f, rtol=0, atol=1e-10)
    virial = -s * framed.get_volume()
    np.testing.assert_allclose(result.virial, virial.flat[[0, 4, 8, 1, 2, 5]], rtol=0, atol=1e-9)
    direct = EFACalculator(model_file, kspace="direct")
    assert abs(direct.get_potential_energy(framed) - e) > 1e-12  # negative control: the mesh was in use


def test_bad_kspace_is_refused_by_lammps_and_the_calculator(model_file, tmp_path):
    write_data(crystal(n=6, seed=9), tmp_path / "data.lmp", ["H", "O"])
    with pytest.raises(RuntimeError, match="kspace must be direct, mesh or auto, not 'pppm'"):
        static_run(tmp_path, model_file, ["H", "O"], boundary="p p p", pair_args="kspace pppm")
    with pytest.raises(ValueError, match="kspace must be 'direct', 'mesh' or 'auto'"):
        EFACalculator(model_file, kspace="pppm")


# ---- the shipped periodic model and its deck

@pytest.mark.mpi
def test_the_shipped_periodic_deck_gives_the_same_run_at_one_and_two_ranks(tmp_path):
    """The shipped file is float32: its runs at 1 and 2 ranks agree to float32 round-off after
    100 NPT steps (measured: 2e-8); its float64 conversion makes them agree to 1e-8 or better
    (measured: all 12 printed digits)."""
    import os
    import subprocess

    from efa_deploy.modelfile import convert_model_file
    from helpers import LMP, MPIEXEC, REPO

    folder = REPO / "examples" / "periodic"
    shipped = REPO / "export" / "periodic" / "ionic_efa.pt"
    float64 = tmp_path / "ionic_efa_f64.pt"
    convert_model_file(shipped, float64, dtype="float64")
    for model, rtol in ((shipped, 1e-6), (float64, 1e-8)):
        finals = []
        for nprocs in (1, 2):
            proc = subprocess.run([str(MPIEXEC), "-n", str(nprocs), str(LMP), "-in", "in.npt", "-var", "steps", "100",
                                   "-var", "model", str(model), "-log", "none"], cwd=folder, capture_output=True,
                                  text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
            assert f"loaded {model}" in proc.stdout
            line = [x for x in proc.stdout.splitlines() if x.startswith("final ")][-1]
            finals.append(np.array(line.split()[1:], dtype=float))
        np.testing.assert_allclose(finals[1], finals[0], rtol=rtol)
        assert np.all(np.isfinite(finals[0]))
