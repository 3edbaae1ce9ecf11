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
from imtl_func._tree import PyTree, leaf_sums, where, zeros_where_not

__all__ = ["gate"]


def gate(proposal: Proposal, state: IMTLState, grads: PyTree = None, *, owned: bool = False
         ) -> tuple[Any, IMTLState, Info]:
    """Accept ``proposal`` (and ``grads``) if everything is finite, else keep ``state``.

    Args:
        proposal: what the transform proposed for this step.
        state: the state before the step.
        grads: the combined gradients (any pytree), or None.
        owned: ``grads`` are fresh tensors that nobody else holds (the step's own backward):
            they are zeroed in place and returned.

    Returns:
        ``(grads, state, info)``: ``grads`` as given or zeros, the proposed or the old state, and
        the proposal's :class:`Info` with ``finite`` and ``nonfinite`` filled in.
    """
    num_tasks = proposal.info.scale.shape[0]
    device = proposal.info.scale.device
    k = proposal.gramian
    grad_sums, state_sums = leaf_sums(grads, device), leaf_sums(proposal.state, device)
    # One finiteness test of everything, then views of it: the sum of a gradient or state
    # leaf is not finite as soon as one of its elements is not.
    parts = [proposal.losses, proposal.info.scale, *([] if k is None else [k.reshape(-1)])]
    sums = grad_sums + state_sums
    parts.append(torch.stack(sums) if sums else proposal.losses.new_zeros(0))
    bad = ~torch.isfinite(torch.cat(parts))
    pieces = bad.split([x.shape[0] for x in parts[:-1]] + [len(grad_sums), len(state_sums)])
    bad_losses, bad_scales = pieces[0], pieces[1]
    if k is None:
        bad_gramian = torch.zeros_like(bad_scales)
    else:
        bad_k = pieces[2].reshape(num_tasks, num_tasks)
        # A task whose own entry K_tt is not finite is to blame for its whole row; rows with a
        # bad entry count only when no diagonal entry explains it (an overflowing product).
        diagonal = bad_k.diagonal()
        bad_gramian = diagonal | (bad_k.any(1) & ~diagonal.any())
    bad_grads, bad_state = pieces[-2].any(), pieces[-1].any()
    finite = ~bad.any()
    nonfinite = NonFinite(bad_losses[:num_tasks], bad_scales, bad_gramian, bad_grads, bad_state)
    info = proposal.info._replace(finite=finite, nonfinite=nonfinite)
    grads = None if grads is None else zeros_where_not(finite, grads, in_place=owned)
    return grads, where(finite, proposal.state, state), info


