"""Task Jacobians in one batched backward pass over the rows of the identity."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from imtl_func import _checks
from imtl_func._autodiff import use_autograd, vjp
from imtl_func._tree import PyTree

__all__ = ["task_jacobian"]


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
    _checks.chunk_size(chunk_size)

    def wrapped(p: PyTree) -> Tensor:
        out = fn(p, *args)
        if isinstance(out, Tensor):
            _checks.differentiable(out, "task_jacobian's fn")
        return out

    res = vjp(wrapped, params, autograd=use_autograd(params, args))
    losses = _checks.losses(res.out, None, "task_jacobian")
    (jac,) = res.rows(chunk_size)
    return losses, jac

