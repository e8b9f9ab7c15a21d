"""The EFA block's exact pairwise form in pure torch,

    y_i = sum_{j of i's structure} sum_m (q_i^m . k_j^m) sinc(omega_m r_ij) v_j,

which the linear (ERoPE) form equals while all r_ij <= r_max (efa.py). Training takes it for
small structures (model.train_pairwise_max_atoms) through efa::pairwise_attention
(ops/fused_pairwise.cpp); pairwise_attention_reference is that operator's reference and its
registration when the library is not built (ops.py).
"""

from typing import Tuple

import torch
from torch import Tensor

from .erope import pad


def extent_error(distance: float, r_max: float) -> str:
    return ("efa::pairwise_attention: a training structure has atoms {:.6g} A apart, more than r_max = {:.6g} A: "
            "the grid form (validation, export, MD) would alias them; raise model.r_max or set "
            "model.train_pairwise_max_atoms: 0".format(distance, r_max))


def sinc_kernel(pos: Tensor, pairs: Tensor, omega: Tensor) -> Tuple[Tensor, Tensor]:
    """sinc(omega_m r_ij) of positions (..., n, 3) as (..., M, n, n): 1 on i = j, 0 where
    pairs (..., n, n) is 0; and the squared distances (..., n, n)."""
    m, n = omega.numel(), pos.shape[-2]
    with torch.no_grad():
        eye = torch.eye(n, dtype=pos.dtype, device=pos.device)
        still = (omega == 0).to(pos.dtype).reshape(m, 1, 1)  # a zero frequency has kernel 1
        # r and x are kept away from 0, where sqrt and sin(x) / x have no finite derivative
        # (the masks below remove those entries again)
        r_offset = 1.0 - pairs
        sinc_mask = pairs.unsqueeze(-3) * (1.0 - still)
        base = pairs.unsqueeze(-3) * still + eye
        omega = omega.to(pos.dtype).reshape(m, 1, 1)
    diff = pos.unsqueeze(-2) - pos.unsqueeze(-3)
    r2 = torch.sum(diff * diff, dim=-1)
    x = torch.addcmul(still, torch.sqrt(r2 + r_offset).unsqueeze(-3), omega)  # omega_m r_ij
    return torch.sin(x) / x * sinc_mask + base, r2


def pairwise_attention_reference(positions: Tensor, queries: Tensor, keys: Tensor, values: Tensor, omega: Tensor,
                                 slot: Tensor, n_structures: int, n_max: int, r_max: float) -> Tensor:
    """y_i = sum_{j of i's structure} sum_m (q_i^m . k_j^m) sinc(omega_m r_ij) v_j (unscaled), with
    (B, M, Nmax, Nmax) kernels in the padded layout of erope.padded_slots: the reference of
    efa::pairwise_attention and its pure-torch registration. Two atoms of a structure more than
    r_max apart raise ValueError: the grid form the model is exported with would alias them."""
    b, n, m, d = n_structures, queries.shape[0], omega.numel(), values.shape[1]
    rows = torch.cat([positions, queries.reshape(n, 2 * m), keys.reshape(n, 2 * m), values], dim=1)
    pos, qp, kp, vp = torch.split(pad(rows, slot, b, n_max), [3, 2 * m, 2 * m, d], dim=2)
    with torch.no_grad():  # pairs of distinct real atoms (not padding)
        real = torch.zeros(b * n_max, dtype=pos.dtype, device=pos.device).index_fill_(0, slot, 1.0)
        real = real.reshape(b, 1, n_max)
        pairs = real.transpose(1, 2) * real * (1.0 - torch.eye(n_max, dtype=pos.dtype, device=pos.device))
    kernel, r2 = sinc_kernel(pos, pairs, omega)  # (B, M, Nmax, Nmax), (B, Nmax, Nmax)
    farthest = float(torch.sqrt(torch.max(r2.detach() * pairs))) if pairs.numel() > 0 else 0.0
    if farthest > r_max:
        raise ValueError(extent_error(farthest, r_max))
    qp = qp.reshape(b, n_max, m, 2).transpose(1, 2)  # (B, M, Nmax, 2)
    kp = kp.reshape(b, n_max, m, 2).permute(0, 2, 3, 1)  # (B, M, 2, Nmax)
    attention = torch.sum((qp @ kp) * kernel, dim=1)  # (B, Nmax, Nmax)
    return (attention @ vp).reshape(b * n_max, d)[slot]
