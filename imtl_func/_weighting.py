"""Weightings: how the T task gradients are combined, read from their Gramian.

A weighting is an ``(init, update)`` pair. ``update`` receives the ``[T, T]`` Gramian
``K_ij = <g_i, g_j>`` of the task gradients (``None`` when the weighting does not need it), the
``[T]`` task losses and its own state, and returns ``[T]`` weights ``α`` with the combined
gradient ``g = Σ_t α_t g_t``, statistics for logging (a NamedTuple of tensors) and the new state.
Nothing else in the package knows which weighting it runs: a new method is one function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, overload

import torch
from torch import Tensor

__all__ = ["EmptyState", "EmptyStats", "Weighting", "equal", "weighting"]


class EmptyStats(NamedTuple):
    """Statistics of a weighting that reports none."""


class Weighting(NamedTuple):
    """A weighting of the task gradients.

    Attributes:
        init: ``init(num_tasks, device) -> state``, a NamedTuple of tensors (empty if stateless).
        update: ``update(gramian, losses, state) -> (alpha, stats, new_state)``. ``gramian`` is
            the ``[T, T]`` Gramian of the task gradients (float32 or float64: its dtype is the
            rounding level of its entries; ``None`` when ``needs_gramian`` is False), ``losses``
            the ``[T]`` detached losses; ``alpha`` is ``[T]`` float64, ``stats`` a NamedTuple of
            tensors. Must be pure and traceable (no ``.item()``, no branches on values).
        needs_gramian: whether ``update`` reads the Gramian (the steps then compute the T task
            gradients; otherwise they need one ordinary backward pass).
        uniform: ``alpha`` is all ones whatever the input (equal weighting): the shared and the
            task-specific parameters then take the same cotangent, one backward for both.
    """

    init: Callable[[int, torch.device | None], Any]
    update: Callable[[Tensor | None, Tensor, Any], tuple[Tensor, Any, Any]]
    needs_gramian: bool = True
    uniform: bool = False


class EmptyState(NamedTuple):
    """State of a weighting or a scale rule that keeps none."""


def _no_state(num_tasks: int, device: torch.device | None) -> EmptyState:
    return EmptyState()


@overload
def weighting(fn: Callable[[Tensor, Tensor], Any], *,
              needs_gramian: Literal[True] = True) -> Weighting: ...


@overload
def weighting(fn: Callable[[Tensor | None, Tensor], Any], *, needs_gramian: bool) -> Weighting: ...


def weighting(fn: Callable[[Any, Tensor], Any], *, needs_gramian: bool = True) -> Weighting:
    """A stateless :class:`Weighting` from one function of the Gramian.

    Args:
        fn: ``fn(gramian [T, T], losses [T]) -> alpha [T]`` or ``(alpha, stats)`` with ``stats``
            a NamedTuple of tensors. ``gramian`` is ``None`` when ``needs_gramian`` is False.
        needs_gramian: whether ``fn`` reads the Gramian.

    Returns:
        A :class:`Weighting` whose ``alpha`` is returned in float64.
    """
    if not callable(fn):
        raise TypeError(f"weighting needs a function (gramian, losses) -> alpha, got "
                        f"{type(fn).__name__}")

    def update(gramian: Tensor | None, losses: Tensor, state: Any) -> tuple[Tensor, Any, Any]:
        out = fn(gramian, losses)
        alpha, stats = out if isinstance(out, tuple) and not hasattr(out, "_fields") else (
            out, EmptyStats())
        if not isinstance(alpha, Tensor) or alpha.shape != losses.shape:
            got = tuple(alpha.shape) if isinstance(alpha, Tensor) else type(alpha).__name__
            raise ValueError(f"the weighting function must return [T] = {tuple(losses.shape)} "
                             f"weights, got {got}")
        return alpha.detach().to(torch.float64), stats, state

    return Weighting(_no_state, update, needs_gramian=bool(needs_gramian))


def equal() -> Weighting:
    """Equal weighting: ``α_t = 1``, the gradient of ``Σ_t ℓ_t`` (of the scaled losses with
    IMTL-L scales). The baseline every multi-task method is measured against."""

    def update(gramian: Tensor | None, losses: Tensor, state: Any) -> tuple[Tensor, Any, Any]:
        return torch.ones_like(losses, dtype=torch.float64), EmptyStats(), state

    return Weighting(_no_state, update, needs_gramian=False, uniform=True)
