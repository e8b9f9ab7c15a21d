"""The fused message operators against their references: torch.ops.efa.edge_message (what
exported files call: the radial basis, envelope and unit vectors made from the edge vectors per
chunk of edges) against edge_message_passing, and torch.ops.efa.message (what older files call)
against message_passing: float64 equality (1e-12 relative) of outputs, gradients, energies,
forces and per-atom energies on random graphs, empty graphs, isolated atoms and ghosts;
TorchScript; LAMMPS at 1 and 2 ranks; a clear error on double backward; a negative control per
input; and a bound on the bytes the fused energy + forces call keeps for backward per atom. The
model tests run the fused EFA operators too (their own tests: test_fused_efa.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from efa_deploy.graph import structure_graph
from efa_deploy.model import ModelConfig, energy_and_forces, use_fused
from efa_deploy.model.local import edge_message_passing, message_passing, radial_frequencies
from efa_deploy.modelfile import load_model_file, rebuild_model, save_model_file
from efa_deploy.ops import EDGE_MESSAGE_SCHEMA, MESSAGE_SCHEMA
from efa_deploy.paths import OPS_LIBRARY

from helpers import (CONFIG, MESSAGE_OPS, OLD_MESSAGE_OPS, REPO, RTOL, assert_close, fused_and_reference,
                     jittered_cluster, model_outputs, randomised_model, static_run, water_cluster, write_data)

pytestmark = pytest.mark.skipif(not OPS_LIBRARY.exists(), reason="libefa_ops.so is not built (make build)")

FLOAT_INPUTS = ("filter", "vec", "rbf", "weight", "bias", "envelope", "unit")


def random_inputs(atoms: int, edges: int, features: int = 8, radial: int = 5, linked: int | None = None,
                  seed: int = 0) -> dict:
    """Inputs of one message step; edges join only the first `linked` atoms (the rest are isolated)."""
    g = torch.Generator().manual_seed(seed)
    linked = atoms if linked is None else linked
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    unit = rand(edges, 3)
    return {
        "filter": rand(atoms, 3 * features), "vec": rand(atoms, 3, features), "rbf": rand(edges, radial),
        "weight": rand(3 * features, radial), "bias": rand(3 * features), "envelope": torch.rand(edges, 1, generator=g,
                                                                                                   dtype=torch.float64),
        "unit": unit / unit.norm(dim=1, keepdim=True),
        "sender": torch.randint(0, max(linked, 1), (edges,), generator=g),
        "receiver": torch.randint(0, max(linked, 1), (edges,), generator=g),
    }


def outputs_and_gradients(op, inputs: dict, float_inputs: tuple[str, ...] = FLOAT_INPUTS) -> list[torch.Tensor]:
    """(dx, dv) and the gradient of a fixed random functional of them with respect to every float input."""
    leaves = {k: v.clone().requires_grad_(k in float_inputs) if isinstance(v, torch.Tensor) else v
              for k, v in inputs.items()}
    dx, dv = op(*leaves.values())
    g = torch.Generator().manual_seed(1)
    loss = (dx * torch.randn(dx.shape, generator=g, dtype=dx.dtype)).sum() + (
        dv * torch.randn(dv.shape, generator=g, dtype=dv.dtype)).sum()
    grads = torch.autograd.grad(loss, [leaves[k] for k in float_inputs], allow_unused=True)
    return [dx, dv] + [torch.zeros_like(leaves[k]) if gr is None else gr for k, gr in zip(float_inputs, grads)]


# (atoms, edges, linked) of the operator tests: kChunk is 256 edges
GRAPHS = pytest.mark.parametrize(
    "atoms, edges, linked",
    [(0, 0, None), (6, 0, None), (1, 3, None), (7, 40, None), (60, 1500, None), (300, 2049, 100)],
    ids=["0 atoms", "0 edges", "self loops", "small", "6 chunks", "isolated atoms"],
)


@GRAPHS
def test_operator_equals_reference(atoms, edges, linked):
    inputs = random_inputs(atoms, edges, linked=linked)
    fused = outputs_and_gradients(torch.ops.efa.message, inputs)
    assert_close(fused, outputs_and_gradients(message_passing, inputs))
    if linked is not None:  # isolated atoms receive nothing and pass nothing back
        assert fused[0][linked:].abs().max() == 0 and fused[2][linked:].abs().max() == 0
    if edges:
        assert all(t.abs().max() > 0 for t in fused)  # every output and gradient is exercised


@pytest.mark.parametrize("name", FLOAT_INPUTS)
def test_a_perturbed_term_fails_the_comparison(name):
    """Negative control: a 1e-9 relative change to any one input is caught by the comparison."""
    inputs = random_inputs(40, 300)
    fused = outputs_and_gradients(torch.ops.efa.message, inputs)
    broken = dict(inputs, **{name: inputs[name] * (1 + 1e-9)})
    with pytest.raises(AssertionError):
        assert_close(fused, outputs_and_gradients(message_passing, broken))


def test_first_derivatives_match_finite_differences():
    inputs = random_inputs(5, 12, features=3, radial=2)
    args = [v.requires_grad_(k in FLOAT_INPUTS) for k, v in inputs.items()]
    assert torch.autograd.gradcheck(torch.ops.efa.message, args)


def test_double_backward_raises():
    inputs = random_inputs(5, 12)
    args = [v.requires_grad_(k in FLOAT_INPUTS) for k, v in inputs.items()]
    dx, dv = torch.ops.efa.message(*args)
    (g,) = torch.autograd.grad(dx.sum() + (dv ** 2).sum(), [args[0]], create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative.*use_fused"):
        g.sum().backward()


def test_bad_shapes_and_indices_raise_clear_errors():
    inputs = random_inputs(4, 6)
    with pytest.raises(RuntimeError, match=r"unit must be \(E, 3\)"):
        torch.ops.efa.message(*dict(inputs, unit=inputs["unit"][:, :2]).values())
    with pytest.raises(RuntimeError, match="edge 2 joins atoms"):
        sender = inputs["sender"].clone()
        sender[2] = 4
        torch.ops.efa.message(*dict(inputs, sender=sender).values())


def test_schema_and_meta_kernel():
    assert str(torch.ops.efa.message.default._schema) == "efa::" + MESSAGE_SCHEMA
    meta = {k: v.to("meta") for k, v in random_inputs(9, 20, features=4).items()}
    dx, dv = torch.ops.efa.message(*meta.values())
    assert dx.shape == (9, 4) and dv.shape == (9, 3, 4) and dx.device.type == "meta"


# -- efa::edge_message: the geometry from the edge vectors, per chunk --------------------------

EDGE_FLOAT_INPUTS = ("filter", "vec", "d", "weight", "bias")
EDGE_CUTOFF = 4.0


def random_edge_inputs(atoms: int, edges: int, features: int = 8, radial: int = 5, linked: int | None = None,
                       seed: int = 0) -> dict:
    """Inputs of efa::edge_message: edge vectors of lengths in (0.3, 1.25 cutoff), a fifth of them
    beyond the cutoff (envelope and slope zero); edges join only the first `linked` atoms."""
    base = random_inputs(atoms, edges, features, radial, linked, seed)
    g = torch.Generator().manual_seed(seed + 7)
    lengths = 0.3 + (1.25 * EDGE_CUTOFF - 0.3) * torch.rand(edges, 1, generator=g, dtype=torch.float64)
    return {"filter": base["filter"], "vec": base["vec"], "d": base["unit"] * lengths,
            "n_pi": radial_frequencies(radial, EDGE_CUTOFF), "weight": base["weight"], "bias": base["bias"],
            "sender": base["sender"], "receiver": base["receiver"], "cutoff": EDGE_CUTOFF}


def edge_outputs_and_gradients(op, inputs: dict) -> list[torch.Tensor]:
    return outputs_and_gradients(op, inputs, EDGE_FLOAT_INPUTS)


@GRAPHS
def test_edge_operator_equals_reference(atoms, edges, linked):
    inputs = random_edge_inputs(atoms, edges, linked=linked)
    fused = edge_outputs_and_gradients(torch.ops.efa.edge_message, inputs)
    assert_close(fused, edge_outputs_and_gradients(edge_message_passing, inputs))
    if linked is not None:  # isolated atoms receive nothing and pass nothing back
        assert fused[0][linked:].abs().max() == 0 and fused[2][linked:].abs().max() == 0
    if edges:
        assert all(t.abs().max() > 0 for t in fused)  # every output and gradient is exercised
        beyond = inputs["d"].norm(dim=1) >= EDGE_CUTOFF
        assert beyond.any() and (fused[4][beyond] == 0).all()  # edges beyond the cutoff: no force


def test_edge_operator_in_float32_follows_the_reference():
    inputs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in random_edge_inputs(50, 1000).items()}
    assert_close(edge_outputs_and_gradients(torch.ops.efa.edge_message, inputs),
                 edge_outputs_and_gradients(edge_message_passing, inputs), rtol=1e-5)


@pytest.mark.parametrize("name", EDGE_FLOAT_INPUTS + ("n_pi", "cutoff"))
def test_a_perturbed_edge_input_fails_the_comparison(name):
    """Negative control: a 1e-9 relative change to any one input is caught by the comparison."""
    inputs = random_edge_inputs(40, 300)
    fused = edge_outputs_and_gradients(torch.ops.efa.edge_message, inputs)
    broken = dict(inputs, **{name: inputs[name] * (1 + 1e-9)})
    with pytest.raises(AssertionError):
        assert_close(fused, edge_outputs_and_gradients(edge_message_passing, broken))


def test_edge_first_derivatives_match_finite_differences():
    inputs = random_edge_inputs(5, 12, features=3, radial=2)
    args = [v.requires_grad_(k in EDGE_FLOAT_INPUTS) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()]
    assert torch.autograd.gradcheck(torch.ops.efa.edge_message, args)


def test_edge_double_backward_raises():
    inputs = random_edge_inputs(5, 12)
    args = [v.requires_grad_(k in EDGE_FLOAT_INPUTS) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()]
    dx, dv = torch.ops.efa.edge_message(*args)
    (g,) = torch.autograd.grad(dx.sum() + (dv ** 2).sum(), [args[2]], create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative.*use_fused"):
        g.sum().backward()


def test_edge_bad_inputs_raise_clear_errors_schema_and_meta_kernel():
    inputs = random_edge_inputs(4, 6)
    with pytest.raises(RuntimeError, match=r"efa::edge_message: d must be \(E, 3\)"):
        torch.ops.efa.edge_message(*dict(inputs, d=inputs["d"][:, :2]).values())
    with pytest.raises(RuntimeError, match=r"weight must be \(3F, R\)"):
        torch.ops.efa.edge_message(*dict(inputs, n_pi=inputs["n_pi"][:3]).values())
    with pytest.raises(RuntimeError, match="efa::edge_message: edge 2 joins atoms"):
        sender = inputs["sender"].clone()
        sender[2] = 4
        torch.ops.efa.edge_message(*dict(inputs, sender=sender).values())
    assert str(torch.ops.efa.edge_message.default._schema) == "efa::" + EDGE_MESSAGE_SCHEMA
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in random_edge_inputs(9, 20, features=4).items()}
    dx, dv = torch.ops.efa.edge_message(*meta.values())
    assert dx.shape == (9, 4) and dv.shape == (9, 3, 4) and dx.device.type == "meta"


def saved_bytes_per_atom(model, graph) -> float:
    """Bytes autograd keeps for backward in one energy + forces call, per atom (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        energy_and_forces(model, *graph.inputs())
    return sum(seen.values()) / graph.positions.shape[0]


# float32, 32 features, 2 layers, cutoff 5 A, 16 radial functions, water droplets (36-42 edges per
# atom). Measured with efa::edge_message: 9.1 KB/atom (local), 10.4-10.6 (EFA), the graph's
# saved indices included; with efa::message + efa::radial_basis (before) 12.5 / 13.8, since the
# E x 16 basis alone is 2.6 KB/atom (benchmarks/results/memory_breakdown_2026-11-27.md).
SAVED_KB_PER_ATOM = {False: 9.5, True: 11.0}


@pytest.mark.parametrize("use_efa", [False, True], ids=["local", "EFA"])
def test_fused_energy_and_forces_keep_few_bytes_for_backward(use_efa):
    """What autograd saves for backward in the fused energy + forces call is bounded per atom
    (counted, not timed: machine-independent): no per-edge tensor but d (E x 3) and the indices."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from fused_step import random_model, water_droplet

    graph = structure_graph(water_droplet(600), [1, 8], 5.0, torch.float32)
    model = use_fused(random_model(use_efa, torch.float32), True)
    edges_per_atom = graph.edge_index.shape[1] / graph.positions.shape[0]
    assert 35 < edges_per_atom < 45
    saved = saved_bytes_per_atom(model, graph)
    assert saved <= 1024 * SAVED_KB_PER_ATOM[use_efa], saved / 1024
    # negative control: the reference radial basis keeps its E x 16 tensors (5 KB/atom more)
    use_fused(model, False)
    assert saved_bytes_per_atom(model, graph) > saved + 16 * 4 * edges_per_atom


# -- the whole model --------------------------------------------------------------------------

@pytest.mark.parametrize("script", [False, True], ids=["eager", "TorchScript"])
def test_model_on_water_cluster(script):
    graph = structure_graph(water_cluster(), CONFIG.atomic_numbers, CONFIG.cutoff)
    fused, reference = fused_and_reference(graph, script=script)
    assert_close(fused, reference)


def test_model_uses_its_own_radial_frequencies():
    """A model trained in float32 and cast to float64 (the shipped ones) carries float32-rounded
    frequencies n_pi: the fused path takes the model's buffer, not n pi / cutoff anew."""
    model = randomised_model(CONFIG)
    with torch.no_grad():
        model.radial.n_pi.copy_(model.radial.n_pi.float().double())
    graph = structure_graph(water_cluster(), CONFIG.atomic_numbers, CONFIG.cutoff)
    fused, reference = fused_and_reference(graph, model=model)
    assert_close(fused, reference)


@pytest.mark.parametrize("use_efa", [False, True], ids=["local", "EFA"])
def test_model_with_ghosts_and_isolated_atoms(use_efa):
    """owned = 0 rows (ghost copies, as on an MPI rank) and atoms beyond the cutoff of all others."""
    atoms = jittered_cluster(30)
    atoms.positions[-3:] += [[40.0, 0, 0], [0, 40.0, 0], [0, 0, 40.0]]
    graph = structure_graph(atoms, [1, 6, 8], 4.0)
    graph.owned[::4] = 0.0
    config = ModelConfig(atomic_numbers=[1, 6, 8], features=8, num_layers=3, cutoff=4.0, use_efa=use_efa, r_max=80.0)
    fused, reference = fused_and_reference(graph, config)
    assert_close(fused, reference)
    assert (fused[2][::4] == 0).all() and fused[1][::4].abs().max() > 0  # ghosts: no energy, but forces


@pytest.mark.parametrize("use_efa", [False, True], ids=["local", "EFA"])
def test_model_on_empty_graphs(use_efa):
    for atoms in (jittered_cluster(0), jittered_cluster(2, spacing=20.0)):  # an empty rank; no edges
        graph = structure_graph(atoms, [1, 6, 8], 4.0)
        config = ModelConfig(atomic_numbers=[1, 6, 8], features=8, use_efa=use_efa)
        fused, reference = fused_and_reference(graph, config)
        assert_close(fused, reference)


def test_files_calling_the_old_message_operators_load_and_equal_the_current_code():
    """A file exported before efa::edge_message (efa::message + efa::radial_basis in its code) loads,
    runs its own operators, and equals the same weights on the current code to 1e-12."""
    path = REPO / "tests" / "data" / "old_message_ops.pt"
    module, metadata = load_model_file(path)
    assert metadata["ops"] == ["efa::forward_ghosts", "efa::message", "efa::radial_basis"]
    model, _, _ = rebuild_model(path)
    graph = structure_graph(jittered_cluster(30), [1, 6, 8], 4.0)
    old = model_outputs(module, graph, OLD_MESSAGE_OPS)
    assert old[0].abs().max() > 0.01
    assert_close(model_outputs(torch.jit.script(use_fused(model, True)), graph, MESSAGE_OPS), old)


def test_training_with_the_fused_path_raises():
    model = use_fused(randomised_model(CONFIG), True)
    graph = structure_graph(water_cluster(), CONFIG.atomic_numbers, CONFIG.cutoff)
    _, forces, _ = energy_and_forces(model, *graph.inputs(), create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        (forces ** 2).sum().backward()


# Without the compiled library: efa::message and efa::attention_* are the reference, registered in pure torch.
PURE_TORCH = r"""
from pathlib import Path
import efa_deploy.paths
efa_deploy.paths.OPS_LIBRARY = Path("/nonexistent/libefa_ops.so")
import torch
from efa_deploy.ops import load_ops
from efa_deploy.model import ModelConfig, build_model, energy_and_forces, use_fused
assert load_ops() == "pure torch"
torch.manual_seed(0)
model = build_model(ModelConfig(atomic_numbers=[1], features=4, num_layers=2, num_vector_frequencies=2,
                                value_vectors=2, value_tensors=1))
with torch.no_grad():  # the residual outputs start at zero: randomise them so EFA counts
    for name, p in model.named_parameters():
        if "mlp.2" in name:
            p.normal_(0.0, 0.3)
positions = torch.rand(5, 3, dtype=torch.float64) * 2
edges = torch.tensor([[0, 1, 2, 3, 4, 0], [1, 2, 3, 4, 0, 2]])
inputs = (torch.zeros(5, dtype=torch.long), edges, torch.zeros(6, 3, dtype=torch.float64),
          torch.zeros(5, dtype=torch.long), 1, torch.ones(5, dtype=torch.float64))
reference = energy_and_forces(model, positions, *inputs)
fused = energy_and_forces(torch.jit.script(use_fused(model, True)), positions, *inputs)
print(max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(reference, fused)))
"""


def test_fused_models_run_without_the_compiled_library():
    result = subprocess.run([sys.executable, "-c", PURE_TORCH], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # the pure-torch operators are the reference itself (EFA: its rotations made once per stage)
    assert float(result.stdout) <= RTOL


# -- exported files in LAMMPS -----------------------------------------------------------------

ELEMENTS = ["H", "C", "O"]
LAMMPS_CONFIG = ModelConfig(atomic_numbers=[1, 6, 8], features=16, num_layers=2, cutoff=4.0, r_max=20.0)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """The exported (fused) file, and the same model scripted on the reference path."""
    folder = tmp_path_factory.mktemp("fused")
    model = randomised_model(LAMMPS_CONFIG)
    save_model_file(model, LAMMPS_CONFIG, folder / "fused.pt")
    save_model_file(model, LAMMPS_CONFIG, folder / "reference.pt", fused=False)
    return {name: folder / f"{name}.pt" for name in ("fused", "reference")}


def test_export_selects_the_fused_path(model_files):
    fused, _ = load_model_file(model_files["fused"])
    reference, _ = load_model_file(model_files["reference"])
    flags = {name: [m.fused for key, m in module.named_modules() if key.endswith((".message", ".efa"))]
             for name, module in (("fused", fused), ("reference", reference))}
    assert flags == {"fused": [True] * 4, "reference": [False] * 4}
    assert fused.radial.fused and not reference.radial.fused


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [1, 2])
def test_lammps_fused_file_equals_reference_file(tmp_path, model_files, nprocs):
    atoms = jittered_cluster(40)
    results = {}
    for name, path in model_files.items():
        workdir = tmp_path / name
        workdir.mkdir()
        write_data(atoms, workdir / "data.lmp", ELEMENTS)
        results[name] = static_run(workdir, path, ELEMENTS, nprocs=nprocs)
    fused, reference = results["fused"], results["reference"]
    assert abs(reference.energy) > 1.0 and np.abs(reference.forces).max() > 0.1
    assert fused.energy == pytest.approx(reference.energy, rel=RTOL)
    np.testing.assert_allclose(fused.forces, reference.forces, rtol=0, atol=RTOL * np.abs(reference.forces).max())
    np.testing.assert_allclose(fused.atomic_energies, reference.atomic_energies, rtol=0,
                               atol=RTOL * np.abs(reference.atomic_energies).max())
    np.testing.assert_allclose(fused.virial, reference.virial, rtol=0, atol=RTOL * np.abs(reference.virial).max())
