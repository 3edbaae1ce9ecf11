"""IMTL-L: scaled losses, their scale gradient, and update rules for the log-scales.

Task t has a learnable log-scale ``s_t``; its scaled loss is ``L_t = e^{s_t} ℓ_t − s_t`` with
``∂L_t/∂s_t = e^{s_t} ℓ_t − 1``, whose root ``e^{s_t} ℓ_t = 1`` brings every scaled loss to the
same value. A scale rule turns that gradient into a change of ``s`` (optax-style
``init``/``update`` pair; its state is a NamedTuple of tensors).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from imtl_func import _checks
from imtl_func._weighting import EmptyState

__all__ = [
    "AdamState",
    "EmptyState",
    "NewtonState",
    "ScaleRule",
    "scale_adam",
    "scale_frozen",
    "scale_grad",
    "scale_losses",
    "scale_newton",
    "scale_sgd",
]


def scale_losses(losses: Tensor, log_scale: Tensor) -> Tensor:
    """Scaled losses ``e^{s} ℓ − s``.

    Args:
        losses: ``[T]`` raw task losses.
        log_scale: ``[T]`` log-scales ``s``.

    Returns:
        ``[T]``; differentiable in both arguments.
    """
    return torch.exp(log_scale) * losses - log_scale


def scale_grad(losses: Tensor, log_scale: Tensor) -> Tensor:
    """Gradient of the scaled losses with respect to the log-scales: ``e^{s} ℓ − 1``, ``[T]``.

    Computed from detached values: it is a number to feed a scale rule, not a graph.
    """
    return torch.exp(log_scale.detach()) * losses.detach() - 1


class ScaleRule(NamedTuple):
    """A rule that updates the log-scales from their gradient.

    Attributes:
        init: ``init(log_scale [T]) -> state`` (a NamedTuple of tensors).
        update: ``update(grad [T], state) -> (delta [T], new_state)``; the new log-scales are
            ``log_scale + delta``.
    """

    # The state is each rule's own NamedTuple (a generic NamedTuple needs Python 3.11).
    init: Callable[[Tensor], Any]
    update: Callable[[Tensor, Any], tuple[Tensor, Any]]


class NewtonState(NamedTuple):
    """State of :func:`scale_newton`.

    Attributes:
        mean_grad: ``[T]`` momentum average of the clipped scale gradient
            ``clamp(e^{s} ℓ − 1, −1, 1)``; starts at 0, the value at the root.
    """

    mean_grad: Tensor


class AdamState(NamedTuple):
    """State of :func:`scale_adam`.

    Attributes:
        mu: ``[T]`` first moment of the clipped scale gradient.
        nu: ``[T]`` second moment of the clipped scale gradient.
        step: ``[]`` int64 number of updates so far (for the bias correction).
    """

    mu: Tensor
    nu: Tensor
    step: Tensor


def _state_zeros(log_scale: Tensor) -> Tensor:
    """Zeros shaped like ``log_scale`` in its dtype, but at least float32 (a float16 state
    cannot hold the small moments of a rule near its root)."""
    dtype = torch.promote_types(log_scale.dtype, torch.float32)
    return torch.zeros_like(log_scale, dtype=dtype)


def _clip(grad: Tensor, dtype: torch.dtype) -> Tensor:
    """``clamp(g, −1, 1)`` in ``dtype``, with NaN read as 0 (no information) and ±inf as ±1."""
    return torch.nan_to_num(grad.to(dtype), nan=0.0).clamp(-1.0, 1.0)


def scale_newton(lr: float = 0.1, momentum: float = 0.8) -> ScaleRule:
    """Clipped, damped Newton steps on the log-scales (the default rule).

    At the root the curvature of ``L`` in ``s`` is ``e^{s} ℓ = 1``, so Newton's step there is
    ``−g`` with ``g = e^{s} ℓ − 1``. This rule clips ``g`` to [−1, 1], averages it with
    momentum ``β`` (no bias correction: the average starts at 0, the root's value) and takes a
    step of ``lr`` times the average::

        c = clamp(g, −1, 1);   m ← β m + (1 − β) c;   delta = −lr · m

    Properties (tested):

    - each step is at most ``lr`` in either direction, whatever the loss (plain SGD on ``s``
      steps ``lr · e^{s} ℓ`` and diverges for ``ℓ ≫ 1/lr``);
    - one batch, however extreme its loss, changes the clipped gradient by some ``Δc`` (at most
      1 at the root, where ``c = 0``), which enters the later steps with weights
      ``(1 − β) β^k`` summing to 1: it pushes ``s`` by at most ``lr · |Δc|`` in total, and is
      forgotten by the factor ``β`` per step (at the defaults, from the root: ``s`` moves by
      0.066 at most and is back within 0.01 after 25 updates);
    - the clip is the identity for ``|g| ≤ 1``, so for noisy losses with ``e^{s} ℓ ≤ 2`` the
      fixed point is ``E[e^{s} ℓ] = 1``, the root of IMTL-L's own gradient; beyond that band
      it is ``E[clamp(e^{s} ℓ − 1, −1, 1)] = 0``, which weighs large losses less, like a robust
      mean (log-normal losses with σ = 0.5 settle at ``E[e^{s} ℓ] ≈ 1.04``); for a constant
      loss ``s`` converges to ``−log ℓ``;
    - a sustained change of the loss by a factor ``r`` is followed at ``lr`` per step once the
      average fills (about ``β / (1 − β)`` steps): ``|log r| / lr`` steps plus a few (97
      updates to stay within 0.1 of the new root after a 1e4× jump at the defaults).

    From ``s = 0`` the defaults reach ``|s − s*| < 0.01`` in under 200 steps for ``ℓ`` anywhere
    in [1e-3, 1e3]. Near the root ``g ≈ s − s*``; for ``β`` above about 0.67 (at ``lr = 0.1``)
    the error decays like a damped oscillation, by ``sqrt(β)`` per step.

    The state is kept in the dtype of ``log_scale`` given to ``init``, but at least float32; the
    rule computes in the wider of that and ``grad``'s dtype and returns ``delta`` in ``grad``'s.

    Args:
        lr: largest step per update, > 0.
        momentum: averaging factor ``β`` of the clipped gradient, in [0, 1).
    """
    lr = _checks.finite_float(lr, "lr", positive=True)
    momentum = _checks.finite_float(momentum, "momentum", low=0.0, high=1.0)

    def init(log_scale: Tensor) -> NewtonState:
        return NewtonState(_state_zeros(log_scale))

    def update(grad: Tensor, state: NewtonState) -> tuple[Tensor, NewtonState]:
        dtype = state.mean_grad.dtype
        work = torch.promote_types(grad.dtype, dtype)
        mean = momentum * state.mean_grad.to(work) + (1 - momentum) * _clip(grad, work)
        return (-lr * mean).to(grad.dtype), NewtonState(mean.to(dtype))

    return ScaleRule(init, update)


def scale_adam(lr: float = 0.01, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8) -> ScaleRule:
    """Adam on the clipped log-scale gradient ``clamp(e^{s} ℓ − 1, −1, 1)``.

    Close to what training ``s`` with the model's own Adam amounts to, with one change: the
    gradient is clipped to [−1, 1] (identity near the root, so the fixed point is still
    ``E[e^{s} ℓ] = 1`` while ``e^{s} ℓ ≤ 2``). Unclipped, one extreme batch fills the second
    moment with ``g²`` (``inf`` in float32 for ``g > 1.8e19``), which freezes the scales for
    thousands of steps (forever once it is ``inf``); clipped, the second moment stays ≤ 1.

    Adam normalizes its steps by the gradient's own size, so near the root, where ``g → 0``, a
    single outlier still moves ``s`` by several ``lr`` (about 5 ``lr`` at the defaults) before it is
    forgotten; :func:`scale_newton` bounds that move by ``lr``. Steps are bounded by about ``lr``.

    The state is kept in the dtype of ``log_scale`` given to ``init``, but at least float32; the
    rule computes in the wider of that and ``grad``'s dtype and returns ``delta`` in ``grad``'s.

    Args:
        lr: step size, > 0.
        b1: decay of the first moment, in [0, 1).
        b2: decay of the second moment, in [0, 1).
        eps: added to the root of the second moment, > 0.
    """
    lr = _checks.finite_float(lr, "lr", positive=True)
    b1 = _checks.finite_float(b1, "b1", low=0.0, high=1.0)
    b2 = _checks.finite_float(b2, "b2", low=0.0, high=1.0)
    eps = _checks.finite_float(eps, "eps", positive=True)

    def init(log_scale: Tensor) -> AdamState:
        zeros = _state_zeros(log_scale)
        step = torch.zeros((), dtype=torch.int64, device=log_scale.device)
        return AdamState(zeros, zeros.clone(), step)

    def update(grad: Tensor, state: AdamState) -> tuple[Tensor, AdamState]:
        dtype = state.mu.dtype
        work = torch.promote_types(grad.dtype, dtype)
        clipped = _clip(grad, work)
        step = state.step + 1
        mu = b1 * state.mu.to(work) + (1 - b1) * clipped
        nu = b2 * state.nu.to(work) + (1 - b2) * clipped * clipped
        k = step.to(work)
        mu_hat = mu / (1 - b1**k)
        nu_hat = nu / (1 - b2**k)
        delta = -lr * mu_hat / (nu_hat.sqrt() + eps)
        return delta.to(grad.dtype), AdamState(mu.to(dtype), nu.to(dtype), step)

    return ScaleRule(init, update)


def scale_sgd(lr: float) -> ScaleRule:
    """Plain gradient descent ``delta = −lr · (e^{s} ℓ − 1)``.

    Stable only while ``lr · e^{s} ℓ < 2``: it diverges for large losses (see :func:`scale_newton`).
    """
    lr = _checks.finite_float(lr, "lr", positive=True)

    def init(log_scale: Tensor) -> EmptyState:
        return EmptyState()

    def update(grad: Tensor, state: EmptyState) -> tuple[Tensor, EmptyState]:
        return -lr * grad, state

    return ScaleRule(init, update)


def scale_frozen() -> ScaleRule:
    """Leave the log-scales unchanged (for users who update ``s`` with their own optimizer from
    ``info.scale_grad``, or who want fixed scales)."""

    def init(log_scale: Tensor) -> EmptyState:
        return EmptyState()

    def update(grad: Tensor, state: EmptyState) -> tuple[Tensor, EmptyState]:
        return torch.zeros_like(grad), state

    return ScaleRule(init, update)


#: ``|s|`` never exceeds this: ``e^40 ≈ 2.4e17`` covers losses from 4e-18 to 2e17 and keeps
#: ``e^{s} ℓ`` and the scaled gradients finite in float32.
MAX_LOG_SCALE = 40.0


def log_scale_bound(dtype: torch.dtype) -> float:
    """Largest ``|s|`` for a step that computes in ``dtype``: 40, or less where ``e^{s}`` would
    come within a factor e of the dtype's largest value (float16: 10.09, ``e^{s} ≤ 24,100``)."""
    return min(MAX_LOG_SCALE, math.log(torch.finfo(dtype).max) - 1.0)


def loss_scales(log_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The loss scales ``e^{s}`` a step computing in ``dtype`` uses, detached, ``[T]``.

    ``s`` is clamped to ``±log_scale_bound(dtype)`` first, so a scale is finite and nonzero in
    that dtype whatever the state holds (e.g. a large ``init_loss``).
    """
    bound = log_scale_bound(dtype)
    return torch.exp(log_scale.detach().clamp(-bound, bound))
