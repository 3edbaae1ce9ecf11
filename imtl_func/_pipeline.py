"""The one pipeline every path runs: rows → Gramian → reduce → update → contract → gate.

The paths (feature level with a general ``decode`` or per-task decoders, parameter level,
:class:`imtl_func.nn.IMTL`) differ only in how they get the task rows and where the combined
gradient goes; the stages between are these functions.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from imtl_func import _reduce
from imtl_func._gate import gate
from imtl_func._gramian import gramian
from imtl_func._transform import IMTLState, Info, Proposal, Transform
from imtl_func._tree import PyTree, contract, tree_map

__all__ = ["Grads", "Losses", "StepResult", "combine", "finish", "weigh"]


class Losses(NamedTuple):
    """What a loss function may return instead of a bare ``[T]`` tensor.

    Attributes:
        per_task: ``[T]`` raw task losses, weighted by IMTL.
        extra: optional scalar that bypasses IMTL (a regulariser, an auxiliary loss): its plain
            gradient is added to every parameter's gradient, unweighted and unscaled.
    """

    per_task: Tensor
    extra: Tensor | None = None


class Grads(NamedTuple):
    """Gradients with the structure of the parameters they belong to.

    Attributes:
        shared: like ``shared_params``: the weighted combination of the task gradients (plus the
            gradient of ``Losses.extra``).
        task: like ``task_params``: ``Σ_t w_t ∇ℓ_t`` with ``w = e^{s}`` (ones without loss
            scales), i.e. each head its own (scaled) task gradient (plus ``Losses.extra``).
    """

    shared: PyTree
    task: PyTree


class StepResult(NamedTuple):
    """Result of one IMTL step.

    Attributes:
        losses: ``[T]`` raw task losses (detached; with ``reduce``, the global ones).
        grads: :class:`Grads` (zeros when ``info.finite`` is False).
        state: the new :class:`IMTLState` (the old one when ``info.finite`` is False).
        info: :class:`Info` for logging.
        aux: feature level: ``(encoder_aux, decoder_aux)``; parameter level: the loss
            function's aux; ``None`` where no function has aux.
    """

    losses: Tensor
    grads: Grads
    state: IMTLState
    info: Info
    aux: Any


def rows_gramian(rows: PyTree, num_tasks: int) -> Tensor:
    """Gramian of the first ``num_tasks`` rows (an extra loss's row is left out)."""
    return gramian(tree_map(lambda j: j[:num_tasks], rows))


def weigh(tx: Transform, state: IMTLState, vector: Tensor, num_tasks: int,
          k: Tensor | None, reduce: _reduce.Reduce | None, *, prescaled: bool = False
          ) -> tuple[Proposal, Tensor | None]:
    """Reduce the statistics over replicas and let the transform propose weights and a state.

    ``vector``: ``[T]`` or ``[T + 1]`` losses (the extra loss last); ``k``: the local Gramian.
    Returns the proposal (its ``losses`` the whole reduced vector) and the replica count.
    """
    vector, k, count = _reduce.statistics(reduce, vector, k)
    proposal = tx.propose(vector[:num_tasks], k, state, prescaled=prescaled)
    return proposal._replace(losses=vector), count


def with_extra(weights: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """Weights as a cotangent of ``size`` losses: weight 1 for a bypassing extra loss."""
    w = weights.to(dtype)
    return w if size == w.shape[0] else torch.cat([w, w.new_ones(size - w.shape[0])])


def combine(weights: Tensor, rows: PyTree, size: int) -> PyTree:
    """``Σ_t weights[t] rows[t]`` (with weight 1 on an extra loss's row)."""
    return contract(with_extra(weights, size, torch.float64), rows)


def finish(proposal: Proposal, state: IMTLState, grads: Grads, aux: Any, num_tasks: int
           ) -> StepResult:
    """Gate the step and package it."""
    grads, new_state, info = gate(proposal, state, grads)
    return StepResult(proposal.losses[:num_tasks].detach(), grads, new_state, info, aux)
