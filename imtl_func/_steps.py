"""One-call IMTL steps: losses in, combined gradients and the new state out.

Two levels, one recipe (DESIGN.md §2):

* feature-level (:func:`mtl_value_and_grad`, the paper's fast path): task gradients are taken
  with respect to the shared feature ``z = encode(θ, batch)``. Cost: one forward pass, one
  batched backward through the heads for all T tasks, one backward through the encoder with the
  cotangent ``Σ_t w_t ∇_z ℓ_t``.
* parameter-level (:func:`value_and_grad`): task gradients with respect to the shared
  parameters themselves; a batched backward through the whole model gives the ``T × |θ|``
  Jacobian.

Both are pure functions of their inputs, traceable by ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import vjp

from imtl_func import _checks
from imtl_func import distributed as _dist
from imtl_func._gramian import gramian
from imtl_func._jacobian import pullback_rows
from imtl_func._scales import ScaleRule
from imtl_func._transform import IMTLState, Info, Transform, transform
from imtl_func._tree import PyTree, all_finite, contract, tree_map, where, zeros_where_not

__all__ = ["Grads", "Losses", "StepResult", "mtl_value_and_grad", "value_and_grad"]


class Losses(NamedTuple):
    """What a loss function may return instead of a bare ``[T]`` tensor.

    Attributes:
        task: ``[T]`` raw task losses, weighted by IMTL.
        extra: optional scalar that bypasses IMTL (a regulariser, an auxiliary loss): its plain
            gradient is added to every parameter's gradient, unweighted and unscaled.
    """

    task: Tensor
    extra: Tensor | None = None


class Grads(NamedTuple):
    """Gradients with the structure of the parameters they belong to.

    Attributes:
        shared: like ``shared_params``: the IMTL combination of the task gradients (plus the
            gradient of ``Losses.extra``).
        task: like ``task_params``: ``Σ_t w_t ∇ℓ_t`` with ``w = e^{s}`` ('loss', 'hybrid') or ones
            ('gradient'), i.e. each head its own (scaled) task gradient (plus ``Losses.extra``).
    """

    shared: PyTree
    task: PyTree


class StepResult(NamedTuple):
    """Result of one IMTL step.

    Attributes:
        losses: ``[T]`` raw task losses (detached).
        grads: :class:`Grads`.
        state: the new :class:`IMTLState` (unchanged when ``info.finite`` is False).
        info: :class:`Info` for logging.
        aux: feature-level: ``(encoder_aux, decoder_aux)``; parameter-level: the loss
            function's aux; ``None`` where no function has aux.
    """

    losses: Tensor
    grads: Grads
    state: IMTLState
    info: Info
    aux: Any


Method = str | Transform


def _as_transform(method: Method, scale_rule: ScaleRule | None, flip_negative: bool) -> Transform:
    if isinstance(method, Transform):
        if scale_rule is not None or flip_negative:
            raise ValueError("pass scale_rule and flip_negative to imtl_func.transform(), not "
                             "next to a Transform")
        return method
    return transform(method, scale_rule=scale_rule, flip_negative=flip_negative)


def _loss_vector(out: Any, where_: str) -> tuple[Tensor, int]:
    """A loss function's output as ``[T]``, or ``[T + 1]`` with the extra loss last; and T."""
    if isinstance(out, Losses):
        _checks.losses(out.task, None, where_)
        if out.extra is None:
            return out.task, out.task.shape[0]
        _checks.extra_loss(out.extra, where_)
        return torch.cat([out.task, out.extra.reshape(1).to(out.task.dtype)]), out.task.shape[0]
    _checks.losses(out, None, where_)
    return out, out.shape[0]


def _vjp(fn: Callable[..., Any], has_aux: bool, where_: str, *primals: PyTree
         ) -> tuple[Tensor, Callable[..., Any], int, Any]:
    """``torch.func.vjp`` of a loss function: ``(vector, pullback, T, aux)``.

    T is a Python int read while ``fn`` runs (shapes are static, also under ``torch.compile``).
    """
    meta: dict[str, int] = {}

    def wrapped(*args: PyTree) -> Any:
        out = fn(*args)
        if has_aux:
            if not isinstance(out, tuple) or isinstance(out, Losses) or len(out) != 2:
                raise ValueError(f"{where_} was declared has_aux=True, so it must return "
                                 "(losses, aux)")
            out, aux = out
        vector, meta["num_tasks"] = _loss_vector(out, where_)
        return (vector, aux) if has_aux else vector

    if has_aux:
        vector, pullback, aux = vjp(wrapped, *primals, has_aux=True)
    else:
        (vector, pullback), aux = vjp(wrapped, *primals), None
    return vector, pullback, meta["num_tasks"], aux


def _detached(tree: PyTree) -> PyTree:
    return tree_map(torch.Tensor.detach, tree)


def _rows(vector: Tensor) -> Tensor:
    return torch.eye(vector.shape[0], dtype=vector.dtype, device=vector.device)


def _with_extra(weights: Tensor, size: int) -> Tensor:
    """Append weight 1 for the bypassing extra loss when there is one (``size = T + 1``)."""
    if size == weights.shape[0]:
        return weights
    return torch.cat([weights, weights.new_ones(size - weights.shape[0])])


def _task_losses(vector: Tensor, num_tasks: int, state: IMTLState, where_: str) -> Tensor:
    """The ``[T]`` task losses at the head of ``vector``, T checked against the state."""
    losses = vector[:num_tasks]
    _checks.losses(losses, state.log_scale.shape[0], where_)
    return losses


def _finish(
    losses: Tensor,
    vector: Tensor,
    g_shared: PyTree,
    g_task: PyTree,
    state: IMTLState,
    new_state: IMTLState,
    info: Info,
    aux: Any,
    replicas: _dist.Replicas | None = None,
) -> StepResult:
    """Skip the step (zero gradients, old state) unless every loss and gradient is finite."""
    finite = info.finite & torch.isfinite(vector).all() & all_finite(g_shared, g_task)
    if replicas is not None:
        finite = finite & replicas.finite
    return StepResult(
        losses=losses.detach(),
        grads=Grads(zeros_where_not(finite, g_shared), zeros_where_not(finite, g_task)),
        state=where(finite, new_state, state),
        info=info._replace(finite=finite),
        aux=aux,
    )


def mtl_value_and_grad(
    encode: Callable[..., Any],
    decode: Callable[..., Any] | Sequence[Callable[..., Tensor]],
    method: Method = "hybrid",
    *,
    scale_rule: ScaleRule | None = None,
    flip_negative: bool = False,
    encoder_has_aux: bool = False,
    has_aux: bool = False,
    chunk_size: int | None = None,
    reduce: _dist.Reduce | None = None,
) -> Callable[..., StepResult]:
    """Feature-level IMTL step (the paper's practice): task gradients w.r.t. the shared feature.

    Args:
        encode: ``encode(shared_params, *batch) -> features``, any pytree of tensors (or
            ``(features, aux)`` with ``encoder_has_aux``; e.g. updated BatchNorm buffers).
        decode: ``decode(task_params, features, *batch) -> losses`` with ``losses`` a ``[T]``
            tensor or :class:`Losses` (or ``(losses, aux)`` with ``has_aux``). Or the fast
            path: a sequence of T functions ``decode[t](task_params, features, *batch) -> ℓ_t``
            (a scalar), one per task. Each then reads its own reference to the features, so a
            single ordinary backward through the heads gives every ``∇_z ℓ_t`` (no vmap): the
            cost of equal weighting plus one ``T × T`` Gramian. A general ``decode`` needs the
            batched backward over T rows, which also back-propagates every row through every
            head (``T²`` head backwards; see the benchmarks). No aux or extra loss here.
        method: ``'loss'``, ``'gradient'``, ``'hybrid'`` or a :class:`Transform`.
        scale_rule: log-scale update rule (default :func:`imtl_func.scale_newton`).
        flip_negative: see :func:`imtl_func.transform`.
        encoder_has_aux: ``encode`` returns ``(features, aux)`` (e.g. updated BatchNorm buffers).
        has_aux: ``decode`` returns ``(losses, aux)``. Either aux comes back in
            ``StepResult.aux = (encoder_aux, decoder_aux)``.
        chunk_size: rows of the batched head backward per vmap call (``1``: a plain loop).
        reduce: data parallelism (like JAX's ``axis_name``): ``reduce(x)`` returns the sum of a
            1-D tensor over the replicas, e.g. :func:`imtl_func.distributed.all_sum`. Each
            replica passes its slice of the global batch (every feature tensor split along the
            batch); one reduction of the ``[T, T]`` Gramian, the losses and a non-finite flag
            gives every replica the global α and state, a second one averages the gradients.
            The result is that of one process on the global batch.

    Returns:
        ``step(shared_params, task_params, state, *batch) -> StepResult``. With
        ``g_t = ∇_z ℓ_t`` (``e^{s_t}∇_z ℓ_t`` for 'hybrid') and ``α`` from their Gramian, the
        shared parameters get ``vjp_encode(Σ_t α_t g_t)``, the task parameters
        ``Σ_t w_t ∇ℓ_t`` (see :class:`Grads`). For 'loss' this is just the gradient of
        ``Σ_t e^{s_t} ℓ_t``, computed with a single backward pass.
    """
    tx = _as_transform(method, scale_rule, flip_negative)
    _checks.chunk_size(chunk_size)
    where_ = "decode"
    heads = _checks.per_task_decoders(decode, has_aux)

    def step(shared_params: PyTree, task_params: PyTree, state: IMTLState, *batch: Any
             ) -> StepResult:
        _checks.params(shared_params, "shared_params")
        _checks.params(task_params, "task_params")

        def enc(p: PyTree) -> Any:
            return encode(p, *batch)

        def dec(tp: PyTree, z: PyTree) -> Any:
            return decode(tp, z, *batch)

        if encoder_has_aux:
            features, enc_pullback, enc_aux = vjp(enc, _detached(shared_params), has_aux=True)
        else:
            (features, enc_pullback), enc_aux = vjp(enc, _detached(shared_params)), None
        _checks.params(features, "the features returned by encode")
        if heads is not None:
            g_shared, g_task, losses, vector, new_state, info, replicas = _per_task_heads(
                tx, heads, features, enc_pullback, task_params, state, batch, reduce)
            aux = (enc_aux, None) if encoder_has_aux else None
            return _finish(losses, vector, g_shared, g_task, state, new_state, info, aux,
                           replicas)
        vector, dec_pullback, num_tasks, dec_aux = _vjp(
            dec, has_aux, where_, _detached(task_params), features)
        _task_losses(vector, num_tasks, state, where_)

        k = None
        if tx.needs_gramian:
            task_rows, feature_rows = pullback_rows(dec_pullback, _rows(vector), chunk_size)
            k = gramian(tree_map(lambda j: j[:num_tasks], feature_rows))
        vector, k, replicas = _dist.sum_statistics(reduce, vector, k)
        losses = vector[:num_tasks]
        weights, new_state, info = tx.update(losses, k, state)
        if tx.needs_gramian:
            g_task = contract(_with_extra(weights.task, vector.shape[0]), task_rows)
            cotangent = contract(_with_extra(weights.shared, vector.shape[0]), feature_rows)
        else:
            g_task, cotangent = dec_pullback(
                _with_extra(weights.task, vector.shape[0]).to(vector.dtype))
        (g_shared,) = enc_pullback(cotangent)
        g_shared, g_task = _dist.mean_over_replicas(reduce, replicas, (g_shared, g_task))
        aux = None if not (encoder_has_aux or has_aux) else (enc_aux, dec_aux)
        return _finish(losses, vector, g_shared, g_task, state, new_state, info, aux, replicas)

    return step


def _per_task_heads(
    tx: Transform,
    heads: Sequence[Callable[..., Tensor]],
    features: PyTree,
    enc_pullback: Callable[..., Any],
    task_params: PyTree,
    state: IMTLState,
    batch: tuple[Any, ...],
    reduce: _dist.Reduce | None,
) -> tuple[PyTree, PyTree, Tensor, Tensor, IMTLState, Info, _dist.Replicas | None]:
    """The feature-level step for per-task decoders: one plain backward through the heads.

    Task t reads its own reference ``z_t`` to the features, so the cotangent ``c = Weights.task``
    (known before the update) gives ``∂/∂z_t = c_t ∇_z ℓ_t`` for every t at once and the task
    parameters their final gradient ``Σ_t c_t ∇ℓ_t``.
    """
    num_tasks = len(heads)

    def dec_all(tp: PyTree, copies: tuple[PyTree, ...]) -> Tensor:
        return torch.stack([
            _checks.scalar_loss(head(tp, z, *batch), t)
            for t, (head, z) in enumerate(zip(heads, copies, strict=True))
        ])

    vector, pullback = vjp(dec_all, _detached(task_params), (features,) * num_tasks)
    losses = _task_losses(vector, num_tasks, state, "decode")
    c = tx.task_weights(state).to(vector.dtype)
    g_task, copies = pullback(c)
    rows = tree_map(lambda *r: torch.stack(r), *copies)  # leaves [T, ...]: c_t ∇_z ℓ_t
    k = gramian(rows) / (c[:, None] * c[None, :]) if tx.needs_gramian else None
    vector, k, replicas = _dist.sum_statistics(reduce, vector, k)
    losses = vector[:num_tasks]
    weights, new_state, info = tx.update(losses, k, state)
    (g_shared,) = enc_pullback(contract(weights.shared / c.to(weights.shared.dtype), rows))
    g_shared, g_task = _dist.mean_over_replicas(reduce, replicas, (g_shared, g_task))
    return g_shared, g_task, losses, vector, new_state, info, replicas


def value_and_grad(
    loss_fn: Callable[..., Any],
    method: Method = "hybrid",
    *,
    scale_rule: ScaleRule | None = None,
    flip_negative: bool = False,
    has_aux: bool = False,
    chunk_size: int | None = None,
    reduce: _dist.Reduce | None = None,
) -> Callable[..., StepResult]:
    """Parameter-level IMTL step: task gradients w.r.t. the shared parameters themselves.

    Args:
        loss_fn: ``loss_fn(shared_params, task_params, *batch) -> losses`` with ``losses`` a
            ``[T]`` tensor or :class:`Losses` (or ``(losses, aux)`` with ``has_aux``). Which
            leaves are shared is said by which argument holds them.
        method: ``'loss'``, ``'gradient'``, ``'hybrid'`` or a :class:`Transform`.
        scale_rule: log-scale update rule (default :func:`imtl_func.scale_newton`).
        flip_negative: see :func:`imtl_func.transform`.
        has_aux: ``loss_fn`` returns ``(losses, aux)``; ``aux`` comes back as ``StepResult.aux``.
        chunk_size: Jacobian rows per vmap call; bounds the memory of the ``T × |θ|`` Jacobian
            pass (``1``: a plain loop).
        reduce: as in :func:`mtl_value_and_grad`. A row of the global Jacobian is a sum over
            replicas, so the whole ``T × |θ|`` shared Jacobian is reduced (with the losses and
            the flag), then the task-specific gradients: T times the traffic of plain data
            parallelism ('loss' needs no Jacobian and reduces only the gradients).

    Returns:
        ``step(shared_params, task_params, state, *batch) -> StepResult``; the shared parameters
        get ``Σ_t w_t ∇_θ ℓ_t`` with the weights from the Gramian of the per-task parameter
        gradients (summed over every shared leaf), the task parameters as in the feature-level
        step. Exact, but one batched backward computes T gradients of the whole model.
    """
    tx = _as_transform(method, scale_rule, flip_negative)
    _checks.chunk_size(chunk_size)
    where_ = "loss_fn"

    def step(shared_params: PyTree, task_params: PyTree, state: IMTLState, *batch: Any
             ) -> StepResult:
        _checks.params(shared_params, "shared_params")
        _checks.params(task_params, "task_params")

        def fn(sp: PyTree, tp: PyTree) -> Any:
            return loss_fn(sp, tp, *batch)

        vector, pullback, num_tasks, aux = _vjp(
            fn, has_aux, where_, _detached(shared_params), _detached(task_params))
        _task_losses(vector, num_tasks, state, where_)

        if tx.needs_gramian:
            shared_rows, task_rows = pullback_rows(pullback, _rows(vector), chunk_size)
            vector, shared_rows, replicas = _dist.sum_rows(reduce, vector, shared_rows)
            k = gramian(tree_map(lambda j: j[:num_tasks], shared_rows))
            weights, new_state, info = tx.update(vector[:num_tasks], k, state)
            g_shared = contract(_with_extra(weights.shared, vector.shape[0]), shared_rows)
            g_task = contract(_with_extra(weights.task, vector.shape[0]), task_rows)
            g_task = _dist.mean_over_replicas(reduce, replicas, g_task)
        else:
            vector, _, replicas = _dist.sum_statistics(reduce, vector, None)
            weights, new_state, info = tx.update(vector[:num_tasks], None, state)
            g_shared, g_task = pullback(
                _with_extra(weights.task, vector.shape[0]).to(vector.dtype))
            g_shared, g_task = _dist.mean_over_replicas(reduce, replicas, (g_shared, g_task))
        return _finish(vector[:num_tasks], vector, g_shared, g_task, state, new_state, info, aux,
                       replicas)

    return step
