"""The CUDA kernels of efa::edge_message (ops/cuda/, built with EFA_CUDA=1 on a machine with nvcc
and a CUDA build of torch; benchmarks/gpu/cuda_ops_check.sh) against the CPU operator: outputs and
first derivatives in float64 to 1e-12, with empty graphs, self loops, isolated atoms, edges beyond
the cutoff, feature counts that are not powers of two, and the gradient subsets autograd asks for.
Skipped without a GPU or without the kernels; the CPU suite stays green either way."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from test_fused import EDGE_FLOAT_INPUTS, random_edge_inputs

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not torch._C._dispatch_has_kernel_for_dispatch_key("efa::edge_message", "CUDA"),
    reason="needs a CUDA GPU and the library built with EFA_CUDA=1")


def on(device: str, inputs: dict) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def outputs_and_gradients(inputs: dict, wanted: tuple[str, ...]) -> list[torch.Tensor]:
    """(dx, dv) and the gradients of a fixed random functional of them (the same on every device)
    with respect to the inputs named in `wanted`, as CPU tensors."""
    leaves = {k: v.clone().requires_grad_(k in wanted) if isinstance(v, torch.Tensor) else v
              for k, v in inputs.items()}
    dx, dv = torch.ops.efa.edge_message(*leaves.values())
    g = torch.Generator().manual_seed(1)
    wx = torch.randn(dx.shape, generator=g, dtype=dx.dtype).to(dx.device)
    wv = torch.randn(dv.shape, generator=g, dtype=dv.dtype).to(dv.device)
    grads = torch.autograd.grad((dx * wx).sum() + (dv * wv).sum(), [leaves[k] for k in wanted], allow_unused=True)
    return [t.detach().cpu() for t in [dx, dv] + [torch.zeros_like(leaves[k]) if gr is None else gr
                                                   for k, gr in zip(wanted, grads)]]


@pytest.mark.parametrize("atoms, edges, linked, features", [
    (0, 0, None, 8), (6, 0, None, 8), (1, 3, None, 8), (7, 40, None, 8), (60, 1500, None, 20),
    (300, 2049, 100, 32), (50, 700, None, 128)],
    ids=["0 atoms", "0 edges", "self loops", "small", "20 features", "isolated atoms", "128 features"])
@pytest.mark.parametrize("wanted", [EDGE_FLOAT_INPUTS, ("d",), ("filter", "vec", "weight")],
                         ids=["all", "forces", "no d"])
def test_cuda_edge_message_equals_the_cpu_operator(atoms, edges, linked, features, wanted):
    inputs = random_edge_inputs(atoms, edges, features=features, linked=linked)
    cpu = outputs_and_gradients(inputs, wanted)
    gpu = outputs_and_gradients(on("cuda", inputs), wanted)
    assert_close(gpu, cpu, rtol=1e-12)
    if edges:
        assert all(t.abs().max() > 0 for t in cpu)


def test_cuda_edge_message_in_float32_follows_float64():
    inputs = random_edge_inputs(60, 1500, features=32)
    single = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    gpu = outputs_and_gradients(on("cuda", single), EDGE_FLOAT_INPUTS)
    assert_close([t.double() for t in gpu], outputs_and_gradients(inputs, EDGE_FLOAT_INPUTS), rtol=1e-5)


def test_cuda_edge_message_refuses_an_edge_to_a_missing_atom():
    inputs = on("cuda", random_edge_inputs(7, 40))
    inputs["receiver"][3] = 7
    with pytest.raises(RuntimeError, match="an edge joins atom 7 but there are 7 atoms"):
        torch.ops.efa.edge_message(*inputs.values())
