"""One-call IMTL steps: losses in, combined gradients and the new state out.

Two levels, one pipeline (:mod:`imtl_func._pipeline`):

* feature level (:func:`mtl_value_and_grad`, the paper's practice): task gradients with respect
  to the shared feature ``z = encode(θ, batch)``; one backward through the heads for all T tasks
  and one through the encoder with the cotangent ``Σ_t w_t ∇_z ℓ_t``.
* parameter level (:func:`value_and_grad`): task gradients with respect to the shared
  parameters themselves, a ``T × |θ|`` Jacobian from one batched backward.

Both are pure functions of their inputs, traceable by ``torch.compile(fullgraph=True)``. An eager
call differentiates with plain ``torch.autograd`` on fresh leaves that alias the inputs (same
numbers, without torch.func's per-operation cost); a traced call, or one inside another
torch.func transform, uses ``torch.func.vjp`` (see :func:`_plain_autograd`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge
from torch.func import vjp

from imtl_func import _checks, _reduce
from imtl_func._jacobian import pullback_rows
from imtl_func._pipeline import (
    Grads,
    Losses,
    StepResult,
    combine,
    finish,
    rows_gramian,
    weigh,
    with_extra,
)
from imtl_func._presets import resolve
from imtl_func._scales import ScaleRule
from imtl_func._transform import IMTLState, Proposal, Transform
from imtl_func._tree import PyTree, leaves, tree_map, unflatten

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


def _loss_vector(out: Any, where: str) -> tuple[Tensor, int]:
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


def _loss_parts(out: Any, has_aux: bool, where: str
                ) -> tuple[Tensor, Tensor | None, Any]:
    """A loss function's output, checked: ``(per_task [T], extra scalar or None, aux)``."""
    aux = None
    if has_aux:
        if not isinstance(out, tuple) or isinstance(out, Losses) or len(out) != 2:
            raise ValueError(f"{where} was declared has_aux=True, so it must return "
                             "(losses, aux)")
        out, aux = out
    if isinstance(out, Losses):
        _checks.losses(out.per_task, None, where)
        if out.extra is not None:
            _checks.extra_loss(out.extra, where)
        return out.per_task, out.extra, aux
    return _checks.losses(out, None, where), None, aux


def _loss_output(out: Any, has_aux: bool, where: str) -> tuple[Tensor, int, Any]:
    """A loss function's output, checked: ``(vector [T] or [T + 1], T, aux or None)``."""
    aux = None
    if has_aux:
        if not isinstance(out, tuple) or isinstance(out, Losses) or len(out) != 2:
            raise ValueError(f"{where} was declared has_aux=True, so it must return "
                             "(losses, aux)")
        out, aux = out
    vector, num_tasks = _loss_vector(out, where)
    _checks.differentiable(vector, where)
    return vector, num_tasks, aux


def _vjp(fn: Callable[..., Any], has_aux: bool, where: str, *primals: PyTree
         ) -> tuple[Tensor, Callable[..., Any], int, Any]:
    """``torch.func.vjp`` of a loss function: ``(vector, pullback, T, aux)``.

    T is a Python int read while ``fn`` runs (shapes are static, also under ``torch.compile``).
    """
    meta: dict[str, int] = {}

    def wrapped(*args: PyTree) -> Any:
        vector, meta["num_tasks"], aux = _loss_output(fn(*args), has_aux, where)
        return (vector, aux) if has_aux else vector

    if has_aux:
        vector, pullback, aux = vjp(wrapped, *primals, has_aux=True)
    else:
        (vector, pullback), aux = vjp(wrapped, *primals), None
    return vector, pullback, meta["num_tasks"], aux


def _detached(tree: PyTree) -> PyTree:
    return tree_map(torch.Tensor.detach, tree)


def _eye(vector: Tensor) -> Tensor:
    return torch.eye(vector.shape[0], dtype=vector.dtype, device=vector.device)


def _plain_autograd(*trees: PyTree) -> bool:
    """Differentiate with plain ``torch.autograd`` (True) or with ``torch.func.vjp`` (False).

    Both give the same numbers. In eager mode torch.func wraps every tensor of the forward and
    dispatches every operation through its transform (a fixed few milliseconds a step), so an
    eager call builds an ordinary autograd graph on fresh leaves that alias the inputs (no
    copy, the inputs untouched). torch.func is kept while ``torch.compile`` traces (it traces
    to one graph), inside another torch.func transform (it nests), and where autograd cannot
    record: inference mode, or an inference tensor among ``trees`` (parameters, batch).
    """
    if (torch.compiler.is_compiling() or torch.is_inference_mode_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None):
        return False
    return not any(isinstance(x, Tensor) and x.is_inference() for t in trees for x in leaves(t))


def _track(tree: PyTree) -> tuple[PyTree, list[Tensor]]:
    """Fresh autograd leaves aliasing the tensors of ``tree``: ``(tree, its leaves)``."""
    tracked = [x.detach().requires_grad_() for x in leaves(tree)]
    return unflatten(tree, tracked), tracked


def _grad(outputs: Sequence[Tensor], cotangents: Sequence[Tensor], inputs: Sequence[Tensor],
          *, retain: bool = False) -> list[Tensor]:
    """``Σ_k ⟨cotangents[k], ∂outputs[k]/∂x⟩`` for every x of ``inputs``, by one backward.

    Zeros for an input that no output depends on (as ``torch.func.vjp`` returns).
    """
    pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(x) for x in inputs]
    outs, cots = zip(*pairs, strict=True)
    return list(torch.autograd.grad(outs, inputs, cots, retain_graph=retain, allow_unused=True,
                                    materialize_grads=True))


def _detached_aux(aux: Any) -> Any:
    """Tensors of an aux output without the step's graph (as ``torch.func.vjp`` returns aux)."""
    return optree.tree_map(lambda a: a.detach() if isinstance(a, Tensor) else a, aux,
                           none_is_leaf=True)


def _encoder_output(out: Any, encoder_has_aux: bool) -> tuple[PyTree, Any]:
    """``(features, aux)`` of what ``encode`` returned, checked."""
    aux = None
    if encoder_has_aux:
        if not isinstance(out, tuple) or len(out) != 2:
            raise ValueError("encode was declared encoder_has_aux=True, so it must return "
                             "(features, aux)")
        out, aux = out
    _checks.params(out, "the features returned by encode")
    return out, aux


class _Encoded(NamedTuple):
    """The shared encoder run for a step.

    Attributes:
        features: ``z = encode(θ, *batch)``, without a graph.
        pullback: ``pullback(cotangent like z) -> gradient like θ``.
        aux: the encoder's aux (None without ``encoder_has_aux``).
    """

    features: PyTree
    pullback: Callable[[PyTree], PyTree]
    aux: Any


def _encode(encode: Callable[..., Any], encoder_has_aux: bool, shared_params: PyTree,
            batch: tuple[Any, ...], plain: bool) -> _Encoded:
    """Run the encoder once, keeping what its backward needs (see :func:`_plain_autograd`)."""
    if not plain:
        def enc(p: PyTree) -> tuple[PyTree, tuple[Any, ...]]:
            features, aux = _encoder_output(encode(p, *batch), encoder_has_aux)
            return features, (aux,) if encoder_has_aux else ()

        features, pullback, aux = vjp(enc, _detached(shared_params), has_aux=True)
        return _Encoded(features, lambda cot: pullback(cot)[0], aux[0] if aux else None)
    params, inputs = _track(shared_params)
    with torch.enable_grad():
        features, aux = _encoder_output(encode(params, *batch), encoder_has_aux)
    outputs = leaves(features)

    def pullback(cotangent: PyTree) -> PyTree:
        return unflatten(shared_params, _grad(outputs, leaves(cotangent), inputs))

    return _Encoded(_detached(features), pullback, _detached_aux(aux))


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
            ``[T]`` tensor or :class:`Losses` (or ``(losses, aux)`` with ``has_aux``); it needs a
            batched backward over T rows, which back-propagates every row through every head
            (``T²`` head backwards).
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

    def step(shared_params: PyTree, task_params: PyTree, state: IMTLState, *batch: Any
             ) -> StepResult:
        _checks.params(shared_params, "shared_params")
        _checks.params(task_params, "task_params")
        plain = _plain_autograd(shared_params, task_params, batch)
        if tx.weighting.uniform and not tx.needs_gramian:
            def losses(sp: PyTree, tp: PyTree) -> tuple[Tensor, int, tuple[Any, ...]]:
                features, enc_aux = _encoder_output(encode(sp, *batch), encoder_has_aux)
                if heads is not None:
                    vector = _head_losses(heads, tp, (features,) * len(heads), batch, state)
                    num, dec_aux = len(heads), None
                else:
                    vector, num, dec_aux = _loss_output(decode(tp, features, *batch), has_aux,
                                                        "decode")
                return vector, num, (enc_aux, dec_aux)[0 if encoder_has_aux else 1:
                                                       2 if has_aux else 1]

            def pack(parts: tuple[Any, ...]) -> Any:
                if not (encoder_has_aux or has_aux):
                    return None
                return (parts[0] if encoder_has_aux else None, parts[-1] if has_aux else None)

            return _uniform(tx, losses, pack, shared_params, task_params, state, batch, reduce,
                            plain, prescaled=heads is not None)
        enc = _encode(encode, encoder_has_aux, shared_params, batch, plain)
        if heads is not None:
            return _per_task(tx, heads, enc, encoder_has_aux, task_params, state, batch, reduce,
                             plain)

        if plain and tx.needs_gramian:
            vector, num_tasks, rows, extra, g_task, dec_aux = _decoded_rows(
                tx, decode, has_aux, enc.features, task_params, state, batch, chunk_size)
            proposal, count = weigh(tx, state, vector, num_tasks,
                                    rows_gramian(rows, num_tasks), reduce, prescaled=True)
            cotangent = combine(proposal.weights.shared, rows, num_tasks)
            del rows
            if extra is not None:
                cotangent = tree_map(torch.add, cotangent, extra)
            grads = Grads(*_reduce.mean(reduce, count, (enc.pullback(cotangent), g_task)))
            aux = None if not (encoder_has_aux or has_aux) else (enc.aux, dec_aux)
            return finish(proposal, state, grads, aux, num_tasks,
                          owned=_owned(grads, task_params, enc.features, batch))

        def dec(tp: PyTree, z: PyTree) -> Any:
            return decode(tp, z, *batch)

        vector, dec_pullback, num_tasks, dec_aux = _vjp(
            dec, has_aux, "decode", _detached(task_params), enc.features)
        k = None
        if tx.needs_gramian:
            task_rows, feature_rows = pullback_rows(dec_pullback, _eye(vector), chunk_size)
            k = rows_gramian(feature_rows, num_tasks)
        proposal, count = weigh(tx, state, vector, num_tasks, k, reduce)
        weights, size = proposal.weights, vector.shape[0]
        if tx.needs_gramian:
            g_task = combine(weights.task, task_rows, size)
            cotangent = combine(weights.shared, feature_rows, size)
        else:
            g_task, _ = dec_pullback(_cot(weights.task, vector))
            _, cotangent = dec_pullback(_cot(weights.shared, vector))
        grads = Grads(*_reduce.mean(reduce, count, (enc.pullback(cotangent), g_task)))
        aux = None if not (encoder_has_aux or has_aux) else (enc.aux, dec_aux)
        return finish(proposal, state, grads, aux, num_tasks)

    return Step(step, tx, "mtl_value_and_grad", FeatureSpec(
        encode, decode, heads, encoder_has_aux, has_aux, chunk_size, reduce))


def _cot(weights: Tensor, vector: Tensor) -> Tensor:
    """Weights as the cotangent of ``vector`` (weight 1 on an extra loss)."""
    return with_extra(weights, vector.shape[0], vector.dtype)


def _decoded_rows(
    tx: Transform,
    decode: Callable[..., Any],
    has_aux: bool,
    features: PyTree,
    task_params: PyTree,
    state: IMTLState,
    batch: tuple[Any, ...],
    chunk_size: int | None,
) -> tuple[Tensor, int, PyTree, PyTree | None, PyTree, Any]:
    """A general ``decode``'s task rows at the features by plain autograd (eager).

    The rows carry the scales ``c = e^{s}`` (as in the per-task path): row t is
    ``c_t ∇_z ℓ_t``. When ``decode`` stacks T scalars (``torch.stack([ℓ_1, ..., ℓ_T])``), row
    t is one backward from ``ℓ_t`` alone, through its own head only (T head backwards in all,
    as for per-task decoders, instead of T²); otherwise one batched backward of the whole
    ``[T]`` vector per row (``chunk_size`` rows at a time, ``1``: a loop).

    Returns:
        ``(vector [T] or [T + 1] detached, T, rows like features with leaves [T, ...], the
        extra loss's gradient at the features or None, task gradient Σ_t c_t ∇ℓ_t (+ the extra
        loss's), decoder aux)``.
    """
    tp, tp_in = _track(task_params)
    z, z_in = _track(features)
    with torch.enable_grad():
        per_task, extra, aux = _loss_parts(decode(tp, z, *batch), has_aux, "decode")
    _checks.differentiable(per_task if extra is None else torch.cat(
        [per_task, extra.reshape(1).to(per_task.dtype)]), "decode")
    num_tasks = _checks.losses(per_task, state.log_scale.shape[0], "IMTL update").shape[0]
    c = tx.loss_scales(state, per_task.dtype).to(per_task.dtype)
    inputs, n = [*z_in, *tp_in], len(z_in)
    last = extra is None or not extra.requires_grad
    edges = _task_edges(per_task)
    if edges is not None:
        rows: list[list[Tensor]] = [[] for _ in z_in]
        g_task: list[Tensor | None] = [None] * len(tp_in)
        for t, edge in enumerate(edges):
            if edge is None:  # a constant loss: a zero row
                g = [None] * len(inputs)
            else:
                g = list(torch.autograd.grad(edge, inputs, c[t], allow_unused=True,
                                             retain_graph=not (last and t == num_tasks - 1)))
            for i in range(n):
                rows[i].append(torch.zeros_like(inputs[i]) if g[i] is None else g[i])
            g_task = [a if b is None else b if a is None else a + b
                      for a, b in zip(g_task, g[n:], strict=True)]
            del g
        stacked = [torch.stack(r) for r in rows]
        del rows
        task = [torch.zeros_like(x) if a is None else a for a, x in zip(g_task, tp_in,
                                                                        strict=True)]
    else:
        cot = torch.diag(c)
        parts = [cot[i:i + (chunk_size or num_tasks)]
                 for i in range(0, num_tasks, chunk_size or num_tasks)]
        if chunk_size == 1:
            got = [_grad([per_task], [p[0]], inputs, retain=True) for p in parts]
            got = [[torch.stack(x) for x in zip(*got, strict=True)]]
        else:
            got = [list(torch.autograd.grad(per_task, inputs, p, retain_graph=True,
                                            is_grads_batched=True, allow_unused=True,
                                            materialize_grads=True)) for p in parts]
        stacked = [torch.cat(x) if len(x) > 1 else x[0] for x in zip(*got, strict=True)]
        del got
        task = [r.sum(0) for r in stacked[n:]]
        stacked = stacked[:n]
    extra_z = None
    vector = per_task.detach()
    if extra is not None:
        g = _grad([extra], [torch.ones_like(extra)], inputs)
        extra_z = unflatten(features, g[:n])
        task = [a + b for a, b in zip(task, g[n:], strict=True)]
        vector = torch.cat([vector, extra.detach().reshape(1).to(vector.dtype)])
    return (vector, num_tasks, unflatten(features, stacked), extra_z,
            unflatten(task_params, task), _detached_aux(aux))


def _task_edges(per_task: Tensor) -> list[Any] | None:
    """The autograd edges to the T scalars that ``torch.stack`` made ``per_task`` of (None
    for a constant one), or None when ``per_task`` was not made so."""
    node = per_task.grad_fn
    if node is None or node.name() != "StackBackward0":
        return None
    nexts = node.next_functions
    if len(nexts) != per_task.shape[0] or any(
            fn is not None and fn.name().endswith("AccumulateGrad") for fn, _ in nexts):
        return None
    return [None if fn is None else GradientEdge(fn, nr) for fn, nr in nexts]


def _head_losses(heads: Sequence[Callable[..., Tensor]], task_params: PyTree,
                 copies: Sequence[PyTree], batch: tuple[Any, ...], state: IMTLState) -> Tensor:
    """``[ℓ_1(task_params, z_1), ..., ℓ_T(task_params, z_T)]``, each checked."""
    vector = torch.stack([_checks.scalar_loss(head(task_params, z, *batch), t)
                          for t, (head, z) in enumerate(zip(heads, copies, strict=True))])
    return _checks.losses(vector, state.log_scale.shape[0], "decode")


def _uniform(
    tx: Transform,
    losses: Callable[[PyTree, PyTree], tuple[Tensor, int, tuple[Any, ...]]],
    pack: Callable[[tuple[Any, ...]], Any],
    shared_params: PyTree,
    task_params: PyTree,
    state: IMTLState,
    batch: tuple[Any, ...],
    reduce: _reduce.Reduce | None,
    plain: bool,
    *,
    prescaled: bool,
) -> StepResult:
    """A step of a uniform weighting without a Gramian ('loss', 'equal'): the gradient of
    ``Σ_t w_t ℓ_t`` (``w = e^{s}``, weight 1 on an extra loss), one backward through the whole
    model as in a plain training step.

    ``losses(shared, task) -> (vector [T] or [T + 1], T, parts)``, ``parts`` the declared aux
    outputs (a tuple of pytrees of tensors, as torch.func returns them), ``pack(parts)`` the
    step's aux. The weights are known once the losses are (they read only losses and state).
    """
    if plain:
        sp, sp_in = _track(shared_params)
        tp, tp_in = _track(task_params)
        with torch.enable_grad():
            vector, num_tasks, aux = losses(sp, tp)
        proposal, count = weigh(tx, state, vector.detach(), num_tasks, None, reduce,
                                prescaled=prescaled)
        # A copy: the weights are also info.scale, and a gradient may alias its cotangent.
        cot = _cot(proposal.weights.task, vector).clone()
        g = _grad([vector], [cot], [*sp_in, *tp_in])
        g_shared = unflatten(shared_params, g[:len(sp_in)])
        g_task = unflatten(task_params, g[len(sp_in):])
        aux = _detached_aux(aux)
    else:
        meta: dict[str, int] = {}

        def wrapped(sp: PyTree, tp: PyTree) -> tuple[Tensor, Any]:
            vector, meta["num_tasks"], aux = losses(sp, tp)
            return vector, aux

        vector, pullback, aux = vjp(wrapped, _detached(shared_params), _detached(task_params),
                                    has_aux=True)
        num_tasks = meta["num_tasks"]
        proposal, count = weigh(tx, state, vector, num_tasks, None, reduce, prescaled=prescaled)
        g_shared, g_task = pullback(_cot(proposal.weights.task, vector))
    grads = Grads(*_reduce.mean(reduce, count, (g_shared, g_task)))
    return finish(proposal, state, grads, pack(aux), num_tasks,
                  owned=plain and _owned(grads, shared_params, task_params, batch))


def _per_task(
    tx: Transform,
    heads: Sequence[Callable[..., Tensor]],
    enc: _Encoded,
    encoder_has_aux: bool,
    task_params: PyTree,
    state: IMTLState,
    batch: tuple[Any, ...],
    reduce: _reduce.Reduce | None,
    plain: bool,
) -> StepResult:
    """The feature-level step for per-task decoders: one plain backward through the heads.

    Task t reads its own reference ``z_t`` to the features, so the cotangent ``c = e^{s}``
    (known before the update) gives ``∂/∂z_t = c_t ∇_z ℓ_t`` for every t at once and the task
    parameters their final gradient ``Σ_t c_t ∇ℓ_t``. The rows already carry the scales, so
    nothing is divided by them.
    """
    num_tasks = len(heads)
    vector, g_task, copies = _head_rows(tx, heads, enc.features, task_params, state, batch, plain)
    proposal, count, cotangent = _weigh_rows(tx, state, vector, copies, reduce)
    del copies  # the T feature-sized rows go before the encoder's backward allocates its own
    grads = Grads(*_reduce.mean(reduce, count, (enc.pullback(cotangent), g_task)))
    aux = (enc.aux, None) if encoder_has_aux else None
    return finish(proposal, state, grads, aux, num_tasks,
                  owned=plain and _owned(grads, task_params, enc.features, batch))


def _head_rows(tx: Transform, heads: Sequence[Callable[..., Tensor]], features: PyTree,
               task_params: PyTree, state: IMTLState, batch: tuple[Any, ...], plain: bool
               ) -> tuple[Tensor, PyTree, list[PyTree]]:
    """The heads' forward and one backward with the cotangent ``c = e^{s}``: ``(losses [T],
    task gradient Σ_t c_t ∇ℓ_t, [c_t ∇_z ℓ_t for every t])``."""
    num_tasks = len(heads)
    if plain:
        tp, tp_in = _track(task_params)
        tracked = [_track(features) for _ in heads]
        with torch.enable_grad():
            vector = _head_losses(heads, tp, [z for z, _ in tracked], batch, state)
        c = tx.loss_scales(state, vector.dtype).to(vector.dtype)
        g = _grad([vector], [c], [*tp_in, *(x for _, xs in tracked for x in xs)])
        n, m = len(tp_in), len(tracked[0][1])
        return vector.detach(), unflatten(task_params, g[:n]), [
            unflatten(features, g[n + t * m:n + (t + 1) * m]) for t in range(num_tasks)]

    def dec_all(tp: PyTree, zs: tuple[PyTree, ...]) -> Tensor:
        return _head_losses(heads, tp, zs, batch, state)

    vector, pullback = vjp(dec_all, _detached(task_params), (features,) * num_tasks)
    g_task, copies = pullback(tx.loss_scales(state, vector.dtype).to(vector.dtype))
    return vector, g_task, list(copies)


def _weigh_rows(tx: Transform, state: IMTLState, vector: Tensor, copies: list[PyTree],
                reduce: _reduce.Reduce | None) -> tuple[Proposal, Tensor | None, PyTree]:
    """Weigh the rows ``c_t ∇_z ℓ_t``: ``(proposal, replica count, cotangent Σ_t α_t rows_t)``."""
    num_tasks = len(copies)
    if not tx.needs_gramian:  # a weighting on the losses alone that is not uniform
        proposal, count = weigh(tx, state, vector, num_tasks, None, reduce, prescaled=True)
        w = proposal.weights.shared.to(vector.dtype)  # on the scaled rows
        return proposal, count, tree_map(
            lambda *r: sum(wt * x for wt, x in zip(w, r, strict=True)), *copies)
    rows = tree_map(lambda *r: torch.stack(r), *copies)  # leaves [T, ...]: c_t ∇_z ℓ_t
    proposal, count = weigh(tx, state, vector, num_tasks, rows_gramian(rows, num_tasks),
                            reduce, prescaled=True)
    return proposal, count, combine(proposal.weights.shared, rows, num_tasks)


def _owned(grads: PyTree, *inputs: PyTree) -> bool:
    """Whether no gradient shares memory with the step's inputs: then the gate may zero them in
    place (they are fresh tensors of this step's backward)."""
    held = {x.untyped_storage().data_ptr() for t in inputs for x in leaves(t)
            if isinstance(x, Tensor)}
    return not any(g.untyped_storage().data_ptr() in held for g in leaves(grads))


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
        if tx.weighting.uniform and not tx.needs_gramian:
            def losses(sp: PyTree, tp: PyTree) -> tuple[Tensor, int, tuple[Any, ...]]:
                vector, num, aux = _loss_output(loss_fn(sp, tp, *batch), has_aux, "loss_fn")
                return vector, num, (aux,) if has_aux else ()

            plain = _plain_autograd(shared_params, task_params, batch)
            return _uniform(tx, losses, lambda parts: parts[0] if has_aux else None,
                            shared_params, task_params, state, batch, reduce, plain,
                            prescaled=False)

        def fn(sp: PyTree, tp: PyTree) -> Any:
            return loss_fn(sp, tp, *batch)

        vector, pullback, num_tasks, aux = _vjp(
            fn, has_aux, "loss_fn", _detached(shared_params), _detached(task_params))
        size = vector.shape[0]
        if tx.needs_gramian:
            shared_rows, task_rows = pullback_rows(pullback, _eye(vector), chunk_size)
            vector, shared_rows, count = _reduce.rows(reduce, vector, shared_rows)
            proposal, _ = weigh(tx, state, vector, num_tasks,
                                rows_gramian(shared_rows, num_tasks), None)
            g_shared = combine(proposal.weights.shared, shared_rows, size)
            g_task = _reduce.mean(reduce, count,
                                  combine(proposal.weights.task, task_rows, size))
        else:
            proposal, count = weigh(tx, state, vector, num_tasks, None, reduce)
            _, g_task = pullback(_cot(proposal.weights.task, vector))
            g_shared, _ = pullback(_cot(proposal.weights.shared, vector))
            g_shared, g_task = _reduce.mean(reduce, count, (g_shared, g_task))
        return finish(proposal, state, Grads(g_shared, g_task), aux, num_tasks)

    return Step(step, tx, "value_and_grad")
