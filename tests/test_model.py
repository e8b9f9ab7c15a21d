"""The EFA energy model: symmetries, batching, padding, forces, edge cases, TorchScript."""

import copy
import math

import numpy as np
import pytest
import torch
from ase import Atoms
from scipy.spatial.transform import Rotation

from efa_deploy.graph import Graph, batch_graph
from efa_deploy.model import EuclideanFastAttention, ModelConfig, build_model, energy_and_forces

torch.set_num_threads(1)

ELEMENTS = [1, 6, 8]
CUTOFF = 4.0
R_MAX = 10.0


# l = 1 query/key channels, vector and tensor values together: every path of the EFA block
EQUIVARIANT = dict(num_vector_frequencies=1, value_vectors=2, value_tensors=2)


def make_model(dtype=torch.float64, seed=0, **options):
    """A small model whose zero-initialised last MLP layers are randomised, so that every block
    (the EFA one included) changes the energy; per-element shifts are non-zero."""
    settings = dict(features=16, num_layers=2, cutoff=CUTOFF, r_max=R_MAX, num_frequencies=4, value_dim=8)
    settings.update(options)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(atomic_numbers=ELEMENTS, **settings), dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mlp.2" in name:
                torch.nn.init.normal_(p, std=0.3)
        model.energy_shift.copy_(torch.tensor([-0.5, -1.5, -2.5]))
    return model


def set_exact(model, exact: bool) -> None:
    for module in model.modules():
        if isinstance(module, EuclideanFastAttention):
            module.exact = exact


def random_molecule(n: int, size: float, seed: int) -> Atoms:
    """n atoms in a cube of edge `size`, at least 0.8 A apart, two of them on opposite corners."""
    rng = np.random.default_rng(seed)
    positions = [np.zeros(3), np.full(3, size)]
    while len(positions) < n:
        p = rng.uniform(0.0, size, 3)
        if min(np.linalg.norm(p - q) for q in positions) > 0.8:
            positions.append(p)
    return Atoms(numbers=rng.choice(ELEMENTS, n), positions=np.array(positions))


def evaluate(model, structures, dtype=torch.float64):
    graph = batch_graph(structures, ELEMENTS, CUTOFF, dtype)
    energy, forces, _ = energy_and_forces(model, *graph.inputs())
    return energy.detach().numpy(), forces.detach().numpy()


def relative(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------------------
# Lebedev form vs exact pairwise form, rotation and translation


@pytest.mark.parametrize("options", [dict(), dict(num_vector_frequencies=2), EQUIVARIANT],
                         ids=["scalar", "vector", "equivariant-values"])
def test_model_lebedev_matches_exact_within_r_max_and_degrades_beyond(options):
    model = make_model(**options)
    errors = []
    for size in (0.99 * R_MAX / math.sqrt(3), 2.0 * R_MAX / math.sqrt(3)):
        molecule = random_molecule(12, size, seed=1)
        e_fast, f_fast = evaluate(model, [molecule])
        set_exact(model, True)
        e_exact, f_exact = evaluate(model, [molecule])
        set_exact(model, False)
        # the energy's error is diluted by the local part: judge energy and forces together
        errors.append(max(relative(e_fast, e_exact), relative(f_fast, f_exact)))
    # measured: about 2e-8 inside r_max, 2e-4 (forces) at twice the size
    assert errors[0] < 1e-4
    assert errors[1] > 100 * errors[0]


def test_translation_invariance():
    model = make_model(num_vector_frequencies=1)
    molecule = random_molecule(12, 5.0, seed=2)
    e0, f0 = evaluate(model, [molecule])
    for shift in ([3.1, -7.2, 5.4], [100.0, 0.0, -40.0]):
        moved = molecule.copy()
        moved.positions += shift
        e1, f1 = evaluate(model, [moved])
        assert abs(e1[0] - e0[0]) < 1e-10
        np.testing.assert_allclose(f1, f0, atol=1e-9)


# Rotation invariance holds to quadrature accuracy. Measured with this model: energy and force
# errors about 2e-9 and 4e-8 relative on the 50-point grid (b_max = pi); about 5e-5 and 3e-3 on the
# 6-point grid with the same b_max. The tolerance sits 25x above the first and 40x below the second.
ROTATION_TOLERANCE = 1e-6


def worst_rotation_error(model, molecule) -> float:
    e0, f0 = evaluate(model, [molecule])
    worst = 0.0
    for seed in range(3):
        rotation = Rotation.random(random_state=seed).as_matrix()
        turned = molecule.copy()
        turned.positions = molecule.positions @ rotation.T
        e1, f1 = evaluate(model, [turned])
        worst = max(worst, relative(e1, e0), relative(f1, f0 @ rotation.T))
    return worst


@pytest.mark.parametrize("options", [dict(), dict(num_vector_frequencies=2), dict(qk_activation="silu"), EQUIVARIANT],
                         ids=["scalar", "vector", "silu", "equivariant-values"])
def test_rotation_invariance_on_50_point_grid(options):
    model = make_model(grid_points=50, **options)
    assert worst_rotation_error(model, random_molecule(12, 5.5, seed=3)) < ROTATION_TOLERANCE


@pytest.mark.parametrize("options", [dict(), dict(num_vector_frequencies=2), EQUIVARIANT],
                         ids=["scalar", "vector", "equivariant-values"])
def test_rotation_invariance_fails_on_6_point_grid(options):
    """Negative control: the same tolerance with a grid too coarse for b_max = pi."""
    model = make_model(grid_points=6, b_max=math.pi, **options)
    assert worst_rotation_error(model, random_molecule(12, 5.5, seed=3)) > 10 * ROTATION_TOLERANCE


def test_rotation_invariance_is_exact_without_efa():
    model = make_model(use_efa=False)
    assert worst_rotation_error(model, random_molecule(12, 5.5, seed=3)) < 1e-12


# ---------------------------------------------------------------------------------------------
# permutation, batching, padding


def test_permutation_equivariance():
    model = make_model(num_vector_frequencies=1)
    molecule = random_molecule(10, 5.0, seed=4)
    order = np.random.default_rng(0).permutation(len(molecule))
    e0, f0 = evaluate(model, [molecule])
    e1, f1 = evaluate(model, [molecule[order]])
    assert abs(e1[0] - e0[0]) < 1e-10
    np.testing.assert_allclose(f1, f0[order], atol=1e-10)


@pytest.mark.parametrize("options", [dict(num_vector_frequencies=1), EQUIVARIANT], ids=["vector", "equivariant-values"])
def test_batch_equals_structures_computed_alone(options):
    model = make_model(**options)
    structures = [random_molecule(7, 4.0, seed=5), random_molecule(3, 2.5, seed=6), random_molecule(11, 5.5, seed=7)]
    energy, forces = evaluate(model, structures)
    start = 0
    for b, molecule in enumerate(structures):
        e_alone, f_alone = evaluate(model, [molecule])
        assert abs(energy[b] - e_alone[0]) < 1e-10
        np.testing.assert_allclose(forces[start : start + len(molecule)], f_alone, atol=1e-10)
        start += len(molecule)
    assert start == len(forces)


def padded(graph: Graph, extra: int, seed: int) -> Graph:
    """The graph plus `extra` atoms of structure 0 with owned = 0 and no edges (some of them within
    the cutoff of real atoms, some beyond r_max)."""
    g = torch.Generator().manual_seed(seed)
    n = graph.positions.shape[0]
    fake = torch.rand(extra, 3, generator=g, dtype=graph.positions.dtype) * 3.0 * R_MAX - R_MAX
    fake[0] = graph.positions[0] + 0.5
    return Graph(
        positions=torch.cat([graph.positions, fake]),
        species=torch.cat([graph.species, torch.randint(0, len(ELEMENTS), (extra,), generator=g)]),
        edge_index=graph.edge_index,
        edge_shift=graph.edge_shift,
        batch=torch.cat([graph.batch, torch.zeros(extra, dtype=torch.long)]),
        n_structures=graph.n_structures,
        owned=torch.cat([graph.owned, torch.zeros(extra, dtype=graph.owned.dtype)]),
    )


@pytest.mark.parametrize("exact", [False, True], ids=["lebedev", "exact"])
@pytest.mark.parametrize("options", [dict(num_vector_frequencies=1), EQUIVARIANT], ids=["vector", "equivariant-values"])
def test_padding_changes_nothing(exact, options):
    model = make_model(**options)
    set_exact(model, exact)
    graph = batch_graph([random_molecule(9, 5.0, seed=8)], ELEMENTS, CUTOFF)
    e0, f0, a0 = energy_and_forces(model, *graph.inputs())
    e1, f1, a1 = energy_and_forces(model, *padded(graph, 5, seed=1).inputs())
    assert abs(e1.item() - e0.item()) < 1e-10
    torch.testing.assert_close(f1[:9], f0, rtol=0, atol=1e-10)
    torch.testing.assert_close(a1[:9], a0, rtol=0, atol=1e-10)
    assert torch.all(a1[9:] == 0) and torch.all(f1[9:] == 0)


def test_efa_block_ignores_atoms_that_are_not_owned():
    torch.manual_seed(0)
    block = EuclideanFastAttention(16, num_frequencies=4, value_dim=8, r_max=R_MAX, **EQUIVARIANT).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(14, 16, generator=g, dtype=torch.float64)
    vec = torch.randn(14, 3, 16, generator=g, dtype=torch.float64)
    pos = torch.rand(14, 3, generator=g, dtype=torch.float64) * 5.0
    batch = torch.tensor([0] * 6 + [1] * 8)
    owned = torch.tensor([1, 1, 0, 1, 1, 0] + [1, 0, 1, 1, 1, 1, 0, 0], dtype=torch.float64)
    keep = owned.bool()
    for exact in (False, True):
        block.exact = exact
        y_masked = block(x, vec, pos, batch, 2, owned)
        y_kept = block(x[keep], vec[keep], pos[keep], batch[keep], 2, owned[keep])
        torch.testing.assert_close(y_masked[keep], y_kept, rtol=0, atol=1e-12)
        assert y_kept.abs().max() > 0.1  # the check compares something


# ---------------------------------------------------------------------------------------------
# forces


def finite_difference_forces(model, structure: Atoms, h: float = 1e-5) -> np.ndarray:
    """-dE/dr by central differences, rebuilding the neighbour list for each displaced structure."""
    forces = np.zeros((len(structure), 3))
    for i in range(len(structure)):
        for c in range(3):
            energies = []
            for sign in (1, -1):
                moved = structure.copy()
                moved.positions[i, c] += sign * h
                energies.append(evaluate(model, [moved])[0][0])
            forces[i, c] = -(energies[0] - energies[1]) / (2 * h)
    return forces


@pytest.mark.parametrize(
    "options", [dict(), dict(num_vector_frequencies=2, qk_activation="silu"), EQUIVARIANT, dict(use_efa=False)],
    ids=["efa", "efa-vector-silu", "efa-equivariant-values", "local"],
)
def test_forces_are_minus_the_energy_gradient(options):
    model = make_model(**options)
    molecule = random_molecule(6, 3.5, seed=9)
    _, forces = evaluate(model, [molecule])
    reference = finite_difference_forces(model, molecule)
    assert np.abs(forces).max() > 5e-3
    np.testing.assert_allclose(forces, reference, rtol=1e-6, atol=1e-6)


def periodic_crystal(seed: int) -> Atoms:
    rng = np.random.default_rng(seed)
    cell = np.array([[4.2, 0.0, 0.0], [0.6, 3.9, 0.0], [0.3, -0.4, 4.4]])
    fractional = np.array([[0.1, 0.1, 0.1], [0.6, 0.2, 0.3], [0.3, 0.7, 0.5], [0.8, 0.6, 0.9], [0.4, 0.4, 0.75]])
    fractional += rng.uniform(-0.05, 0.05, fractional.shape)
    return Atoms(numbers=rng.choice(ELEMENTS, 5), scaled_positions=fractional, cell=cell, pbc=True)


def test_periodic_local_model_forces_and_lattice_symmetry():
    model = make_model(use_efa=False)
    crystal = periodic_crystal(seed=10)
    graph = batch_graph([crystal], ELEMENTS, CUTOFF)
    assert torch.any(graph.edge_shift != 0)  # images across the cell boundary take part
    energy, forces = evaluate(model, [crystal])
    np.testing.assert_allclose(forces, finite_difference_forces(model, crystal), rtol=1e-6, atol=1e-6)
    assert abs(forces.sum(axis=0)).max() < 1e-10  # no net force in a periodic crystal
    # moving an atom by a lattice vector changes nothing
    moved = crystal.copy()
    moved.positions[2] += crystal.cell[0] - 2 * crystal.cell[2]
    e_moved, f_moved = evaluate(model, [moved])
    assert abs(e_moved[0] - energy[0]) < 1e-10
    np.testing.assert_allclose(f_moved, forces, atol=1e-10)
    # a 2x1x1 supercell has twice the energy and the same forces on each copy
    e_super, f_super = evaluate(model, [crystal.repeat((2, 1, 1))])
    assert abs(e_super[0] - 2 * energy[0]) < 1e-10
    np.testing.assert_allclose(f_super, np.concatenate([forces, forces]), atol=1e-10)


# ---------------------------------------------------------------------------------------------
# one atom, no atoms


def isolated_atom_energy(model, species: int) -> float:
    """The model's forward pass written out by hand for one atom with no neighbours: messages vanish,
    vector features stay zero, and EFA reduces to its self-term 1/sqrt(D) (q . k) v (sinc(0) = 1,
    grid weights summing to 1)."""
    with torch.no_grad():
        x = model.embedding.weight[species].unsqueeze(0)
        for layer in model.layers:
            features = x.shape[1]
            norm = torch.full_like(x, math.sqrt(1e-8))  # |V v| of zero vectors, as regularised in Update
            a_ss = layer.update.mix(torch.cat([x, norm], dim=1))[:, 2 * features :]
            efa = layer.global_update.efa
            q, k = efa.query(x), efa.key(x)
            if efa.use_silu:
                q, k = torch.nn.functional.silu(q), torch.nn.functional.silu(k)
            channels = q.shape[1] + 6 * efa.num_vector_frequencies
            y = (q * k).sum(dim=1, keepdim=True) * efa.value(x) / math.sqrt(channels)
            x_global = layer.global_update.mlp(x + layer.global_update.dense(y))
            x = x + layer.local_mlp(x + a_ss) + x_global
        return (model.readout(x).squeeze() + model.energy_shift[species]).item()


@pytest.mark.parametrize("options", [dict(), dict(num_vector_frequencies=1, qk_activation="silu")],
                         ids=["scalar", "vector-silu"])
def test_single_atom(options):
    model = make_model(**options)
    for symbol, species in (("H", 0), ("O", 2)):
        reference = isolated_atom_energy(model, species)
        for position in ([0.0, 0.0, 0.0], [7.0, -3.0, 12.0]):
            energy, forces = evaluate(model, [Atoms(symbol, positions=[position])])
            assert abs(energy[0] - reference) < 1e-12
            assert np.abs(forces).max() < 1e-12
        set_exact(model, True)
        assert abs(evaluate(model, [Atoms(symbol, positions=[[1.0, 2.0, 3.0]])])[0][0] - reference) < 1e-12
        set_exact(model, False)


@pytest.mark.parametrize("exact", [False, True], ids=["lebedev", "exact"])
@pytest.mark.parametrize("options", [dict(), EQUIVARIANT], ids=["scalar", "equivariant-values"])
def test_empty_structure(exact, options):
    model = make_model(**options)
    set_exact(model, exact)
    energy, forces = evaluate(model, [Atoms()])
    assert energy.shape == (1,) and energy[0] == 0.0
    assert forces.shape == (0, 3)
    # an empty structure inside a batch: zero energy, neighbours unaffected
    a, b = random_molecule(4, 3.0, seed=11), random_molecule(5, 3.0, seed=12)
    energy, forces = evaluate(model, [a, Atoms(), b])
    assert energy.shape == (3,) and energy[1] == 0.0
    assert abs(energy[0] - evaluate(model, [a])[0][0]) < 1e-10
    assert abs(energy[2] - evaluate(model, [b])[0][0]) < 1e-10
    assert forces.shape == (9, 3)


# ---------------------------------------------------------------------------------------------
# TorchScript, local baseline


@pytest.mark.parametrize("options", [dict(num_vector_frequencies=1), EQUIVARIANT], ids=["vector", "equivariant-values"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["float64", "float32"])
def test_torchscript_equals_eager(dtype, tolerance, options):
    double = make_model(**options)
    model = copy.deepcopy(double).to(dtype)
    scripted = torch.jit.script(model)
    structures = [random_molecule(8, 5.0, seed=13), random_molecule(5, 3.0, seed=14)]
    e_eager, f_eager = evaluate(model, structures, dtype)
    e_script, f_script = evaluate(scripted, structures, dtype)
    assert e_script.dtype == f_script.dtype == (np.float64 if dtype == torch.float64 else np.float32)
    np.testing.assert_allclose(e_script, e_eager, rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(f_script, f_eager, rtol=tolerance, atol=tolerance)
    if dtype == torch.float32:  # and single precision stays close to double precision
        e_double, f_double = evaluate(double, structures)
        assert relative(e_script, e_double) < 1e-5 and relative(f_script, f_double) < 1e-4


def test_local_baseline_is_the_same_backbone_without_the_global_term():
    efa = make_model()
    local = make_model(use_efa=False)
    efa_shapes = {n: p.shape for n, p in efa.named_parameters()}
    local_shapes = {n: p.shape for n, p in local.named_parameters()}
    global_names = {n for n in efa_shapes if ".global_update." in n}
    assert global_names and not any(".global_update." in n for n in local_shapes)
    assert {n: s for n, s in efa_shapes.items() if n not in global_names} == local_shapes
    # with the local parameters copied over and the global MLP's output layer zeroed, the EFA
    # model computes exactly the local model's energy and forces
    with torch.no_grad():
        for name, p in efa.named_parameters():
            if name in local_shapes:
                p.copy_(dict(local.named_parameters())[name])
            elif "global_update.mlp.2" in name:
                p.zero_()
    molecule = random_molecule(8, 5.0, seed=15)
    e_efa, f_efa = evaluate(efa, [molecule])
    e_local, f_local = evaluate(local, [molecule])
    assert abs(e_efa[0] - e_local[0]) < 1e-12
    np.testing.assert_allclose(f_efa, f_local, atol=1e-12)
    assert np.abs(f_local).max() > 0.05


def test_default_settings_keep_todays_parameters():
    """New options default to off and add no parameters: model files from before still load."""
    names = set(make_model().state_dict())
    assert not {n for n in names if "_value." in n or "_contract." in n}
    assert {n for n in make_model(**EQUIVARIANT).state_dict()} - names == {
        f"layers.{t}.global_update.efa.{m}.weight" for t in range(2)
        for m in ("vector_value", "vector_contract", "tensor_value", "tensor_contract")
    }


# ---------------------------------------------------------------------------------------------
# the pairwise training form (train_pairwise_max_atoms)


def force_loss_and_gradients(model, structures):
    """Energies, forces and the parameter gradients of a force loss (a double backward)."""
    graph = batch_graph(structures, ELEMENTS, CUTOFF)
    energy, forces, _ = energy_and_forces(model, *graph.inputs(), create_graph=True)
    loss = energy.square().sum() + forces.square().sum()
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    flat = torch.cat([g.reshape(-1) for g in grads if g is not None])
    return energy.detach().numpy(), forces.detach().numpy(), flat.numpy()


@pytest.mark.parametrize("options", [dict(), EQUIVARIANT], ids=["scalar", "equivariant-values"])
def test_pairwise_training_form_equals_the_exact_form(options):
    model = make_model(train_pairwise_max_atoms=12, **options)
    small = [random_molecule(7, 4.0, seed=5), random_molecule(3, 2.5, seed=6), random_molecule(11, 5.5, seed=7)]
    for batch in (small, small[2:]):  # several structures (padded) and one
        model.train()
        trained = force_loss_and_gradients(model, batch)
        set_exact(model, True)
        exact = force_loss_and_gradients(model, batch)
        set_exact(model, False)
        for a, b in zip(trained, exact):
            assert relative(a, b) < 1e-12
        # evaluation mode takes the grid: the same numbers to quadrature accuracy, not bit for bit
        model.eval()
        grid = force_loss_and_gradients(model, batch)
        for a, b in zip(grid, exact):
            assert 1e-14 < relative(a, b) < 1e-6
    # a structure above the threshold takes the grid in training mode too
    large = [random_molecule(13, 5.5, seed=8)]
    model.train()
    assert relative(force_loss_and_gradients(model, large)[1], evaluate(model.eval(), large)[1]) < 1e-13


def test_pairwise_training_form_refuses_structures_beyond_r_max():
    model = make_model(train_pairwise_max_atoms=12).train()
    wide = random_molecule(6, 1.2 * R_MAX / math.sqrt(3), seed=9)
    with pytest.raises(ValueError, match="r_max"):
        force_loss_and_gradients(model, [wide])
    model.eval()
    force_loss_and_gradients(model, [wide])  # the grid form evaluates it (aliased, as before)
