"""Task Jacobians in one batched backward pass: ``torch.func.vjp`` + ``vmap`` over cotangents."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import optree
import torch
from torch import Tensor
from torch.func import vjp as torch_vjp
from torch.func import vmap

from imtl_func import _checks
from imtl_func._tree import PyTree, tree_map

__all__ = ["task_jacobian"]


#: A vjp pull-back: ``pullback(cotangent)`` returns one cotangent per primal, in a tuple.
Pullback = Callable[..., tuple[Any, ...]]


# torch annotates vjp with one union of its two results, so a caller cannot unpack either.
def vjp(fn: Callable[..., Any], *primals: PyTree) -> tuple[Any, Pullback]:
    """``torch.func.vjp(fn, *primals)``: ``(fn(*primals), pullback)``."""
    return cast("tuple[Any, Pullback]", torch_vjp(fn, *primals))


def vjp_with_aux(fn: Callable[..., Any], *primals: PyTree) -> tuple[Any, Pullback, Any]:
    """``torch.func.vjp(fn, *primals, has_aux=True)`` of ``fn -> (out, aux)``:
    ``(out, pullback, aux)``."""
    return cast("tuple[Any, Pullback, Any]", torch_vjp(fn, *primals, has_aux=True))


def pullback_rows(
    pullback: Callable[[Tensor], Any], cotangents: Tensor, chunk_size: int | None = None
) -> Any:
    """Apply a vjp pull-back to every row of ``cotangents`` at once.

    Args:
        pullback: the function returned by ``torch.func.vjp`` for an output of shape ``[R]``.
        cotangents: ``[N, R]``; row i is one cotangent.
        chunk_size: ``None`` maps all N rows in one batched call; ``k`` maps k rows at a time
            (bounds memory); ``1`` is a plain Python loop, for ops without a batching rule.

    Returns:
        The pull-back's output with a leading axis of size N on every leaf.
    """
    _checks.chunk_size(chunk_size)
    if chunk_size == 1:
        rows = [pullback(c) for c in cotangents.unbind(0)]
        return optree.tree_map(lambda *xs: torch.stack(xs), *rows, none_is_leaf=False)
    return vmap(pullback, chunk_size=chunk_size)(cotangents)


def task_jacobian(
    fn: Callable[..., Tensor],
    params: PyTree,
    *args: Any,
    chunk_size: int | None = None,
) -> tuple[Tensor, PyTree]:
    """Jacobian of T task losses with respect to a pytree, in one batched backward pass.

    ``fn(params, *args)`` returns the losses ``[T]``. One forward pass builds the vjp pull-back;
    ``vmap`` of it over the T rows of the identity gives every row of the Jacobian.

    Args:
        fn: ``fn(params, *args) -> losses [T]``.
        params: pytree of floating tensors (parameters, or a feature tensor / pytree of them).
        *args: passed to ``fn`` unchanged and not differentiated.
        chunk_size: rows of the batched backward per ``vmap`` call; ``None`` maps all T rows
            at once, ``k`` maps k rows at a time (bounds memory), ``1`` is a plain Python loop
            (for operations without a batching rule).

    Returns:
        ``(losses, jac)``: ``losses`` ``[T]`` (detached), and ``jac`` with the structure of
        ``params`` whose leaves have shape ``[T, *leaf.shape]``: ``jac[t] = ∇ ℓ_t``.
    """
    _checks.params(params, "params")
    params = tree_map(torch.Tensor.detach, params)
    def wrapped(p: PyTree) -> Tensor:
        out = fn(p, *args)
        if isinstance(out, Tensor):
            _checks.differentiable(out, "task_jacobian's fn")
        return out

    losses, pullback = vjp(wrapped, params)
    _checks.losses(losses, None, "task_jacobian")
    eye = torch.eye(losses.shape[0], dtype=losses.dtype, device=losses.device)
    (jac,) = pullback_rows(pullback, eye, chunk_size)
    return losses.detach(), jac

