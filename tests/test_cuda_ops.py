"""The CUDA kernels of efa::edge_message (ops/cuda/) against the CPU operator, float64 to 1e-12:

- everywhere: the kernels' per-thread steps (ops/cuda/edge_message_steps.h), built for the host
  with ops/cuda/emulate.cpp and run edge after edge in the kernels' order;
- on a GPU, with the library built with EFA_CUDA=1 (benchmarks/gpu/cuda_ops_check.sh): the
  kernels themselves, outputs and first derivatives through autograd, with empty graphs, self
  loops, isolated atoms, edges beyond the cutoff, feature counts that are not powers of two and
  the gradient subsets autograd asks for; skipped elsewhere."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from efa_deploy.paths import OPS_LIBRARY
from helpers import REPO, assert_close
from test_fused import EDGE_FLOAT_INPUTS, random_edge_inputs

needs_kernels = pytest.mark.skipif(
    not torch.cuda.is_available() or not torch._C._dispatch_has_kernel_for_dispatch_key("efa::edge_message", "CUDA"),
    reason="needs a CUDA GPU and the library built with EFA_CUDA=1")
GRAPHS = pytest.mark.parametrize("atoms, edges, linked, features", [
    (0, 0, None, 8), (6, 0, None, 8), (1, 3, None, 8), (7, 40, None, 8), (60, 1500, None, 20),
    (300, 2049, 100, 32), (50, 700, None, 128)],
    ids=["0 atoms", "0 edges", "self loops", "small", "20 features", "isolated atoms", "128 features"])


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        pytest.skip("no C++ compiler to build ops/cuda/emulate.cpp")
    library = tmp_path_factory.mktemp("emulate") / "emulate.so"
    subprocess.run([compiler, "-std=c++17", "-O1", "-shared", "-fPIC", str(REPO / "ops" / "cuda" / "emulate.cpp"),
                    "-o", str(library)], check=True)
    return ctypes.CDLL(str(library))


def pointer(t: torch.Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


@pytest.mark.skipif(not OPS_LIBRARY.exists(), reason="libefa_ops.so is not built (make build)")
@GRAPHS
def test_kernel_steps_run_on_the_cpu_equal_the_cpu_operator(emulation, atoms, edges, linked, features):
    x = random_edge_inputs(atoms, edges, features=features, linked=linked)
    arrays = [x[k].contiguous() for k in ("filter", "vec", "d", "n_pi", "weight", "bias", "sender", "receiver")]
    sizes = [ctypes.c_int64(n) for n in (atoms, edges, features, x["n_pi"].shape[0])] + [ctypes.c_double(x["cutoff"])]
    common = [pointer(t) for t in arrays] + sizes
    dx, dv = torch.zeros(atoms, features, dtype=torch.float64), torch.zeros(atoms, 3, features, dtype=torch.float64)
    emulation.efa_emulate_edge_message(*common, pointer(dx), pointer(dv))
    assert_close([dx, dv], list(torch.ops.efa.edge_message(*x.values())), rtol=1e-12)
    g = torch.Generator().manual_seed(2)
    grad_dx, grad_dv = torch.randn(dx.shape, generator=g, dtype=torch.float64), torch.randn(dv.shape, generator=g,
                                                                                           dtype=torch.float64)
    g_filter, g_vec = torch.zeros_like(x["filter"]), torch.zeros_like(x["vec"])
    g_d = torch.zeros(edges, 3, dtype=torch.float64)
    g_radial = torch.zeros(edges, 3 * features, dtype=torch.float64)
    rbf = torch.zeros(edges, x["n_pi"].shape[0], dtype=torch.float64)
    emulation.efa_emulate_edge_message_backward(*common, pointer(grad_dx), pointer(grad_dv), pointer(g_filter),
                                                pointer(g_vec), pointer(g_d), pointer(g_radial), pointer(rbf))
    expected = torch.ops.efa.edge_message_backward(grad_dx, grad_dv, *x.values(), [True, True, True])
    steps = [g_filter, g_vec, g_d, g_radial.t() @ rbf, g_radial.sum(0)]  # as edge_message_cuda.cpp makes the last two
    assert_close(steps, list(expected), rtol=1e-12)
    if edges:
        assert all(t.abs().max() > 0 for t in steps)


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


@needs_kernels
@GRAPHS
@pytest.mark.parametrize("wanted", [EDGE_FLOAT_INPUTS, ("d",), ("filter", "vec", "weight")],
                         ids=["all", "forces", "no d"])
def test_cuda_edge_message_equals_the_cpu_operator(atoms, edges, linked, features, wanted):
    inputs = random_edge_inputs(atoms, edges, features=features, linked=linked)
    cpu = outputs_and_gradients(inputs, wanted)
    gpu = outputs_and_gradients(on("cuda", inputs), wanted)
    assert_close(gpu, cpu, rtol=1e-12)
    if edges:
        assert all(t.abs().max() > 0 for t in cpu)


@needs_kernels
def test_cuda_edge_message_in_float32_follows_float64():
    inputs = random_edge_inputs(60, 1500, features=32)
    single = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    gpu = outputs_and_gradients(on("cuda", single), EDGE_FLOAT_INPUTS)
    assert_close([t.double() for t in gpu], outputs_and_gradients(inputs, EDGE_FLOAT_INPUTS), rtol=1e-5)


@needs_kernels
def test_cuda_edge_message_refuses_an_edge_to_a_missing_atom():
    inputs = on("cuda", random_edge_inputs(7, 40))
    inputs["receiver"][3] = 7
    with pytest.raises(RuntimeError, match="an edge joins atom 7 but there are 7 atoms"):
        torch.ops.efa.edge_message(*inputs.values())


# -- efa::attention_keys / attention_queries: the kernels' steps on the CPU, composed as attention_cuda.cpp does

def emulated_attention(emulation, x: dict, w_kv: torch.Tensor, w_y: torch.Tensor, kv_in: torch.Tensor,
                       chunk: int) -> list[torch.Tensor]:
    """KV, y and the backward operators' gradients for upstream gradients w_kv, w_y (y from kv_in),
    made as attention_cuda.cpp makes them: per chunk of at most `chunk` consecutive atoms of one
    structure, the emulated rows kernel and a matrix product; backward through the emulated
    rows-backward kernel."""
    m, g, d = x["omega"].numel(), x["directions"].shape[0], x["values"].shape[1]
    sizes = [ctypes.c_int64(m), ctypes.c_int64(g)]
    runs = torch.unique_consecutive(x["batch"], return_counts=True)
    pieces, start = [], 0
    for b, n in zip(*[t.tolist() for t in runs]):
        pieces += [(b, start + first, min(chunk, n - first)) for first in range(0, n, chunk)]
        start += n

    def rows(channels, first, count):
        out = torch.zeros(count, 2 * m * g, dtype=torch.float64)
        emulation.efa_emulate_attention_rows(pointer(x["positions"]), pointer(channels), pointer(x["omega"]),
                                             pointer(x["directions"]), *sizes, ctypes.c_int64(first),
                                             ctypes.c_int64(count), pointer(out))
        return out

    def rows_backward(channels, first, count, grad_rows, g_channels, g_positions):
        emulation.efa_emulate_attention_rows_backward(
            pointer(x["positions"]), pointer(channels), pointer(x["omega"]), pointer(x["directions"]), *sizes,
            ctypes.c_int64(first), ctypes.c_int64(count), pointer(grad_rows.contiguous()), pointer(g_channels),
            pointer(g_positions))

    matrix = lambda t, b: t[b].reshape(2 * m * g, d)  # noqa: E731
    masked = x["values"] * x["owned"].unsqueeze(1)
    kv = torch.zeros(x["n_structures"], m, g, 2 * d, dtype=torch.float64)
    y = torch.zeros(x["positions"].shape[0], d, dtype=torch.float64)
    gk_pos, g_keys, g_masked = torch.zeros_like(x["positions"]), torch.zeros_like(x["keys"]), torch.zeros_like(masked)
    gq_pos, g_queries, g_kv = torch.zeros_like(x["positions"]), torch.zeros_like(x["queries"]), torch.zeros_like(kv_in)
    for b, first, count in pieces:
        part = slice(first, first + count)
        a = rows(x["keys"], first, count)
        matrix(kv, b).add_(a.t() @ masked[part])
        g_masked[part] = a @ matrix(w_kv, b)
        rows_backward(x["keys"], first, count, masked[part] @ matrix(w_kv, b).t(), g_keys, gk_pos)
        a = rows(x["queries"], first, count)
        y[part] = a @ matrix(kv_in, b)
        matrix(g_kv, b).add_(a.t() @ w_y[part])
        rows_backward(x["queries"], first, count, w_y[part] @ matrix(kv_in, b).t(), g_queries, gq_pos)
    return [kv, y, gk_pos, g_keys, g_masked * x["owned"].unsqueeze(1), gq_pos, g_queries, g_kv]


@pytest.mark.skipif(not OPS_LIBRARY.exists(), reason="libefa_ops.so is not built (make build)")
@pytest.mark.parametrize("case", ["one structure", "three structures, one empty", "ghosts", "uneven frequencies",
                                  "one zero frequency"])
def test_attention_kernel_steps_run_on_the_cpu_equal_the_cpu_operators(emulation, case):
    from test_fused_efa import CASES, KEYS_ARGS, QUERIES_ARGS, stage_inputs

    x = stage_inputs(**CASES[case])
    x = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    kv = torch.ops.efa.attention_keys(*[x[k] for k in KEYS_ARGS])
    gen = torch.Generator().manual_seed(5)
    w_kv = torch.randn(kv.shape, generator=gen, dtype=torch.float64)
    kv_in = torch.randn(kv.shape, generator=gen, dtype=torch.float64)
    w_y = torch.randn(x["positions"].shape[0], x["values"].shape[1], generator=gen, dtype=torch.float64)
    queries_inputs = [kv_in if k == "kv" else x[k] for k in QUERIES_ARGS]
    expected = [kv, torch.ops.efa.attention_queries(*queries_inputs),
                *torch.ops.efa.attention_keys_backward(w_kv, *[x[k] for k in KEYS_ARGS if k != "n_structures"]),
                *torch.ops.efa.attention_queries_backward(w_y, *queries_inputs)]
    assert_close(emulated_attention(emulation, x, w_kv, w_y, kv_in, chunk=7), expected, rtol=1e-12)


@needs_kernels
@pytest.mark.parametrize("case", ["one structure", "several chunks", "three structures, one empty", "ghosts",
                                  "uneven frequencies", "one zero frequency", "large grid"])
def test_cuda_attention_equals_the_cpu_operators(case):
    from test_fused_efa import CASES, KEYS_ARGS, QUERIES_ARGS, stage_inputs

    x = stage_inputs(**CASES[case])
    gen = torch.Generator().manual_seed(5)
    kv = torch.ops.efa.attention_keys(*[x[k] for k in KEYS_ARGS])
    w_kv, kv_in = torch.randn(kv.shape, generator=gen, dtype=torch.float64), torch.randn(kv.shape, generator=gen,
                                                                                          dtype=torch.float64)
    w_y = torch.randn(x["positions"].shape[0], x["values"].shape[1], generator=gen, dtype=torch.float64)
    results = []
    for device in ("cpu", "cuda"):
        xd = on(device, dict(x, kv=kv_in, w_kv=w_kv, w_y=w_y))
        keys_args = [xd[k] for k in KEYS_ARGS]
        queries_args = [xd[k] for k in QUERIES_ARGS]
        out = [torch.ops.efa.attention_keys(*keys_args), torch.ops.efa.attention_queries(*queries_args),
               *torch.ops.efa.attention_keys_backward(xd["w_kv"], *[a for k, a in zip(KEYS_ARGS, keys_args)
                                                                    if k != "n_structures"]),
               *torch.ops.efa.attention_queries_backward(xd["w_y"], *queries_args)]
        # and through autograd, as the model calls them
        p = xd["positions"].clone().requires_grad_(True)
        y = torch.ops.efa.attention_queries(p, *queries_args[1:])
        out.append(torch.autograd.grad((y * xd["w_y"]).sum(), [p])[0])
        results.append([t.detach().cpu() for t in out])
    assert_close(results[1], results[0], rtol=1e-12)
