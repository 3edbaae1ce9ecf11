"""A stateful IMTL module for ordinary PyTorch loops (``loss.backward()`` and ``torch.optim``).

:class:`IMTL` keeps the usage of the original IMTL module: it holds the IMTL-L log-scales as an
``nn.Parameter`` that the user's optimizer trains next to the network, and one call writes every
gradient into ``.grad``::

    imtl = IMTL(method="hybrid", num_losses=5).to(device)
    optimizer = torch.optim.Adam(itertools.chain(net.parameters(), imtl.parameters()), lr=1e-3)
    z = net.encoder(x)
    losses = [l1, l2, l3, l4, l5]
    shared, specific = imtl(z, losses)        # feature level: task gradients w.r.t. z
    # or: imtl.backward(shared_parameters=net.encoder.parameters(), losses=losses)
    optimizer.step(); optimizer.zero_grad()

The math is the functional core's: :func:`imtl_func.gramian` of the task gradients and
the weighting of ``imtl_func.preset(method)`` (or of the given transform) for the weights, through
the same finiteness gate as the steps. The module only moves tensors between the
existing autograd graph and the core: one batched backward pass (``is_grads_batched=True``) gives
all T task gradients, one ``torch.autograd.backward`` writes the result.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from imtl_func import _checks
from imtl_func._gate import gate
from imtl_func._optim import scaler_step
from imtl_func._pipeline import rows_gramian, weigh
from imtl_func._presets import preset
from imtl_func._reduce import Reduce
from imtl_func._scales import log_scale_bound, scale_frozen, scale_losses
from imtl_func._transform import IMTLState, Info, Transform, transform
from imtl_func._tree import contract

__all__ = ["IMTL", "IMTLOutput"]


class IMTLOutput(NamedTuple):
    """What one :class:`IMTL` call returns: detached values for logging (no autograd graph).

    Unpacks as a pair (``shared, specific = imtl(z, losses)`` or
    ``grad_loss, scaled_losses = imtl.backward(...)``).

    Attributes:
        grad_loss: ``[]`` ``Σ_t α_t L_t`` over the active tasks, where ``L_t`` is the scaled loss
            below and ``α`` the IMTL-G weights (ones for 'loss'). Its gradient with respect to the
            shared parameters, ``α`` held constant, is what they received (the feature-level call
            back-propagates it through ``z``).
        scaled_losses: ``[T]`` ``L_t = e^{s_t} ℓ_t − s_t`` with the log-scales before the optimizer
            step (the raw ``ℓ_t`` for 'gradient'), for every task, skipped ones included. The
            heads received ``∇ Σ_t L_t``.
    """

    grad_loss: Tensor
    scaled_losses: Tensor


def _flat_tensors(tree: Any, name: str) -> list[Tensor]:
    """Tensors of a tensor, a mapping or a (nested) iterable of them, in order, without repeats.

    ``[model.parameters()]`` (a list holding a generator) is accepted, as in the original README.
    """
    out: list[Tensor] = []
    seen: set[int] = set()

    def visit(x: Any) -> None:
        if isinstance(x, Tensor):
            if id(x) not in seen:
                seen.add(id(x))
                out.append(x)
        elif isinstance(x, Mapping):
            for v in x.values():
                visit(v)
        elif isinstance(x, Iterable) and not isinstance(x, (str, bytes)):
            for v in x:
                visit(v)
        else:
            raise TypeError(f"{name} must hold only tensors, found {type(x).__name__}")

    visit(tree)
    return out


def _reached(roots: Sequence[Tensor], targets: Sequence[Tensor]) -> list[bool]:
    """Whether the autograd graph of ``roots`` leads to each target tensor.

    A non-leaf target is found by its ``grad_fn``, a leaf by its ``AccumulateGrad`` node. Reads
    the graph only (no backward pass), so it can validate the inputs before any ``.grad`` is
    touched.
    """
    by_node = {id(t.grad_fn): i for i, t in enumerate(targets) if t.grad_fn is not None}
    by_leaf = {id(t): i for i, t in enumerate(targets) if t.grad_fn is None}
    found = [False] * len(targets)
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if id(node) in by_node:
            found[by_node[id(node)]] = True
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in by_leaf:
            found[by_leaf[id(variable)]] = True
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


class IMTL(nn.Module):
    """Impartial Multi-Task Learning (Liu et al., ICLR 2021) as a module for ordinary loops.

    A call computes the IMTL gradients and accumulates them into ``.grad``, like ``backward()``:

    * shared parameters: the IMTL-G combination ``Σ_t α_t e^{s_t} ∇ℓ_t`` ('hybrid'),
      ``Σ_t α_t ∇ℓ_t`` ('gradient') or ``Σ_t e^{s_t} ∇ℓ_t`` ('loss');
    * every other parameter the losses depend on (the heads): ``Σ_t e^{s_t} ∇ℓ_t``
      (``Σ_t ∇ℓ_t`` for 'gradient'), i.e. each head its own (scaled) task gradient;
    * the log-scales :attr:`log_scale`: ``e^{s_t} ℓ_t − 1`` (what autograd gives for
      ``L_t = e^{s_t} ℓ_t − s_t``), so the user's optimizer trains them.

    Two call styles:

    * ``imtl(z, losses)``, feature level (the paper's practice): ``α`` from the task gradients
      with respect to the shared feature ``z`` (flattened over the whole batch and every tensor
      of ``z``); the encoder receives ``J_zᵀ Σ_t α_t g_t``. Parameters that reach a loss without
      passing through ``z`` receive ``Σ_t e^{s_t} ∇ℓ_t`` like the heads.
    * ``imtl.backward(shared_parameters=..., losses=...)``, parameter level: ``α`` from the task
      gradients with respect to the shared parameters themselves (exact, a ``T × |θ|``
      Jacobian).

    Losses whose ``requires_grad`` is False are skipped: they get no gradient, their scale gets a
    zero gradient, and ``α`` is computed over the active tasks only (as if the skipped tasks were
    not in the list). A zero gradient leaves a scale unchanged under SGD and under Adam from a
    fresh state; an optimizer with accumulated momentum or weight decay still moves it. With
    every loss skipped (e.g. under ``torch.no_grad()``), a call only returns the logging values.

    If a loss or a task gradient is not finite, nothing is written to ``.grad``, a
    ``RuntimeWarning`` is issued and :attr:`finite` is False: skip ``optimizer.step()`` for that
    batch (:meth:`step` does; with ``zero_grad(set_to_none=True)``, torch's default, a step
    over ``None`` gradients does nothing for the parameters IMTL would have updated). The
    check covers the losses and the task gradients the module computes ('loss' computes none);
    a NaN produced inside the network's own backward from finite losses reaches ``.grad`` as
    it would with ``loss.backward()``.

    The shared tensors (``z`` or the shared parameters) get their gradient through a tensor hook
    that replaces what arrives through the heads by the IMTL combination: a tensor hook the user
    registered on those same tensors with ``register_hook`` sees the head-path gradient and its
    result is replaced. Post-accumulate-grad hooks (DDP, optimizer-in-backward) see the IMTL
    gradient as usual.

    The returned values are detached numbers for logging (:class:`IMTLOutput`); the backward
    pass has already run, so do not call ``backward()`` on them.

    ``imtl.step(optimizer)`` steps the optimizer unless the last call was not finite (then
    parameters, moments and step counts stay as they were), in one call.

    float16 mixed precision: pass ``grad_scaler=torch.amp.GradScaler(...)``. The module's own
    backward then runs with its cotangents multiplied by the scaler's scale ``S`` (what
    ``scaler.scale(loss).backward()`` does), so every ``.grad`` it writes is ``S`` times the
    gradient, ready for ``scaler.step(optimizer)`` (or ``imtl.step(optimizer)``) and
    ``scaler.update()``. ``α`` and :attr:`info` are those of the unscaled task gradients, the
    loss scales learn from the raw losses (``log_scale.grad`` is ``S (e^{s} ℓ − 1)``, which
    ``unscale_`` brings back to ``e^{s} ℓ − 1``), and a call that is not finite (e.g. task
    gradients that overflow at this scale) writes NaN gradients instead of none, without a
    warning: the scaler skips the step and backs off, as for any overflow. A module with a
    Transform moves its scales in the call, when IMTL's part is finite, even if the scaler
    later skips the step for an overflow elsewhere.

    Args:
        method: ``'hybrid'`` (IMTL, the paper's Algorithm 1; default), ``'gradient'`` (IMTL-G, no
            parameters), ``'loss'`` (IMTL-L) or ``'equal'``: the log-scales, if any, are an
            ``nn.Parameter`` your optimizer trains. Or a :class:`imtl_func.Transform` (a
            weighting and a scale rule): its weighting combines the gradients and the module
            moves the log-scales itself with its scale rule (they are then a buffer, with the
            rule's state; ``num_losses`` or ``init_loss`` is required).
        num_losses: number of tasks T. ``None``: taken from ``init_loss`` or, if that is None
            too, from the first call (the log-scale parameter exists from construction, so an
            optimizer can be built before the first call).
        init_loss: initial log-scales ``s`` (T numbers); default zeros, as in the paper.
        retain_graph: keep the autograd graph after the call (default True), so that losses
            sharing it (``other_loss.backward()``) can still be back-propagated.
        reduce: data parallelism (feature-level calls): ``reduce(x)`` sums a 1-D tensor over the
            replicas, e.g. :func:`imtl_func.distributed.all_sum`. The local Gramian and losses
            are summed in one reduction, so α, the scale gradient and :attr:`finite` are those
            of the global batch and the same on every rank; the network's gradients are left to
            ``DistributedDataParallel`` (one backward through it per call).
        grad_scaler: a ``torch.amp.GradScaler`` for float16 mixed precision (see above); the
            module reads its scale on every call and never calls its ``step`` or ``update``
            itself, except through :meth:`step`. A disabled scaler is ignored.

    Attributes:
        log_scale: ``[T]`` log-scales ``s``: an ``nn.Parameter`` with a method name, a buffer
            with a Transform, ``None`` without loss scales.
        info: the core's :class:`imtl_func.Info` of the last call, over its active tasks
            (``None`` before the first call and when every loss was skipped).
        active: per task, whether the last call used it (``requires_grad`` True).
    """

    log_scale: Tensor | None

    def __init__(
        self,
        method: str | Transform = "hybrid",
        num_losses: int | None = None,
        init_loss: Sequence[float] | Tensor | None = None,
        *,
        retain_graph: bool = True,
        reduce: Reduce | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        super().__init__()
        self.retain_graph = bool(retain_graph)
        self._reduce = reduce
        if grad_scaler is not None and not isinstance(grad_scaler, torch.amp.GradScaler):
            raise TypeError("grad_scaler must be a torch.amp.GradScaler or None, got "
                            f"{type(grad_scaler).__name__}")
        self.grad_scaler = grad_scaler
        self._owns_rule = isinstance(method, Transform)
        if isinstance(method, Transform):
            self.method = "transform"
            self._tx = method
        else:
            named = preset(method)
            self.method = method
            # The optimizer trains the scales: the transform only reads them.
            self._tx = transform(named.weighting, scale_frozen() if named.learns_scales else None)
        if num_losses is not None:
            _checks.num_tasks(num_losses)
        if init_loss is not None:
            if not self._tx.learns_scales:
                raise ValueError(f"method={self.method!r} has no loss scales: init_loss must be "
                                 "None")
            size = len(init_loss)
            if num_losses is not None and size != num_losses:
                raise ValueError(f"init_loss has {size} entries but num_losses={num_losses}")
            num_losses = size
        self._num_losses = num_losses
        self.info: Info | None = None
        self.active: tuple[bool, ...] = ()
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
            parts, self._state_spec = optree.tree_flatten(
                (state.rule_state, state.weighting_state), none_is_leaf=False)
            for i, x in enumerate(parts):
                self.register_buffer(f"_state_{i}", x)
        elif not self._tx.learns_scales:
            self.register_parameter("log_scale", None)
        elif num_losses is None:
            self.log_scale = UninitializedParameter(dtype=dtype)
        else:
            state = self._tx.init(num_losses, log_scale=init_loss, dtype=dtype)
            self.log_scale = nn.Parameter(state.log_scale)

    # ------------------------------------------------------------------ size and state_dict

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

    def extra_repr(self) -> str:
        return f"method={self.method!r}, num_losses={self._num_losses}"

    # ------------------------------------------------------------------ calls

    def forward(self, z: Tensor | Sequence[Tensor], losses: Sequence[Tensor] | Tensor
                ) -> IMTLOutput:
        """Feature-level IMTL: task gradients with respect to the shared feature ``z``.

        Args:
            z: the shared feature (encoder output before pooling/heads), a tensor or a sequence
                of tensors, part of the autograd graph of ``losses``.
            losses: T raw task losses, scalar tensors (or a ``[T]`` tensor).

        Returns:
            :class:`IMTLOutput` (detached). The gradients are already in ``.grad``.
        """
        return self._step(_flat_tensors(z, "z"), losses, "the feature z")

    def backward(self, shared_parameters: Any, losses: Sequence[Tensor] | Tensor) -> IMTLOutput:
        """Parameter-level IMTL: task gradients with respect to the shared parameters.

        Args:
            shared_parameters: the shared parameters (an iterable such as
                ``net.encoder.parameters()``, possibly nested, or a dict). Parameters with
                ``requires_grad=False`` are ignored.
            losses: T raw task losses, scalar tensors (or a ``[T]`` tensor).

        Returns:
            :class:`IMTLOutput` (detached). The gradients are already in ``.grad``.
        """
        if self._reduce is not None and self._tx.needs_gramian:
            raise NotImplementedError(
                "IMTL(reduce=...).backward: the parameter-level Gramian needs the all-reduced "
                "T × |θ| Jacobian; call the module on the shared feature (imtl(z, losses)) or use "
                "imtl_func.value_and_grad(..., reduce=...)")
        params = [p for p in _flat_tensors(shared_parameters, "shared_parameters")
                  if p.requires_grad]
        if not params:
            raise ValueError("shared_parameters holds no tensor that requires grad")
        return self._step(params, losses, "shared parameter")

    def _step(self, targets: list[Tensor], losses: Sequence[Tensor] | Tensor,
              what: str) -> IMTLOutput:
        items = _loss_items(losses)
        self._size(len(items))
        active = [bool(x.requires_grad) for x in items]
        self.active = tuple(active)
        values = torch.stack([x.detach().reshape(()) for x in items])
        state = self._state(values)
        _checks.same_device(values, state.log_scale)
        # The scales the step uses: e^{s} with s within the bound for the losses' dtype.
        bound = log_scale_bound(values.dtype)
        scaled = scale_losses(values.to(state.log_scale.dtype),
                              state.log_scale.clamp(-bound, bound))
        if not any(active):
            self.info = None
            return IMTLOutput(values.new_zeros(()).to(scaled.dtype), scaled)

        idx = torch.tensor([i for i, a in enumerate(active) if a], device=values.device)
        vector = torch.stack([x.reshape(()) for x, a in zip(items, active, strict=True) if a])
        _check_reached(vector, targets, what)
        num_tasks = vector.shape[0]
        sub = _take(state, idx, len(items))
        amp = self._amp_scale(vector)
        rows, k = None, None
        if self._tx.needs_gramian:
            eye = torch.eye(num_tasks, dtype=vector.dtype, device=vector.device)
            if amp is not None:  # a diagonal of S, cast once (S·0 in float16 could be NaN)
                eye = torch.diag(amp.expand(num_tasks)).to(vector.dtype)
            rows = torch.autograd.grad(vector, targets, grad_outputs=eye, retain_graph=True,
                                       is_grads_batched=True, allow_unused=True,
                                       materialize_grads=True)
            k = rows_gramian(rows, num_tasks)
            if amp is not None:  # the Gramian of the unscaled rows: info as without AMP
                k = k / amp.to(k.dtype) / amp.to(k.dtype)
        proposal, _ = weigh(self._tx, sub, vector.detach(), num_tasks, k, self._reduce)
        shared = None if rows is None else contract(proposal.weights.shared, rows)
        shared, new_sub, info = gate(proposal, sub, shared)
        self.info = info
        grad_loss = (info.alpha.to(scaled.dtype) * scaled[idx]).sum()
        out = IMTLOutput(grad_loss, scaled)
        if not bool(info.finite):
            if amp is not None:
                # Tell the scaler as an overflowing backward would: NaN in .grad, so that
                # scaler.step skips the step and scaler.update backs off.
                torch.autograd.backward([vector], [torch.full_like(vector, float("nan"))],
                                        retain_graph=self.retain_graph)
                return out
            warnings.warn("IMTL: a loss, a loss scale or a task gradient is not finite; no .grad "
                          "was written and the scales did not move. Skip optimizer.step() for "
                          "this batch.", RuntimeWarning, stacklevel=3)
            return out
        if self._owns_rule:
            self._store(_put(state, new_sub, idx, len(items)))

        roots = [vector]
        cotangents = [_amp(proposal.weights.task, amp).to(device=vector.device,
                                                          dtype=vector.dtype)]
        if (self.log_scale is not None and self.log_scale.requires_grad
                and not self._owns_rule):
            roots.append(self.log_scale)
            # S·(e^s ℓ − 1): the scaler's unscale_ of .grad leaves e^s ℓ − 1 of the raw losses.
            cotangents.append(_amp(torch.zeros_like(state.log_scale).index_copy(
                0, idx, info.scale_grad), amp))
        hooks = []
        if shared is not None:
            # The shared tensors receive exactly Σ_t w_shared[t] ∇ℓ_t: a hook replaces whatever
            # reaches them through the heads (Σ_t w_task[t] ∇ℓ_t) by the IMTL combination.
            for target, grad in zip(targets, shared, strict=True):
                hooks.append(target.register_hook(lambda _, grad=grad: grad))
        try:
            torch.autograd.backward(roots, cotangents, retain_graph=self.retain_graph)
        finally:
            for hook in hooks:
                hook.remove()
        return out

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step ``optimizer`` unless the last call was not finite; True if it stepped.

        Without a ``grad_scaler``: ``optimizer.step()`` if :attr:`finite`, else nothing (a step
        over the unchanged ``.grad`` would still move parameters under momentum, Adam's moments
        or weight decay, and count a step). With one: ``grad_scaler.step(optimizer)``, which
        unscales ``.grad`` and skips the step on inf or NaN (a call that was not finite wrote
        NaN); call ``grad_scaler.update()`` after it as usual. Reads :attr:`finite` on the
        host (one sync, like ``GradScaler.step``).
        """
        scaler = self.grad_scaler
        if scaler is not None and scaler.is_enabled():
            ran = scaler_step(scaler, optimizer)
            return ran and self.finite
        if not self.finite:
            return False
        optimizer.step()
        return True

    def _amp_scale(self, like: Tensor) -> Tensor | None:
        """The scaler's current scale ``S`` as a ``[]`` float32 tensor (no host sync), or None."""
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        return scaler.scale(torch.ones((), dtype=torch.float32, device=like.device))

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
        parts = optree.tree_leaves((state.rule_state, state.weighting_state), none_is_leaf=False)
        for i, x in enumerate(parts):
            getattr(self, f"_state_{i}").copy_(x)


def _amp(cotangent: Tensor, amp: Tensor | None) -> Tensor:
    """``S · cotangent`` computed in float32 at least, or the cotangent."""
    if amp is None:
        return cotangent
    return cotangent.to(torch.promote_types(cotangent.dtype, torch.float32)) * amp


def _take(tree: Any, idx: Tensor, size: int) -> Any:
    """The active tasks' part of every ``[T, ...]`` leaf; other leaves (step counts) as they are."""
    return optree.tree_map(lambda x: x[idx] if x.dim() > 0 and x.shape[0] == size else x, tree,
                           none_is_leaf=False)


def _put(full: Any, part: Any, idx: Tensor, size: int) -> Any:
    """``full`` with the active tasks' rows replaced by ``part`` (inverse of :func:`_take`)."""
    return optree.tree_map(
        lambda f, p: f.index_copy(0, idx, p) if f.dim() > 0 and f.shape[0] == size else p,
        full, part, none_is_leaf=False)


def _loss_items(losses: Sequence[Tensor] | Tensor) -> list[Tensor]:
    """The task losses as a list of one-element floating tensors, with clear errors."""
    if isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError(f"losses as a tensor must have shape [T], got {tuple(losses.shape)}")
        items = list(losses.unbind(0))
    elif isinstance(losses, Sequence) and not isinstance(losses, (str, bytes)):
        items = list(losses)
    else:
        raise TypeError(f"losses must be a list of scalar tensors, got {type(losses).__name__}")
    if not items:
        raise ValueError("losses is empty: pass one scalar loss per task")
    for i, x in enumerate(items):
        if not isinstance(x, Tensor):
            raise TypeError(f"losses[{i}] must be a scalar tensor, got {type(x).__name__}")
        if x.numel() != 1:
            raise ValueError(f"losses[{i}] must be a scalar, got shape {tuple(x.shape)}; reduce "
                             "each task's loss to one number (e.g. .mean())")
        if not x.is_floating_point():
            raise TypeError(f"losses[{i}] must be floating point, got dtype {x.dtype}")
    return items


def _check_reached(vector: Tensor, targets: list[Tensor], what: str) -> None:
    """Raise unless every target requires grad and some active loss depends on it."""
    for i, t in enumerate(targets):
        if not t.requires_grad:
            raise ValueError(f"{what} #{i} (shape {tuple(t.shape)}) does not require grad, so no "
                             "loss can depend on it; pass the encoder output itself, not a "
                             "detached copy")
    for i, ok in enumerate(_reached([vector], targets)):
        if not ok:
            raise ValueError(f"no active loss depends on {what} #{i} (shape "
                             f"{tuple(targets[i].shape)}); pass the tensors that lead to the "
                             "losses")
