"""Pytree helpers on `optree` used by the steps (internal)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch
from torch import Tensor

PyTree = Any


def leaves(tree: PyTree) -> list[Tensor]:
    """Tensor leaves of ``tree`` in a fixed order (``None`` is an empty subtree)."""
    return optree.tree_leaves(tree, none_is_leaf=False)


def tree_map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    return optree.tree_map(fn, tree, *rest, none_is_leaf=False)


def no_autocast(x: Tensor) -> torch.autocast:
    """A context with autocast off on ``x``'s device: IMTL's own products keep their dtype
    (autocast would run a float32 ``@`` in float16 inside a step called under it)."""
    return torch.autocast(x.device.type, enabled=False)


def contract(weights: Tensor, jac: PyTree) -> PyTree:
    """``Σ_t weights[t] · jac[t]`` for every leaf of a stacked pytree, in the leaf's dtype.

    weights: [T]; each leaf of ``jac``: [T, *shape]  ->  leaf of shape [*shape].
    """

    def one(j: Tensor) -> Tensor:
        with no_autocast(j):
            return torch.tensordot(weights.to(j.dtype), j, dims=1)

    return tree_map(one, jac)


def leaf_sums(tree: PyTree, device: torch.device) -> list[Tensor]:
    """One scalar per floating leaf, its sum, on ``device``: non-finite as soon as one element
    is (a finiteness test in one reduction per leaf and no temporaries).

    The sum runs in float32 at least (a float16 sum of finite values overflows easily); a
    float32 sum of finite values beyond 3.4e38 reads as non-finite (a safe false alarm).
    """
    sums = [x.sum(dtype=x.dtype if x.dtype.itemsize >= 4 else torch.float32)
            for x in leaves(tree) if x.is_floating_point()]
    return [x if x.device == device else x.to(device) for x in sums]


def where(cond: Tensor, tree: PyTree, other: PyTree) -> PyTree:
    """Leaf-wise ``torch.where(cond, a, b)`` with a scalar ``cond``."""
    return tree_map(lambda a, b: torch.where(cond, a, b), tree, other)


#: Integer dtype of the same width, to select a floating tensor's bits (see zeros_where_not).
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


def zeros_where_not(cond: Tensor, tree: PyTree, *, in_place: bool = False) -> PyTree:
    """Leaves of ``tree`` where ``cond`` holds, zeros (never NaN) elsewhere; ``cond`` a bool
    scalar.

    Eagerly, a floating leaf's bits are multiplied as integers by ``cond`` (0 or 1): one pass
    like a multiply, all-zero bits (+0.0) for a False ``cond`` whatever the value, where
    ``torch.where`` with a scalar condition costs several times as much on CPU. ``in_place``:
    the caller owns the leaves (fresh tensors nobody else holds), so the contiguous ones are
    multiplied in place, in one call, instead of copied (on CPU a fresh buffer of the size of
    the gradients costs more in page faults than the pass itself). While ``torch.compile``
    traces, inside a torch.func transform and for leaves that need autograd, ``torch.where``
    (the compiler fuses it). Every way gives the leaf exactly or +0.0.
    """
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return tree_map(lambda a: torch.where(cond, a, 0.0), tree)
    masks: dict[torch.device, Tensor] = {}
    batched: dict[torch.device, list[Tensor]] = {}
    out = []
    for a in leaves(tree):
        bits = _BITS.get(a.dtype)
        if bits is None or a.requires_grad:
            out.append(torch.where(cond, a, 0.0))
            continue
        if a.device not in masks:  # a 0-dim integer: the product keeps the leaf's width
            masks[a.device] = cond.to(device=a.device, dtype=torch.int64)
        if in_place and a.is_contiguous():
            # Idempotent: a leaf that aliases another one is still right.
            batched.setdefault(a.device, []).append(a.view(bits))
            out.append(a)
        else:
            out.append((a.view(bits) * masks[a.device]).view(a.dtype))
    for device, views in batched.items():
        torch._foreach_mul_(views, masks[device])
    return unflatten(tree, out)


def unflatten(like: PyTree, values: list[Any]) -> PyTree:
    """``values`` (one per tensor leaf of ``like``, in :func:`leaves` order) in ``like``'s
    structure."""
    return optree.tree_structure(like, none_is_leaf=False).unflatten(values)


def take_tasks(tree: Any, idx: Tensor, size: int) -> Any:
    """The active tasks' part of every ``[T, ...]`` leaf; other leaves (step counts) as they are."""
    return optree.tree_map(lambda x: x[idx] if x.dim() > 0 and x.shape[0] == size else x, tree,
                           none_is_leaf=False)


def put_tasks(full: Any, part: Any, idx: Tensor, size: int) -> Any:
    """``full`` with the active tasks' rows replaced by ``part`` (inverse of :func:`take_tasks`)."""
    return optree.tree_map(
        lambda f, p: f.index_copy(0, idx, p) if f.dim() > 0 and f.shape[0] == size else p,
        full, part, none_is_leaf=False)
