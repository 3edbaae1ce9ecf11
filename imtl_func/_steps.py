"""One-call IMTL steps: losses in, combined gradients and the new state out.

Two levels, one pipeline (:mod:`imtl_func._pipeline`):

* feature level (:func:`mtl_value_and_grad`, the paper's practice): task gradients with respect
  to the shared feature ``z = encode(θ, batch)``; one backward through the heads for all T tasks
  and one through the encoder with the cotangent ``Σ_t w_t ∇_z ℓ_t``.
* parameter level (:func:`value_and_grad`): task gradients with respect to the shared
  parameters themselves, a ``T × |θ|`` Jacobian from one batched backward.

Both are pure functions of their inputs, traceable by ``torch.compile(fullgraph=True)``. They
differentiate through :func:`imtl_func._autodiff.vjp`: plain autograd when called eagerly,
``torch.func`` under ``torch.compile`` and inside other torch.func transforms (same numbers).
A weighting that is uniform and reads no Gramian ('loss', 'equal') needs no rows: one backward
through the whole model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor

from imtl_func import _checks, _reduce
from imtl_func._autodiff import VJP, use_autograd, vjp
from imtl_func._pipeline import (
    Grads,
    StepResult,
    combine,
    encoder,
    finish,
    head_losses,
    loss_vjp,
    rows_gramian,
    split_aux,
    weigh,
    with_extra,
)
from imtl_func._presets import resolve
from imtl_func._scales import ScaleRule
from imtl_func._transform import IMTLState, Transform
from imtl_func._tree import PyTree, tree_map

__all__ = ["Step", "mtl_value_and_grad", "value_and_grad"]


class FeatureSpec(NamedTuple):
    """What a feature-level step was built from (read by :func:`imtl_func.accumulate`)."""

    encode: Callable[..., Any]
    decode: Callable[..., Any]
    heads: tuple[Callable[..., Tensor], ...] | None
    encoder_has_aux: bool
    has_aux: bool
    chunk_size: int | None
    reduce: _reduce.Reduce | None


class Step:
    """A one-call IMTL step and the transform it runs.

    ``step(shared_params, task_params, state, *batch) -> StepResult``; ``step.init(T)`` makes
    the state it expects. ``torch.compile(step)`` compiles the call.
    """

    def __init__(self, fn: Callable[..., StepResult], tx: Transform, name: str,
                 feature: FeatureSpec | None = None) -> None:
        self._fn = fn
        self.transform = tx
        self.__name__ = name
        self._feature = feature  # what imtl_func.accumulate rebuilds; None: parameter level

    def init(self, num_tasks: int, **kwargs: Any) -> IMTLState:
        """The initial state: ``self.transform.init(num_tasks, log_scale=None,
        dtype=torch.float32, device=None)``."""
        return self.transform.init(num_tasks, **kwargs)

    def __call__(self, shared_params: PyTree, task_params: PyTree, state: IMTLState,
                 *batch: Any) -> StepResult:
        self.transform.check_state(state)
        return self._fn(shared_params, task_params, state, *batch)


def mtl_value_and_grad(
    encode: Callable[..., Any],
    decode: Callable[..., Any] | Sequence[Callable[..., Tensor]],
    method: str | Transform = "hybrid",
    *,
    scale_rule: ScaleRule | None = None,
    flip_negative: bool = False,
    encoder_has_aux: bool = False,
    has_aux: bool = False,
    chunk_size: int | None = None,
    reduce: _reduce.Reduce | None = None,
) -> Step:
    """Feature-level IMTL step (the paper's practice): task gradients w.r.t. the shared feature.

    Args:
        encode: ``encode(shared_params, *batch) -> features``, any pytree of tensors (or
            ``(features, aux)`` with ``encoder_has_aux``; e.g. updated BatchNorm buffers).
        decode: the fast path, a sequence of T functions
            ``decode[t](task_params, features, *batch) -> ℓ_t`` (a scalar), one per task: each
            reads its own reference to the features, so one ordinary backward through the heads
            gives every ``∇_z ℓ_t``, the cost of equal weighting plus one ``T × T`` Gramian. Or
            one function ``decode(task_params, features, *batch) -> losses`` with ``losses`` a
            ``[T]`` tensor or :class:`Losses` (or ``(losses, aux)`` with ``has_aux``). Called
            eagerly with ``losses = torch.stack([ℓ_1, ..., ℓ_T])``, row t is one backward from
            ``ℓ_t`` through its own head (T head backwards; the per-task cost plus T small
            backward calls). Any other ``[T]`` tensor (a :class:`Losses` with an extra loss
            included), and every call under ``torch.compile``, needs a batched backward over
            T rows that runs every row through every head (``T²`` head backwards): pass
            per-task decoders there. 'loss' and 'equal' need no rows: one backward in all.
        method: ``'hybrid'``, ``'gradient'``, ``'loss'``, ``'equal'`` (see
            :func:`imtl_func.preset`) or a :class:`Transform`.
        scale_rule: log-scale rule of a named method (default :func:`imtl_func.scale_newton`).
        flip_negative: see :func:`imtl_func.imtl_g`.
        encoder_has_aux: ``encode`` returns ``(features, aux)``.
        has_aux: ``decode`` returns ``(losses, aux)``. Either aux comes back in
            ``StepResult.aux = (encoder_aux, decoder_aux)``.
        chunk_size: rows of the batched head backward per vmap call (``1``: a plain loop).
        reduce: data parallelism (like JAX's ``axis_name``): ``reduce(x)`` returns the sum of a
            1-D tensor over the replicas, e.g. :func:`imtl_func.distributed.all_sum`. Each
            replica passes its slice of the global batch; one reduction of the Gramian and the
            losses gives every replica the global α and state, a second one averages the
            gradients. The result is that of one process on the global batch.

    Returns:
        A :class:`Step`: ``step(shared_params, task_params, state, *batch) -> StepResult`` and
        ``step.init(num_tasks)``. With ``g_t = ∇_z ℓ_t`` (``e^{s_t}∇_z ℓ_t`` with loss scales)
        and ``α`` the weighting of their Gramian, the shared parameters get
        ``vjp_encode(Σ_t α_t g_t)``, the task parameters ``Σ_t w_t ∇ℓ_t`` (see :class:`Grads`).
    """
    tx = resolve(method, scale_rule, flip_negative)
    _checks.chunk_size(chunk_size)
    heads = _checks.per_task_decoders(decode, has_aux)
    decode_fn = cast("Callable[..., Any]", decode)  # one function whenever heads is None

    def step(shared_params: PyTree, task_params: PyTree, state: IMTLState, *batch: Any
             ) -> StepResult:
        _checks.params(shared_params, "shared_params")
        _checks.params(task_params, "task_params")
        autograd = use_autograd(shared_params, task_params, batch)
        inputs = (shared_params, task_params, batch)
        enc = encoder(encode, encoder_has_aux, batch)

        def dec(tp: PyTree, z: PyTree) -> Any:
            if heads is None:
                return decode_fn(tp, z, *batch)
            # Per-task decoders: z holds one reference to the features per head.
            return head_losses(heads, tp, z, batch, state.log_scale.shape[0])

        if _one_backward(tx):
            def model(sp: PyTree, tp: PyTree) -> tuple[Any, Any]:
                z, enc_aux = split_aux(enc(sp), encoder_has_aux, "encode")
                losses, dec_aux = split_aux(
                    dec(tp, z if heads is None else (z,) * len(heads)), has_aux, "decode")
                return losses, (enc_aux, dec_aux)

            res = _whole_model(tx, model, True, "decode", state, inputs, reduce, autograd)
            aux = res.aux if encoder_has_aux or has_aux else None
            return res._replace(aux=aux)

        encoded = vjp(enc, shared_params, has_aux=encoder_has_aux, autograd=autograd)
        features = encoded.out
        if heads is not None:
            decoder = vjp(dec, task_params, (features,) * len(heads), autograd=autograd)
            return _per_task(tx, decoder, encoded, encoder_has_aux, state, reduce,
                             inputs if autograd else None)

        decoder, num_tasks = loss_vjp(dec, has_aux, "decode", task_params, features,
                                      autograd=autograd)
        vector, k = decoder.out, None
        if tx.needs_gramian:
            task_rows, feature_rows = decoder.rows(chunk_size)
            k = rows_gramian(feature_rows, num_tasks)
        proposal, count = weigh(tx, state, vector, num_tasks, k, reduce)
        weights, size = proposal.weights, vector.shape[0]
        if tx.needs_gramian:
            g_task = combine(weights.task, task_rows, size)
            cotangent = combine(weights.shared, feature_rows, size)
        else:
            g_task, _ = decoder.pullback(_cot(weights.task, vector))
            _, cotangent = decoder.pullback(_cot(weights.shared, vector), last=True)
        (g_shared,) = encoded.pullback(cotangent, last=True)
        grads = Grads(*_reduce.mean(reduce, count, (g_shared, g_task)))
        aux = None if not (encoder_has_aux or has_aux) else (encoded.aux, decoder.aux)
        return finish(proposal, state, grads, aux, num_tasks,
                      inputs=inputs if autograd else None)

    return Step(step, tx, "mtl_value_and_grad", FeatureSpec(
        encode, decode_fn, heads, encoder_has_aux, has_aux, chunk_size, reduce))


def _cot(weights: Tensor, vector: Tensor) -> Tensor:
    """Weights as the cotangent of ``vector`` (weight 1 on an extra loss)."""
    return with_extra(weights, vector.shape[0], vector.dtype)


def _one_backward(tx: Transform) -> bool:
    """The combined gradient is that of ``Σ_t w_t ℓ_t`` with weights read off the losses alone
    (a uniform weighting without a Gramian, e.g. 'loss' and 'equal'): one backward through the
    whole model, as in a plain training step."""
    return tx.weighting.uniform and not tx.needs_gramian


def _whole_model(tx: Transform, model: Callable[..., Any], has_aux: bool, where: str,
                 state: IMTLState, inputs: tuple[PyTree, PyTree, tuple[Any, ...]],
                 reduce: _reduce.Reduce | None, autograd: bool) -> StepResult:
    """A step of :func:`_one_backward`: ``model(shared, task) -> losses`` (or ``(losses,
    aux)``), weighed, then one backward of ``Σ_t w_t ℓ_t`` (weight 1 on an extra loss) gives
    both gradients. ``w = e^{s}`` is known as soon as the losses are."""
    res, num_tasks = loss_vjp(model, has_aux, where, *inputs[:2], autograd=autograd)
    proposal, count = weigh(tx, state, res.out, num_tasks, None, reduce)
    # A copy: the weights are also info.scale, and a gradient may alias its cotangent.
    g_shared, g_task = res.pullback(_cot(proposal.weights.task, res.out).clone(), last=True)
    grads = Grads(*_reduce.mean(reduce, count, (g_shared, g_task)))
    return finish(proposal, state, grads, res.aux, num_tasks, inputs=inputs if autograd else None)


def _per_task(tx: Transform, decoder: VJP, encoded: VJP, encoder_has_aux: bool,
              state: IMTLState, reduce: _reduce.Reduce | None, inputs: tuple[Any, ...] | None
              ) -> StepResult:
    """The feature-level step for per-task decoders: one plain backward through the heads.

    Task t reads its own reference ``z_t`` to the features, so the cotangent ``c = e^{s}``
    (known before the update) gives ``∂/∂z_t = c_t ∇_z ℓ_t`` for every t at once and the task
    parameters their final gradient ``Σ_t c_t ∇ℓ_t``. The rows already carry the scales, so
    nothing is divided by them.
    """
    vector = decoder.out
    num_tasks = vector.shape[0]
    c = tx.loss_scales(state, vector.dtype).to(vector.dtype)
    g_task, copies = decoder.pullback(c, last=True)  # the heads' buffers go here
    if not tx.needs_gramian:  # a weighting of the losses alone that is not uniform
        proposal, count = weigh(tx, state, vector, num_tasks, None, reduce, prescaled=True)
        w = proposal.weights.shared.to(vector.dtype)  # on the scaled rows
        cotangent = tree_map(lambda *r: sum(wt * x for wt, x in zip(w, r, strict=True)),
                             *copies)
    else:
        rows = tree_map(lambda *r: torch.stack(r), *copies)  # leaves [T, ...]: c_t ∇_z ℓ_t
        del copies
        proposal, count = weigh(tx, state, vector, num_tasks, rows_gramian(rows, num_tasks),
                                reduce, prescaled=True)
        cotangent = combine(proposal.weights.shared, rows, num_tasks)
        del rows
    (g_shared,) = encoded.pullback(cotangent, last=True)
    grads = Grads(*_reduce.mean(reduce, count, (g_shared, g_task)))
    aux = (encoded.aux, None) if encoder_has_aux else None
    return finish(proposal, state, grads, aux, num_tasks, inputs=inputs)


def value_and_grad(
    loss_fn: Callable[..., Any],
    method: str | Transform = "hybrid",
    *,
    scale_rule: ScaleRule | None = None,
    flip_negative: bool = False,
    has_aux: bool = False,
    chunk_size: int | None = None,
    reduce: _reduce.Reduce | None = None,
) -> Step:
    """Parameter-level IMTL step: task gradients w.r.t. the shared parameters themselves.

    Args:
        loss_fn: ``loss_fn(shared_params, task_params, *batch) -> losses`` with ``losses`` a
            ``[T]`` tensor or :class:`Losses` (or ``(losses, aux)`` with ``has_aux``). Which
            leaves are shared is said by which argument holds them.
        method: as in :func:`mtl_value_and_grad`.
        scale_rule: log-scale rule of a named method (default :func:`imtl_func.scale_newton`).
        flip_negative: see :func:`imtl_func.imtl_g`.
        has_aux: ``loss_fn`` returns ``(losses, aux)``; ``aux`` comes back as ``StepResult.aux``.
        chunk_size: Jacobian rows per vmap call; bounds the memory of the ``T × |θ|`` Jacobian
            pass (``1``: a plain loop).
        reduce: as in :func:`mtl_value_and_grad`. A row of the global Jacobian is a mean over
            replicas, so the whole ``T × |θ|`` shared Jacobian is reduced (with the losses),
            then the task-specific gradients: T times the traffic of plain data parallelism.

    Returns:
        A :class:`Step`; the shared parameters get ``Σ_t w_t ∇_θ ℓ_t`` with the weights from the
        Gramian of the per-task parameter gradients (summed over every shared leaf), the task
        parameters as in the feature-level step. Exact, but one batched backward computes T
        gradients of the whole model.
    """
    tx = resolve(method, scale_rule, flip_negative)
    _checks.chunk_size(chunk_size)

    def step(shared_params: PyTree, task_params: PyTree, state: IMTLState, *batch: Any
             ) -> StepResult:
        _checks.params(shared_params, "shared_params")
        _checks.params(task_params, "task_params")

        autograd = use_autograd(shared_params, task_params, batch)
        inputs = (shared_params, task_params, batch)

        def fn(sp: PyTree, tp: PyTree) -> Any:
            return loss_fn(sp, tp, *batch)

        if _one_backward(tx):
            return _whole_model(tx, fn, has_aux, "loss_fn", state, inputs, reduce, autograd)
        res, num_tasks = loss_vjp(fn, has_aux, "loss_fn", shared_params, task_params,
                                  autograd=autograd)
        vector, size = res.out, res.out.shape[0]
        if tx.needs_gramian:
            shared_rows, task_rows = res.rows(chunk_size)
            vector, shared_rows, count = _reduce.rows(reduce, vector, shared_rows)
            proposal, _ = weigh(tx, state, vector, num_tasks,
                                rows_gramian(shared_rows, num_tasks), None)
            g_shared = combine(proposal.weights.shared, shared_rows, size)
            g_task = _reduce.mean(reduce, count,
                                  combine(proposal.weights.task, task_rows, size))
        else:
            proposal, count = weigh(tx, state, vector, num_tasks, None, reduce)
            _, g_task = res.pullback(_cot(proposal.weights.task, vector))
            g_shared, _ = res.pullback(_cot(proposal.weights.shared, vector), last=True)
            g_shared, g_task = _reduce.mean(reduce, count, (g_shared, g_task))
        return finish(proposal, state, Grads(g_shared, g_task), res.aux, num_tasks,
                      inputs=inputs if autograd else None)

    return Step(step, tx, "value_and_grad")
