"""The gate: the one place that decides whether a step is finite.

A step (or a bare transform update) proposes new weights, a new state and gradients; the gate
checks the losses, the loss scales ``e^{s}``, the Gramian, the combined gradients and the
proposed state. If anything is not finite, nothing moves: the gradients come back as zeros (never
NaN), the state is the old one, and ``info`` says what was not finite and for which tasks.
Branch-free (``torch.where``), so it traces under ``torch.compile``. With data parallelism every
input is already a sum or mean over the replicas, so every replica reaches the same verdict.
"""

from __future__ import annotations

from typing import Any

import torch

from imtl_func._transform import IMTLState, Info, NonFinite, Proposal
from imtl_func._tree import PyTree, all_finite, where, zeros_where_not

__all__ = ["gate"]


def gate(proposal: Proposal, state: IMTLState, grads: PyTree = None
         ) -> tuple[Any, IMTLState, Info]:
    """Accept ``proposal`` (and ``grads``) if everything is finite, else keep ``state``.

    Args:
        proposal: what the transform proposed for this step.
        state: the state before the step.
        grads: the combined gradients (any pytree), or None.

    Returns:
        ``(grads, state, info)``: ``grads`` as given or zeros, the proposed or the old state, and
        the proposal's :class:`Info` with ``finite`` and ``nonfinite`` filled in.
    """
    num_tasks = proposal.info.scale.shape[0]
    bad_losses = ~torch.isfinite(proposal.losses)
    bad_scales = ~torch.isfinite(proposal.info.scale)
    if proposal.gramian is None:
        bad_gramian = torch.zeros_like(bad_scales)
    else:
        bad = ~torch.isfinite(proposal.gramian)
        # A task whose own entry K_tt is not finite is to blame for its whole row; rows with a
        # bad entry count only when no diagonal entry explains it (an overflowing product).
        diagonal = bad.diagonal()
        bad_gramian = diagonal | (bad.any(1) & ~diagonal.any())
    bad_grads = ~all_finite(grads).to(bad_scales.device)
    bad_state = ~all_finite(proposal.state).to(bad_scales.device)
    finite = ~(bad_losses.any() | bad_scales.any() | bad_gramian.any() | bad_grads | bad_state)
    nonfinite = NonFinite(bad_losses[:num_tasks], bad_scales, bad_gramian, bad_grads, bad_state)
    info = proposal.info._replace(finite=finite, nonfinite=nonfinite)
    grads = None if grads is None else zeros_where_not(finite, grads)
    return grads, where(finite, proposal.state, state), info


