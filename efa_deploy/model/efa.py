"""Euclidean fast attention (arXiv 2412.08541): a global, rotation-invariant attention at
linear cost, and its exact O(N^2) pairwise form.

Queries and keys are complex channels (pairs of reals). Channel m is rotated by the angle
omega_m (u_g . r_i) at every Lebedev direction u_g (ERoPE); averaging over the sphere turns
the product of a rotated query and key into sinc(omega_m |r_i - r_j|), so

    y_i = 1/sqrt(D) sum_g w_g rot(q_i, g) . KV_g,   KV_g = sum_j rot(k_j, g) (x) v_j

equals the pairwise sum_j sum_m (q_i^m . k_j^m) sinc(omega_m r_ij) v_j while all r_ij <= r_max.
"""

import math
from typing import List

import torch
from torch import Tensor, nn

from .. import ops  # noqa: F401  (registers torch.ops.efa)
from .lebedev import lebedev_grid


def frequencies(num_pairs: int, b_max: float, r_max: float) -> Tensor:
    """omega_f = (b_max / r_max) f / (K - 1), f = 0 .. K-1; f = 0 is a plain global term."""
    if num_pairs == 1:
        return torch.zeros(1, dtype=torch.float64)
    return (b_max / r_max) * torch.arange(num_pairs, dtype=torch.float64) / (num_pairs - 1)


class EuclideanFastAttention(nn.Module):
    def __init__(
        self,
        features: int,
        num_frequencies: int = 8,
        value_dim: int = 16,
        grid_points: int = 50,
        r_max: float = 15.0,
        b_max: float = math.pi,
        num_vector_frequencies: int = 0,
        qk_activation: str = "identity",
    ):
        super().__init__()
        self.query = nn.Linear(features, 2 * num_frequencies, bias=False)
        self.key = nn.Linear(features, 2 * num_frequencies, bias=False)
        self.value = nn.Linear(features, value_dim)
        self.num_vector_frequencies = num_vector_frequencies
        # l = 1 channels: a bias-free linear map of vector features stays equivariant
        self.vector_query = nn.Linear(features, 2 * max(num_vector_frequencies, 1), bias=False)
        self.vector_key = nn.Linear(features, 2 * max(num_vector_frequencies, 1), bias=False)
        self.use_silu = qk_activation == "silu"
        self.exact = False  # evaluate the O(N^2) pairwise form instead (tests, benchmarks)

        points, weights = lebedev_grid(grid_points)
        self.register_buffer("grid_points", torch.from_numpy(points))
        self.register_buffer("grid_weights", torch.from_numpy(weights))
        omega_s = frequencies(num_frequencies, b_max, r_max)
        omega_v = frequencies(num_vector_frequencies, b_max, r_max) if num_vector_frequencies else omega_s[:0]
        # one frequency per complex channel: scalar channels, then 3 components of each vector channel
        self.register_buffer("omega", torch.cat([omega_s, omega_v.repeat(3)]))
        self.scale = 1.0 / math.sqrt(2 * self.omega.numel())

    def _queries_keys(self, x: Tensor, vec: Tensor) -> tuple[Tensor, Tensor]:
        """Complex channels (N, M, 2) of queries and keys, M = K + 3 Kv."""
        q = self.query(x)
        k = self.key(x)
        if self.use_silu:
            q = torch.nn.functional.silu(q)
            k = torch.nn.functional.silu(k)
        n = x.shape[0]
        if self.num_vector_frequencies > 0:
            q = torch.cat([q, self.vector_query(vec).reshape(n, 3 * self.vector_query.out_features)], dim=1)
            k = torch.cat([k, self.vector_key(vec).reshape(n, 3 * self.vector_key.out_features)], dim=1)
        m = self.omega.numel()  # explicit sizes: N may be 0 (an empty MPI subdomain)
        return q.reshape(n, m, 2), k.reshape(n, m, 2)

    def _rotate(self, z: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """ERoPE: (N, M, 2) channels rotated by (N, G, M) angles -> (N, G * M * 2)."""
        a = z[:, :, 0].unsqueeze(1)
        b = z[:, :, 1].unsqueeze(1)
        rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
        return rotated.reshape(z.shape[0], cos.shape[1] * cos.shape[2] * 2)

    def forward(
        self, x: Tensor, vec: Tensor, positions: Tensor, batch: Tensor, n_structures: int, owned: Tensor
    ) -> Tensor:
        """EFA output (N, Dv) for every atom; only owned atoms (owned == 1) enter the global sums."""
        q, k = self._queries_keys(x, vec)
        v = self.value(x)
        if self.exact:
            return self._pairwise(q, k, v, positions, batch, owned)
        theta = (positions @ self.grid_points.T).unsqueeze(-1) * self.omega  # (N, G, M)
        cos, sin = torch.cos(theta), torch.sin(theta)
        rot_k = self._rotate(k, cos, sin)
        rot_q = self._rotate(q, cos, sin) * self.grid_weights.repeat_interleave(2 * self.omega.numel())
        # atoms of a structure are contiguous (graph.batch_graph): one (G M 2, Dv) sum per
        # structure, formed from its owned atoms; never a copy of KV per atom
        if n_structures == 0:
            return v
        v = v * owned.unsqueeze(1)
        # (split/unbind, not slicing: their backward costs O(N), a slice's O(N) per structure)
        sizes: List[int] = torch.bincount(batch, minlength=n_structures).tolist()
        k_parts = torch.split(rot_k, sizes)
        v_parts = torch.split(v, sizes)
        kv = torch.ops.efa.global_sum(torch.stack([kp.T @ vp for kp, vp in zip(k_parts, v_parts)]))  # (B, G M 2, Dv)
        y = [qp @ kv_b for qp, kv_b in zip(torch.split(rot_q, sizes), torch.unbind(kv))]
        return self.scale * torch.cat(y)

    def _pairwise(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, batch: Tensor, owned: Tensor) -> Tensor:
        """sum_j sum_m (q_i^m . k_j^m) sinc(omega_m r_ij) v_j over owned j of i's structure."""
        r = torch.cdist(positions, positions)
        same = (batch.unsqueeze(1) == batch.unsqueeze(0)).to(v.dtype) * owned.unsqueeze(0)
        qk = torch.einsum("imc,jmc->ijm", q, k)
        kernel = torch.sinc(r.unsqueeze(-1) * self.omega / math.pi)
        return self.scale * torch.einsum("ijm,ij,jd->id", qk * kernel, same, v)
