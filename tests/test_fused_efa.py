"""The fused EFA operators torch.ops.efa.attention_keys / attention_queries (ops/fused_efa.cpp)
against the pure-torch stages (efa_deploy/model/erope.py) and the model's reference path:
float64 equality (1e-12 relative) of outputs and gradients on one or several structures (one
of them empty), ghosts (owned = 0), empty ranks, several cache chunks, evenly spaced
frequencies (angle-addition recurrence) and others (sin/cos per channel); every EFA variant
(l = 1 queries/keys, vector and tensor values, silu) as a block, against the O(N^2) pairwise
form and in whole models; finite differences; a negative control; a clear error on double
backward. LAMMPS runs of exported (fused) files: test_fused.py and test_lammps.py."""

from __future__ import annotations

import math

import pytest
import torch

from efa_deploy.graph import structure_graph
from efa_deploy.model import EuclideanFastAttention, ModelConfig, energy_and_forces, use_fused
from efa_deploy.model.efa import frequencies
from efa_deploy.model.erope import key_value_sums, query_contraction
from efa_deploy.model.lebedev import lebedev_grid
from efa_deploy.ops import ATTENTION_SCHEMAS
from efa_deploy.paths import OPS_LIBRARY

from helpers import assert_close, fused_and_reference, randomised_model, water_cluster

pytestmark = pytest.mark.skipif(not OPS_LIBRARY.exists(), reason="libefa_ops.so is not built (make build)")

LADDER = torch.cat([frequencies(4, math.pi, 10.0), frequencies(2, math.pi, 10.0).repeat(3)])  # 0, 1, 2, 3 x pi/30
UNEVEN = torch.tensor([0.0, 0.21, 0.5, 0.37, 0.5])  # no common step: sin/cos per channel
STILL = torch.zeros(1)  # one zero frequency: a plain global sum


def stage_inputs(atoms: int, omega: torch.Tensor = LADDER, values: int = 6, batch: list[int] | None = None,
                 n_structures: int = 1, ghosts: bool = False, grid: int = 50, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    m = omega.numel()
    owned = torch.ones(atoms, dtype=torch.float64)
    if ghosts:
        owned[1::3] = 0.0
    return {
        "positions": torch.rand(atoms, 3, generator=g, dtype=torch.float64) * 8.0 - 2.0,
        "keys": rand(atoms, m, 2), "values": rand(atoms, values), "owned": owned,
        "batch": torch.zeros(atoms, dtype=torch.long) if batch is None else torch.tensor(batch, dtype=torch.long),
        "n_structures": n_structures, "omega": omega.double(),
        "directions": torch.from_numpy(lebedev_grid(grid)[0]), "queries": rand(atoms, m, 2),
    }


KEYS_ARGS = ("positions", "keys", "values", "owned", "batch", "n_structures", "omega", "directions")
QUERIES_ARGS = ("positions", "queries", "kv", "batch", "omega", "directions")


def both_stages(keys_op, queries_op, inputs: dict) -> list[torch.Tensor]:
    """KV and y, and the gradients of a fixed random functional of each with respect to every
    differentiable input of its stage (stage 2 gets the same KV in both paths)."""
    leaves = {k: (v.clone().requires_grad_(k in ("positions", "keys", "values", "queries"))
                  if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    kv = keys_op(*[leaves[k] for k in KEYS_ARGS])
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(kv.shape, generator=g, dtype=kv.dtype)
    kv_grads = torch.autograd.grad((kv * weights).sum(), [leaves[k] for k in ("positions", "keys", "values")],
                                   allow_unused=True)
    leaves["kv"] = torch.randn(kv.shape, generator=g, dtype=kv.dtype).requires_grad_(True)
    y = queries_op(*[leaves[k] for k in QUERIES_ARGS])
    weights = torch.randn(y.shape, generator=g, dtype=y.dtype)
    y_grads = torch.autograd.grad((y * weights).sum(), [leaves[k] for k in ("positions", "queries", "kv")],
                                  allow_unused=True)
    grads = [gr if gr is not None else torch.zeros(1) for gr in kv_grads + y_grads]
    return [kv.detach(), y.detach()] + grads


def fused_stages(inputs):
    return both_stages(torch.ops.efa.attention_keys, torch.ops.efa.attention_queries, inputs)


def reference_stages(inputs):
    return both_stages(key_value_sums, query_contraction, inputs)


CASES = {
    "one structure": dict(atoms=40),
    "several chunks": dict(atoms=300),
    "three structures, one empty": dict(atoms=32, batch=[0] * 7 + [2] * 20 + [3] * 5, n_structures=4),
    "ghosts": dict(atoms=30, batch=[0] * 10 + [1] * 20, n_structures=2, ghosts=True),
    "uneven frequencies": dict(atoms=40, omega=UNEVEN),
    "one zero frequency": dict(atoms=20, omega=STILL),
    "large grid": dict(atoms=50, grid=590, omega=LADDER * 4),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_stages_equal_reference(case):
    inputs = stage_inputs(**case)
    fused = fused_stages(inputs)
    assert_close(fused, reference_stages(inputs))
    position_grads = (2, 5)  # a zero frequency does not see positions
    assert all(t.abs().max() > 0 for i, t in enumerate(fused) if case.get("omega") is not STILL or i not in position_grads)
    if case.get("ghosts"):  # ghosts add nothing to KV and get no key/value gradients from it
        owned = inputs["owned"] == 1
        assert fused[3][~owned].abs().max() == 0 and fused[4][~owned].abs().max() == 0
        assert fused[2][~owned].abs().max() == 0 and fused[5][~owned].abs().max() > 0


@pytest.mark.parametrize("atoms", [0, 3], ids=["empty rank", "all ghosts"])
def test_stages_with_nothing_to_sum(atoms):
    inputs = stage_inputs(atoms)
    inputs["owned"].zero_()
    fused = fused_stages(inputs)
    assert_close(fused, reference_stages(inputs))
    assert fused[0].shape == (1, LADDER.numel(), 50, 12) and fused[0].abs().sum() == 0


def test_no_structures():
    inputs = stage_inputs(0, n_structures=0)
    kv = torch.ops.efa.attention_keys(*[inputs[k] for k in KEYS_ARGS])
    y = torch.ops.efa.attention_queries(*[kv if k == "kv" else inputs[k] for k in QUERIES_ARGS])
    assert kv.shape == (0, LADDER.numel(), 50, 12) and y.shape == (0, 6)


def test_a_perturbed_input_fails_the_comparison():
    """Negative control: a 1e-9 relative change of the frequencies is caught."""
    inputs = stage_inputs(40)
    fused = fused_stages(inputs)
    with pytest.raises(AssertionError):
        assert_close(fused, reference_stages(dict(inputs, omega=inputs["omega"] * (1 + 1e-9))))


def test_first_derivatives_match_finite_differences():
    inputs = stage_inputs(5, values=2, batch=[0, 0, 1, 1, 1], n_structures=2, ghosts=True, grid=14)
    keys_args = [inputs[k].requires_grad_(k in ("positions", "keys", "values")) if isinstance(inputs[k], torch.Tensor)
                 else inputs[k] for k in KEYS_ARGS]
    assert torch.autograd.gradcheck(torch.ops.efa.attention_keys, keys_args)
    kv = torch.randn(2, LADDER.numel(), 14, 4, dtype=torch.float64, requires_grad=True)
    inputs = dict(inputs, kv=kv, positions=inputs["positions"].detach(), queries=inputs["queries"].requires_grad_(True))
    queries_args = [inputs[k].requires_grad_(k in ("positions", "queries", "kv")) for k in QUERIES_ARGS]
    assert torch.autograd.gradcheck(torch.ops.efa.attention_queries, queries_args)


def test_double_backward_raises():
    inputs = stage_inputs(6)
    positions = inputs["positions"].requires_grad_(True)
    kv = torch.ops.efa.attention_keys(*[inputs[k] for k in KEYS_ARGS])
    y = torch.ops.efa.attention_queries(positions, inputs["queries"], kv.detach(), inputs["batch"], inputs["omega"],
                                        inputs["directions"])
    for out in (kv, y):
        (g,) = torch.autograd.grad((out ** 2).sum(), [positions], create_graph=True)
        with pytest.raises(RuntimeError, match="no second derivative.*use_fused"):
            g.sum().backward()


def test_bad_inputs_raise_clear_errors():
    inputs = stage_inputs(4, batch=[0, 0, 1, 2], n_structures=2)
    with pytest.raises(RuntimeError, match="atom 3 is in structure 2 but there are 2 structures"):
        torch.ops.efa.attention_keys(*[inputs[k] for k in KEYS_ARGS])
    with pytest.raises(RuntimeError, match=r"keys must be \(N, M, 2\)"):
        torch.ops.efa.attention_keys(*[inputs[k][:, :2] if k == "keys" else inputs[k] for k in KEYS_ARGS])
    with pytest.raises(RuntimeError, match=r"kv must be \(B, M, G, 2D\)"):
        wrong_kv = torch.zeros(2, 3, 50, 4, dtype=torch.float64)  # 3 channels, not 7
        torch.ops.efa.attention_queries(*[wrong_kv if k == "kv" else inputs[k] for k in QUERIES_ARGS])


def test_schemas_and_meta_kernels():
    for name, schema in ATTENTION_SCHEMAS.items():
        assert str(getattr(torch.ops.efa, name).default._schema) == "efa::" + schema
    inputs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in stage_inputs(9, n_structures=1).items()}
    kv = torch.ops.efa.attention_keys(*[inputs[k] for k in KEYS_ARGS])
    y = torch.ops.efa.attention_queries(*[kv if k == "kv" else inputs[k] for k in QUERIES_ARGS])
    assert kv.shape == (1, LADDER.numel(), 50, 12) and y.shape == (9, 6) and y.device.type == "meta"


# -- the EFA block: every variant, against its reference path and the pairwise form ----------

VARIANTS = {
    "scalar": dict(),
    "l=1 queries and keys": dict(num_vector_frequencies=2),
    "vector and tensor values": dict(value_vectors=3, value_tensors=2),
    "silu": dict(qk_activation="silu"),
    "one frequency": dict(num_frequencies=1),
    "uneven frequencies": dict(num_frequencies=8, num_vector_frequencies=3),  # steps pi/70 and pi/20
    "everything": dict(num_vector_frequencies=4, value_vectors=2, value_tensors=2, qk_activation="silu"),
}
FEATURES = 16


def random_block(**options) -> EuclideanFastAttention:
    torch.manual_seed(0)
    block = EuclideanFastAttention(FEATURES, num_frequencies=options.pop("num_frequencies", 4), value_dim=8,
                                   grid_points=110, r_max=10.0, b_max=math.pi, **options).double()
    with torch.no_grad():
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.5)
    return block


def block_outputs(block, fused: bool, exact: bool = False, atoms: int = 24, seed: int = 3) -> list[torch.Tensor]:
    """Output and gradients (features, vector features, positions) of two structures with ghosts,
    largest distance within r_max."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(atoms, FEATURES, generator=g, dtype=torch.float64, requires_grad=True)
    vec = torch.randn(atoms, 3, FEATURES, generator=g, dtype=torch.float64, requires_grad=True)
    positions = (torch.rand(atoms, 3, generator=g, dtype=torch.float64) * 5.5).requires_grad_(True)
    batch = torch.tensor([0] * (atoms // 3) + [1] * (atoms - atoms // 3))
    owned = torch.ones(atoms, dtype=torch.float64)
    owned[::5] = 0.0
    block.fused, block.exact = fused, exact
    y = block(x, vec, positions, batch, 2, owned)
    weights = torch.randn(y.shape, generator=g, dtype=y.dtype)
    grads = torch.autograd.grad((y * weights).sum(), [x, vec, positions], allow_unused=True)  # vec: l = 1 variants
    return [y.detach()] + [torch.zeros(1) if gr is None else gr for gr in grads]


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_block_variants_equal_reference_and_pairwise_form(options):
    block = random_block(**options)
    fused = block_outputs(block, fused=True)
    assert_close(fused, block_outputs(block, fused=False))
    # the grid is a quadrature of the pairwise kernel: equal to its accuracy within r_max
    assert_close(fused, block_outputs(block, fused=False, exact=True), rtol=1e-6)
    with pytest.raises(AssertionError):  # negative control: the same comparison on another system
        assert_close(fused, block_outputs(block, fused=False, exact=True, seed=4), rtol=1e-6)


def test_block_on_cuda_tensors_takes_the_reference_path():
    """On CUDA tensors a fused block runs erope.py, or the CUDA kernels of ops/cuda/ where the
    library has them (EFA_CUDA=1): the same numbers either way."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    block = random_block(num_vector_frequencies=2).cuda()
    block.fused = True
    x = torch.randn(5, FEATURES, dtype=torch.float64, device="cuda")
    vec = torch.randn(5, 3, FEATURES, dtype=torch.float64, device="cuda")
    positions = torch.rand(5, 3, dtype=torch.float64, device="cuda")
    batch, owned = torch.zeros(5, dtype=torch.long, device="cuda"), torch.ones(5, dtype=torch.float64, device="cuda")
    fused = block(x, vec, positions, batch, 1, owned)
    block.fused = False
    assert_close([fused], [block(x, vec, positions, batch, 1, owned)])


# -- whole models -----------------------------------------------------------------------------

MODEL = ModelConfig(atomic_numbers=[1, 8], features=16, num_layers=2, cutoff=4.0, r_max=30.0, num_vector_frequencies=2,
                    value_vectors=2, value_tensors=2)


@pytest.mark.parametrize("script", [False, True], ids=["eager", "TorchScript"])
def test_model_with_every_variant_on_water_cluster(script):
    graph = structure_graph(water_cluster(), MODEL.atomic_numbers, MODEL.cutoff)
    fused, reference = fused_and_reference(graph, MODEL, script=script)
    assert_close(fused, reference)


def test_model_in_float32_is_close():
    """float32 models take the fused path too (equal to float32 rounding)."""
    graph = structure_graph(water_cluster(), MODEL.atomic_numbers, MODEL.cutoff)
    model = randomised_model(MODEL, dtype=torch.float32)
    inputs = list(graph.inputs())
    inputs[0], inputs[3], inputs[6] = inputs[0].float(), inputs[3].float(), inputs[6].float()
    results = [energy_and_forces(use_fused(model, fused), *inputs) for fused in (True, False)]
    assert_close([t.detach() for t in results[0]], [t.detach() for t in results[1]], rtol=1e-4)
