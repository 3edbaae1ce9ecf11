"""Data-parallel IMTL: the same α and scale state on every replica, for the global batch.

Each replica (rank) holds a slice of the global batch. The steps take an optional ``reduce``
argument, the way JAX steps take an ``axis_name``: a function that returns the element-wise
**sum over the replicas** of a 1-D tensor (a ``psum``). :func:`all_sum` builds one on
``torch.distributed``. No global state: which replicas take part is said by the function.

What crosses the wire, per step (``P_s``, ``P_t``: number of shared / task-specific parameters):

* feature-level step: one float64 vector ``[K (T·T), losses (T, +1 with Losses.extra),
  non-finite flag, replica count]`` (``(T² + T + 2) · 8`` bytes: 176 bytes for T = 4), then the
  gradients ``P_s + P_t`` in their dtype (what DDP would send anyway). Exact: the feature
  slices are disjoint, so the global Gramian is ``Σ_r K_r / R²``.
* parameter-level step: the task Jacobian rows ``T · P_s`` plus the same statistics in one
  buffer, then the task-specific gradients ``P_t``: T times the traffic of plain data parallelism,
  because a Jacobian row of the global loss is a sum over replicas.

Every replica receives the same sums, so it computes the same α, the same new state and the same
``info.finite``: a non-finite loss or gradient on one replica makes every replica skip the step.
The returned losses are the global ones (mean of the local ones, which equals the loss of the
global batch when every replica reduces the same number of examples by a mean).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from imtl_func._transform import IMTLState, Info, Transform, Weights
from imtl_func._tree import PyTree, all_finite, leaves, where

__all__ = [
    "Reduce",
    "Replicas",
    "all_sum",
    "mean_over_replicas",
    "replicated",
    "sum_rows",
    "sum_statistics",
]

#: ``reduce(x) -> Σ_replicas x`` for a 1-D tensor ``x``, the same result on every replica.
Reduce = Callable[[Tensor], Tensor]


class Replicas(NamedTuple):
    """What one reduction told about the replicas.

    Attributes:
        count: ``[]`` number of replicas R (the sum of a 1 from each); float.
        finite: ``[]`` bool, True when every replica's losses (and Gramian or Jacobian rows) were
            finite. Identical on every replica.
    """

    count: Tensor
    finite: Tensor


def all_sum(group: Any = None) -> Reduce:
    """A ``reduce`` for the steps that sums over the ranks of a ``torch.distributed`` group.

    One ``torch.distributed.all_reduce`` (SUM) of a copy of its argument; any backend (gloo on
    CPU, nccl on GPUs). ``torch.compile`` traces it (dynamo maps it to the functional
    collective). The process group must be initialised before the first step, not before
    this call.

    Args:
        group: a ``ProcessGroup``; ``None`` means the default (world) group.

    Returns:
        ``psum(x) -> Tensor``: a new tensor, the element-wise sum of ``x`` over the group.
    """
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of PyTorch")

    def psum(x: Tensor) -> Tensor:
        total = x.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    return psum


def _sum_packed(reduce: Reduce, tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """Sum every tensor over the replicas with ONE call of ``reduce`` on a flat ``dtype`` buffer.

    Returns tensors of the input shapes and the buffer's dtype.
    """
    flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
    total = reduce(flat)
    if not isinstance(total, Tensor) or total.shape != flat.shape:
        got = tuple(total.shape) if isinstance(total, Tensor) else type(total).__name__
        raise ValueError(f"reduce must return a tensor of the shape it was given "
                         f"{tuple(flat.shape)} (the sum over replicas), got {got}")
    parts = torch.split(total, [t.numel() for t in tensors])
    return [p.reshape(t.shape) for p, t in zip(parts, tensors, strict=True)]


def _local_flags(vector: Tensor, finite: Tensor, dtype: torch.dtype) -> Tensor:
    """``[not finite, 1]``: summed, the number of non-finite replicas and the replica count."""
    return torch.stack([(~finite).to(dtype), torch.ones((), dtype=dtype, device=vector.device)])


def sum_statistics(reduce: Reduce | None, vector: Tensor, gramian: Tensor | None
                   ) -> tuple[Tensor, Tensor | None, Replicas | None]:
    """Global losses and Gramian from the local ones (feature level), in one reduction.

    Args:
        reduce: see :data:`Reduce`; ``None`` returns the inputs unchanged and no replicas.
        vector: ``[T]`` (or ``[T + 1]`` with the extra loss) local losses, each a mean over the
            local batch.
        gramian: ``[T, T]`` local Gramian of the task gradients w.r.t. the local feature slice, or
            ``None`` ('loss').

    Returns:
        ``(losses, gramian, replicas)``: the mean of the losses over the replicas (in
        ``vector``'s dtype), the Gramian of the global batch's task gradients
        ``Σ_r K_r / R²`` (float64), and :class:`Replicas`.
    """
    if reduce is None:
        return vector, gramian, None
    dtype = torch.float64
    finite = torch.isfinite(vector).all()
    parts = [vector]
    if gramian is not None:
        finite = finite & torch.isfinite(gramian).all()
        parts.append(gramian)
    parts.append(_local_flags(vector, finite, dtype))
    summed = _sum_packed(reduce, parts, dtype)
    bad, count = summed[-1].unbind(0)
    losses = (summed[0] / count).to(vector.dtype)
    k = None if gramian is None else summed[1] / (count * count)
    return losses, k, Replicas(count, bad == 0)


def sum_rows(reduce: Reduce | None, vector: Tensor, rows: PyTree
             ) -> tuple[Tensor, PyTree, Replicas | None]:
    """Global losses and task Jacobian rows from the local ones (parameter level).

    A row of the global Jacobian is the mean over replicas of the local rows, so the whole
    ``T × P_s`` Jacobian goes through ``reduce``, in one buffer with the losses and the flags
    (dtype: the widest of float32 and the inputs').

    Args:
        reduce: see :data:`Reduce`; ``None`` returns the inputs unchanged and no replicas.
        vector: ``[T]`` or ``[T + 1]`` local losses.
        rows: pytree whose leaves are ``[T(+1), *shape]`` local Jacobian rows.

    Returns:
        ``(losses, rows, replicas)``: means over the replicas, in the input dtypes.
    """
    if reduce is None:
        return vector, rows, None
    row_leaves = leaves(rows)
    dtype = torch.promote_types(torch.float32, vector.dtype)
    for x in row_leaves:
        dtype = torch.promote_types(dtype, x.dtype)
    finite = torch.isfinite(vector).all() & all_finite(rows)
    flags = _local_flags(vector, finite.to(vector.device), dtype)
    summed = _sum_packed(reduce, [vector, *row_leaves, flags], dtype)
    bad, count = summed[-1].unbind(0)
    mean = [(s / count).to(x.dtype) for s, x in zip(summed[:-1], [vector, *row_leaves],
                                                     strict=True)]
    spec = _treespec(rows)
    return mean[0], spec.unflatten(mean[1:]), Replicas(count, bad == 0)


def mean_over_replicas(reduce: Reduce | None, replicas: Replicas | None, tree: PyTree) -> PyTree:
    """Mean over the replicas of every leaf of ``tree`` (gradients), in one reduction.

    The buffer has the widest floating dtype of the leaves; every leaf comes back in its own.
    ``reduce=None`` returns ``tree`` unchanged.
    """
    if reduce is None or replicas is None:
        return tree
    xs = leaves(tree)
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    summed = _sum_packed(reduce, xs, dtype)
    count = replicas.count.to(dtype)
    return _treespec(tree).unflatten([(s / count).to(x.dtype) for s, x in zip(summed, xs,
                                                                              strict=True)])


def replicated(tx: Transform, reduce: Reduce) -> Transform:
    """The transform of the global batch: ``update`` first sums its inputs over the replicas.

    ``update(local_losses, local_gramian, state)`` reduces the ``[T]`` losses and the ``[T, T]``
    feature-level Gramian with :func:`sum_statistics` (one reduction), then runs ``tx.update`` on
    the global ones; ``info.finite`` is False on every replica when any replica's losses or
    Gramian were not finite. The Gramian must be a sum over replicas (task gradients w.r.t.
    disjoint feature slices), not a parameter-level one (see :func:`sum_rows`). Every replica
    must call it with the same T, at the same point of its loop.

    Args:
        tx: an IMTL :class:`~imtl_func.Transform`.
        reduce: see :data:`Reduce`.

    Returns:
        A :class:`~imtl_func.Transform` with the same ``method`` and ``init``.
    """

    def update(losses: Tensor, gramian: Tensor | None, state: IMTLState
               ) -> tuple[Weights, IMTLState, Info]:
        losses, gramian, replicas = sum_statistics(reduce, losses, gramian)
        assert replicas is not None
        weights, new_state, info = tx.update(losses, gramian, state)
        new_state = where(replicas.finite, new_state, state)
        return weights, new_state, info._replace(finite=info.finite & replicas.finite)

    return tx._replace(update=update)


def _treespec(tree: PyTree) -> Any:
    return optree.tree_structure(tree, none_is_leaf=False)
