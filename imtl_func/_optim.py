"""Hand a functional step's result to a ``torch.optim`` optimizer; float16 loss scaling.

The steps are pure and never read a tensor on the host, so a step that was not finite still
returns (zero) gradients and its caller decides. A ``torch.optim`` optimizer that gets zero
gradients still moves (momentum, Adam's moments, weight decay) and counts a step, so
:func:`apply_updates` gives the contract of ``torch.amp.GradScaler``: a step that was not finite
is skipped entirely. That decision reads one boolean on the host, outside the compiled step.
"""

from __future__ import annotations

from typing import Any

import optree
import torch
from torch import Tensor

from imtl_func._pipeline import StepResult
from imtl_func._tree import PyTree

__all__ = ["amp_scale", "apply_updates", "scaler_step", "write_grads"]


def amp_scale(losses: Tensor, scale: Any) -> Tensor:
    """The same losses, with every gradient through them multiplied by ``scale``.

    ``x.detach() + (x − x.detach()) · S``: the value is exactly ``x`` (IMTL-L's scale rule and
    the gate read the true losses), while a backward pass that reaches ``x`` with cotangent
    ``c`` continues with ``S · c``. This is the loss scaling of float16 mixed precision
    (``scaler.scale(loss).backward()``) for a functional step, which back-propagates by itself:
    apply it to the losses inside the loss function, and the step's Gramian, rows and
    gradients are all ``S`` times larger (IMTL-G's ``α`` is unchanged by a common factor) while
    ``α``, the loss scales and the state are those of the unscaled losses. ``info.grad_norm`` is
    ``S`` times larger. Hand the result to :func:`apply_updates` with the same ``scaler`` to
    unscale and skip on overflow. Traceable by ``torch.compile`` when ``scale`` is a tensor or
    a number.

    Args:
        losses: any tensor (``[T]`` losses, a scalar loss, an extra loss).
        scale: a ``torch.amp.GradScaler`` (its current scale, no host sync), a ``[]`` tensor or
            a number. Half-precision losses are multiplied in float32, so that a scale above the
            float16 range overflows only in the backward pass (where the scaler sees it), not in
            the value.

    Returns:
        A tensor equal to ``losses`` in value, dtype and shape.
    """
    if not isinstance(losses, Tensor) or not losses.is_floating_point():
        got = losses.dtype if isinstance(losses, Tensor) else type(losses).__name__
        raise TypeError(f"amp_scale: losses must be a floating-point tensor, got {got}")
    if isinstance(scale, torch.amp.GradScaler):
        scale = scale.scale(torch.ones((), dtype=torch.float32, device=losses.device))
    elif not isinstance(scale, (Tensor, int, float)) or isinstance(scale, bool):
        raise TypeError("amp_scale: scale must be a torch.amp.GradScaler, a tensor or a number, "
                        f"got {type(scale).__name__}")
    wide = torch.promote_types(losses.dtype, torch.float32)
    fixed = losses.detach()
    return fixed + ((losses.to(wide) - fixed.to(wide)) * scale).to(losses.dtype)


def apply_updates(
    optimizer: torch.optim.Optimizer,
    result: StepResult,
    shared_params: PyTree,
    task_params: PyTree = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
) -> bool:
    """Write a step's gradients into ``.grad`` and step ``optimizer``, unless it was not finite.

    ``result.grads.shared`` goes to the leaves of ``shared_params`` and ``result.grads.task`` to
    those of ``task_params`` (the same pytrees the step was called with, holding the optimizer's
    own parameters). ``.grad`` is replaced, not accumulated into, by the result's tensors
    themselves (no copy: an optimizer or a scaler that changes ``.grad`` in place changes them).

    When ``result.info.finite`` is False nothing is written and ``optimizer.step()`` is not
    called: parameters, moments and step counts stay bit-identical (a zero gradient would still
    move them under momentum, Adam or weight decay). Reading ``info.finite`` is one host sync
    per call, like ``GradScaler.step``; it happens here, outside a compiled step.

    With ``scaler`` (an enabled ``torch.amp.GradScaler``; the losses went through
    :func:`amp_scale` with it), ``scaler.step(optimizer)`` replaces ``optimizer.step()``: it
    unscales ``.grad``, skips the step if it finds inf or NaN, and records that for
    ``scaler.update()``, which you call after it as usual. A step IMTL found not finite (e.g. a
    Gramian that overflowed at this scale) is reported to the scaler as an overflow (an inf
    ``.grad`` on the first parameter), so it is skipped and the scale backs off as for any
    overflow.

    Args:
        optimizer: a ``torch.optim.Optimizer`` holding every leaf of both pytrees.
        result: the :class:`StepResult` of ``step(shared_params, task_params, state, ...)``.
        shared_params: the shared parameters, a pytree of leaf tensors.
        task_params: the task-specific parameters (``None`` or an empty pytree if there are none).
        scaler: a ``torch.amp.GradScaler``, or None.

    Returns:
        True if ``optimizer.step()`` ran (a fused optimizer that skips internally on the
        scaler's inf flag counts as having run), False if the step was skipped.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("apply_updates: optimizer must be a torch.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    pairs, finite, scaled = _prepare(result, shared_params, task_params, scaler, "apply_updates")
    _check_held(optimizer, pairs)
    if not scaled:
        if not finite:
            return False
        _write(pairs)
        optimizer.step()
        return True
    assert scaler is not None  # scaled
    _write_or_overflow(pairs, finite)
    ran = scaler_step(scaler, optimizer)  # also when not finite: the scaler records the inf
    return finite and ran


def write_grads(result: StepResult, shared_params: PyTree, task_params: PyTree = None, *,
                scaler: torch.amp.GradScaler | None = None) -> bool:
    """Write a step's gradients into ``.grad`` for an optimizer step that something else runs.

    :func:`apply_updates` without the step: for loops whose ``optimizer.step()`` goes through a
    framework, e.g. PyTorch Lightning's ``opt.step()`` under manual optimization, which runs
    the precision plugin's ``GradScaler`` (unscale, skip on inf, update) itself.

    Returns ``bool(result.info.finite)`` (one host sync). Not finite and no ``scaler``: nothing
    is written; skip the step. Not finite with an enabled ``scaler`` (the losses went through
    :func:`amp_scale` with it): an inf ``.grad`` on the first parameter, so that the scaler's
    step skips and its scale backs off as for any overflow; step anyway, as with
    ``scaler.scale(loss).backward()``. Arguments as for :func:`apply_updates`.
    """
    pairs, finite, scaled = _prepare(result, shared_params, task_params, scaler, "write_grads")
    if scaled:
        _write_or_overflow(pairs, finite)
    elif finite:
        _write(pairs)
    return finite


def _prepare(result: StepResult, shared_params: PyTree, task_params: PyTree,
             scaler: torch.amp.GradScaler | None, where: str
             ) -> tuple[list[tuple[str, Tensor, Tensor]], bool, bool]:
    """Checked ``(where, parameter, gradient)`` pairs, ``info.finite`` read on the host, and
    whether an enabled scaler is in use."""
    if not isinstance(result, StepResult):
        raise TypeError(f"{where}: result must be the StepResult a step returned, got "
                        f"{type(result).__name__}")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"{where}: scaler must be a torch.amp.GradScaler or None, got "
                        f"{type(scaler).__name__}")
    pairs = (_pairs(shared_params, result.grads.shared, "shared_params", where)
             + _pairs(task_params, result.grads.task, "task_params", where))
    if not pairs:
        raise ValueError(f"{where}: shared_params and task_params hold no tensor")
    finite = bool(result.info.finite)  # the one host sync
    scaled = scaler is not None and scaler.is_enabled()
    if scaler is not None and scaled:  # creates the scale if amp_scale had a number
        scaler.scale(torch.ones((), device=pairs[0][1].device))
    return pairs, finite, scaled


def _write_or_overflow(pairs: list[tuple[str, Tensor, Tensor]], finite: bool) -> None:
    """The gradients, or an inf on the first parameter that a GradScaler reads as an overflow."""
    if finite:
        _write(pairs)
    else:
        first = pairs[0][1]
        first.grad = torch.full_like(first, float("inf"))


def scaler_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """``scaler.step(optimizer)``; True if it called ``optimizer.step()``."""
    ran: list[bool] = []
    handle = optimizer.register_step_post_hook(lambda *_: ran.append(True))
    try:
        scaler.step(optimizer)
    finally:
        handle.remove()
    return bool(ran)


def _pairs(params: PyTree, grads: PyTree, name: str, caller: str
           ) -> list[tuple[str, Tensor, Tensor]]:
    """``(where, parameter, gradient)`` for the leaves of two pytrees of the same structure."""
    paths, p_leaves, p_spec = optree.tree_flatten_with_path(params, none_is_leaf=False)
    g_leaves, g_spec = optree.tree_flatten(grads, none_is_leaf=False)
    if p_spec != g_spec:
        raise ValueError(f"{caller}: {name} must have the structure of the gradients the "
                         f"step returned for it; got {p_spec} for gradients {g_spec}")
    wheres = [name + "".join(f"[{k!r}]" for k in path) for path in paths]
    for where, p in zip(wheres, p_leaves, strict=True):
        if not isinstance(p, Tensor) or not p.is_leaf:
            raise ValueError(f"{caller}: {where} is not a leaf tensor; pass the optimizer's "
                             "parameters themselves (e.g. dict(module.named_parameters())), not "
                             "tensors computed from them")
    return list(zip(wheres, p_leaves, g_leaves, strict=True))


def _check_held(optimizer: torch.optim.Optimizer,
                pairs: list[tuple[str, Tensor, Tensor]]) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for where, p, _ in pairs:
        if id(p) not in held:
            raise ValueError(f"apply_updates: {where} (shape {tuple(p.shape)}) is not in the "
                             "optimizer's param_groups; build the optimizer over every tensor "
                             "of shared_params and task_params")


def _write(pairs: list[tuple[str, Tensor, Tensor]]) -> None:
    for _, p, g in pairs:
        p.grad = g.detach()

