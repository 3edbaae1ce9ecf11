"""What exact gradient accumulation carries between micro-batches (see :mod:`._accumulate`):
the running sums of pass 1, the plan between the passes, micro-batch weights and the random
generators' state that pass 2 replays."""

from __future__ import annotations

from typing import Any, NamedTuple, overload

import torch
from torch import Tensor

from imtl_func import _checks
from imtl_func._transform import IMTLState, Info, Proposal

__all__ = ["AccumulatedStats", "AccumulationPlan", "add", "as_weight", "rng_state", "set_rng_state"]


class AccumulatedStats(NamedTuple):
    """Running sums of pass 1 over the micro-batches seen so far.

    Attributes:
        weight: ``[]`` float64, ``W = Σ_m w_m``.
        losses: ``[T]`` ``Σ_m w_m ℓ_m`` (the raw task losses), in the losses' dtype.
        extra: ``[]`` ``Σ_m w_m extra_m`` of a :class:`~imtl_func.Losses` ``extra``, or None.
        gramian: ``[T, T]`` ``Σ_m w_m² K_m`` of the feature-level task gradients (with the loss
            scales for per-task decoders), in the Gramian's dtype; None when the weighting needs
            no Gramian.

    Every sum is added in float64 and stored in the dtype one micro-batch gives.
    """

    weight: Tensor
    losses: Tensor
    extra: Tensor | None
    gramian: Tensor | None


class AccumulationPlan(NamedTuple):
    """The big batch's weights, between the two passes.

    Attributes:
        info: the :class:`~imtl_func.Info` the step will report, pre-gated on the statistics
            alone: ``info.finite`` is False when the big batch's losses, scales, Gramian or new
            state are not finite (pass 2 can then be skipped: the step will be skipped anyway).
            :meth:`Accumulator.finish` gates again with the gradients.
        state: the state the step started from (kept when the gate trips).
        weight: ``[]`` float64, ``W = Σ_m w_m``.
        proposal: the transform's proposal (weights, new state) that :meth:`~Accumulator.finish`
            gates.
        replicas: the number of replicas with a ``reduce`` (None without).
    """

    info: Info
    state: IMTLState
    weight: Tensor
    proposal: Proposal
    replicas: Tensor | None


def as_weight(value: Any, device: torch.device) -> Tensor:
    """A micro-batch weight as a float64 ``[]`` tensor on ``device``."""
    value = _checks.micro_batch_weight(value)
    if isinstance(value, Tensor):
        return value.detach().to(device=device, dtype=torch.float64)
    return torch.tensor(value, dtype=torch.float64, device=device)


@overload
def add(total: Tensor | None, x: Tensor, factor: Tensor) -> Tensor: ...


@overload
def add(total: Tensor | None, x: Tensor | None, factor: Tensor) -> Tensor | None: ...


def add(total: Tensor | None, x: Tensor | None, factor: Tensor) -> Tensor | None:
    """``total + factor · x``, computed in float64, stored in ``x``'s dtype."""
    if x is None:
        return None
    new = factor * x.detach().to(torch.float64)
    if total is not None:
        new = total.to(torch.float64) + new
    return new.to(x.dtype)


def rng_state() -> tuple[Tensor, list[Tensor] | None]:
    """The random generators' states (CPU, and CUDA once initialised)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.random.get_rng_state(), cuda


def set_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    torch.random.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])
