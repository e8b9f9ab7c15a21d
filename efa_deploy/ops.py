"""The collective operators (torch.ops.efa.*) that every EFA model calls.

Outside LAMMPS each is the identity (a copy); inside, the pair style turns them into MPI and
ghost communication (see ops/efa_ops.h). The compiled library libefa_ops.so is
loaded when it is built; without it (only torch installed, no compiler run) the same operators
are registered here in pure torch, with the same schemas and adjoints, so that models import,
train, script and export anywhere. Both carry shape-only (fake) kernels for torch.export.

efa::edge_message is the fused local message step exported files call (ops/fused_message.cpp);
its pure-torch registration is the reference, efa_deploy.model.local.edge_message_passing.
efa::message (reference: local.message_passing) and efa::radial_basis (ops/fused_radial.cpp,
local.radial_basis) are what files exported before efa::edge_message call; they stay registered
so that those files load. Likewise
efa::attention_keys / attention_queries, the fused EFA stages (ops/fused_efa.cpp), are
efa_deploy.model.erope.key_value_sums / query_contraction in pure torch, and efa::mesh_spread /
mesh_gather (ops/fused_mesh.cpp) efa_deploy.model.mesh.spread_reference / gather_reference, and
efa::pairwise_attention, the exact pairwise form that training takes for small structures, with
first and second derivatives (ops/fused_pairwise.cpp), efa_deploy.model.pairwise.pairwise_attention_reference.
"""

import os
import warnings

import torch

from .paths import OPS_LIBRARY

# operator -> its adjoint (the operator its backward applies)
ADJOINTS = {"global_sum": "global_sum", "forward_ghosts": "reverse_ghosts", "reverse_ghosts": "forward_ghosts"}
MESSAGE_SCHEMA = ("message(Tensor filter, Tensor vec, Tensor rbf, Tensor weight, Tensor bias, Tensor envelope, "
                  "Tensor unit, Tensor sender, Tensor receiver) -> (Tensor, Tensor)")
EDGE_MESSAGE_SCHEMA = ("edge_message(Tensor filter, Tensor vec, Tensor d, Tensor n_pi, Tensor weight, Tensor bias, "
                       "Tensor sender, Tensor receiver, float cutoff) -> (Tensor, Tensor)")
RADIAL_SCHEMA = "radial_basis(Tensor r, Tensor n_pi, float cutoff) -> (Tensor, Tensor)"
ATTENTION_SCHEMAS = {
    "attention_keys": "attention_keys(Tensor positions, Tensor keys, Tensor values, Tensor owned, Tensor batch, "
                      "int n_structures, Tensor omega, Tensor directions) -> Tensor",
    "attention_queries": "attention_queries(Tensor positions, Tensor queries, Tensor kv, Tensor batch, Tensor omega, "
                         "Tensor directions) -> Tensor",
}
MESH_SCHEMAS = {
    "mesh_spread": "mesh_spread(Tensor u, Tensor values, Tensor offset, int[] mesh, int rows, int order) -> Tensor",
    "mesh_gather": "mesh_gather(Tensor u, Tensor grid, Tensor offset, int[] mesh, int order) -> Tensor",
}
CUDA_KERNELS_SCHEMA = "cuda_kernels(Tensor t) -> bool"  # ops/efa_ops.cpp: kernels of ops/cuda/ for t
PAIRWISE_SCHEMA = ("pairwise_attention(Tensor positions, Tensor queries, Tensor keys, Tensor values, Tensor omega, "
                   "Tensor slot, int n_structures, int n_max, float r_max) -> Tensor")

_loaded = False
_library = None  # keeps the pure-torch registrations alive


def _register_pure_torch() -> None:
    global _library
    _library = torch.library.Library("efa", "DEF")
    for name in ADJOINTS:
        _library.define(f"{name}(Tensor x) -> Tensor")
        _library.impl(name, torch.clone, "CompositeExplicitAutograd")
        torch.library.register_fake(f"efa::{name}", torch.empty_like, lib=_library)
    for name, adjoint in ADJOINTS.items():
        adjoint_op = getattr(torch.ops.efa, adjoint)
        torch.library.register_autograd(f"efa::{name}", lambda ctx, grad, op=adjoint_op: op(grad), lib=_library)
    _library.define(CUDA_KERNELS_SCHEMA)  # no CUDA kernels without the library
    _library.impl("cuda_kernels", lambda t: False, "CompositeExplicitAutograd")
    # imported here: the model package imports this module
    from .model.erope import key_value_sums, query_contraction
    from .model.local import edge_message_passing, message_passing, radial_basis
    from .model.mesh import gather_reference, spread_reference
    from .model.pairwise import pairwise_attention_reference

    # autograd and meta by decomposition
    for name, schema, reference in (("message", MESSAGE_SCHEMA, message_passing),
                                    ("edge_message", EDGE_MESSAGE_SCHEMA, edge_message_passing),
                                    ("radial_basis", RADIAL_SCHEMA, radial_basis),
                                    ("attention_keys", ATTENTION_SCHEMAS["attention_keys"], key_value_sums),
                                    ("attention_queries", ATTENTION_SCHEMAS["attention_queries"], query_contraction),
                                    ("mesh_spread", MESH_SCHEMAS["mesh_spread"], spread_reference),
                                    ("mesh_gather", MESH_SCHEMAS["mesh_gather"], gather_reference),
                                    ("pairwise_attention", PAIRWISE_SCHEMA, pairwise_attention_reference)):
        _library.define(schema)
        _library.impl(name, reference, "CompositeImplicitAutograd")


def called_operators(module: torch.jit.ScriptModule) -> list[str]:
    """The efa:: operators the TorchScript code of `module` calls (every method, submodule
    calls inlined, every branch): what a process must register to load the module. Adjoints
    run from the operators' own backward kernels, not from the code, and are not listed."""
    found: set[str] = set()

    def walk(block) -> None:
        for node in block.nodes():
            if node.kind().startswith("efa::"):
                found.add(node.kind())
            for inner in node.blocks():
                walk(inner)

    for name in module._c._method_names():
        walk(getattr(module, name).inlined_graph)
    return sorted(found)


def is_registered(name: str) -> bool:
    """Whether the dispatcher knows operator `name` ("efa::global_sum"), as the plugin asks it."""
    try:
        torch._C._dispatch_find_schema_or_throw(name, "")
    except RuntimeError:
        return False
    return True


MALLOC_POLICIES = ("lean", "keep", "system")


def set_malloc_policy(default: str = "lean") -> bool:
    """Apply glibc's malloc policy EFA_DEPLOY_MALLOC names (`default` when it is unset): "lean"
    (peak memory near the live tensors, a page fault per 4 KB of each tensor above 256 KB),
    "keep" (no page faults; the heap keeps the largest layout it ever needed) or "system"
    (ops/malloc_policy.cpp). Returns whether a setting was applied. load_ops applies it; so does
    pair_style efa."""
    import ctypes

    choice = os.environ.get("EFA_DEPLOY_MALLOC") or default
    if choice not in MALLOC_POLICIES:  # the C side leaves malloc alone then
        warnings.warn(f"EFA_DEPLOY_MALLOC={choice!r} is not one of {', '.join(MALLOC_POLICIES)}: glibc's default "
                      "malloc policy stays", stacklevel=2)
    if not OPS_LIBRARY.exists():
        return False
    policy = ctypes.CDLL(str(OPS_LIBRARY)).efa_malloc_policy
    policy.argtypes = [ctypes.c_char_p]
    return policy(default.encode()) == 1


def load_ops() -> str:
    """Register torch.ops.efa once per process; returns which implementation is in use."""
    global _loaded
    if not _loaded:
        if OPS_LIBRARY.exists():
            torch.ops.load_library(str(OPS_LIBRARY))
            set_malloc_policy()
        else:
            _register_pure_torch()
        _loaded = True
    return "compiled" if _library is None else "pure torch"


load_ops()
