"""The Lebedev grid follows the system (efa_deploy/model/grid.py): on a structure three times the
model's r_max the automatic grid reproduces the exact O(N^2) pairwise form and is rotation
invariant, where the training grid is neither; LAMMPS at 1 and 2 ranks chooses the same grid as
the calculator; hysteresis, logging, fixed grids, the limit beyond the largest rule, MD across a
grid change, and the conversion of format-version-1 files."""

from __future__ import annotations

import json
import logging
import math
import zipfile

import numpy as np
import pytest
import torch
from ase import Atoms

from efa_deploy import EFACalculator
from efa_deploy.graph import batch_graph, system_extent
from efa_deploy.model import ModelConfig, energy_and_forces
from efa_deploy.model.grid import EXACT_B_MAX, GROW_MARGIN, SHRINK_MARGIN
from efa_deploy.modelfile import FORMAT_VERSION, METADATA_NAME, convert_model_file, load_model_file, save_model_file
from efa_deploy.structures import rotated

from helpers import FINITE_SETUP, jittered_cluster, randomised_model, run_lammps, static_run, write_data

ELEMENTS = ["H", "C", "O"]
R_MAX = 8.0
CONFIG = ModelConfig(atomic_numbers=[1, 6, 8], features=16, num_layers=2, cutoff=3.0, r_max=R_MAX,
                     num_frequencies=4, value_dim=8, num_vector_frequencies=1)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    eager = randomised_model(CONFIG)
    path = tmp_path_factory.mktemp("grid") / "efa.pt"
    save_model_file(eager, CONFIG, path)
    return eager, path


@pytest.fixture(scope="module")
def large():
    """216 atoms spanning three times the model's r_max."""
    atoms = jittered_cluster(216, spacing=2.9, seed=1)
    assert 2.9 * R_MAX < system_extent(atoms.positions) < 3.3 * R_MAX
    return atoms


def calculate(path, atoms, **options):
    atoms = atoms.copy()
    atoms.calc = EFACalculator(path, **options)
    return atoms.get_potential_energy(), atoms.get_forces(), atoms.get_potential_energies(), atoms.calc


def exact_pairwise(eager, atoms):
    """Energy, forces and per-atom energies of the exact O(N^2) form of the same weights."""
    graph = batch_graph([atoms], CONFIG.atomic_numbers, CONFIG.cutoff)
    blocks = [layer.global_update.efa for layer in eager.layers]
    for block in blocks:
        block.exact = True
    try:
        energy, forces, atomic = energy_and_forces(eager, *graph.inputs())
    finally:
        for block in blocks:
            block.exact = False
    return float(energy.detach()), forces.detach().numpy(), atomic.detach().numpy()


def relative(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


def rotation_spread(path, atoms, **options) -> float:
    """Largest minus smallest energy per atom over the structure and three rigid rotations."""
    energies = [calculate(path, a, **options)[0] for a in [atoms] + [rotated(atoms, s) for s in range(3)]]
    return (max(energies) - min(energies)) / len(atoms)


def test_auto_grid_is_exact_and_rotation_invariant_where_the_training_grid_is_not(model, large):
    eager, path = model
    exact = exact_pairwise(eager, large)
    energy, forces, atomic, calc = calculate(path, large)
    assert calc.module.grid_size() > 50
    # measured: per-atom energies 5e-14, forces 4e-13 relative; rotations 1e-13 eV/atom
    assert relative(atomic, exact[2]) <= 1e-6 and relative(forces, exact[1]) <= 1e-6
    assert abs(energy - exact[0]) <= 1e-6 * abs(exact[0])
    assert rotation_spread(path, large) <= 1e-9
    # negative control, the training grid: measured 4e-4 and 1.5e-3 relative; 1.3e-3 eV/atom
    energy50, forces50, atomic50, _ = calculate(path, large, grid=50, extent_check="off")
    assert relative(atomic50, exact[2]) > 1e-6 and relative(forces50, exact[1]) > 1e-6
    assert rotation_spread(path, large, grid=50, extent_check="off") > 1e-9


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [1, 2])
def test_lammps_chooses_the_calculators_grid_at_any_rank_count(tmp_path, model, large, nprocs):
    _, path = model
    energy, forces, atomic, calc = calculate(path, large)
    write_data(large, tmp_path / "data.lmp", ELEMENTS)
    result = static_run(tmp_path, path, ELEMENTS, nprocs=nprocs)
    assert result.energy == pytest.approx(energy, rel=1e-10)
    np.testing.assert_allclose(result.forces, forces, rtol=0, atol=1e-10 * np.abs(forces).max())
    np.testing.assert_allclose(result.atomic_energies, atomic, rtol=0, atol=1e-10)
    lines = [line for line in (tmp_path / "log.lammps").read_text().splitlines() if "points, extent" in line]
    assert lines == [f"pair_style efa: grid 50 -> {calc.module.grid_size()} points, "
                     f"extent {system_extent(large.positions):.1f} A"]


def test_hysteresis(model):
    """Grow as soon as the extent needs it, with a margin; shrink only well inside a smaller rule."""
    module = load_model_file(model[1])[0]
    sizes = module.grid_sizes()
    omega_max = EXACT_B_MAX[50] / module.exact_extent(50)
    reach = {n: module.exact_extent(n) for n in sizes}
    assert sizes == sorted(sizes) and sizes[0] == 50 and sizes[-1] == 5810
    assert module.select_grid(0.99 * reach[50]) == 50
    # just beyond 50 points: the smallest rule covering 5 % more
    extent = 1.01 * reach[50]
    expected = min(n for n in sizes if EXACT_B_MAX[n] >= omega_max * extent * (1 + GROW_MARGIN))
    assert module.select_grid(extent) == expected
    # back inside the 50-point range, but not by the shrink margin: no change
    assert module.select_grid(0.9 * reach[50]) == expected
    assert module.select_grid(1.01 * reach[50] / (1 + SHRINK_MARGIN)) == expected
    assert module.select_grid(0.99 * reach[50] / (1 + SHRINK_MARGIN)) == 50
    # an extent wandering about a threshold changes the grid once
    chosen = [module.select_grid(reach[50] * (1.0 - 0.02 * math.cos(k))) for k in range(40)]
    assert len(set(chosen)) == 2 and sum(a != b for a, b in zip(chosen, chosen[1:])) == 1
    # a jump goes straight to the rule it needs
    assert module.select_grid(0.95 * reach[1202]) == 1202


def test_calculator_logs_grid_changes(model, caplog):
    _, path = model
    atoms = Atoms("CO", positions=[[0, 0, 0], [0.5 * R_MAX, 0, 0]])
    calc = EFACalculator(path)
    atoms.calc = calc
    with caplog.at_level(logging.INFO, logger="efa_deploy"):
        atoms.get_potential_energy()
        atoms.positions[1, 0] = 2.5 * R_MAX
        atoms.get_potential_energy()
        atoms.positions[1, 0] = 2.4 * R_MAX
        atoms.get_potential_energy()
    size = calc.module.grid_size()
    assert [r.getMessage() for r in caplog.records] == [f"EFACalculator: grid 50 -> {size} points, extent 20.0 A"]


def test_fixed_grid_and_the_limits(model, tmp_path):
    _, path = model
    with pytest.raises(ValueError, match=r"grid must be 'auto' or one of the Lebedev rules the model carries \(50 74"):
        EFACalculator(path, grid=51)
    far = Atoms("CO", positions=[[0, 0, 0], [2.0, 0, 0]])
    reach50 = load_model_file(path)[0].exact_extent(50)
    far.positions[1, 0] = 1.2 * reach50
    far.calc = EFACalculator(path, grid=50)  # a fixed grid warns by default
    with pytest.warns(RuntimeWarning, match=f"beyond the exact range of the fixed 50-point grid, {reach50:.2f} A"):
        far.get_potential_energy()
    # beyond the largest rule: an error naming the largest exact extent, or a warning
    calc = EFACalculator(path)
    limit = calc.module.exact_extent(5810)
    far.positions[1, 0] = 1.1 * limit
    far.calc = calc
    with pytest.raises(ValueError, match=f"beyond {limit:.2f} A, the largest extent the model's largest grid "
                                         r"\(5810 points\) keeps exact"):
        far.get_potential_energy()
    far.calc = EFACalculator(path, extent_check="warn")
    with pytest.warns(RuntimeWarning, match=f"beyond {limit:.2f} A"):
        far.get_potential_energy()
    # the same in LAMMPS
    write_data(far, tmp_path / "data.lmp", ELEMENTS)
    with pytest.raises(RuntimeError, match=f"beyond {limit:.2f} A, the largest extent"):
        static_run(tmp_path, path, ELEMENTS)
    with pytest.raises(RuntimeError, match="grid 51: model .* carries no 51-point rule; it carries 50 74"):
        static_run(tmp_path, path, ELEMENTS, pair_args="grid 51")


NVE_DECK = """\
group           left id <= {n_left}
velocity        all set {vx} 0 0
velocity        left set -{vx} 0 0
timestep        0.0002
fix             nve all nve
thermo_style    custom step pe etotal
thermo_modify   format float %.15g
thermo          1
run             {steps}
"""


def test_nve_across_a_grid_change_conserves_energy(model, tmp_path):
    """Two clusters fly apart and the grid grows on the way: the total energy's jump at the
    change is below the quadrature tolerance and no larger than its ordinary change per step."""
    _, path = model
    probe = load_model_file(path)[0]
    rule = next(n for n in probe.grid_sizes() if probe.exact_extent(n) > 12.0)
    start = probe.exact_extent(rule) / (1 + GROW_MARGIN) - 0.02  # chooses `rule`; 0.6 A more needs the next
    left = jittered_cluster(8, spacing=1.6, seed=3, offset=1.0)

    def pair(gap: float) -> Atoms:
        right = left.copy()
        right.positions += [gap, 0, 0]
        return left + right

    low, high = 0.0, 2 * start
    for _ in range(60):  # the gap at which the pair's extent is `start`
        mid = 0.5 * (low + high)
        low, high = (mid, high) if system_extent(pair(mid).positions) < start else (low, mid)
    atoms = pair(high)
    assert probe.select_grid(system_extent(atoms.positions)) == rule
    write_data(atoms, tmp_path / "data.lmp", ELEMENTS)
    deck = FINITE_SETUP.format(pair_args="", model=path, elements="H C O") + NVE_DECK.format(
        n_left=len(left), vx=10.0, steps=300)
    out = run_lammps(deck, tmp_path)
    rows, changes = [], []
    for line in (tmp_path / "log.lammps").read_text().splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0].isdigit():
            rows.append([float(f) for f in fields])
        elif "points, extent" in line:
            changes.append((len(rows), line))  # the grid changed before the forces of this row's step
    assert len(changes) == 2 and changes[0][0] == 0 and f"-> {rule} points" in changes[0][1], out[-2000:]
    change = changes[1][0]
    assert 20 < change < len(rows) - 20
    total = np.array(rows)[:, 2]
    steps = np.abs(np.diff(total))
    jump, ordinary = steps[change - 1], np.median(steps)
    print(f"{changes[1][1]} at step {change}: total-energy jump {jump:.2e} eV, median change per step "
          f"{ordinary:.2e} eV, drift over the run {abs(total[-1] - total[0]):.2e} eV")
    assert jump < 1e-7 and jump < 10 * ordinary + 1e-12
    assert abs(total[-1] - total[0]) < 1e-4


def test_converting_a_version_1_file_keeps_its_energies(model, tmp_path):
    """A file as efa-export wrote it before the grid travelled with the model (format 1)."""
    eager, path = model
    old = tmp_path / "old.pt"
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(METADATA_NAME))
        metadata = json.loads(z.read(name))
    metadata["format_version"] = 1
    del metadata["efa"]["grid_rules"]
    torch.jit.save(torch.jit.load(str(path)), str(old), _extra_files={METADATA_NAME: json.dumps(metadata)})
    with pytest.raises(ValueError, match=r"format_version' must be >= 2, got 1.*efa-export --from-model OLD.pt -o NEW.pt"):
        load_model_file(old)
    from efa_deploy.cli.export import main

    new = tmp_path / "new.pt"
    assert main(["--from-model", str(old), "-o", str(new)]) == 0
    module, meta = load_model_file(new)
    assert meta["format_version"] == FORMAT_VERSION and meta["efa"]["grid_rules"] == module.grid_sizes()
    assert meta["provenance"]["converted_from"]["format_version"] == 1
    atoms = jittered_cluster(20, seed=4)
    a, b = calculate(path, atoms), calculate(new, atoms)
    assert a[0] == pytest.approx(b[0], rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-12)
    assert convert_model_file(new, tmp_path / "again.pt")["efa"]["grid_rules"] == meta["efa"]["grid_rules"]
