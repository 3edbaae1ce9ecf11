"""The IMTL transform: a weighting and a scale rule as one ``(init, update)`` pair.

``update`` never sees gradients, only the ``[T]`` losses and the ``[T, T]`` Gramian of the task
gradients, and returns weights on those gradients; the steps do the contraction. That keeps the
math in one place and makes a multi-process Gramian a single all-reduce. The transform proposes;
:func:`imtl_func._gate.gate` decides whether the proposal is taken.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from imtl_func import _checks
from imtl_func._gramian import norms_and_cosines
from imtl_func._scales import ScaleRule, log_scale_bound, loss_scales
from imtl_func._weighting import Weighting

__all__ = ["IMTLState", "Info", "NonFinite", "Proposal", "TaskWeights", "Transform", "transform"]


class IMTLState(NamedTuple):
    """Everything IMTL carries between steps. Made by ``init`` of the transform (or step) that
    updates it; a state of another transform is refused with a clear error.

    Attributes:
        log_scale: ``[T]`` IMTL-L log-scales ``s`` (float32 or float64; zeros, never changed,
            without a scale rule).
        rule_state: the scale rule's state (moments, step count), a NamedTuple of tensors.
        weighting_state: the weighting's state (empty for IMTL-G and equal weighting).
    """

    log_scale: Tensor
    rule_state: Any
    weighting_state: Any


class TaskWeights(NamedTuple):
    """Weights on the task gradients given to ``update``.

    Attributes:
        shared: ``[T]`` float64; the shared parameters get ``Σ_t shared[t] g_t``
            (equal + scales: ``e^{s}``; IMTL-G: ``α``; IMTL-G + scales: ``α ⊙ e^{s}``, or ``α``
            when the rows already carry ``e^{s}``).
        task: ``[T]``; task-specific parameters get ``Σ_t task[t] ∇ℓ_t`` (``e^{s}``, or ones
            without scales).
    """

    shared: Tensor
    task: Tensor


class NonFinite(NamedTuple):
    """What the gate found not finite (True = not finite).

    Attributes:
        losses: ``[T]`` bool, per task.
        scales: ``[T]`` bool, the loss scales ``e^{s}`` per task.
        gramian: ``[T]`` bool, tasks whose row of the Gramian (their gradient) is not finite.
        gradients: ``[]`` bool, the combined gradients the step returns.
        state: ``[]`` bool, the proposed new state.
    """

    losses: Tensor
    scales: Tensor
    gramian: Tensor
    gradients: Tensor
    state: Tensor


class Info(NamedTuple):
    """What a step computed, for logging. All tensors, no autograd graph.

    Attributes:
        alpha: ``[T]`` the weighting's weights on the (scaled) task gradients (IMTL-G:
            ``Σα = 1``; equal weighting: ones).
        scale: ``[T]`` the loss scales ``e^{s}`` used in this step (ones without a scale rule).
        scale_grad: ``[T]`` ``e^{s} ℓ − 1``, the gradient of the scaled losses in ``s`` (zeros
            without a scale rule and for held tasks).
        grad_norm: ``[T]`` norms of the (scaled) task gradients ``α`` was computed from (NaN when
            the weighting needs no Gramian).
        cosine: ``[T, T]`` their cosine similarities (NaN when no Gramian).
        stats: the weighting's statistics (IMTL-G: :class:`IMTLGStats`, with the common
            projection ``c`` and the degenerate flag).
        held: ``[T]`` bool; tasks whose scale was held this step because their loss was not
            positive and finite (IMTL-L needs ``ℓ > 0``: offset such a loss to keep it positive).
        finite: ``[]`` bool; False when the gate tripped: gradients are zero and the state is
            unchanged. Skip the optimizer step.
        nonfinite: :class:`NonFinite`, what was not finite and for which tasks.
    """

    alpha: Tensor
    scale: Tensor
    scale_grad: Tensor
    grad_norm: Tensor
    cosine: Tensor
    stats: Any
    held: Tensor
    finite: Tensor
    nonfinite: NonFinite


class Proposal(NamedTuple):
    """What ``propose`` returns and the gate judges (internal to the pipeline).

    Attributes:
        weights: :class:`TaskWeights`.
        state: the proposed new :class:`IMTLState`.
        info: :class:`Info` with ``finite``/``nonfinite`` not yet filled in by the gate.
        losses: ``[T]`` (or ``[T + 1]`` with an extra loss) the losses the step saw.
        gramian: the ``[T, T]`` Gramian the weighting read, or None.
    """

    weights: TaskWeights
    state: IMTLState
    info: Info
    losses: Tensor
    gramian: Tensor | None


class Transform(NamedTuple):
    """A weighting and a scale rule as an ``(init, update)`` pair.

    Attributes:
        init: ``init(num_tasks, *, log_scale=None, dtype=torch.float32, device=None)`` ->
            :class:`IMTLState`.
        propose: ``propose(losses [T], gramian [T, T] | None, state, *, prescaled=False)`` ->
            :class:`Proposal`, not gated. ``prescaled``: the Gramian's rows already carry the
            loss scales (``g_t = e^{s_t} ∇ℓ_t``).
        weighting: the :class:`~imtl_func.Weighting`.
        scale_rule: the :class:`~imtl_func.ScaleRule`, or None for no loss scales.
        state_spec: what a state of this transform holds (to refuse a foreign one).
    """

    init: Callable[..., IMTLState]
    propose: Callable[..., Proposal]
    weighting: Weighting
    scale_rule: ScaleRule | None
    state_spec: _checks.StateSpec

    def check_state(self, state: object) -> None:
        """Raise a clear error unless ``state`` is a state this transform made."""
        _checks.state(state, self.state_spec)

    @property
    def needs_gramian(self) -> bool:
        """Whether ``update`` needs the Gramian of the task gradients."""
        return self.weighting.needs_gramian

    @property
    def learns_scales(self) -> bool:
        """Whether the transform has IMTL-L loss scales."""
        return self.scale_rule is not None

    def loss_scales(self, state: IMTLState, dtype: torch.dtype) -> Tensor:
        """``e^{s}`` of the next update (ones without scales), ``[T]``, known before it."""
        s = state.log_scale
        return loss_scales(s, dtype) if self.learns_scales else torch.ones_like(s.detach())

    def update(self, losses: Tensor, gramian: Tensor | None, state: IMTLState
               ) -> tuple[TaskWeights, IMTLState, Info]:
        """``update(losses [T], gramian [T, T] | None, state) -> (TaskWeights, state, Info)``.

        ``gramian`` holds ``<∇ℓ_i, ∇ℓ_j>`` of the raw losses (None when not needed). Gated: if
        anything is not finite the state is returned unchanged and ``info.finite`` is False.
        """
        from imtl_func._gate import gate

        proposal = self.propose(losses, gramian, state)
        _, new_state, info = gate(proposal, state)
        return proposal.weights, new_state, info


def transform(weighting: Weighting, scale_rule: ScaleRule | None = None) -> Transform:
    """Build a transform from a weighting and a scale rule.

    Args:
        weighting: how the task gradients are combined, e.g. :func:`imtl_func.imtl_g` (IMTL-G)
            or :func:`imtl_func.equal`.
        scale_rule: how IMTL-L's log-scales move (e.g. :func:`imtl_func.scale_newton`); None for
            no loss scales (``e^{s} = 1``).

    Returns:
        A :class:`Transform`; ``'loss'``, ``'gradient'`` and ``'hybrid'`` are
        :func:`imtl_func.preset` s built with this.
    """
    if isinstance(weighting, str):
        raise TypeError(f"transform() builds a transform from parts; for the method "
                        f"{weighting!r} use imtl_func.preset({weighting!r})")
    if not isinstance(weighting, Weighting):
        raise TypeError("weighting must be a Weighting (e.g. imtl_func.imtl_g()), got "
                        f"{type(weighting).__name__}")
    if scale_rule is not None and not isinstance(scale_rule, ScaleRule):
        raise TypeError("scale_rule must be a ScaleRule (e.g. imtl_func.scale_newton()) or None, "
                        f"got {type(scale_rule).__name__}")
    rule = scale_rule
    learns = rule is not None
    spec = _state_spec(weighting, rule)

    def init(
        num_tasks: int,
        *,
        log_scale: Sequence[float] | Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> IMTLState:
        num_tasks = _checks.num_tasks(num_tasks)
        dtype = _checks.state_dtype(dtype)
        if log_scale is None:
            s = torch.zeros(num_tasks, dtype=dtype, device=device)
        else:
            s = _checks.initial_log_scale(log_scale, num_tasks, dtype, device)
            if not learns and bool((s != 0).any()):
                raise ValueError("this transform has no loss scales (scale_rule=None): "
                                 "log_scale must be None")
        rule_state = rule.init(s) if rule is not None else ()
        return IMTLState(s, rule_state, weighting.init(num_tasks, s.device))

    def propose(losses: Tensor, gramian: Tensor | None, state: IMTLState, *,
                prescaled: bool = False) -> Proposal:
        _checks.state(state, spec)
        num_tasks = state.log_scale.shape[0]
        _checks.losses(losses, num_tasks, "IMTL update")
        _checks.same_device(losses, state.log_scale)
        losses = losses.detach()
        s = state.log_scale
        scale = loss_scales(s, losses.dtype) if learns else torch.ones_like(s)
        ok = torch.isfinite(losses) & (losses > 0)
        if rule is not None:
            held = ~ok
            sgrad = torch.where(held, 0.0, scale * losses.to(s.dtype) - 1)
            delta, rule_state = rule.update(sgrad, state.rule_state)
            bound = log_scale_bound(losses.dtype)
            new_s = torch.where(held, s, (s + delta).clamp(-bound, bound))
        else:
            held = torch.zeros_like(ok)
            sgrad, new_s, rule_state = torch.zeros_like(s), s, state.rule_state

        scale64 = scale.to(torch.float64)
        k = None
        if weighting.needs_gramian:
            k = _checks.gramian_for(gramian, num_tasks, losses.device)
            if learns and not prescaled:
                k = (k.to(torch.float64) * scale64[:, None] * scale64[None, :]).to(k.dtype)
            # The weighting always runs (the gate decides afterwards); a non-finite Gramian
            # reaches it as the identity so that no solver sees NaN.
            k_safe = torch.where(torch.isfinite(k).all(), k, torch.eye(num_tasks, dtype=k.dtype,
                                                                      device=k.device))
            alpha, stats, w_state = weighting.update(k_safe, losses, state.weighting_state)
            norm, cosine = norms_and_cosines(k_safe.to(torch.float64))
            norm, cosine = norm.to(s.dtype), cosine.to(s.dtype)
        else:
            alpha, stats, w_state = weighting.update(None, losses, state.weighting_state)
            nan = torch.full((), float("nan"), dtype=s.dtype, device=s.device)
            norm, cosine = nan.expand(num_tasks), nan.expand(num_tasks, num_tasks)
        alpha = alpha.to(torch.float64)
        shared = alpha if (prescaled or not learns) else alpha * scale64
        # finite / nonfinite are the gate's to fill in.
        per_task, whole = torch.zeros_like(held), torch.zeros((), dtype=torch.bool,
                                                               device=s.device)
        info = Info(alpha.to(s.dtype), scale, sgrad, norm, cosine, stats, held, whole,
                    NonFinite(per_task, per_task, per_task, whole, whole))
        return Proposal(TaskWeights(shared, scale), IMTLState(new_s, rule_state, w_state), info,
                        losses, k)

    return Transform(init, propose, weighting, rule, spec)


def _state_spec(weighting: Weighting, rule: ScaleRule | None) -> _checks.StateSpec:
    """The types a state of this transform holds, read from one tiny ``init``."""
    s = torch.zeros(1)
    rule_state = rule.init(s) if rule is not None else ()
    return _checks.StateSpec(type(rule_state), type(weighting.init(1, s.device)),
                             "a scale rule" if rule is not None else "no scale rule")
