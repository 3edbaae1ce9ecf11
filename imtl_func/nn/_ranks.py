"""Data-parallel agreement for :class:`imtl_func.nn.IMTL` when ranks skip different tasks.

Every rank joins one reduction per call (losses, which tasks are active, the Gramian embedded
in the full ``[T, T]``, a failure flag), whatever it computed or if it failed, so the ranks
never pair different collectives. A task active on any rank is active; its loss is the mean
over the ``R_t`` ranks that computed it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from imtl_func import _reduce

__all__ = ["global_statistics"]


def global_statistics(reduce: _reduce.Reduce, needs_gramian: bool, values: Tensor,
                  local: list[bool], k_local: Tensor | None, targets: list[Tensor],
                  error: Exception | None
                  ) -> tuple[list[int], Tensor, Tensor | None, Tensor]:
    """Data parallel: the global statistics of the tasks active on any rank.

    Every rank joins the one reduction, whatever it computed (or if it failed). Returns the
    tasks active on some rank, their global losses and Gramian, and ``R / R_t``.
    """
    num = len(local)
    mask = torch.tensor(local, device=values.device)
    k_full = None
    if needs_gramian:
        # The same dtype on every rank (the weights depend on it): the targets', ≥ float32.
        dtype = torch.float32
        for t in targets:
            dtype = torch.promote_types(dtype, t.dtype)
        k_full = torch.zeros(num, num, dtype=dtype, device=values.device)
        if k_local is not None and error is None:
            mine = torch.tensor([i for i, a in enumerate(local) if a], device=values.device)
            k_full[mine[:, None], mine[None, :]] = k_local.to(dtype)
    stats = _reduce.active_statistics(reduce, values, mask, k_full,
                                      failed=error is not None)
    if error is not None:
        raise error
    if stats.failed:
        raise RuntimeError(f"IMTL: {stats.failed} other rank(s) raised an error in this call "
                           "(see their output); every rank stops here")
    on = [i for i, c in enumerate(stats.counts.tolist()) if c > 0]
    if not on:
        return on, stats.losses, None, stats.counts
    idx = torch.tensor(on, device=values.device)
    k = None if stats.gramian is None else stats.gramian[idx[:, None], idx[None, :]]
    return on, stats.losses[idx], k, stats.replicas / stats.counts[idx]
