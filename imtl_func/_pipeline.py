"""The one pipeline every path runs: rows → Gramian → reduce → update → contract → gate.

The paths (feature level with a general ``decode`` or per-task decoders, parameter level,
:class:`imtl_func.nn.IMTL`) differ only in how they get the task rows and where the combined
gradient goes; the stages between are these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from imtl_func import _checks, _reduce
from imtl_func._autodiff import VJP, vjp
from imtl_func._gate import gate
from imtl_func._gramian import gramian
from imtl_func._transform import IMTLState, Info, Proposal, Transform
from imtl_func._tree import PyTree, contract, leaves, tree_map

__all__ = ["Grads", "Losses", "StepResult", "combine", "finish", "loss_vjp", "weigh"]


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


def loss_vector(out: Any, where: str) -> tuple[Tensor, int]:
    """A loss function's output as ``[T]``, or ``[T + 1]`` with the extra loss last; and T."""
    if isinstance(out, Losses):
        _checks.losses(out.per_task, None, where)
        if out.extra is None:
            return out.per_task, out.per_task.shape[0]
        _checks.extra_loss(out.extra, where)
        extra = out.extra.reshape(1).to(out.per_task.dtype)
        return torch.cat([out.per_task, extra]), out.per_task.shape[0]
    _checks.losses(out, None, where)
    return out, out.shape[0]


def split_aux(out: Any, has_aux: bool, where: str) -> tuple[Any, Any]:
    """``(losses, aux)`` of a loss function's output (aux None without ``has_aux``)."""
    if not has_aux:
        return out, None
    if not isinstance(out, tuple) or isinstance(out, Losses) or len(out) != 2:
        raise ValueError(f"{where} was declared has_aux=True, so it must return (losses, aux)")
    return out


def loss_vjp(fn: Callable[..., Any], has_aux: bool, where: str, *primals: PyTree,
             autograd: bool) -> tuple[VJP, int]:
    """The :class:`~imtl_func._autodiff.VJP` of a loss function, its output checked and made a
    vector (:func:`loss_vector`), and T.

    T is a Python int read while ``fn`` runs (shapes are static, also under ``torch.compile``).
    """
    meta: dict[str, int] = {}

    def wrapped(*args: PyTree) -> Any:
        out, aux = split_aux(fn(*args), has_aux, where)
        vector, meta["num_tasks"] = loss_vector(out, where)
        _checks.differentiable(vector, where)
        return (vector, aux) if has_aux else vector

    result = vjp(wrapped, *primals, has_aux=has_aux, autograd=autograd)
    return result, meta["num_tasks"]


def encoder(encode: Callable[..., Any], has_aux: bool, batch: tuple[Any, ...]
            ) -> Callable[[PyTree], Any]:
    """``p -> encode(p, *batch)``, its output checked: the features (``(features, aux)`` with
    ``has_aux``)."""

    def enc(p: PyTree) -> Any:
        out = encode(p, *batch)
        if has_aux and (not isinstance(out, tuple) or len(out) != 2):
            raise ValueError("encode was declared encoder_has_aux=True, so it must return "
                             "(features, aux)")
        _checks.params(out[0] if has_aux else out, "the features returned by encode")
        return out

    return enc


def head_losses(heads: Sequence[Callable[..., Tensor]], task_params: PyTree,
                copies: Sequence[PyTree], batch: tuple[Any, ...], num_tasks: int) -> Tensor:
    """``[ℓ_1(task_params, z_1), ..., ℓ_T(task_params, z_T)]`` of per-task decoders (head t
    reads its own reference ``z_t`` to the features), each checked."""
    vector = torch.stack([_checks.scalar_loss(head(task_params, z, *batch), t)
                          for t, (head, z) in enumerate(zip(heads, copies, strict=True))])
    return _checks.losses(vector, num_tasks, "decode")


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


def finish(proposal: Proposal, state: IMTLState, grads: Grads, aux: Any, num_tasks: int, *,
           inputs: tuple[PyTree, ...] | None = None) -> StepResult:
    """Gate the step and package it.

    ``inputs``: what the step read (parameters, features, batch) when its gradients come from
    its own plain-autograd backward: such gradients are fresh tensors, so the gate zeroes them
    in place unless one shares memory with an input, the state or what the step reports (an
    identity-like loss returns its cotangent).
    """
    owned = inputs is not None and _owned(grads, (inputs, proposal, state, aux))
    grads, new_state, info = gate(proposal, state, grads, owned=owned)
    return StepResult(proposal.losses[:num_tasks].detach(), grads, new_state, info, aux)


def _owned(grads: PyTree, others: Any) -> bool:
    held = {x.untyped_storage().data_ptr() for x in optree.tree_leaves(others)
            if isinstance(x, Tensor)}
    return not any(g.untyped_storage().data_ptr() in held for g in leaves(grads))
