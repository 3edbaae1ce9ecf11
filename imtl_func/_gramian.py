"""The Gramian of a stacked pytree Jacobian: all the IMTL-G weights need from the gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from imtl_func import _checks
from imtl_func._tree import PyTree, leaves, no_autocast

__all__ = ["gramian"]


def gramian(jac: PyTree) -> Tensor:
    """Gramian ``K = J Jᵀ`` of a stacked pytree Jacobian, as a sum of per-leaf Gramians.

    Args:
        jac: pytree whose leaves are real floating tensors of shape ``[T, *leaf_shape]`` (row t
            is the gradient of task t with respect to that leaf).

    Raises:
        TypeError: a leaf is not a tensor, is complex (IMTL is defined for real gradients) or is
            not floating point.
        ValueError: no leaves, or leaves without the same leading task axis.

    Returns:
        ``[T, T]`` tensor ``K_ij = Σ_leaves <J_i, J_j>`` in the widest leaf dtype (at least
        float32). Each leaf's product runs in the leaf's dtype (float32 for half precision, also
        under ``torch.autocast``), the sum over leaves in float64. The T × P matrix of all
        leaves side by side is never formed. The dtype tells :func:`imtl_g_weights` the
        rounding level of the entries.
    """
    rows = leaves(jac)
    if not rows:
        raise ValueError("gramian: the Jacobian pytree has no tensor leaves")
    for j in rows:
        _checks.jacobian_leaf(j, "gramian")
    num_tasks = rows[0].shape[0] if rows[0].dim() > 0 else 0
    total: Tensor | None = None
    out_dtype = torch.float32
    for j in rows:
        if j.dim() == 0 or j.shape[0] != num_tasks:
            raise ValueError(
                "gramian: every Jacobian leaf needs the same leading task axis; got shapes "
                f"{[tuple(x.shape) for x in rows]}"
            )
        flat = j.reshape(num_tasks, -1)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        out_dtype = torch.promote_types(out_dtype, flat.dtype)
        with no_autocast(flat):
            part = (flat @ flat.mT).to(torch.float64)
        total = part if total is None else total + part
    assert total is not None
    return total.to(out_dtype)


def norms_and_cosines(gramian: Tensor) -> tuple[Tensor, Tensor]:
    """Task-gradient norms ``√K_tt`` ``[T]`` and cosines ``K_ij / (n_i n_j)`` ``[T, T]`` (0 in the
    rows and columns of zero gradients), in the Gramian's dtype."""
    norm = gramian.diagonal().clamp_min(0).sqrt()
    nonzero = norm > 0
    safe = torch.where(nonzero, norm, torch.ones_like(norm))
    pair = nonzero[:, None] & nonzero[None, :]
    return norm, torch.where(pair, gramian / (safe[:, None] * safe[None, :]), 0.0)
