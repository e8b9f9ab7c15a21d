"""The linear (ERoPE) form of the EFA block in pure torch, in the two stages around the global sum:

    stage 1  KV_b,mg = sum_{owned j of structure b} conj(k_j^m e_jmg) v_j,   e_jmg = exp(i omega_m u_g . r_j)
    (global_sum over MPI ranks, then times the grid weights w_g)
    stage 2  y_i = sum_mg Re(q_i^m e_img KV_b(i),mg)

The model's reference path (efa.py) calls these with one set of rotations for both stages;
torch.ops.efa.attention_keys / attention_queries compute the same stages in one pass over the
atoms each, without per-atom x grid tensors (ops/fused_efa.cpp). When that library is not built,
ops.py registers those two operators as key_value_sums and query_contraction below.
"""

import math
from typing import List

import torch
from torch import Tensor


def phases(positions: Tensor, omega: Tensor, directions: Tensor) -> Tensor:
    """(cos, sin) of every atom's ERoPE angle omega_m (u_g . r_i): (N, M, 2, G).

    One matrix product gives theta + (0, -pi/2): its cosine is (cos theta, sin theta)."""
    m, g = omega.numel(), directions.shape[0]
    angles = omega.reshape(m, 1, 1, 1) * directions.T.reshape(1, 1, 3, g)  # (M, 1, 3, G)
    shift = torch.tensor([0.0, -0.5 * math.pi], dtype=omega.dtype, device=positions.device).reshape(1, 2, 1, 1).expand(m, 2, 1, g)
    weights = torch.cat([angles.expand(m, 2, 3, g), shift], dim=2)  # (M, 2, 4, G)
    weights = weights.permute(2, 0, 1, 3).reshape(4, m * 2 * g).to(positions.dtype)
    ones = torch.ones_like(positions[:, :1])
    return torch.cos(torch.cat([positions, ones], dim=1) @ weights).reshape(positions.shape[0], m, 2, g)


def pad(t: Tensor, slot: Tensor, n_structures: int, n_max: int) -> Tensor:
    """Per-atom rows (N, ...) -> (B, Nmax, ...), zero where a structure has fewer atoms."""
    if n_structures == 1:
        return t.unsqueeze(0)
    rest: List[int] = list(t.shape[1:])
    padded = t.new_zeros([n_structures * n_max] + rest).index_copy(0, slot, t)
    return padded.reshape([n_structures, n_max] + rest)


def padded_slots(batch: Tensor, n_structures: int) -> tuple[Tensor, int]:
    """Row of every atom in a (B * Nmax) padded layout, and Nmax (atoms of a structure are
    contiguous, graph.batch_graph)."""
    index = torch.arange(batch.shape[0], device=batch.device)
    if n_structures == 1:
        return index, batch.shape[0]
    sizes = torch.bincount(batch, minlength=n_structures)
    n_max = int(sizes.max())
    first = torch.cumsum(sizes, 0) - sizes
    return batch * n_max + index - first[batch], n_max


def padded_phases(positions: Tensor, omega: Tensor, directions: Tensor, slot: Tensor, n_structures: int,
                  n_max: int) -> Tensor:
    """phases, padded per structure: (B, M, Nmax, 2, G)."""
    return pad(phases(positions, omega, directions), slot, n_structures, n_max).transpose(1, 2)


def _key_value_rows(k: Tensor, v: Tensor) -> Tensor:
    """Each atom's [[k0 v, -k1 v], [-k1 v, -k0 v]]: the rows (N, M, 2, 2D) that the (C, S) phases
    multiply in stage 1."""
    n, m, d = k.shape[0], k.shape[1], v.shape[1]
    k0, k1 = k[:, :, 0], k[:, :, 1]
    kmat = torch.stack([torch.stack([k0, -k1], dim=2), torch.stack([-k1, -k0], dim=2)], dim=2)  # (N, M, 2, 2)
    return (kmat.unsqueeze(-1) * v.reshape(n, 1, 1, 1, d)).reshape(n, m, 2, 2 * d)


def _rotation_rows(kv: Tensor) -> Tensor:
    """[[KV_re, KV_im], [-KV_im, KV_re]] (B, M, 2G, 2D): what the (C, S) phases multiply in stage 2."""
    d = kv.shape[3] // 2
    kv_re, kv_im = kv[..., :d], kv[..., d:]
    return torch.cat([kv, torch.cat([-kv_im, kv_re], dim=3)], dim=2)


def _contract(q: Tensor, z: Tensor, d: int) -> Tensor:
    """y_i = sum_m q0 Z_re - q1 Z_im from Z (N, M, 2D)."""
    return torch.sum(q[:, :, 0:1] * z[:, :, :d] - q[:, :, 1:2] * z[:, :, d:], dim=1)


def sum_keys_values(trig: Tensor, k: Tensor, v: Tensor, slot: Tensor, n_structures: int, n_max: int) -> Tensor:
    """Stage 1 from padded phases: KV (B, M, G, 2D) as [Re | Im] columns; v is already masked.

    In reals, (C, S) = (cos, sin) theta:
      [KV_re, KV_im] = sum_j [C_j, S_j] [[k0 v, -k1 v], [-k1 v, -k0 v]]_j
    one batched matrix product per (structure, channel)."""
    m, d = k.shape[1], v.shape[1]
    g = trig.shape[-1]
    kv_rows = pad(_key_value_rows(k, v), slot, n_structures, n_max).transpose(1, 2)  # (B, M, Nmax, 2, 2D)
    b = n_structures
    return trig.reshape(b, m, 2 * n_max, g).transpose(2, 3) @ kv_rows.reshape(b, m, 2 * n_max, 2 * d)


def contract_queries(trig: Tensor, q: Tensor, kv: Tensor, slot: Tensor, n_structures: int, n_max: int) -> Tensor:
    """Stage 2 from padded phases and the summed, weighted KV: y (N, D).

      [Z_re, Z_im]_i = [C_i, S_i] [[KV_re, KV_im], [-KV_im, KV_re]],  y_i = sum_m q0 Z_re - q1 Z_im"""
    b, m, g, d = kv.shape[0], kv.shape[1], kv.shape[2], kv.shape[3] // 2
    z = trig.reshape(b, m, n_max, 2 * g) @ _rotation_rows(kv)  # (B, M, Nmax, 2D)
    z = z.transpose(1, 2).reshape(b * n_max, m, 2 * d)
    if b > 1:
        z = z[slot]
    return _contract(q, z, d)


# The periodic form (omega = 1 in every channel): one set of phases, shared by all M channels,
# and one matrix product per structure over all channels at once.

def shared_phases(p: Tensor, directions: Tensor, slot: Tensor, n_structures: int, n_max: int) -> Tensor:
    """(cos, sin) of n_g . p_i, padded per structure: (B, Nmax, 2, G)."""
    angle = p @ directions.T.to(p.dtype)
    return pad(torch.stack([torch.cos(angle), torch.sin(angle)], dim=1), slot, n_structures, n_max)


def shared_sum_keys_values(trig: Tensor, k: Tensor, v: Tensor, slot: Tensor, n_structures: int, n_max: int) -> Tensor:
    """sum_keys_values from shared phases (B, Nmax, 2, G): KV (B, M, G, 2D); v is already masked."""
    n, m, d = k.shape[0], k.shape[1], v.shape[1]
    b, g = n_structures, trig.shape[-1]
    kv_rows = _key_value_rows(k, v).transpose(1, 2).reshape(n, 2, m * 2 * d)  # (N, 2, M 2D)
    kv_rows = pad(kv_rows, slot, b, n_max).reshape(b, 2 * n_max, m * 2 * d)
    kv = trig.reshape(b, 2 * n_max, g).transpose(1, 2) @ kv_rows  # (B, G, M 2D)
    return kv.reshape(b, g, m, 2 * d).transpose(1, 2)


def shared_contract_queries(trig: Tensor, q: Tensor, kv: Tensor, slot: Tensor, n_structures: int, n_max: int) -> Tensor:
    """contract_queries from shared phases (B, Nmax, 2, G): y (N, D)."""
    b, m, g, d = kv.shape[0], kv.shape[1], kv.shape[2], kv.shape[3] // 2
    z = trig.reshape(b, n_max, 2 * g) @ _rotation_rows(kv).transpose(1, 2).reshape(b, 2 * g, m * 2 * d)  # (B, Nmax, M 2D)
    z = z.reshape(b * n_max, m, 2 * d)
    if b > 1:
        z = z[slot]
    return _contract(q, z, d)


# The operators' pure-torch form (same schemas as ops/fused_efa.cpp).

def key_value_sums(positions: Tensor, keys: Tensor, values: Tensor, owned: Tensor, batch: Tensor, n_structures: int,
                   omega: Tensor, directions: Tensor) -> Tensor:
    """Stage 1: this process's KV (B, M, G, 2D) over its owned atoms, before the global sum."""
    if n_structures == 0:
        return values.new_zeros(0, omega.numel(), directions.shape[0], 2 * values.shape[1])
    slot, n_max = padded_slots(batch, n_structures)
    trig = padded_phases(positions, omega, directions, slot, n_structures, n_max)
    return sum_keys_values(trig, keys, values * owned.unsqueeze(1), slot, n_structures, n_max)


def query_contraction(positions: Tensor, queries: Tensor, kv: Tensor, batch: Tensor, omega: Tensor,
                      directions: Tensor) -> Tensor:
    """Stage 2: y (N, D) of every atom from the summed, weighted KV (B, M, G, 2D)."""
    n_structures = kv.shape[0]
    if n_structures == 0:
        return kv.new_zeros(positions.shape[0], kv.shape[3] // 2)
    slot, n_max = padded_slots(batch, n_structures)
    trig = padded_phases(positions, omega, directions, slot, n_structures, n_max)
    return contract_queries(trig, queries, kv, slot, n_structures, n_max)
