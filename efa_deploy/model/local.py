"""Local equivariant message passing (PaiNN-like): scalar and vector features, a radial
basis with a smooth cosine cutoff."""

import math

import torch
from torch import Tensor, nn
from torch.nn.functional import linear

from .. import ops  # noqa: F401  (registers torch.ops.efa)


def fused_kernels_on(t: Tensor) -> bool:
    """Whether the fused operators run on t's device: the CPU always, CUDA where the library has
    the kernels of ops/cuda/ (built with EFA_CUDA=1: torch.ops.efa.cuda_kernels, asked at run
    time, so that a model file exported anywhere uses them where they exist)."""
    return t.device.type == "cpu" or torch.ops.efa.cuda_kernels(t)


def radial_frequencies(num_radial: int, cutoff: float) -> Tensor:
    """n pi / rc for n = 1 .. num_radial (float64)."""
    return math.pi * torch.arange(1, num_radial + 1, dtype=torch.float64) / cutoff


def radial_basis(r: Tensor, n_pi: Tensor, cutoff: float) -> tuple[Tensor, Tensor]:
    """The reference radial basis (E, R) and envelope (E, 1) of edge lengths r (E,);
    torch.ops.efa.radial_basis computes the same without saving E x R tensors for backward
    (ops/fused_radial.cpp; files exported before efa::edge_message call it)."""
    r = r.unsqueeze(-1)
    envelope = 0.5 * (torch.cos(math.pi * r / cutoff) + 1.0) * (r < cutoff).to(r.dtype)
    return torch.sin(n_pi * r) / r, envelope


def edge_geometry(d: Tensor, n_pi: Tensor, cutoff: float) -> tuple[Tensor, Tensor, Tensor]:
    """The radial basis (E, R), envelope (E, 1) and unit vectors (E, 3) of edge vectors d (E, 3)."""
    r = torch.sqrt(torch.sum(d * d, dim=1))
    unit = d / r.unsqueeze(1)
    rbf, envelope = radial_basis(r, n_pi, cutoff)
    return rbf, envelope, unit


class RadialBasis(nn.Module):
    """sin(n pi r / rc) / r times a cosine cutoff whose value and slope vanish at rc.

    `fused` (set by use_fused) tells the model that its message layers run efa::edge_message on
    the CPU, which makes the basis from the edge vectors itself, per chunk of edges."""

    fused: bool

    def __init__(self, num_radial: int, cutoff: float):
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("n_pi", radial_frequencies(num_radial, cutoff))
        self.fused = False

    def forward(self, r: Tensor) -> tuple[Tensor, Tensor]:
        return radial_basis(r, self.n_pi, self.cutoff)

    def geometry(self, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """edge_geometry of d; on the fused path, where efa::edge_message makes them from d per
        chunk of edges (no E x R tensor), the basis's frequencies n_pi (R,) and two empty tensors."""
        if self.fused and fused_kernels_on(d):
            none = d.new_empty(0)
            return self.n_pi, none, none
        return edge_geometry(d, self.n_pi, self.cutoff)


def mlp(n_in: int, n_hidden: int, n_out: int, zero_last: bool = False) -> nn.Sequential:
    last = nn.Linear(n_hidden, n_out)
    if zero_last:  # the block starts as the identity
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.SiLU(), last)


def message_passing(
    filter: Tensor, vec: Tensor, rbf: Tensor, weight: Tensor, bias: Tensor, envelope: Tensor, unit: Tensor,
    sender: Tensor, receiver: Tensor,
) -> tuple[Tensor, Tensor]:
    """The reference message step (edge = (sender j, receiver i)); torch.ops.efa.message computes
    the same in one pass over the edges (ops/fused_message.cpp)."""
    m = filter[sender] * linear(rbf, weight, bias) * envelope
    ds, dvv, dvs = torch.split(m, vec.shape[2], dim=1)
    dv_edge = vec[sender] * dvv.unsqueeze(1) + dvs.unsqueeze(1) * unit.unsqueeze(2)
    dx = torch.zeros(vec.shape[0], vec.shape[2], dtype=vec.dtype, device=vec.device).index_add(0, receiver, ds)
    dv = torch.zeros_like(vec).index_add(0, receiver, dv_edge)
    return dx, dv


def edge_message_passing(
    filter: Tensor, vec: Tensor, d: Tensor, n_pi: Tensor, weight: Tensor, bias: Tensor, sender: Tensor,
    receiver: Tensor, cutoff: float,
) -> tuple[Tensor, Tensor]:
    """The reference of torch.ops.efa.edge_message: message_passing on the geometry of the edge
    vectors d (E, 3), which the operator makes per chunk of edges (ops/fused_message.cpp)."""
    rbf, envelope, unit = edge_geometry(d, n_pi, cutoff)
    return message_passing(filter, vec, rbf, weight, bias, envelope, unit, sender, receiver)


class Message(nn.Module):
    """Scalar and vector updates from neighbours j of receiver i (edge = (j, i)).

    `fused` (set by use_fused) selects the fused operator efa::edge_message on CPU: first
    derivatives only, no E x F or E x R tensors; the reference keeps second derivatives for
    training with force losses. The edges come as RadialBasis.geometry gives them: the edge
    vectors d (E, 3), and the radial basis (E, R), envelope (E, 1) and unit vectors (E, 3), or on
    the fused path, where the operator makes those from d per chunk of edges, the basis's
    frequencies n_pi (R,) (the model's own buffer) in place of rbf and two empty tensors.
    """

    fused: bool

    def __init__(self, features: int, num_radial: int, cutoff: float):
        super().__init__()
        self.features = features
        self.cutoff = cutoff
        self.filter_net = mlp(features, features, 3 * features)
        self.radial = nn.Linear(num_radial, 3 * features)
        self.fused = False

    def forward(
        self, x: Tensor, vec: Tensor, sender: Tensor, receiver: Tensor, d: Tensor, rbf: Tensor, envelope: Tensor,
        unit: Tensor,
    ) -> tuple[Tensor, Tensor]:
        filter, weight, bias = self.filter_net(x), self.radial.weight, self.radial.bias
        if self.fused and fused_kernels_on(x):
            return torch.ops.efa.edge_message(filter, vec, d, rbf, weight, bias, sender, receiver, self.cutoff)
        return message_passing(filter, vec, rbf, weight, bias, envelope, unit, sender, receiver)


class Update(nn.Module):
    """Per-atom mixing of scalars and vectors (PaiNN update block)."""

    def __init__(self, features: int):
        super().__init__()
        self.features = features
        self.u = nn.Linear(features, features, bias=False)
        self.v = nn.Linear(features, features, bias=False)
        self.mix = mlp(2 * features, features, 3 * features)

    def forward(self, x: Tensor, vec: Tensor) -> tuple[Tensor, Tensor]:
        uv = self.u(vec)
        vv = self.v(vec)
        norm = torch.sqrt(torch.sum(vv * vv, dim=1) + 1e-8)
        a_vv, a_sv, a_ss = torch.split(self.mix(torch.cat([x, norm], dim=1)), self.features, dim=1)
        return a_ss + a_sv * torch.sum(uv * vv, dim=1), a_vv.unsqueeze(1) * uv
