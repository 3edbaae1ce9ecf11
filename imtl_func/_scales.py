"""IMTL-L: scaled losses, their scale gradient, and update rules for the log-scales.

Task t has a learnable log-scale ``s_t``; its scaled loss is ``L_t = e^{s_t} ℓ_t − s_t`` with
``∂L_t/∂s_t = e^{s_t} ℓ_t − 1``, whose root ``e^{s_t} ℓ_t = 1`` brings every scaled loss to the
same value. A scale rule turns that gradient into a change of ``s`` (optax-style
``init``/``update`` pair; its state is a NamedTuple of tensors).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from imtl_func import _checks

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

    init: Callable[[Tensor], NamedTuple]
    update: Callable[[Tensor, NamedTuple], tuple[Tensor, NamedTuple]]


class EmptyState(NamedTuple):
    """State of a rule that keeps none."""


class NewtonState(NamedTuple):
    """State of :func:`scale_newton`.

    Attributes:
        mean_grad: ``[T]`` momentum average of ``e^{s} ℓ − 1``.
        count: ``[]`` int64 number of updates so far (for the bias correction).
    """

    mean_grad: Tensor
    count: Tensor


class AdamState(NamedTuple):
    """State of :func:`scale_adam`.

    Attributes:
        mu: ``[T]`` first moment of the scale gradient.
        nu: ``[T]`` second moment of the scale gradient.
        count: ``[]`` int64 number of updates so far.
    """

    mu: Tensor
    nu: Tensor
    count: Tensor


def _count(log_scale: Tensor) -> Tensor:
    return torch.zeros((), dtype=torch.int64, device=log_scale.device)


def scale_newton(lr: float = 0.1, momentum: float = 0.9) -> ScaleRule:
    """Damped Newton steps on the log-scales (the default rule).

    With ``g = e^{s} ℓ − 1`` the curvature of ``L`` in ``s`` is ``e^{s} ℓ = 1 + g``, so Newton's
    step is ``−g / (1 + g)``. This rule averages ``g`` with momentum (``m̂``, bias-corrected) and
    floors the curvature at 1::

        delta = −lr · m̂ / max(1 + m̂, 1)

    Each step is at most ``lr`` in either direction whatever the loss magnitude (plain SGD on
    ``s`` takes a step of ``lr · e^{s} ℓ``, which diverges for ``ℓ ≫ 1/lr``); near the optimum it
    is SGD with rate ``lr``; its fixed point is ``E[e^{s} ℓ] = 1``, the root of IMTL-L's own
    gradient, so the scales converge to ``−log ℓ`` for a constant loss. From ``s = 0`` the
    defaults reach ``|s − s*| < 0.01`` in under 200 steps for ``ℓ`` anywhere in [1e-3, 1e3].

    Args:
        lr: largest step per update, > 0.
        momentum: averaging factor of the gradient, in [0, 1).
    """
    lr = _checks.finite_float(lr, "lr", positive=True)
    momentum = _checks.finite_float(momentum, "momentum", low=0.0, high=1.0)

    def init(log_scale: Tensor) -> NewtonState:
        return NewtonState(torch.zeros_like(log_scale), _count(log_scale))

    def update(grad: Tensor, state: NewtonState) -> tuple[Tensor, NewtonState]:
        count = state.count + 1
        mean = momentum * state.mean_grad + (1 - momentum) * grad
        unbiased = mean / (1 - momentum ** count.to(grad.dtype))
        delta = -lr * unbiased / torch.clamp(1 + unbiased, min=1.0)
        return delta, NewtonState(mean, count)

    return ScaleRule(init, update)


def scale_adam(lr: float = 0.01, b1: float = 0.9, b2: float = 0.99, eps: float = 1e-8) -> ScaleRule:
    """Adam on the log-scales (what training ``s`` with the model's own Adam amounts to).

    Steps are bounded by about ``lr``, but the second moment remembers the large early gradients
    of large losses, so the last approach to ``−log ℓ`` is slower than :func:`scale_newton`.

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
        zeros = torch.zeros_like(log_scale)
        return AdamState(zeros, zeros.clone(), _count(log_scale))

    def update(grad: Tensor, state: AdamState) -> tuple[Tensor, AdamState]:
        count = state.count + 1
        mu = b1 * state.mu + (1 - b1) * grad
        nu = b2 * state.nu + (1 - b2) * grad * grad
        step = count.to(grad.dtype)
        mu_hat = mu / (1 - b1**step)
        nu_hat = nu / (1 - b2**step)
        return -lr * mu_hat / (nu_hat.sqrt() + eps), AdamState(mu, nu, count)

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
