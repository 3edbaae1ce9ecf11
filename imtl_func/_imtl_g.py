"""IMTL-G task weights from the Gramian of the task gradients (Liu et al., ICLR 2021, §3.2).

The weights depend on the task gradients g_1..g_T only through their Gramian
K_ij = <g_i, g_j>, so nothing here ever holds the T gradients side by side.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from imtl_func import _checks
from imtl_func._weighting import Weighting, _no_state

__all__ = ["GWeights", "IMTLGStats", "imtl_g", "imtl_g_weights"]

#: A task whose gradient norm is at most this fraction of the largest one has no direction.
NORM_CUTOFF = 1e-10
#: ``‖Cβ − 1‖ / √m`` above this (or ``RESIDUAL_ULPS`` ulps of a half-precision Gramian's dtype)
#: means no nonzero vector has equal projections.
RESIDUAL_TOL = 1e-6
RESIDUAL_ULPS = 8.0
#: ``|Σw| / Σ|w|`` at or below this, or ``|Σw|`` at or below ``SUM_MARGIN`` times its
#: first-order rounding error (from rounding the entries to the Gramian's dtype), means the
#: common projection is unbounded: the sign of ``c`` is not determined by the Gramian.
SUM_TOL = 1e-8
SUM_MARGIN = 2.0
#: Eigenvalues of the cosine matrix below ``RTOL_ULPS · T`` ulps of the dtype the entries were
#: accumulated in (float32 at least: half-precision products accumulate in float32) are rounding
#: noise: exactly parallel or opposite gradients never give an exactly singular matrix in
#: floating point.
RTOL_ULPS = 30.0
#: Rounding the entries to the Gramian's dtype moves each cosine by at most ``eps · |C_ij|``
#: (first order), so the eigenvalues of C by at most ``eps · ‖C‖_F ≤ √T · eps`` times the
#: largest one: the cut-off is at least ``ENTRY_ULPS · √T`` ulps of the dtype (this decides for
#: float16 and bfloat16).
ENTRY_ULPS = 1.0
#: The default cut-off never exceeds this (bfloat16 beyond 40 tasks): a cut-off near 1 would
#: call orthogonal gradients degenerate.
RTOL_MAX = 0.1


def default_rtol(dtype: torch.dtype, num_tasks: int) -> float:
    """Pseudo-inverse cut-off for a T-task Gramian stored in ``dtype``.

    ``min(max(30 · T · eps_acc, √T · eps), 0.1)`` with ``eps`` of ``dtype``, ``eps_acc`` of the
    accumulation dtype (``dtype`` promoted to float32) and ``T ≥ 2``. At T = 2: 1.3e-14 for
    float64, 7.1e-6 for float32, 1.4e-3 for float16 and 1.1e-2 for bfloat16 (3.5e-2 at T = 5,
    where ``30 · T · eps`` of bfloat16 itself would be 1.17 and call every Gramian degenerate).
    """
    _checks.num_tasks(num_tasks)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    t = max(num_tasks, 2)
    eps = torch.finfo(dtype).eps
    eps_acc = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    return min(max(RTOL_ULPS * t * eps_acc, ENTRY_ULPS * math.sqrt(t) * eps), RTOL_MAX)


class GWeights(NamedTuple):
    """IMTL-G weights and what they were read from.

    Attributes:
        alpha: ``[T]`` weights with ``Σ α_t = 1`` (all zeros in a degenerate case). The combined
            gradient ``g = Σ_t α_t g_t`` has ``<g, g_t / ‖g_t‖> = projection`` for every task with
            a nonzero gradient. Never clipped: weights may be negative. Never NaN.
        projection: ``[]`` the common projection ``c = 1 / Σ_t w_t`` (0 when degenerate). A
            negative ``c`` means a step along ``-g`` raises every task's loss.
        degenerate: ``[]`` bool, True when ``alpha`` is zero: no nonzero vector has equal
            projections (e.g. opposite gradients), the projection is unbounded, every gradient
            is zero, or the Gramian is invalid (``psd`` False). The shared update is then zero.
        norm: ``[T]`` task-gradient norms ``√K_tt`` (of the Gramian as given, so NaN or inf
            where ``K_tt`` is).
        cosine: ``[T, T]`` cosine similarities of the task gradients (rows and columns of tasks
            without a direction are 0; NaN everywhere when the Gramian is not finite).
        finite: ``[]`` bool, False when the Gramian has a NaN or infinite entry.
        psd: ``[]`` bool, True when the Gramian is finite and positive semi-definite up to
            rounding: no diagonal entry below ``-tol · max K_tt``, no inner product beyond
            Cauchy–Schwarz by more than ``tol``, and no eigenvalue of the cosine matrix below
            ``-tol`` times its largest one, with ``tol`` the larger of ``rtol`` and
            the default cut-off.
    """

    alpha: Tensor
    projection: Tensor
    degenerate: Tensor
    norm: Tensor
    cosine: Tensor
    finite: Tensor
    psd: Tensor


def imtl_g_weights(gramian: Tensor, *, rtol: float | None = None) -> GWeights:
    """IMTL-G weights from the Gramian of the task gradients, defined for every Gramian.

    With ``n_t = √K_tt`` and the cosine matrix ``C = diag(n)⁻¹ K diag(n)⁻¹``, the paper's weights
    are ``α ∝ (C⁻¹ 1) / n`` (equivalently ``K⁻¹ n / 1ᵀK⁻¹n``, equivalently the closed form
    ``α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹``). This function computes them in float64, branch-free:

    0. a Gramian with a NaN or inf entry gives ``α = 0`` (``finite`` False); the others are
       divided by their largest entry (α does not depend on the scale, and norms of 1e-160 or
       sums of 1e308 then neither underflow nor overflow);
    1. tasks with ``n_t ≤ 1e-10 · max n`` have no direction: ``α_t = 0``;
    2. a Gramian that is not positive semi-definite beyond rounding gives ``α = 0`` (``psd``
       False);
    3. ``β = C⁺ 1`` over the remaining tasks (minimum-norm least squares, eigenvalues of ``C``
       below ``rtol`` times the largest one dropped);
    4. if ``‖Cβ − 1‖`` is not ≈ 0, only the zero vector has equal projections: ``α = 0``;
    5. ``w = β / n`` and ``α = w / Σw``; if ``|Σw|`` is negligible against ``Σ|w|`` (below
       1e-8 of it, or below twice the rounding error that the dtype's ``eps`` on every entry
       makes in ``Σw``: ``eps · ((1/n)ᵀ |C⁺| |C| |β| + Σ|w|)``), the common projection is
       unbounded: ``α = 0``.

    This equals the paper wherever its inverse exists, never returns NaN in ``alpha`` and
    never raises on a [T, T] real tensor. Multiplying every gradient by ``k > 0`` leaves ``α``
    unchanged; scaling gradient t by ``k_t`` gives ``α'_t ∝ α_t / k_t``. The solve is float64
    for every dtype; the dtype only sets the rounding level (the default ``rtol`` and the
    tolerances of steps 2, 4 and 5), so a float16 or bfloat16 Gramian gives the float64 answer
    to its own precision.

    Args:
        gramian: ``[T, T]`` real symmetric positive semi-definite matrix ``K_ij = <g_i, g_j>``
            of any floating dtype (its entries accumulated in float32 at least).
        rtol: relative cut-off for small eigenvalues of ``C`` in the pseudo-inverse, a number in
            [0, 1); default from the Gramian's dtype (``30 · T`` float32 or
            float64 ulps, at least ``√T`` ulps of the dtype, at most 0.1), so that the rounding
            noise of exactly parallel or opposite gradients is not inverted.

    Returns:
        :class:`GWeights` in the Gramian's dtype (``degenerate``, ``finite`` and ``psd`` are
        bool). No autograd graph.

    Raises:
        TypeError: the Gramian is complex or not floating point, or ``rtol`` is not a number.
        ValueError: the Gramian is not a [T, T] tensor with T ≥ 1, or ``rtol`` is not in [0, 1).
    """
    _checks.real_matrix_dtype(gramian, "gramian")
    _checks.square_matrix(gramian, "gramian")
    dtype = gramian.dtype
    num_tasks = gramian.shape[0]
    tol = default_rtol(dtype, num_tasks)
    rtol = tol if rtol is None else _checks.relative_cutoff(rtol, "rtol")
    tol = max(tol, rtol)  # the rounding level the validity checks allow
    eps = torch.finfo(dtype).eps
    residual_tol = max(RESIDUAL_TOL, RESIDUAL_ULPS * eps)

    raw = gramian.detach().to(torch.float64)
    eye = torch.eye(num_tasks, dtype=torch.float64, device=raw.device)
    finite = torch.isfinite(raw).all()
    k = torch.where(finite, raw, eye)
    # Largest entry 1: products n_i n_j of tiny norms stay normal and k + kᵀ cannot overflow.
    top = k.abs().amax()
    scale = torch.where(top > 0, top, torch.ones_like(top))
    k = k / scale
    k = (k + k.mT) / 2

    diag = k.diagonal()
    norm = diag.clamp_min(0).sqrt()
    top_norm = norm.max()
    active = norm > NORM_CUTOFF * top_norm
    safe_norm = torch.where(active, norm, torch.ones_like(norm))
    pair = active[:, None] & active[None, :]
    cosine = torch.where(pair, k / (safe_norm[:, None] * safe_norm[None, :]), 0.0)

    # Positive semi-definite up to rounding. Cauchy–Schwarz |K_ij| ≤ n_i n_j is checked on K
    # (it also covers tasks without a direction) and bounds C before its eigenvalues are taken.
    bound = (1 + tol) * norm[:, None] * norm[None, :] + tol * top_norm * torch.maximum(
        norm[:, None], norm[None, :])
    schwarz = ((k.abs() <= bound) | eye.bool()).all()
    c = torch.where(pair & schwarz, cosine, eye)
    eigval, eigvec = torch.linalg.eigh(c)
    largest = eigval[-1]  # ≥ 1: the trace of c is T
    psd = (finite & (diag >= -tol * top_norm**2).all() & schwarz
           & (eigval[0] >= -tol * largest))

    # β = C⁺ 1 from the eigendecomposition; tasks without a direction have an identity row in c
    # and a zero right-hand side, so β_t = 0.
    ones = active.to(torch.float64)
    keep = eigval > rtol * largest
    inv = torch.where(keep, 1 / torch.where(keep, eigval, torch.ones_like(eigval)), 0.0)
    pinv = (eigvec * inv) @ eigvec.mT
    beta = torch.where(active, pinv @ ones, 0.0)

    count = active.sum().clamp_min(1).to(torch.float64)
    consistent = torch.linalg.vector_norm(c @ beta - ones) <= residual_tol * count.sqrt()
    w = beta / safe_norm
    total = w.sum()
    # Rounding error of Σw from rounding the entries to the dtype (|δC| ≤ eps |C|, |δn| ≤ eps n,
    # first order): |δβ| ≤ eps |C⁺| |C| |β|, so |δΣw| ≤ eps ((1/n)ᵀ |C⁺| |C| |β| + Σ|w|).
    inv_norm = torch.where(active, 1 / safe_norm, 0.0)
    error = eps * (inv_norm @ (pinv.abs() @ (c.abs() @ beta.abs())) + w.abs().sum())
    bounded = (total.abs() > SUM_TOL * w.abs().sum()) & (total.abs() > SUM_MARGIN * error)
    ok = psd & consistent & bounded & active.any()
    safe_total = torch.where(ok, total, torch.ones_like(total))
    alpha = torch.where(ok, w / safe_total, 0.0)
    # Back in the Gramian's units: n = √scale · norm, so c = 1 / Σ(β / n) = √scale / Σw.
    root = scale.sqrt()
    projection = torch.where(ok, root / safe_total, 0.0)
    nan = torch.full_like(cosine, math.nan)
    return GWeights(
        alpha=alpha.to(dtype),
        projection=projection.to(dtype),
        degenerate=~ok,
        norm=torch.where(finite, root * norm, raw.diagonal().clamp_min(0).sqrt()).to(dtype),
        cosine=torch.where(finite, cosine, nan).to(dtype),
        finite=finite,
        psd=psd,
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
