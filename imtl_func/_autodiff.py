"""How a step differentiates: one ``vjp`` with two backends that give the same numbers.

* ``torch.func.vjp`` while ``torch.compile`` traces (it traces to one graph), inside another
  torch.func transform (it nests), and where autograd cannot record (inference mode or
  inference tensors).
* plain ``torch.autograd`` on fresh leaves that alias the inputs (no copy; the inputs are not
  touched) for every other call. In eager mode torch.func wraps every tensor of the forward and
  dispatches every operation through its transform: a fixed few milliseconds a step that plain
  autograd does not pay.

Both return a :class:`VJP`: the (detached) output, a pull-back that may be called more than once,
and ``rows``, the pull-back of every row of a stack of cotangents in one batched backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import optree
import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge
from torch.func import vjp as func_vjp
from torch.func import vmap

from imtl_func._tree import PyTree, leaves, traced, tree_map, unflatten

__all__ = ["VJP", "detached", "use_autograd", "vjp"]


class VJP(NamedTuple):
    """A function's output and its pull-backs.

    Attributes:
        out: ``fn(*primals)`` without a graph.
        pullback: ``pullback(cotangent like out, last=False) -> (cotangent like primal,
            ...)``, one per primal; zeros for a primal the output does not depend on.
            ``last=True``: no later call, so plain autograd frees the graph's buffers at once.
        rows: ``rows(chunk_size)``, for an ``out`` of shape ``[N]``: the pull-back of every
            row of the ``N × N`` identity (the gradients of each element of ``out`` on its
            own), every leaf with a leading axis N. A batched backward (``chunk_size`` rows at a
            time, ``1``: a loop), or with plain autograd, when ``out`` was made by
            ``torch.stack`` of N scalars, one backward from each scalar through its own
            subgraph (N small backwards instead of N batched ones through everything).
        aux: the function's aux output (None without ``has_aux``), without a graph.
    """

    out: Any
    pullback: Callable[..., tuple[Any, ...]]
    rows: Callable[[int | None], tuple[Any, ...]]
    aux: Any


def use_autograd(*trees: PyTree) -> bool:
    """Whether a call on ``trees`` (parameters, batch) differentiates with plain autograd."""
    if traced() or torch.is_inference_mode_enabled():
        return False
    return not any(isinstance(x, Tensor) and x.is_inference()
                   for t in trees for x in optree.tree_leaves(t))


def detached(tree: PyTree) -> PyTree:
    """Every tensor of ``tree`` without its graph; other leaves as they are."""
    return optree.tree_map(lambda a: a.detach() if isinstance(a, Tensor) else a, tree,
                           none_is_leaf=True)


def vjp(fn: Callable[..., Any], *primals: PyTree, has_aux: bool = False,
        autograd: bool = False) -> VJP:
    """``fn(*primals)`` and its pull-backs, by plain autograd (``autograd=True``, see
    :func:`use_autograd`) or by ``torch.func.vjp``. ``fn`` returns a pytree of tensors, or
    ``(out, aux)`` with ``has_aux``."""
    if autograd:
        return _autograd_vjp(fn, primals, has_aux)
    primals = tuple(tree_map(Tensor.detach, p) for p in primals)
    if has_aux:
        # torch.func returns only tensors as aux: the other leaves (None, numbers) go around it.
        held: dict[str, Any] = {}

        def tensors_aux(*args: PyTree) -> tuple[Any, list[Tensor]]:
            out, aux = fn(*args)
            held["leaves"], held["spec"] = optree.tree_flatten(aux, none_is_leaf=True)
            return out, [x for x in held["leaves"] if isinstance(x, Tensor)]

        out, pullback, tensors = cast("tuple[Any, Any, list[Tensor]]",
                                      func_vjp(tensors_aux, *primals, has_aux=True))
        it = iter(tensors)
        aux = held["spec"].unflatten(
            [next(it) if isinstance(x, Tensor) else x for x in held["leaves"]])
    else:
        (out, pullback), aux = cast("tuple[Any, Any]", func_vjp(fn, *primals)), None

    def pull(cotangent: Any, last: bool = False) -> tuple[Any, ...]:
        return cast("tuple[Any, ...]", pullback(cotangent))

    def rows(chunk_size: int | None) -> tuple[Any, ...]:
        cotangents = _eye(out)
        if chunk_size == 1:
            return _stacked([pullback(c) for c in cotangents.unbind(0)])
        return cast("tuple[Any, ...]", vmap(pullback, chunk_size=chunk_size)(cotangents))

    return VJP(out, pull, rows, aux)


def _autograd_vjp(fn: Callable[..., Any], primals: tuple[PyTree, ...], has_aux: bool) -> VJP:
    tracked = [[x.detach().requires_grad_() for x in leaves(p)] for p in primals]
    with torch.enable_grad():
        out = fn(*(unflatten(p, t) for p, t in zip(primals, tracked, strict=True)))
    aux = None
    if has_aux:
        out, aux = out
    outputs, inputs = leaves(out), [x for t in tracked for x in t]

    def split(grads: Sequence[Tensor]) -> tuple[Any, ...]:
        parts, start = [], 0
        for p, t in zip(primals, tracked, strict=True):
            parts.append(unflatten(p, list(grads[start:start + len(t)])))
            start += len(t)
        return tuple(parts)

    def pullback(cotangent: Any, last: bool = False) -> tuple[Any, ...]:
        return split(_grad(outputs, leaves(cotangent), inputs, batched=False, retain=not last))

    def rows(chunk_size: int | None) -> tuple[Any, ...]:
        (vector,) = outputs
        edges = _stacked_scalars(vector)
        if edges is not None:
            one = vector.new_ones(())
            return split([torch.stack(g) for g in zip(*[
                _grad([e], [one], inputs, batched=False) for e in edges], strict=True)])
        cotangents = _eye(vector)
        if chunk_size == 1:
            return _stacked([pullback(c) for c in cotangents.unbind(0)])
        step = chunk_size or cotangents.shape[0]
        parts = [_grad(outputs, [cotangents[i:i + step]], inputs, batched=True)
                 for i in range(0, cotangents.shape[0], step)]
        return split([torch.cat(g) if len(g) > 1 else g[0] for g in zip(*parts, strict=True)])

    return VJP(detached(out), pullback, rows, detached(aux))


def _eye(vector: Tensor) -> Tensor:
    return torch.eye(vector.shape[0], dtype=vector.dtype, device=vector.device)


def _stacked_scalars(vector: Tensor) -> list[Tensor | GradientEdge] | None:
    """The N scalars ``torch.stack`` made ``vector`` of (as gradient edges; a constant one as a
    tensor without a graph), or None when it was not made so."""
    node = vector.grad_fn
    if node is None or node.name() != "StackBackward0":
        return None
    nexts = node.next_functions
    if len(nexts) != vector.shape[0] or any(
            fn is not None and fn.name().endswith("AccumulateGrad") for fn, _ in nexts):
        return None  # a stacked leaf would need its own shape; keep the batched backward
    return [vector.new_zeros(()) if fn is None else GradientEdge(fn, nr) for fn, nr in nexts]


def _grad(outputs: Sequence[Tensor | GradientEdge], cotangents: Sequence[Tensor],
          inputs: Sequence[Tensor], *, batched: bool, retain: bool = True) -> list[Tensor]:
    """``Σ_k ⟨cotangents[k], ∂outputs[k]/∂x⟩`` for every x of ``inputs``, by one backward
    (a batched one: a leading axis on every cotangent and result). ``retain``: keep the graph
    for another call. Zeros for an input that no output depends on."""
    lead = (cotangents[0].shape[0],) if batched else ()
    pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True)
             if isinstance(o, GradientEdge) or o.requires_grad]
    if not pairs:
        return [x.new_zeros(lead + x.shape) for x in inputs]
    outs, cots = zip(*pairs, strict=True)
    # Zeros made here: materialize_grads would drop the batch axis of an unused input's.
    grads = torch.autograd.grad(outs, inputs, cots, retain_graph=retain, allow_unused=True,
                                is_grads_batched=batched)
    return [x.new_zeros(lead + x.shape) if g is None else g
            for g, x in zip(grads, inputs, strict=True)]


def _stacked(rows: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Pull-backs of single rows, stacked leaf by leaf (a new leading axis)."""
    return cast("tuple[Any, ...]", tree_map(lambda *xs: torch.stack(xs), *rows))
