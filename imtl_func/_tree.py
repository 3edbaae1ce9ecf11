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


def all_finite(*trees: PyTree) -> Tensor:
    """A bool scalar: every element of every floating leaf is finite.

    One reduction per leaf and no temporaries: a sum is NaN or ±inf as soon as one element
    is. The sum runs in float32 at least (a float16 sum of finite values overflows easily); a
    float32 sum of finite values beyond 3.4e38 reads as non-finite (a safe false alarm).
    """
    sums = [x.sum(dtype=torch.promote_types(x.dtype, torch.float32))
            for t in trees for x in leaves(t) if x.is_floating_point()]
    if not sums:
        return torch.tensor(True)
    return torch.isfinite(torch.stack(sums)).all()


def where(cond: Tensor, tree: PyTree, other: PyTree) -> PyTree:
    """Leaf-wise ``torch.where(cond, a, b)`` with a scalar ``cond``."""
    return tree_map(lambda a, b: torch.where(cond, a, b), tree, other)


def zeros_where_not(cond: Tensor, tree: PyTree) -> PyTree:
    """Leaves of ``tree`` where ``cond`` holds, zeros (never NaN) elsewhere."""
    return tree_map(lambda a: torch.where(cond, a, 0.0), tree)


def take_tasks(tree: Any, idx: Tensor, size: int) -> Any:
    """The active tasks' part of every ``[T, ...]`` leaf; other leaves (step counts) as they are."""
    return optree.tree_map(lambda x: x[idx] if x.dim() > 0 and x.shape[0] == size else x, tree,
                           none_is_leaf=False)


def put_tasks(full: Any, part: Any, idx: Tensor, size: int) -> Any:
    """``full`` with the active tasks' rows replaced by ``part`` (inverse of :func:`take_tasks`)."""
    return optree.tree_map(
        lambda f, p: f.index_copy(0, idx, p) if f.dim() > 0 and f.shape[0] == size else p,
        full, part, none_is_leaf=False)


def unflatten(like: PyTree, values: list[Any]) -> PyTree:
    """``values`` (one per tensor leaf of ``like``, in :func:`leaves` order) in ``like``'s
    structure."""
    return optree.tree_structure(like, none_is_leaf=False).unflatten(values)
