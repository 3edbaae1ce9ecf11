"""Data-parallel IMTL: the same α and scale state on every replica, for the global batch.

Each replica (rank) holds a slice of the global batch. The steps and :class:`imtl_func.nn.IMTL`
take an optional ``reduce`` argument, the way JAX steps take an ``axis_name``: a function that
returns the element-wise **sum over the replicas** of a 1-D tensor (a ``psum``). :func:`all_sum`
builds one on ``torch.distributed``. No global state: which replicas take part is said by the
function.

What crosses the wire, per step (``P_s``, ``P_t``: number of shared / task-specific parameters):

* feature-level step: one float64 vector ``[losses (T, +1 with Losses.extra), replica count,
  K (T·T)]`` (``(T² + T + 1) · 8`` bytes: 168 bytes for T = 4), then the gradients
  ``P_s + P_t`` in their dtype (what DDP would send anyway). Exact: the feature slices are
  disjoint, so the global Gramian is ``Σ_r K_r / R²``.
* parameter-level step: the task Jacobian rows ``T · P_s`` with the losses in one buffer, then
  the task-specific gradients ``P_t``: T times the traffic of plain data parallelism, because a
  Jacobian row of the global loss is a sum over replicas.

Every replica receives the same sums, so it computes the same α, the same new state and the same
``info.finite``: a non-finite loss or gradient on one replica makes the sums non-finite and every
replica skips the step. The returned losses are the global ones (mean of the local ones, which
equals the loss of the global batch when every replica reduces the same number of examples by a
mean).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from imtl_func._reduce import Reduce

__all__ = ["Reduce", "all_sum"]


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
