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
from torch.func import vjp as func_vjp
from torch.func import vmap

from imtl_func._tree import PyTree, leaves, tree_map, unflatten

__all__ = ["VJP", "detached", "use_autograd", "vjp"]


class VJP(NamedTuple):
    """A function's output and its pull-backs.

    Attributes:
        out: ``fn(*primals)`` without a graph.
        pullback: ``pullback(cotangent like out) -> (cotangent like primal, ...)``, one per
            primal; zeros for a primal the output does not depend on.
        rows: ``rows(cotangents, chunk_size)``: the pull-back of every row of ``cotangents``
            (``out``'s shape with a leading axis N) in one batched backward; every leaf of the
            result has the leading axis N. ``chunk_size`` rows at a time (``1``: a loop).
        aux: the function's aux output (None without ``has_aux``), without a graph.
    """

    out: Any
    pullback: Callable[[Any], tuple[Any, ...]]
    rows: Callable[[Tensor, int | None], tuple[Any, ...]]
    aux: Any


def use_autograd(*trees: PyTree) -> bool:
    """Whether a call on ``trees`` (parameters, batch) differentiates with plain autograd."""
    if (torch.compiler.is_compiling() or torch.is_inference_mode_enabled()
            # No public API says whether a torch.func transform is running.
            or torch._C._functorch.peek_interpreter_stack() is not None):
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

    def rows(cotangents: Tensor, chunk_size: int | None) -> tuple[Any, ...]:
        if chunk_size == 1:
            return _stacked([pullback(c) for c in cotangents.unbind(0)])
        return cast("tuple[Any, ...]", vmap(pullback, chunk_size=chunk_size)(cotangents))

    return VJP(out, pullback, rows, aux)


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

    def pullback(cotangent: Any) -> tuple[Any, ...]:
        return split(_grad(outputs, leaves(cotangent), inputs, batched=False))

    def rows(cotangents: Tensor, chunk_size: int | None) -> tuple[Any, ...]:
        if chunk_size == 1:
            return _stacked([pullback(c) for c in cotangents.unbind(0)])
        step = chunk_size or cotangents.shape[0]
        parts = [_grad(outputs, [cotangents[i:i + step]], inputs, batched=True)
                 for i in range(0, cotangents.shape[0], step)]
        return split([torch.cat(g) if len(g) > 1 else g[0] for g in zip(*parts, strict=True)])

    return VJP(detached(out), pullback, rows, detached(aux))


def _grad(outputs: Sequence[Tensor], cotangents: Sequence[Tensor], inputs: Sequence[Tensor],
          *, batched: bool) -> list[Tensor]:
    """``Σ_k ⟨cotangents[k], ∂outputs[k]/∂x⟩`` for every x of ``inputs``, by one backward
    (a batched one: a leading axis on every cotangent and result). The graph is kept (a
    pull-back may be called again); zeros for an input that no output depends on."""
    pairs = [(o, c) for o, c in zip(outputs, cotangents, strict=True) if o.requires_grad]
    if not pairs:
        lead = (cotangents[0].shape[0],) if batched else ()
        return [x.new_zeros(lead + x.shape) for x in inputs]
    outs, cots = zip(*pairs, strict=True)
    return list(torch.autograd.grad(outs, inputs, cots, retain_graph=True, allow_unused=True,
                                    materialize_grads=True, is_grads_batched=batched))


def _stacked(rows: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Pull-backs of single rows, stacked leaf by leaf (a new leading axis)."""
    return cast("tuple[Any, ...]", tree_map(lambda *xs: torch.stack(xs), *rows))
