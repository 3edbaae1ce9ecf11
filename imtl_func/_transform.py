"""The IMTL transform: from task losses and the Gramian of their gradients to task weights.

``transform(method)`` returns an optax-style ``(init, update)`` pair. ``update`` never sees
gradients, only the ``[T]`` losses and the ``[T, T]`` Gramian of the *raw* task gradients, and
returns weights on those raw gradients; the steps in :mod:`imtl_func._steps` do the contraction.
That keeps the math in one place and makes a multi-process Gramian a single all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from imtl_func import _checks
from imtl_func._imtl_g import default_rtol, imtl_g_weights
from imtl_func._scales import ScaleRule, scale_newton
from imtl_func._tree import where

__all__ = ["IMTLState", "Info", "Transform", "Weights", "init", "transform"]


class IMTLState(NamedTuple):
    """Everything IMTL carries between steps.

    Attributes:
        log_scale: ``[T]`` IMTL-L log-scales ``s`` (zeros, and never changed, for 'gradient').
        rule_state: the scale rule's state (moments, step count), a NamedTuple of tensors.
    """

    log_scale: Tensor
    rule_state: NamedTuple


class Weights(NamedTuple):
    """Weights on the raw task gradients ``∇ℓ_t``.

    Attributes:
        shared: ``[T]``; the shared parameters get ``Σ_t shared[t] ∇ℓ_t``
            ('loss': ``e^{s}``; 'gradient': ``α``; 'hybrid': ``α ⊙ e^{s}``).
        task: ``[T]``; task-specific parameters get ``Σ_t task[t] ∇ℓ_t``
            (``e^{s}`` for 'loss' and 'hybrid', ones for 'gradient').
    """

    shared: Tensor
    task: Tensor


class Info(NamedTuple):
    """What a step computed, for logging. All tensors, no autograd graph.

    Attributes:
        alpha: ``[T]`` IMTL-G weights on the (scaled, for 'hybrid') task gradients, ``Σα = 1``;
            ones for 'loss'.
        scale: ``[T]`` the loss scales ``e^{s}`` used in this step (ones for 'gradient').
        scale_grad: ``[T]`` ``e^{s} ℓ − 1``, the gradient of the scaled losses in ``s``
            (zeros for 'gradient').
        grad_norm: ``[T]`` norms of the task gradients that ``α`` was computed from
            (NaN for 'loss', which computes no per-task gradient).
        cosine: ``[T, T]`` their cosine similarities (NaN for 'loss').
        projection: ``[]`` the common projection ``c`` of the combined gradient on every unit task
            gradient (NaN for 'loss').
        degenerate: ``[]`` bool; True when IMTL-G found no nonzero equal-projection direction and
            set the shared update to zero.
        finite: ``[]`` bool; False when a loss or gradient was not finite. Then the returned
            gradients are zero and the state is unchanged: skip the optimizer step.
    """

    alpha: Tensor
    scale: Tensor
    scale_grad: Tensor
    grad_norm: Tensor
    cosine: Tensor
    projection: Tensor
    degenerate: Tensor
    finite: Tensor


class Transform(NamedTuple):
    """An IMTL method as an ``(init, update)`` pair.

    Attributes:
        method: ``'loss'``, ``'gradient'`` or ``'hybrid'``.
        init: ``init(num_tasks, *, log_scale=None, dtype=torch.float32, device=None) -> IMTLState``.
        update: ``update(losses [T], gramian [T, T] | None, state) -> (Weights, IMTLState, Info)``.
            ``gramian`` holds ``<∇ℓ_i, ∇ℓ_j>`` of the raw losses; 'loss' ignores it (pass None).
    """

    method: str
    init: Callable[..., IMTLState]
    update: Callable[[Tensor, Tensor | None, IMTLState], tuple[Weights, IMTLState, Info]]

    @property
    def needs_gramian(self) -> bool:
        """Whether ``update`` needs the Gramian of the task gradients."""
        return self.method != "loss"

    @property
    def learns_scales(self) -> bool:
        """Whether the method has IMTL-L scales."""
        return self.method != "gradient"

    def task_weights(self, state: IMTLState) -> Tensor:
        """``Weights.task`` of the next update, known before it: ``e^{s}`` (ones for
        'gradient'), ``[T]``."""
        return _loss_scales(self.learns_scales, state.log_scale)


def _loss_scales(learns: bool, log_scale: Tensor) -> Tensor:
    """``e^{s}`` for the methods with IMTL-L scales, ones for 'gradient' (detached)."""
    s = log_scale.detach()
    return torch.exp(s) if learns else torch.ones_like(s)


def transform(
    method: str = "hybrid",
    *,
    scale_rule: ScaleRule | None = None,
    flip_negative: bool = False,
) -> Transform:
    """Build the IMTL transform for ``method``.

    Args:
        method: ``'loss'`` (IMTL-L), ``'gradient'`` (IMTL-G) or ``'hybrid'`` (IMTL, the paper's
            Algorithm 1).
        scale_rule: how the log-scales move; default :func:`imtl_func.scale_newton`.
        flip_negative: when the common projection ``c`` is negative, negate ``α`` so that a step
            along ``−g`` lowers every task's loss to first order. Off by default (the paper's
            behaviour): ``α`` is returned as computed and ``c`` is reported in ``Info``.

    Returns:
        A :class:`Transform`. Its ``update`` is pure and traceable by ``torch.compile``.
    """
    method = _checks.method(method)
    rule = scale_newton() if scale_rule is None else scale_rule
    if not isinstance(rule, ScaleRule):
        raise TypeError(f"scale_rule must be a ScaleRule (e.g. imtl_func.scale_newton()), "
                        f"got {type(rule).__name__}")
    uses_gramian = method != "loss"
    learns = method != "gradient"

    def init_fn(
        num_tasks: int,
        *,
        log_scale: Sequence[float] | Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> IMTLState:
        num_tasks = _checks.num_tasks(num_tasks)
        if log_scale is None:
            s = torch.zeros(num_tasks, dtype=dtype, device=device)
        else:
            s = torch.as_tensor(log_scale, dtype=dtype, device=device).detach().clone()
            if s.shape != (num_tasks,):
                raise ValueError(f"log_scale must have {num_tasks} entries (one per task), "
                                 f"got shape {tuple(s.shape)}")
            if not torch.isfinite(s).all():
                raise ValueError("log_scale must be finite")
            if not learns and bool((s != 0).any()):
                raise ValueError("method='gradient' has no loss scales: log_scale must be None")
        return IMTLState(s, rule.init(s))

    def update(
        losses: Tensor, gramian: Tensor | None, state: IMTLState
    ) -> tuple[Weights, IMTLState, Info]:
        _checks.losses(losses, state.log_scale.shape[0], f"IMTL({method!r}).update")
        if losses.device != state.log_scale.device:
            raise ValueError(f"the losses are on {losses.device} but the IMTL state on "
                             f"{state.log_scale.device}; create the state with "
                             f"imtl_func.init(..., device={str(losses.device)!r})")
        losses = losses.detach()
        num_tasks = losses.shape[0]
        s = state.log_scale
        finite = torch.isfinite(losses).all()
        scale = _loss_scales(learns, s)
        if learns:
            sgrad = torch.where(torch.isfinite(losses), scale * losses.to(s.dtype) - 1, 0.0)
            delta, rule_state = rule.update(sgrad, state.rule_state)
            new_state = IMTLState(s + delta, rule_state)
        else:
            sgrad = torch.zeros_like(s)
            new_state = state

        if uses_gramian:
            if gramian is None:
                raise ValueError(f"method={method!r} needs the Gramian of the task gradients")
            _checks.square_matrix(gramian, "gramian")
            if gramian.shape[0] != num_tasks:
                raise ValueError(f"gramian is {tuple(gramian.shape)} but there are {num_tasks} "
                                 "task losses")
            k = gramian.detach().to(torch.float64)
            finite = finite & torch.isfinite(k).all()
            eye = torch.eye(num_tasks, dtype=k.dtype, device=k.device)
            scale64 = scale.detach().to(k.dtype)
            k = torch.where(finite, k, eye) * scale64[:, None] * scale64[None, :]
            g = imtl_g_weights(k, rtol=default_rtol(gramian.dtype, num_tasks))
            alpha, projection = g.alpha, g.projection
            if flip_negative:
                sign = torch.where(projection < 0, -1.0, 1.0).to(alpha.dtype)
                alpha, projection = alpha * sign, projection * sign
            shared = alpha * scale64  # float64 weights for the contraction
            # Logged values in the state's dtype, like `scale` and `scale_grad`.
            alpha = alpha.to(s.dtype)
            info_g = (g.norm.to(s.dtype), g.cosine.to(s.dtype), projection.to(s.dtype),
                      g.degenerate)
        else:
            alpha = torch.ones_like(scale)
            shared = scale
            nan = torch.full((), float("nan"), dtype=s.dtype, device=s.device)
            info_g = (nan.expand(num_tasks), nan.expand(num_tasks, num_tasks), nan,
                      torch.zeros((), dtype=torch.bool, device=s.device))

        new_state = where(finite, new_state, state)
        info = Info(alpha, scale, sgrad, *info_g, finite)
        return Weights(shared, scale), new_state, info

    return Transform(method, init_fn, update)


def init(
    num_tasks: int,
    method: str = "hybrid",
    *,
    scale_rule: ScaleRule | None = None,
    log_scale: Sequence[float] | Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> IMTLState:
    """Initial :class:`IMTLState` for ``num_tasks`` tasks: ``transform(method, ...).init(...)``.

    Args:
        num_tasks: number of tasks T.
        method: ``'loss'``, ``'gradient'`` or ``'hybrid'``.
        scale_rule: the same rule as passed to the step (its state is created here).
        log_scale: initial ``s``, T numbers (the original module's ``init_loss``); default
            zeros, as in the paper. Must be None for 'gradient'.
        dtype: dtype of the state tensors.
        device: device of the state tensors.

    Returns:
        :class:`IMTLState` with ``log_scale`` ``[T]`` and the rule's initial state.
    """
    tx = transform(method, scale_rule=scale_rule)
    return tx.init(num_tasks, log_scale=log_scale, dtype=dtype, device=device)
