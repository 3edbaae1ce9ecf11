"""Where :class:`imtl_func.nn.IMTL` keeps its state: the log-scales and the transform's state.

With a method name the log-scales are an ``nn.Parameter`` the user's optimizer trains (sized at
construction or, lazily, by the first call); with a Transform they are a buffer the module moves
with the transform's scale rule, next to the rule's and the weighting's state as buffers. Both
save to and load from a ``state_dict`` that ``torch.load(weights_only=True)`` reads, also before
the first call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optree
import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from imtl_func import _checks
from imtl_func._transform import IMTLState, Info, Transform

__all__ = ["ScaleState"]


class ScaleState(nn.Module):
    """The state half of :class:`imtl_func.nn.IMTL` (a base class, not used alone)."""

    log_scale: Tensor | None
    _tx: Transform
    _owns_rule: bool
    _num_losses: int | None
    info: Info | None

    def _init_scales(self, num_losses: int | None,
                     init_loss: Sequence[float] | Tensor | None) -> None:
        """Create the log-scales (a parameter, a buffer or None) and the transform's state."""
        self._state_spec: Any = None
        dtype = torch.get_default_dtype()
        if self._owns_rule:
            if num_losses is None:
                raise ValueError("IMTL with a Transform needs num_losses (or init_loss): the "
                                 "transform's state is created with the module")
            state = self._tx.init(num_losses, log_scale=init_loss, dtype=dtype)
            if self._tx.learns_scales:
                self.register_buffer("log_scale", state.log_scale)
            else:
                self.register_parameter("log_scale", None)
            tree: Any = (state.rule_state, state.weighting_state)
            parts: list[Tensor]
            parts, self._state_spec = optree.tree_flatten(tree, none_is_leaf=False)
            for i, x in enumerate(parts):
                self.register_buffer(f"_state_{i}", x)
        elif not self._tx.learns_scales:
            self.register_parameter("log_scale", None)
        elif num_losses is None:
            # torch's stub annotates UninitializedParameter.__new__ as returning None.
            self.log_scale = UninitializedParameter(dtype=dtype)  # type: ignore[call-arg]
        else:
            state = self._tx.init(num_losses, log_scale=init_loss, dtype=dtype)
            self.log_scale = nn.Parameter(state.log_scale)

    @property
    def num_losses(self) -> int | None:
        """T, or None while the module waits for its first call to size itself."""
        return self._num_losses

    @property
    def finite(self) -> bool:
        """False when the last call met a non-finite loss or gradient (and wrote no ``.grad``)."""
        return self.info is None or bool(self.info.finite)

    def _size(self, num_losses: int) -> None:
        if self._num_losses is None:
            _checks.num_tasks(num_losses)
            self._num_losses = num_losses
            if isinstance(self.log_scale, UninitializedParameter):
                self.log_scale.materialize((num_losses,))
                with torch.no_grad():
                    self.log_scale.zero_()
        elif num_losses != self._num_losses:
            raise ValueError(f"IMTL got {num_losses} losses but was built for {self._num_losses}; "
                             "pass every task's loss on every call (set requires_grad=False, "
                             "e.g. with .detach(), to skip a task)")

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str,
                            keep_vars: bool) -> None:
        if isinstance(self.log_scale, UninitializedParameter):
            # Unsized: an empty tensor, which torch.load(weights_only=True) can read.
            destination[prefix + "log_scale"] = torch.empty(0, dtype=self.log_scale.dtype)
            return
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        key = prefix + "log_scale"
        incoming = state_dict.get(key)
        if isinstance(incoming, Tensor) and self.log_scale is not None:
            lazy_in = isinstance(incoming, UninitializedParameter) or incoming.shape == (0,)
            lazy_here = isinstance(self.log_scale, UninitializedParameter)
            if lazy_in and lazy_here:
                return
            if lazy_in:
                raise RuntimeError(f"{key}: cannot load the scales of an unsized IMTL module into "
                                   f"one sized for {self._num_losses} losses")
            if lazy_here and incoming.dim() == 1:
                self._size(incoming.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _state(self, like: Tensor) -> IMTLState:
        """The whole [T] state: the log-scales (zeros without scales) and, with a Transform,
        the rule's and the weighting's state from the buffers."""
        s = (torch.zeros(like.shape[0], dtype=torch.promote_types(like.dtype, torch.float32),
                         device=like.device)
             if self.log_scale is None else self.log_scale.detach())
        if self._owns_rule:
            parts = [getattr(self, f"_state_{i}") for i in range(self._state_spec.num_leaves)]
            rule_state, w_state = self._state_spec.unflatten(parts)
            return IMTLState(s, rule_state, w_state)
        fresh = self._tx.init(s.shape[0], dtype=s.dtype, device=s.device)
        return fresh._replace(log_scale=s)

    @torch.no_grad()
    def _store(self, state: IMTLState) -> None:
        if self.log_scale is not None:
            self.log_scale.copy_(state.log_scale)
        tree: Any = (state.rule_state, state.weighting_state)
        parts: list[Tensor] = optree.tree_leaves(tree, none_is_leaf=False)
        for i, x in enumerate(parts):
            getattr(self, f"_state_{i}").copy_(x)
