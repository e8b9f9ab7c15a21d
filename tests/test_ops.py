"""The collective operators torch.ops.efa.*: adjoints, fake kernels, and the pure-torch
registration that lets a model import and train where neither the compiled library nor
LAMMPS/MPI is available."""

import subprocess
import sys

import pytest
import torch

import efa_deploy.ops  # noqa: F401
from efa_deploy.model import ModelConfig
from efa_deploy.modelfile import load_model_file, save_model_file
from efa_deploy.ops import ADJOINTS
from efa_deploy.paths import OPS_LIBRARY

from helpers import REPO, randomised_model

# Blocks lammps, mpi4py and mpich, points the package at a missing libefa_ops.so, then
# imports the model and trains a tiny EFA model with the force loss (double backward).
NO_LAMMPS = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lammps", "mpi4py", "mpich"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
from pathlib import Path
import efa_deploy.paths
efa_deploy.paths.OPS_LIBRARY = Path("/nonexistent/libefa_ops.so")
import torch
import efa_deploy.model
from efa_deploy.ops import load_ops
from efa_deploy.model import ModelConfig, build_model, energy_and_forces
assert load_ops() == "pure torch", load_ops()
torch.manual_seed(0)
model = build_model(ModelConfig(atomic_numbers=[1, 8], features=8, num_layers=2, num_frequencies=2, value_dim=4,
                                r_max=8.0, cutoff=3.0, num_radial=4))
n = 6
positions = torch.rand(n, 3, dtype=torch.float64) * 3
species = torch.tensor([0, 1, 0, 1, 0, 0])
i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
keep = i != j
edges = torch.stack([i[keep], j[keep]])
inputs = (species, edges, torch.zeros(edges.shape[1], 3, dtype=torch.float64), torch.zeros(n, dtype=torch.long), 1,
          torch.ones(n, dtype=torch.float64))
target_forces = torch.randn(n, 3, dtype=torch.float64)
optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
losses = []
for step in range(30):
    energy, forces, _ = energy_and_forces(model, positions, *inputs, create_graph=True)
    loss = ((forces - target_forces) ** 2).mean() + (energy.sum() - 1.0) ** 2
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    losses.append(float(loss))
torch.jit.script(model)
print(losses[0], losses[-1])
"""


def test_model_imports_and_trains_without_lammps_or_compiled_ops():
    result = subprocess.run([sys.executable, "-c", NO_LAMMPS], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    first, last = map(float, result.stdout.split())
    assert last < 0.5 * first  # it learned: the force loss reached the weights through double backward


@pytest.mark.parametrize("name", sorted(ADJOINTS))
def test_operators_are_differentiable_to_second_order(name):
    op = getattr(torch.ops.efa, name)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(op, (x,))
    assert torch.autograd.gradgradcheck(op, (x,))


@pytest.mark.parametrize("name", sorted(ADJOINTS))
def test_operators_have_shape_only_kernels(name):
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = getattr(torch.ops.efa, name)
    assert op(torch.empty(4, 7, device="meta")).shape == (4, 7)
    with FakeTensorMode():
        assert op(torch.empty(2, 9, dtype=torch.float32)).shape == (2, 9)


def test_compiled_library_is_in_use_when_built():
    if not OPS_LIBRARY.exists():
        pytest.skip("libefa_ops.so is not built")
    assert efa_deploy.ops.load_ops() == "compiled"


def test_torch_export_keeps_the_collectives_and_the_numbers():
    """torch.export (the path to AOTInductor) traces the model with the collectives as graph nodes,
    and the exported program gives the eager model's energies and forces."""
    from ase.io import read

    from efa_deploy.graph import batch_graph
    from efa_deploy.model import energy_and_forces


    config = ModelConfig(atomic_numbers=[1, 8], features=8, num_layers=2, num_frequencies=2, value_dim=4,
                         value_vectors=2, value_tensors=2, r_max=20.0)
    model = randomised_model(config).eval()
    graph = batch_graph([read(REPO / "export" / "water16.xyz")], config.atomic_numbers, config.cutoff)
    program = torch.export.export(model, graph.inputs())
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert {"efa.global_sum.default", "efa.forward_ghosts.default"} <= targets
    energy, forces, _ = energy_and_forces(model, *graph.inputs())
    exported_energy, exported_forces, _ = energy_and_forces(program.module(), *graph.inputs())
    assert abs(float(energy.detach()[0])) > 1.0
    assert float(exported_energy.detach()[0]) == pytest.approx(float(energy.detach()[0]), rel=1e-12)
    torch.testing.assert_close(exported_forces, forces, rtol=0, atol=1e-12)


def code_operators(path) -> set[str]:
    """The efa:: operators named in a model file's serialised TorchScript code (its text)."""
    import re
    import zipfile

    with zipfile.ZipFile(path) as z:
        code = "".join(z.read(n).decode() for n in z.namelist() if "/code/" in n and n.endswith(".py"))
    return {f"efa::{name}" for name in re.findall(r"\bops\.efa\.(\w+)\(", code)}


@pytest.mark.parametrize("use_efa, fused", [(True, True), (True, False), (False, True)],
                         ids=["efa fused", "efa reference", "local fused"])
def test_the_ops_field_lists_the_operators_the_file_calls(tmp_path, use_efa, fused):
    """Derived from the scripted graph at export, checked against the text of the file's code.
    A local model calls no global_sum and no attention operator. The fused and the reference
    paths list the same operators: the choice is a module attribute read at run time, so the
    file carries both branches and needs efa::edge_message (and, with EFA, the fused attention
    and mesh operators: the mesh path is in every EFA block's code) either way."""

    config = ModelConfig(atomic_numbers=[1, 8], features=8, num_layers=2, cutoff=3.0, r_max=10.0, use_efa=use_efa)
    path = tmp_path / "model.pt"
    metadata = save_model_file(randomised_model(config), config, path, fused=fused)
    attention = {"efa::global_sum", "efa::attention_keys", "efa::attention_queries", "efa::mesh_spread",
                 "efa::mesh_gather"}
    # efa::cuda_kernels: whether the fused operators have CUDA kernels here (local.fused_kernels_on)
    expected = {"efa::forward_ghosts", "efa::edge_message", "efa::cuda_kernels"} | (attention if use_efa else set())
    assert metadata["ops"] == sorted(code_operators(path)) == sorted(expected)
    module, read_back = load_model_file(path)
    assert read_back["ops"] == efa_deploy.ops.called_operators(module) == metadata["ops"]
