"""IMTL-G task weights from the Gramian of the task gradients (Liu et al., ICLR 2021, §3.2).

The weights depend on the task gradients g_1..g_T only through their Gramian
K_ij = <g_i, g_j>, so nothing here ever holds the T gradients side by side.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from imtl_func import _checks
from imtl_func._weighting import Weighting, _no_state

__all__ = ["GWeights", "IMTLGStats", "imtl_g", "imtl_g_weights"]

#: A task whose gradient norm is at most this fraction of the largest one has no direction.
NORM_CUTOFF = 1e-10
#: ``‖Cβ − 1‖ / √m`` above this means no nonzero vector has equal projections.
RESIDUAL_TOL = 1e-6
#: ``|Σw| / Σ|w|`` at or below this means the common projection is unbounded.
SUM_TOL = 1e-8
#: Eigenvalues of the cosine matrix below ``RTOL_ULPS · T`` ulps of its dtype (times the largest
#: one) are rounding noise: exactly parallel or opposite gradients never give an exactly singular
#: matrix in floating point.
RTOL_ULPS = 30.0


def default_rtol(dtype: torch.dtype, num_tasks: int) -> float:
    """Pseudo-inverse cut-off for a T-task Gramian computed in ``dtype``: ``30 · T · eps``."""
    return RTOL_ULPS * max(num_tasks, 2) * torch.finfo(dtype).eps


class GWeights(NamedTuple):
    """IMTL-G weights and what they were read from.

    Attributes:
        alpha: ``[T]`` weights with ``Σ α_t = 1`` (all zeros in a degenerate case). The combined
            gradient ``g = Σ_t α_t g_t`` has ``<g, g_t / ‖g_t‖> = projection`` for every task with
            a nonzero gradient. Never clipped: weights may be negative.
        projection: ``[]`` the common projection ``c = 1 / Σ_t w_t`` (0 when degenerate). A
            negative ``c`` means a step along ``-g`` raises every task's loss.
        degenerate: ``[]`` bool, True when no nonzero vector has equal projections (e.g. opposite
            gradients), when the projection is unbounded, or when every gradient is zero. Then
            ``alpha`` is zero and the shared update is zero.
        norm: ``[T]`` task-gradient norms ``√K_tt``.
        cosine: ``[T, T]`` cosine similarities of the task gradients (rows and columns of tasks
            without a direction are 0).
    """

    alpha: Tensor
    projection: Tensor
    degenerate: Tensor
    norm: Tensor
    cosine: Tensor


def imtl_g_weights(gramian: Tensor, *, rtol: float | None = None) -> GWeights:
    """IMTL-G weights from the Gramian of the task gradients, defined for every Gramian.

    With ``n_t = √K_tt`` and the cosine matrix ``C = diag(n)⁻¹ K diag(n)⁻¹``, the paper's weights
    are ``α ∝ (C⁻¹ 1) / n`` (equivalently ``K⁻¹ n / 1ᵀK⁻¹n``, equivalently the closed form
    ``α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹``). This function computes them in float64, branch-free:

    1. tasks with ``n_t ≤ 1e-10 · max n`` have no direction: ``α_t = 0``;
    2. ``β = C⁺ 1`` over the remaining tasks (minimum-norm least squares);
    3. if ``‖Cβ − 1‖`` is not ≈ 0, only the zero vector has equal projections: ``α = 0``;
    4. ``w = β / n`` and ``α = w / Σw``; if ``|Σw|`` is negligible against ``Σ|w|`` the common
       projection is unbounded: ``α = 0``.

    This equals the paper wherever its inverse exists and never returns NaN. Multiplying every
    gradient by ``k > 0`` leaves ``α`` unchanged; scaling gradient t by ``k_t`` gives
    ``α'_t ∝ α_t / k_t``.

    Args:
        gramian: ``[T, T]`` symmetric positive semi-definite matrix ``K_ij = <g_i, g_j>``.
        rtol: relative cut-off for small eigenvalues of ``C`` in the pseudo-inverse; default
            ``30 · T · eps`` of the Gramian's dtype (``30 · T`` ulps: 1.3e-14 for float64
            and 7.2e-6 for float32 at T = 2), so that the rounding noise of exactly parallel or
            opposite gradients is not inverted.

    Returns:
        :class:`GWeights` in the Gramian's dtype (``degenerate`` is bool). No autograd graph.
    """
    _checks.square_matrix(gramian, "gramian")
    dtype = gramian.dtype
    num_tasks = gramian.shape[0]
    if rtol is None:
        rtol = default_rtol(dtype, num_tasks)
    k = gramian.detach().to(torch.float64)
    k = (k + k.mT) / 2
    eye = torch.eye(num_tasks, dtype=torch.float64, device=k.device)

    norm = k.diagonal().clamp_min(0).sqrt()
    active = norm > NORM_CUTOFF * norm.max()
    safe_norm = torch.where(active, norm, torch.ones_like(norm))
    pair = active[:, None] & active[None, :]
    cosine = torch.where(pair, k / (safe_norm[:, None] * safe_norm[None, :]), 0.0)
    # Tasks without a direction get an identity row and a zero right-hand side, so β_t = 0.
    c = torch.where(pair, cosine, eye)
    ones = active.to(torch.float64)
    beta = torch.where(active, torch.linalg.pinv(c, rtol=rtol, hermitian=True) @ ones, 0.0)

    count = active.sum().clamp_min(1).to(torch.float64)
    consistent = torch.linalg.vector_norm(c @ beta - ones) <= RESIDUAL_TOL * count.sqrt()
    w = beta / safe_norm
    total = w.sum()
    bounded = total.abs() > SUM_TOL * w.abs().sum()
    ok = consistent & bounded & active.any()
    safe_total = torch.where(ok, total, torch.ones_like(total))
    alpha = torch.where(ok, w / safe_total, 0.0)
    projection = torch.where(ok, 1 / safe_total, 0.0)
    return GWeights(
        alpha=alpha.to(dtype),
        projection=projection.to(dtype),
        degenerate=~ok,
        norm=norm.to(dtype),
        cosine=cosine.to(dtype),
    )


class IMTLGStats(NamedTuple):
    """What :func:`imtl_g` reports besides ``α``.

    Attributes:
        projection: ``[]`` the common projection ``c`` of the combined gradient on every unit task
            gradient (0 when degenerate; sign-flipped with ``flip_negative``).
        degenerate: ``[]`` bool; no nonzero equal-projection direction, ``α = 0``.
    """

    projection: Tensor
    degenerate: Tensor


def imtl_g(*, flip_negative: bool = False, rtol: float | None = None) -> Weighting:
    """IMTL-G as a :class:`~imtl_func.Weighting`: the weights of :func:`imtl_g_weights`.

    Args:
        flip_negative: when the common projection ``c`` is negative, negate ``α`` so that a step
            along ``−g`` lowers every task's loss to first order. Off by default (the paper's
            behaviour): ``α`` is returned as computed and ``c`` is reported.
        rtol: see :func:`imtl_g_weights`; default from the Gramian's dtype.
    """
    flip = bool(flip_negative)

    def update(gramian: Tensor | None, losses: Tensor, state: Any) -> tuple[Tensor, Any, Any]:
        if gramian is None:
            raise ValueError("IMTL-G needs the Gramian of the task gradients")
        g = imtl_g_weights(gramian, rtol=rtol)
        alpha, projection = g.alpha.to(torch.float64), g.projection.to(torch.float64)
        if flip:
            sign = torch.where(projection < 0, -1.0, 1.0).to(torch.float64)
            alpha, projection = alpha * sign, projection * sign
        return alpha, IMTLGStats(projection, g.degenerate), state

    return Weighting(_no_state, update, needs_gramian=True)
