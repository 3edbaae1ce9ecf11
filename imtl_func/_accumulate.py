"""Exact gradient accumulation: the feature-level IMTL step of one big batch from M micro-batches.

IMTL-G's ``α`` is a function of the whole batch's Gramian and is needed before any backward
through the encoder, so summing the gradients of M ordinary steps is not the big-batch step
(each micro-batch would get its own ``α``). At feature level it can be done exactly, because the
task gradients of a batch are its micro-batches' feature gradients side by side (disjoint
slices of ``z``): the Gramian is a sum, the fact that makes data parallelism one all-reduce.
With losses reduced by a mean over each micro-batch and micro-batch weights ``w_m`` (``W = Σ_m
w_m``; ``w_m = 1`` for equal sizes, ``w_m = n_m`` for sizes ``n_m``), the big batch has

    ℓ = Σ_m w_m ℓ_m / W,    ∇_{z_m} ℓ_t = (w_m / W) ∇_{z_m} ℓ_{m,t},    K = Σ_m w_m² K_m / W²,

``K_m`` the Gramian of micro-batch m's feature gradients. Two passes give that step:

1. :meth:`Accumulator.statistics`, per micro-batch: the encoder's forward without a graph, the
   heads' forward and backward to the feature, ``w_m ℓ_m`` and ``w_m² K_m`` added to running sums
   (:class:`AccumulatedStats`). No encoder backward.
2. :meth:`Accumulator.weigh`, once: the transform's ``propose`` on the big batch's losses and
   Gramian (:func:`imtl_func._pipeline.weigh`), pre-gated for an early look
   (:class:`AccumulationPlan`).
3. :meth:`Accumulator.gradients`, per micro-batch: forward again and the backward of everything
   with the cotangent ``(w_m / W) Σ_t α_t g_t`` at the feature and ``(w_m / W) e^{s}`` at the
   losses for the heads, summed over the micro-batches.
4. :meth:`Accumulator.finish`, once: the one gate (:func:`imtl_func._gate.gate`) on the
   proposal and the summed gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from imtl_func import _checks, _reduce
from imtl_func._autodiff import detached, use_autograd, vjp
from imtl_func._gate import gate
from imtl_func._micro_batches import (
    AccumulatedStats,
    AccumulationPlan,
    add,
    as_weight,
    rng_state,
    set_rng_state,
)
from imtl_func._pipeline import (
    Grads,
    StepResult,
    encoder,
    finish,
    head_losses,
    loss_vector,
    loss_vjp,
    rows_gramian,
    split_aux,
    weigh,
    with_extra,
)
from imtl_func._steps import FeatureSpec, Step
from imtl_func._transform import IMTLState, Transform
from imtl_func._tree import PyTree, tree_map

__all__ = ["AccumulatedStats", "AccumulationPlan", "Accumulator", "accumulate"]


def _call(fn: Callable[..., Any], has_aux: bool, where: str, *args: Any) -> tuple[Tensor, int]:
    """A loss function's ``[T]`` (or ``[T + 1]``) losses and T, without a graph."""
    with torch.no_grad():
        out, _ = split_aux(fn(*args), has_aux, where)
    return loss_vector(out, where)


class Accumulator:
    """Exact gradient accumulation for a feature-level step; made by :func:`accumulate`.

    ``acc(shared_params, task_params, state, micro_batches) -> StepResult`` runs both passes;
    the stages :meth:`statistics`, :meth:`weigh`, :meth:`gradients` and :meth:`finish` are the
    same computation for loops that load micro-batches lazily. Each stage is a pure function of
    its arguments and traces under ``torch.compile``.
    """

    def __init__(self, step: Step, spec: FeatureSpec) -> None:
        self.step = step
        self.transform: Transform = step.transform
        self._spec = spec

    def init(self, num_tasks: int, **kwargs: Any) -> IMTLState:
        """The initial state, as ``step.init`` (the same transform)."""
        return self.step.init(num_tasks, **kwargs)

    # ---------------------------------------------------------------------------- pass 1

    def statistics(self, shared_params: PyTree, task_params: PyTree, state: IMTLState,
                   stats: AccumulatedStats | None, *batch: Any, weight: Any = 1.0
                   ) -> AccumulatedStats:
        """Pass 1 on one micro-batch: add ``w ℓ_m`` and ``w² K_m`` to ``stats``.

        Args:
            shared_params: as for the step; the same in every call of one accumulated step.
            task_params: as for the step; the same in every call.
            state: as for the step; the same in every call.
            stats: the previous call's :class:`AccumulatedStats`, None for the first micro-batch.
            *batch: this micro-batch's arguments of ``encode`` and ``decode``.
            weight: ``w_m > 0`` (a number or a scalar tensor): 1 for equal micro-batches, or
                the micro-batch's size when sizes differ (losses reduced by a mean). The same
                weight goes to :meth:`gradients` for this micro-batch.

        Returns:
            The updated :class:`AccumulatedStats`. The encoder runs without an autograd graph; the
            heads are differentiated with respect to the feature only.
        """
        spec, tx = self._spec, self.transform
        _checks.params(shared_params, "shared_params")
        _checks.params(task_params, "task_params")
        if stats is not None and not isinstance(stats, AccumulatedStats):
            raise TypeError("stats must be None (the first micro-batch) or the AccumulatedStats "
                            f"returned by the previous call, got {type(stats).__name__}")
        with torch.no_grad():
            features, _ = split_aux(encoder(spec.encode, spec.encoder_has_aux, batch)(
                detached(shared_params)), spec.encoder_has_aux, "encode")
        num_tasks = state.log_scale.shape[0]
        task = detached(task_params)
        autograd = use_autograd(shared_params, task_params, batch)
        k = None
        if spec.heads is not None:
            heads = spec.heads

            def dec_all(copies: tuple[PyTree, ...]) -> Tensor:
                return head_losses(heads, task, copies, batch, num_tasks)

            if tx.needs_gramian:
                res = vjp(dec_all, (features,) * len(heads), autograd=autograd)
                vector = res.out
                c = tx.loss_scales(state, vector.dtype).to(vector.dtype)
                # copies[t] = e^{s_t} ∇_z ℓ_t, as in the step
                (copies,) = res.pullback(c, last=True)
                k = rows_gramian(tree_map(lambda *r: torch.stack(r), *copies), num_tasks)
            else:
                with torch.no_grad():
                    vector = dec_all((features,) * len(heads))
            size = num_tasks
        else:
            def dec(z: PyTree) -> Any:
                return spec.decode(task, z, *batch)

            if tx.needs_gramian:
                res, size = loss_vjp(dec, spec.has_aux, "decode", features, autograd=autograd)
                vector = res.out
                (rows,) = res.rows(spec.chunk_size)
                k = rows_gramian(rows, size)
            else:
                vector, size = _call(dec, spec.has_aux, "decode", features)
            _checks.losses(vector[:size], num_tasks, "decode")
        losses = vector[:size]
        extra = vector[size] if vector.shape[0] > size else None
        w = as_weight(weight, vector.device)
        if stats is None:
            return AccumulatedStats(w, add(None, losses, w), add(None, extra, w),
                                    add(None, k, w * w))
        if stats.losses.shape != losses.shape or (stats.extra is None) != (extra is None):
            raise ValueError(
                f"statistics: this micro-batch has {losses.shape[0]} task losses"
                f"{' and an extra loss' if extra is not None else ''} but the statistics hold "
                f"{stats.losses.shape[0]}{' and an extra loss' if stats.extra is not None else ''}"
                "; every micro-batch of one step needs the same tasks")
        return AccumulatedStats(stats.weight + w, add(stats.losses, losses, w),
                                add(stats.extra, extra, w), add(stats.gramian, k, w * w))

    # ------------------------------------------------------------------------------ weigh

    def weigh(self, state: IMTLState, stats: AccumulatedStats | None) -> AccumulationPlan:
        """The big batch's weights and new state from the accumulated statistics.

        The losses ``Σ w_m ℓ_m / W`` and the Gramian ``Σ w_m² K_m / W²`` go through the
        transform's ``propose`` once (after the ``reduce`` over replicas, if any).

        Returns:
            A :class:`AccumulationPlan` for :meth:`gradients` and :meth:`finish`.
        """
        if stats is None:
            raise ValueError("weigh needs the statistics of at least one micro-batch: call "
                             "acc.statistics on every micro-batch first")
        if not isinstance(stats, AccumulatedStats):
            raise TypeError(f"stats must be the AccumulatedStats of acc.statistics, got "
                            f"{type(stats).__name__}")
        total = stats.weight
        losses = (stats.losses.to(torch.float64) / total).to(stats.losses.dtype)
        vector = losses
        if stats.extra is not None:
            extra = (stats.extra.to(torch.float64) / total).to(losses.dtype)
            vector = torch.cat([losses, extra.reshape(1)])
        k = None
        if stats.gramian is not None:
            k = (stats.gramian.to(torch.float64) / (total * total)).to(stats.gramian.dtype)
        proposal, replicas = weigh(self.transform, state, vector, losses.shape[0], k,
                                   self._spec.reduce, prescaled=self._spec.heads is not None)
        _, _, info = gate(proposal, state)
        return AccumulationPlan(info, state, total, proposal, replicas)

    # ---------------------------------------------------------------------------- pass 2

    def gradients(self, shared_params: PyTree, task_params: PyTree, plan: AccumulationPlan,
                  grads: Grads | None, *batch: Any, weight: Any = 1.0) -> tuple[Grads, Any]:
        """Pass 2 on one micro-batch: its share of the big batch's gradients, added to ``grads``.

        Args:
            shared_params: as in pass 1.
            task_params: as in pass 1.
            plan: the :class:`AccumulationPlan` of :meth:`weigh`.
            grads: the previous call's :class:`~imtl_func.Grads`, None for the first micro-batch.
            *batch: this micro-batch's arguments, as in pass 1.
            weight: this micro-batch's weight, as in pass 1.

        Returns:
            ``(grads, aux)``: the running sum and this micro-batch's ``(encoder_aux,
            decoder_aux)`` (None where neither function has aux). The forward must compute what
            it computed in pass 1: replay the random generators for dropout (``acc(...)`` does).
        """
        spec, tx = self._spec, self.transform
        if not isinstance(plan, AccumulationPlan):
            raise TypeError(f"plan must be the AccumulationPlan returned by acc.weigh, got "
                            f"{type(plan).__name__}")
        if grads is not None and not isinstance(grads, Grads):
            raise TypeError("grads must be None (the first micro-batch) or the Grads returned "
                            f"by the previous call, got {type(grads).__name__}")
        _checks.params(shared_params, "shared_params")
        _checks.params(task_params, "task_params")

        autograd = use_autograd(shared_params, task_params, batch)
        encoded = vjp(encoder(spec.encode, spec.encoder_has_aux, batch), shared_params,
                      has_aux=spec.encoder_has_aux, autograd=autograd)
        features = encoded.out
        weights, dec_aux = plan.proposal.weights, None
        share = as_weight(weight, plan.weight.device) / plan.weight  # w_m / W
        if spec.heads is not None:
            heads, num_tasks = spec.heads, plan.state.log_scale.shape[0]

            def dec_all(tp: PyTree, copies: tuple[PyTree, ...]) -> Tensor:
                return head_losses(heads, tp, copies, batch, num_tasks)

            res = vjp(dec_all, task_params, (features,) * len(heads), autograd=autograd)
            vector = res.out
            c = tx.loss_scales(plan.state, vector.dtype).to(torch.float64) * share
            g_task, copies = res.pullback(c.to(vector.dtype), last=True)
            w = weights.shared.to(vector.dtype)  # on the scaled rows (prescaled)
            cotangent = tree_map(lambda *r: sum(wt * x for wt, x in zip(w, r, strict=True)),
                                 *copies)
        else:
            def dec(tp: PyTree, z: PyTree) -> Any:
                return spec.decode(tp, z, *batch)

            res, _ = loss_vjp(dec, spec.has_aux, "decode", task_params, features,
                              autograd=autograd)
            vector, dec_aux = res.out, res.aux
            expected = plan.proposal.losses.shape
            if vector.shape != expected:
                raise ValueError(f"gradients: this micro-batch gives {vector.shape[0]} losses "
                                 f"but the plan was weighed on {expected[0]} (tasks plus an "
                                 "extra loss); every micro-batch of one step needs the same")
            size = vector.shape[0]

            def cot(wt: Tensor) -> Tensor:
                return (with_extra(wt, size, torch.float64) * share).to(vector.dtype)

            if tx.weighting.uniform:
                g_task, cotangent = res.pullback(cot(weights.task), last=True)
            else:
                g_task, _ = res.pullback(cot(weights.task))
                _, cotangent = res.pullback(cot(weights.shared), last=True)
        (g_shared,) = encoded.pullback(cotangent, last=True)
        new = Grads(g_shared, g_task)
        if grads is not None:
            new = Grads(*tree_map(torch.add, (grads.shared, grads.task), (g_shared, g_task)))
        aux = (encoded.aux, dec_aux) if (spec.encoder_has_aux or spec.has_aux) else None
        return new, aux

    # ----------------------------------------------------------------------------- finish

    def finish(self, plan: AccumulationPlan, grads: Grads | None, aux: Any = None) -> StepResult:
        """The big batch's :class:`~imtl_func.StepResult`: the one gate on the plan's proposal and
        the summed gradients (averaged over replicas with a ``reduce``).

        If anything is not finite (any micro-batch's loss, Gramian or gradient, the new state),
        the gradients are zeros and the state is ``plan.state``, exactly as for one step.
        """
        if not isinstance(plan, AccumulationPlan):
            raise TypeError(f"plan must be the AccumulationPlan returned by acc.weigh, got "
                            f"{type(plan).__name__}")
        if grads is None:
            raise ValueError("finish needs the summed gradients of pass 2: call acc.gradients "
                             "on every micro-batch first")
        summed = _reduce.mean(self._spec.reduce, plan.replicas, (grads.shared, grads.task))
        return finish(plan.proposal, plan.state, Grads(*summed), aux,
                      plan.state.log_scale.shape[0])

    # -------------------------------------------------------------------------- one call

    def __call__(self, shared_params: PyTree, task_params: PyTree, state: IMTLState,
                 micro_batches: Sequence[Sequence[Any]], *,
                 weights: Sequence[Any] | Tensor | None = None) -> StepResult:
        """Both passes over ``micro_batches``: the step of their concatenation.

        Args:
            shared_params: as for the step.
            task_params: as for the step.
            state: as for the step.
            micro_batches: a list of micro-batches, each a tuple of the step's batch arguments
                (read twice, so a list, not an iterator).
            weights: one weight per micro-batch (see :meth:`statistics`); None: equal weights.

        Returns:
            The :class:`~imtl_func.StepResult` of the big batch; ``aux`` is the list of the
            micro-batches' ``(encoder_aux, decoder_aux)`` from pass 2 (None without aux).
            The random generators are replayed for pass 2, so dropout draws the same masks in
            both passes; afterwards they are where one pass would have left them.
        """
        batches = _checks.micro_batches(micro_batches)
        ws = [1.0] * len(batches) if weights is None else _checks.micro_batch_weights(
            weights, len(batches))
        rng = rng_state()
        stats = None
        for batch, w in zip(batches, ws, strict=True):
            stats = self.statistics(shared_params, task_params, state, stats, *batch, weight=w)
        plan = self.weigh(state, stats)
        set_rng_state(rng)
        grads, auxes = None, []
        for batch, w in zip(batches, ws, strict=True):
            grads, aux = self.gradients(shared_params, task_params, plan, grads, *batch,
                                        weight=w)
            auxes.append(aux)
        has_aux = self._spec.encoder_has_aux or self._spec.has_aux
        return self.finish(plan, grads, auxes if has_aux else None)


def accumulate(step: Step) -> Accumulator:
    """Exact gradient accumulation for a feature-level step: one big batch in M micro-batches.

    Args:
        step: a :class:`~imtl_func.Step` from :func:`imtl_func.mtl_value_and_grad` (a general
            ``decode`` or per-task decoders; any method or transform; its ``reduce`` is kept).

    Returns:
        An :class:`Accumulator`. ``acc(shared_params, task_params, state, micro_batches)``
        returns what ``step`` returns on the concatenated batch (losses, ``α``, state, every
        gradient, the gate's verdict), when each micro-batch's losses are means over its
        examples and the feature is per example: ``K = Σ_m w_m² K_m / W²`` (see the module
        docstring). It costs one extra forward of the encoder and the heads and one extra head
        backward per micro-batch.
    """
    if not isinstance(step, Step):
        raise TypeError("accumulate needs the Step returned by imtl_func.mtl_value_and_grad "
                        "(the uncompiled one: compile the accumulator's stages instead), got "
                        f"{type(step).__name__}")
    spec = step._feature
    if spec is None:
        raise ValueError("accumulate works on a feature-level step (imtl_func.mtl_value_and_grad)"
                         ": at parameter level the big batch's Gramian is not a sum of the "
                         "micro-batches' Gramians")
    return Accumulator(step, spec)
