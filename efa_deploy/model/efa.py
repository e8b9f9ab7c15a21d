"""Euclidean fast attention (arXiv 2412.08541): a global, rotation-invariant attention at
linear cost, and its exact O(N^2) pairwise form.

Queries and keys are complex channels (pairs of reals). Channel m is rotated by the angle
omega_m (u_g . r_i) at every Lebedev direction u_g (ERoPE); averaging over the sphere turns
the product of a rotated query and key into sinc(omega_m |r_i - r_j|), so

    y_i = 1/sqrt(D) sum_g w_g rot(q_i, g) . KV_g,   KV_g = sum_j rot(k_j, g) (x) v_j

equals the pairwise sum_j sum_m (q_i^m . k_j^m) sinc(omega_m r_ij) v_j while all r_ij <= r_max.

The kernel is rotation invariant, so the values may be equivariant: besides scalar columns,
v_j carries l = 1 vectors (a linear map of j's vector features) and symmetric rank-2 tensors
(sym(a_j b_j^T), the l = 0 + l = 2 part of two linear maps of j's vector features). At atom i
their transported sums are contracted with i's own vector features into invariants
(p_i . Y_i and u_i^T Y_i w_i). Scalar values cannot carry orientations: the plane of a CH2 end
cancels in any linear sum over its two hydrogens, sum_j d_j = 0, but not in sum_j d_j d_j^T
(tests/test_expressivity.py).
"""

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops  # noqa: F401  (registers torch.ops.efa)
from .erope import (contract_queries, padded_phases, padded_slots, shared_contract_queries, shared_phases,
                    shared_sum_keys_values, sum_keys_values)
from .lebedev import lebedev_grid
from .local import fused_kernels_on
from .mesh import mesh_key_value_sums, mesh_query_contraction
from .pairwise import pairwise_attention_reference, sinc_kernel

def frequencies(num_pairs: int, b_max: float, r_max: float) -> Tensor:
    """omega_f = (b_max / r_max) f / (K - 1), f = 0 .. K-1; f = 0 is a plain global term."""
    if num_pairs == 1:
        return torch.zeros(1, dtype=torch.float64)
    return (b_max / r_max) * torch.arange(num_pairs, dtype=torch.float64) / (num_pairs - 1)


def symmetric_product(a: Tensor, b: Tensor, off_diagonal: float = 0.5) -> Tensor:
    """(a b^T + b a^T) / 2 of vectors (N, 3, C) as its 6 components xx, yy, zz, xy, yz, zx (N, 6, C);
    off_diagonal=1.0 doubles the last three, so that u^T Y w of a symmetric Y is the sum over
    Y's components times those of symmetric_product(u, w, 1.0). Products of equal shapes only: a
    broadcast outer product is several times slower to differentiate twice."""
    a_next, b_next = torch.roll(a, -1, dims=1), torch.roll(b, -1, dims=1)  # (y, z, x) components
    return torch.cat([a * b, off_diagonal * (a * b_next + a_next * b)], dim=1)


class EuclideanFastAttention(nn.Module):
    """`fused` (set by use_fused) selects, on CPU, the fused operators torch.ops.efa.attention_keys
    and attention_queries (ops/fused_efa.cpp): the same two stages without per-atom x grid
    tensors, first derivatives only; the reference keeps second derivatives for training."""

    fused: bool
    mesh: List[int]

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
        value_vectors: int = 0,
        value_tensors: int = 0,
        train_pairwise_max_atoms: int = 0,
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
        self.fused = False
        self.exact = False  # evaluate the O(N^2) pairwise form instead (tests, benchmarks)
        # the periodic form on this K1 x K2 x K3 mesh (mesh.py) instead of the direct sum over k; [] = direct
        self.mesh = []
        # in training mode, batches of structures this small take the pairwise form: the same
        # kernel while all pairs are within r_max (checked), and far cheaper for molecules
        self.train_pairwise_max_atoms = train_pairwise_max_atoms
        self.r_max = float(r_max)
        self.value_dim = value_dim
        self.value_vectors = value_vectors
        self.value_tensors = value_tensors
        # equivariant values and the maps of i's own vectors that contract them (absent: None)
        self.vector_value: Optional[nn.Linear] = None
        self.vector_contract: Optional[nn.Linear] = None
        self.tensor_value: Optional[nn.Linear] = None
        self.tensor_contract: Optional[nn.Linear] = None
        if value_vectors > 0:
            self.vector_value = nn.Linear(features, value_vectors, bias=False)
            self.vector_contract = nn.Linear(features, value_vectors, bias=False)
        if value_tensors > 0:
            self.tensor_value = nn.Linear(features, 2 * value_tensors, bias=False)
            self.tensor_contract = nn.Linear(features, 2 * value_tensors, bias=False)
        self.output_dim = value_dim + value_vectors + value_tensors  # invariants per atom

        points, weights = lebedev_grid(grid_points)
        self.register_buffer("grid_points", torch.from_numpy(points))
        self.register_buffer("grid_weights", torch.from_numpy(weights))
        omega_s = frequencies(num_frequencies, b_max, r_max)
        omega_v = frequencies(num_vector_frequencies, b_max, r_max) if num_vector_frequencies else omega_s[:0]
        # one frequency per complex channel: scalar channels, then 3 components of each vector channel
        self.register_buffer("omega", torch.cat([omega_s, omega_v.repeat(3)]))
        self.scale = 1.0 / math.sqrt(2 * self.omega.numel())

    def _vector_maps(self, vec: Tensor) -> List[Tensor]:
        """The linear maps of the vector features (N, 3, F) the block uses, as one product: vector
        queries, vector keys, vector values, their contraction maps, the tensor values' two factors,
        their contraction maps ((N, 3, C) each, C = 0 where unused). One product leaves one gradient
        of the vector features to accumulate instead of up to six."""
        cv, ct = self.value_vectors, self.value_tensors
        sizes: List[int] = [0, 0, cv, cv, 2 * ct, 2 * ct]
        weights: List[Tensor] = []
        if self.num_vector_frequencies > 0:
            sizes[0] = self.vector_query.out_features
            sizes[1] = self.vector_key.out_features
            weights += [self.vector_query.weight, self.vector_key.weight]
        vector_value, vector_contract = self.vector_value, self.vector_contract
        if vector_value is not None and vector_contract is not None:
            weights += [vector_value.weight, vector_contract.weight]
        tensor_value, tensor_contract = self.tensor_value, self.tensor_contract
        if tensor_value is not None and tensor_contract is not None:
            weights += [tensor_value.weight, tensor_contract.weight]
        if len(weights) == 0:
            return [vec[:, :, :0] for _ in sizes]
        return list(torch.split(torch.nn.functional.linear(vec, torch.cat(weights)), sizes, dim=2))

    def _queries_keys(self, x: Tensor, maps: List[Tensor]) -> tuple[Tensor, Tensor]:
        """Complex channels (N, M, 2) of queries and keys, M = K + 3 Kv."""
        q = self.query(x)
        k = self.key(x)
        if self.use_silu:
            q = torch.nn.functional.silu(q)
            k = torch.nn.functional.silu(k)
        n = x.shape[0]
        if self.num_vector_frequencies > 0:
            q = torch.cat([q, maps[0].reshape(n, 3 * self.vector_query.out_features)], dim=1)
            k = torch.cat([k, maps[1].reshape(n, 3 * self.vector_key.out_features)], dim=1)
        m = self.omega.numel()  # explicit sizes: N may be 0 (an empty MPI subdomain)
        return q.reshape(n, m, 2), k.reshape(n, m, 2)

    def _values(self, x: Tensor, maps: List[Tensor]) -> Tensor:
        """Value columns (N, Dv + 3 Cv + 6 Ct): scalars, then vectors, then symmetric tensors."""
        n = x.shape[0]
        columns = [self.value(x)]
        if self.value_vectors > 0:
            columns.append(maps[2].reshape(n, 3 * self.value_vectors))
        if self.value_tensors > 0:
            a, b = torch.split(maps[4], self.value_tensors, dim=2)
            columns.append(symmetric_product(a, b).reshape(n, 6 * self.value_tensors))
        return torch.cat(columns, dim=1)

    def _invariants(self, y: Tensor, maps: List[Tensor]) -> Tensor:
        """Contract the transported vectors and tensors with i's own vectors: (N, Dv + Cv + Ct)."""
        n = y.shape[0]
        cv, ct = self.value_vectors, self.value_tensors
        scalars, vectors, tensors = torch.split(y, [self.value_dim, 3 * cv, 6 * ct], dim=1)
        out = [scalars]
        if cv > 0:
            out.append(torch.sum(vectors.reshape(n, 3, cv) * maps[3], dim=1))
        if ct > 0:
            u, w = torch.split(maps[5], ct, dim=2)
            out.append(torch.sum(tensors.reshape(n, 6, ct) * symmetric_product(u, w, 1.0), dim=1))  # u^T Y w
        return torch.cat(out, dim=1)

    def forward(
        self, x: Tensor, vec: Tensor, positions: Tensor, batch: Tensor, n_structures: int, owned: Tensor,
        reciprocal: Optional[Tuple[Tensor, Tensor, Tensor]] = None,
    ) -> Tensor:
        """EFA invariants (N, output_dim) for every atom; only owned atoms (owned == 1) enter the
        global sums. `reciprocal`: the periodic form's (phase positions (N, 3), lattice indices
        (G, 3), weights (B, M, G)) of reciprocal.reciprocal_terms, which replace the positions,
        the Lebedev directions x frequencies and the grid weights."""
        maps = self._vector_maps(vec)
        q, k = self._queries_keys(x, maps)
        v = self._values(x, maps)
        if self.exact:
            if reciprocal is not None:
                return self._invariants(self._pairwise_periodic(q, k, v, reciprocal, batch, owned), maps)
            return self._invariants(self._pairwise(q, k, v, positions, batch, owned), maps)
        if n_structures == 0:
            return self._invariants(v, maps)
        slot, n_max = padded_slots(batch, n_structures)
        if self.training and n_max <= self.train_pairwise_max_atoms and reciprocal is None:
            return self._invariants(self._pairwise_padded(q, k, v, positions, slot, n_structures, n_max, owned), maps)
        # stage 1 (per-structure sums of this process's owned atoms), the global sum over MPI
        # ranks, stage 2 (queries contract the sums): erope.py. The fused operators recompute the
        # rotations in each stage; the reference shares one set of them (B, M, Nmax, 2, G).
        # The periodic form may run both stages on a k-space mesh instead (mesh.py, set by use_mesh).
        fused = self.fused and fused_kernels_on(positions)
        fused_mesh = fused and positions.device.type == "cpu"  # the mesh steps have CPU kernels only
        on_mesh = False
        if reciprocal is None:
            omega, directions = self.omega, self.grid_points
            weights = self.grid_weights.to(v.dtype).reshape(1, 1, -1, 1)
        else:
            positions, directions, weights = reciprocal
            omega = torch.ones_like(self.omega)
            weights = weights.unsqueeze(3)
            on_mesh = len(self.mesh) == 3
        # the periodic reference shares one set of phases (B, Nmax, 2, G) among the channels
        shared = reciprocal is not None and not fused and not on_mesh
        if fused or on_mesh:
            trig = positions.new_zeros(0)
        elif shared:
            trig = shared_phases(positions, directions, slot, n_structures, n_max)
        else:
            trig = padded_phases(positions, omega, directions, slot, n_structures, n_max)
        if on_mesh:
            kv = mesh_key_value_sums(positions, k, v, owned, batch, n_structures, directions, self.mesh,
                                     fused=fused_mesh)
        elif fused:
            kv = torch.ops.efa.attention_keys(positions, k, v, owned, batch, n_structures, omega, directions)
        elif shared:
            kv = shared_sum_keys_values(trig, k, v * owned.unsqueeze(1), slot, n_structures, n_max)
        else:
            kv = sum_keys_values(trig, k, v * owned.unsqueeze(1), slot, n_structures, n_max)
        kv = torch.ops.efa.global_sum(kv) * weights  # (B, M, G, 2D)
        if on_mesh:
            y = mesh_query_contraction(positions, q, kv, batch, directions, self.mesh, second_order=not self.fused,
                                       fused=fused_mesh)
        elif fused:
            y = torch.ops.efa.attention_queries(positions, q, kv, batch, omega, directions)
        elif shared:
            y = shared_contract_queries(trig, q, kv, slot, n_structures, n_max)
        else:
            y = contract_queries(trig, q, kv, slot, n_structures, n_max)
        return self._invariants(self.scale * y, maps)

    @torch.jit.unused
    def _pairwise_padded(
        self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, slot: Tensor, n_structures: int, n_max: int,
        owned: Tensor,
    ) -> Tensor:
        """The pairwise form batched over structures: efa::pairwise_attention (ops/fused_pairwise.cpp)
        on the CPU, its reference elsewhere; both refuse atoms more than r_max apart. Training only:
        model files (scripted, for inference) leave it out, so they need no operator for it."""
        args = (positions, q, k * owned.reshape(-1, 1, 1), v, self.omega, slot)
        if positions.device.type == "cpu":
            y = torch.ops.efa.pairwise_attention(*args, n_structures, n_max, self.r_max)
        else:
            y = pairwise_attention_reference(*args, n_structures, n_max, self.r_max)
        return self.scale * y

    def _pairwise_periodic(self, q: Tensor, k: Tensor, v: Tensor, reciprocal: Tuple[Tensor, Tensor, Tensor],
                           batch: Tensor, owned: Tensor) -> Tensor:
        """The periodic form over all N x N pairs: sum_j sum_m (q_i^m . k_j^m) K_m(r_ij) v_j with
        K_m(r_ij) = sum_g w_bmg cos(n_g . (p_i - p_j)), the reference for the linear form."""
        phase, n, weights = reciprocal
        same = (batch.unsqueeze(1) == batch.unsqueeze(0)).to(v.dtype)
        angle = phase @ n.T  # (N, G)
        cos, sin = torch.cos(angle), torch.sin(angle)
        w = weights[batch]  # (N, M, G): receiver i's structure
        # cos(a_i - a_j) = cos a_i cos a_j + sin a_i sin a_j
        kernel = torch.einsum("img,jg->mij", w * cos.unsqueeze(1), cos) + torch.einsum("img,jg->mij", w * sin.unsqueeze(1), sin)
        qk = torch.einsum("imc,jmc->mij", q, k)
        return self.scale * (torch.sum(qk * kernel, dim=0) * same * owned.unsqueeze(0)) @ v

    def _pairwise(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, batch: Tensor, owned: Tensor) -> Tensor:
        """sum_j sum_m (q_i^m . k_j^m) sinc(omega_m r_ij) v_j over owned j of i's structure: the
        reference, over all N x N pairs at once."""
        n = positions.shape[0]
        same = (batch.unsqueeze(1) == batch.unsqueeze(0)).to(v.dtype)
        kernel, _ = sinc_kernel(positions, same * (1.0 - torch.eye(n, dtype=v.dtype, device=v.device)), self.omega)
        qk = torch.einsum("imc,jmc->mij", q, k)
        return self.scale * (torch.sum(qk * kernel, dim=0) * same * owned.unsqueeze(0)) @ v
