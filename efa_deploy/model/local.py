"""Local equivariant message passing (PaiNN-like): scalar and vector features, a radial
basis with a smooth cosine cutoff."""

import math

import torch
from torch import Tensor, nn
from torch.nn.functional import linear

from .. import ops  # noqa: F401  (registers torch.ops.efa)


def radial_basis(r: Tensor, n_pi: Tensor, cutoff: float) -> tuple[Tensor, Tensor]:
    """The reference radial basis (E, R) and envelope (E, 1) of edge lengths r (E,);
    torch.ops.efa.radial_basis computes the same without saving E x R tensors for backward
    (ops/fused_radial.cpp)."""
    r = r.unsqueeze(-1)
    envelope = 0.5 * (torch.cos(math.pi * r / cutoff) + 1.0) * (r < cutoff).to(r.dtype)
    return torch.sin(n_pi * r) / r, envelope


class RadialBasis(nn.Module):
    """sin(n pi r / rc) / r times a cosine cutoff whose value and slope vanish at rc.

    `fused` (set by use_fused) selects the fused operator on CPU (first derivatives only)."""

    fused: bool

    def __init__(self, num_radial: int, cutoff: float):
        super().__init__()
        self.cutoff = cutoff
        self.register_buffer("n_pi", math.pi * torch.arange(1, num_radial + 1, dtype=torch.float64) / cutoff)
        self.fused = False

    def forward(self, r: Tensor) -> tuple[Tensor, Tensor]:
        if self.fused and r.device.type == "cpu":
            return torch.ops.efa.radial_basis(r, self.n_pi, self.cutoff)
        return radial_basis(r, self.n_pi, self.cutoff)


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


class Message(nn.Module):
    """Scalar and vector updates from neighbours j of receiver i (edge = (j, i)).

    `fused` (set by use_fused) selects the fused operator on CPU: first derivatives only, no
    E x F tensors; the reference keeps second derivatives for training with force losses.
    """

    fused: bool

    def __init__(self, features: int, num_radial: int):
        super().__init__()
        self.features = features
        self.filter_net = mlp(features, features, 3 * features)
        self.radial = nn.Linear(num_radial, 3 * features)
        self.fused = False

    def forward(
        self, x: Tensor, vec: Tensor, sender: Tensor, receiver: Tensor, rbf: Tensor, envelope: Tensor, unit: Tensor
    ) -> tuple[Tensor, Tensor]:
        filter, weight, bias = self.filter_net(x), self.radial.weight, self.radial.bias
        if self.fused and x.device.type == "cpu":
            return torch.ops.efa.message(filter, vec, rbf, weight, bias, envelope, unit, sender, receiver)
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
