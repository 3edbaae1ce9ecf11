"""Sums over data-parallel replicas for the pipeline (internal; see :mod:`imtl_func.distributed`).

A ``reduce`` returns the element-wise sum of a 1-D tensor over the replicas. Non-finite values
survive a sum (NaN or ±inf on one replica makes the sum non-finite), so the gate, which reads the
reduced values, reaches the same verdict on every replica without a flag of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import optree
import torch
from torch import Tensor

from imtl_func._tree import PyTree, leaves

#: ``reduce(x) -> Σ_replicas x`` for a 1-D tensor ``x``, the same result on every replica.
Reduce = Callable[[Tensor], Tensor]


def _sum_packed(reduce: Reduce, tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Every tensor summed over the replicas with ONE call of ``reduce`` on a flat buffer."""
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    total = reduce(flat)
    if not isinstance(total, Tensor) or total.shape != flat.shape:
        got = tuple(total.shape) if isinstance(total, Tensor) else type(total).__name__
        raise ValueError(f"reduce must return a tensor of the shape it was given "
                         f"{tuple(flat.shape)} (the sum over replicas), got {got}")
    parts = torch.split(total, [t.numel() for t in tensors])
    return [p.reshape(t.shape) for p, t in zip(parts, tensors, strict=True)]


def statistics(reduce: Reduce | None, vector: Tensor, gramian: Tensor | None
               ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Global losses and feature-level Gramian from the local ones, in one float64 reduction.

    The feature slices of the replicas are disjoint, so the Gramian of the global batch's task
    gradients (each a mean over R equal slices) is ``Σ_r K_r / R²``; the losses are the mean.

    Returns:
        ``(losses, gramian, count)``; ``count`` is R (float64 ``[]``), None without ``reduce``.
    """
    if reduce is None:
        return vector, gramian, None
    one = torch.ones(1, dtype=torch.float64, device=vector.device)
    parts = [vector, one] if gramian is None else [vector, one, gramian]
    summed = _sum_packed(reduce, parts, torch.float64)
    count = summed[1][0]
    losses = (summed[0] / count).to(vector.dtype)
    k = None if gramian is None else (summed[2] / (count * count)).to(gramian.dtype)
    return losses, k, count


#: What a replica that failed before the reduction adds to the replica count: every replica can
#: tell how many failed without a payload of its own (exact in float64 up to 2^33 failures).
FAILED = 2.0**20


class ActiveStatistics(NamedTuple):
    """Global statistics when the replicas compute different sets of tasks.

    Attributes:
        losses: ``[T]`` task t's loss: the mean of its local losses over the replicas where it is
            active (0 where it is active nowhere).
        gramian: ``[T, T]`` Gramian of the gradients of those losses, or None.
        counts: ``[T]`` float64, ``R_t``: on how many replicas task t is active.
        replicas: ``[]`` float64, ``R``: how many replicas took part.
        failed: how many replicas reported a failure (a Python int, the same on every replica).
    """

    losses: Tensor
    gramian: Tensor | None
    counts: Tensor
    replicas: Tensor
    failed: int


def active_statistics(reduce: Reduce, losses: Tensor, active: Tensor, gramian: Tensor | None,
                      *, failed: bool = False) -> ActiveStatistics:
    """:func:`statistics` when a task may be active on some replicas only: one float64 reduction.

    Task t's global loss is the mean of its local losses over the ``R_t`` replicas where it is
    active and its global gradient is that mean's, so with disjoint feature slices
    ``K_ij = Σ_r K^r_ij / (R_i R_j)``, where a replica on which t is off has zeros in row and
    column t. With every task active everywhere this is :func:`statistics`.
    Payload: ``(T² + 2T + 1) · 8`` bytes.

    Args:
        losses: ``[T]`` local losses; entries of inactive tasks are ignored (NaN allowed there).
        active: ``[T]`` bool, the tasks this replica computed.
        gramian: ``[T, T]`` local Gramian (zero rows and columns for inactive tasks), or None.
        failed: this replica hit an error before the reduction; it still joins the reduction
            (with zeros) so that every replica learns about it instead of waiting.

    Returns:
        :class:`ActiveStatistics`; ``gramian`` in the dtype it was given.
    """
    one = losses.new_full((1,), FAILED + 1.0 if failed else 1.0, dtype=torch.float64)
    on = active.to(torch.float64)
    parts = [torch.where(active, losses.detach().to(torch.float64), 0.0), on, one]
    if gramian is not None:
        parts.append(gramian)
    summed = _sum_packed(reduce, parts, torch.float64)
    counts, total = summed[1], summed[2][0]
    num_failed = int(total.item() // FAILED)          # one host sync: the reply decides a raise
    replicas = total - FAILED * num_failed
    per_task = counts.clamp(min=1.0)
    k = None
    if gramian is not None:
        k = (summed[3] / (per_task[:, None] * per_task[None, :])).to(gramian.dtype)
    return ActiveStatistics((summed[0] / per_task).to(losses.dtype), k, counts, replicas,
                            num_failed)


def rows(reduce: Reduce | None, vector: Tensor, jac: PyTree
         ) -> tuple[Tensor, PyTree, Tensor | None]:
    """Global losses and task Jacobian rows (parameter level): means over the replicas, one
    reduction in the widest of float32 and the inputs' dtypes. Returns ``(losses, rows, count)``.
    """
    if reduce is None:
        return vector, jac, None
    xs = [vector, *leaves(jac)]
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    one = torch.ones(1, dtype=dtype, device=vector.device)
    summed = _sum_packed(reduce, [*xs, one], dtype)
    count = summed[-1][0]
    mean = [(s / count).to(x.dtype) for s, x in zip(summed[:-1], xs, strict=True)]
    return mean[0], _unflatten(jac, mean[1:]), count


def mean(reduce: Reduce | None, count: Tensor | None, tree: PyTree) -> PyTree:
    """Mean over the replicas of every leaf of ``tree`` (gradients), in one reduction."""
    if reduce is None or count is None:
        return tree
    xs = leaves(tree)
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    summed = _sum_packed(reduce, xs, dtype)
    return _unflatten(tree, [(s / count.to(dtype)).to(x.dtype)
                             for s, x in zip(summed, xs, strict=True)])


def _unflatten(like: PyTree, values: list[Tensor]) -> PyTree:
    return optree.tree_structure(like, none_is_leaf=False).unflatten(values)
