"""The :class:`IMTL` module: the usage of the original IMTL module on the functional pipeline.

One call: rows of the task gradients at the shared tensors (:mod:`imtl_func.nn._graph`), the
pipeline's ``weigh`` (reduce and propose) and ``gate``, then one ``torch.autograd.backward`` that
writes every ``.grad``. The scales and the transform's state live in :mod:`imtl_func.nn._state`;
data-parallel agreement between ranks in :mod:`imtl_func.nn._ranks`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from imtl_func import _checks, _reduce
from imtl_func._gate import gate
from imtl_func._optim import scaler_step
from imtl_func._pipeline import rows_gramian, weigh
from imtl_func._presets import preset
from imtl_func._scales import log_scale_bound, scale_frozen, scale_losses
from imtl_func._transform import Info, Transform, transform
from imtl_func._tree import contract, put_tasks, take_tasks
from imtl_func.nn._graph import check_reached, task_rows
from imtl_func.nn._ranks import global_statistics
from imtl_func.nn._state import ScaleState

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


class IMTL(ScaleState):
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
    With ``reduce``, the ranks may skip different tasks (e.g. a task whose labels are missing
    from one rank's slice; its loss there may be NaN): a task active on any rank is active,
    its loss is the mean of its losses over the ``R_t`` ranks that computed it and its gradient
    that mean's (the encoder and head cotangents of a rank carry ``R / R_t``, since DDP divides
    by the world size ``R``). Every rank joins the reduction on every call, also with no loss
    active or after an error (which is then raised on every rank), so the ranks never pair
    different collectives; the exception is a call under ``torch.no_grad()`` with no loss
    active, which only returns the logging values (evaluation may run on some ranks only).

    If a loss or a task gradient is not finite, nothing is written to ``.grad``, a
    ``RuntimeWarning`` is issued and :attr:`finite` is False: skip ``optimizer.step()`` for that
    batch (:meth:`step` does; with ``zero_grad(set_to_none=True)``, torch's default, a step
    over ``None`` gradients does nothing for the parameters IMTL would have updated). The
    check covers the losses and the task gradients the module computes ('loss' computes none);
    a NaN produced inside the network's own backward from finite losses reaches ``.grad`` as
    it would with ``loss.backward()``.

    Hooks: a tensor hook registered with ``register_hook`` on ``z`` (or on a shared or head
    parameter) fires once per call, in the backward that writes the gradients, and sees the
    gradient that tensor receives: the IMTL combination ``Σ_t α_t e^{s_t} ∇_z ℓ_t`` for ``z``,
    ``Σ_t e^{s_t} ∇ℓ_t`` for a head's parameter. What it returns replaces that gradient (e.g.
    clipping applies to the combination). While the module computes the task gradients those
    hooks are paused. Post-accumulate-grad hooks (DDP, optimizer-in-backward) see the final
    gradients as usual. A hook on a tensor inside a head fires while the task gradients are
    computed (once with separate heads; once per task for a head the tasks share), with the
    gradient of the scaled losses ``Σ_t e^{s_t} ℓ_t`` (of ``e^{s_t} ℓ_t`` per task).

    Under ``DistributedDataParallel`` pass the ``z`` the heads consume: with
    ``find_unused_parameters=True`` DDP returns copies of its outputs, so a ``z`` returned next
    to the heads' outputs is not on the losses' path (the call raises).

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
            replicas, e.g. :func:`imtl_func.distributed.all_sum`. The local Gramian, losses and
            active tasks are summed in one reduction (``(T² + 2T + 1) · 8`` bytes), so α, the
            scale gradient and :attr:`finite` are those of the global batch and the same on
            every rank; the network's gradients are left to ``DistributedDataParallel`` (one
            backward through it per call).
        grad_scaler: a ``torch.amp.GradScaler`` for float16 mixed precision (see above); the
            module reads its scale on every call and never calls its ``step`` or ``update``
            itself, except through :meth:`step`. A disabled scaler is ignored.

    Attributes:
        log_scale: ``[T]`` log-scales ``s``: an ``nn.Parameter`` with a method name, a buffer
            with a Transform, ``None`` without loss scales.
        info: the core's :class:`imtl_func.Info` of the last call, over its active tasks
            (``None`` before the first call and when every loss was skipped).
        active: per task, whether the last call used it (``requires_grad`` True; with
            ``reduce``, on some rank).
    """

    log_scale: Tensor | None

    def __init__(
        self,
        method: str | Transform = "hybrid",
        num_losses: int | None = None,
        init_loss: Sequence[float] | Tensor | None = None,
        *,
        retain_graph: bool = True,
        reduce: _reduce.Reduce | None = None,
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
        self._init_scales(num_losses, init_loss)

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
        return self._step(_checks.flat_tensors(z, "z"), losses, "the feature z")

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
        params = [p for p in _checks.flat_tensors(shared_parameters, "shared_parameters")
                  if p.requires_grad]
        if not params:
            raise ValueError("shared_parameters holds no tensor that requires grad")
        return self._step(params, losses, "shared parameter")

    def _step(self, targets: list[Tensor], losses: Sequence[Tensor] | Tensor,
              what: str) -> IMTLOutput:
        items = _checks.loss_items(losses)
        self._size(len(items))
        local = [bool(x.requires_grad) for x in items]
        values = torch.stack([x.detach().reshape(()) for x in items])
        state = self._state(values)
        _checks.same_device(values, state.log_scale)
        # The scales the step uses: e^{s} with s within the bound for the losses' dtype.
        bound = log_scale_bound(values.dtype)
        clamped = state.log_scale.clamp(-bound, bound)
        scaled = scale_losses(values.to(state.log_scale.dtype), clamped)
        if not any(local) and (self._reduce is None or not torch.is_grad_enabled()):
            # Logging only; under no_grad with reduce too (evaluation may run on one rank).
            self.active, self.info = tuple(local), None
            return IMTLOutput(scaled.new_zeros(()), scaled)

        # This rank's active tasks: the leaves their losses reach besides the targets (the
        # heads) and, for a weighting of the gradients, their rows and Gramian.
        mine = [i for i, a in enumerate(local) if a]
        mine_items = [items[i] for i in mine]
        graph, rows, k, error = None, None, None, None
        amp = self._amp_scale(values)
        try:
            if mine:
                graph = check_reached(mine_items, targets, what)
            if self._tx.needs_gramian and graph is not None:  # graph: this rank has tasks
                # Rows of the scaled losses c_t ℓ_t (c = e^{s}, known before the update): the
                # heads' gradients then come out of the same backward passes.
                scales = self._tx.loss_scales(state, values.dtype)[mine]
                if amp is not None:  # S·c: every .grad written is S times the gradient
                    scales = scales * amp.to(scales.dtype)
                one_pass = graph.separate and (self._reduce is None or all(
                    len(tasks) == 1 for tasks in graph.leaf_tasks))
                rows = task_rows(mine_items, scales, targets, graph, one_pass)
                k = rows_gramian(rows.rows, len(mine))
                if amp is not None:  # the Gramian of the unscaled rows: α, info as without AMP
                    k = k / amp.to(k.dtype) / amp.to(k.dtype)
        except Exception as exc:
            if self._reduce is None:
                raise
            error = exc          # raised below, on every rank, after the reduction

        # The tasks α is computed over (with reduce: active on some rank) and their statistics.
        if self._reduce is None:
            on, vector, factor = mine, values[mine] if len(mine) < len(items) else values, None
        else:
            on, vector, k, factor = global_statistics(self._reduce, self._tx.needs_gramian,
                                                      values, local, k, targets, error)
        self.active = tuple(i in on for i in range(len(items)))
        if not on:
            self.info = None
            return IMTLOutput(scaled.new_zeros(()), scaled)
        every = len(on) == len(items)
        idx = torch.tensor(on, device=values.device)
        sub = state if every else take_tasks(state, idx, len(items))
        proposal, _ = weigh(self._tx, sub, vector, len(on), k, None, prescaled=True)
        # This rank's tasks' weights (with reduce: × R / R_t, as DDP divides by R).
        w_shared, w_task = (w if factor is None else w * factor for w in proposal.weights)
        if mine != on:
            where = [on.index(i) for i in mine]
            w_shared, w_task = w_shared[where], w_task[where]
            factor = None if factor is None else factor[where]
        shared = None if rows is None else contract(w_shared, rows.rows)
        shared, new_sub, info = gate(proposal, sub, shared)
        self.info = info
        # α over the tasks of this step's losses (with reduce: the global ones)
        scaled_on = scaled if vector is values else scale_losses(
            vector.to(scaled.dtype), clamped if every else clamped[idx])
        grad_loss = (info.alpha.to(scaled.dtype) * scaled_on).sum()
        out = IMTLOutput(grad_loss, scaled)
        if not bool(info.finite):
            if amp is not None:
                # Tell the scaler as an overflowing backward would: NaN in .grad, so that
                # scaler.step skips the step and scaler.update backs off.
                if mine_items:
                    lost = torch.stack([x.reshape(()) for x in mine_items])
                    torch.autograd.backward([lost], [torch.full_like(lost, float("nan"))],
                                            retain_graph=self.retain_graph)
                return out
            warnings.warn("IMTL: a loss, a loss scale or a task gradient is not finite; no .grad "
                          "was written and the scales did not move. Skip optimizer.step() for "
                          "this batch.", RuntimeWarning, stacklevel=3)
            return out
        if self._owns_rule:
            self._store(new_sub if every else put_tasks(state, new_sub, idx, len(items)))

        roots: list[Tensor] = []
        cotangents: list[Tensor] = []
        if not mine:
            # Nothing active here but elsewhere: zeros through the shared tensors, so that a
            # DistributedDataParallel encoder is reduced on every rank.
            roots = [t for t in targets if t.requires_grad]
            cotangents = [torch.zeros_like(t) for t in roots]
        elif rows is None:
            # No task rows ('loss', 'equal'): one backward of Σ_t w_t ℓ_t writes everything.
            roots.append(torch.stack([x.reshape(()) for x in mine_items]))
            cotangents.append(_amp(w_task, amp).to(device=values.device, dtype=roots[0].dtype))
        else:
            # The shared tensors get Σ_t α_t c_t ∇ℓ_t, the heads' leaves Σ_t c_t ∇ℓ_t from the
            # rows' backward passes: no second pass through the heads.
            roots.extend(targets)
            cotangents.extend(g.to(t.dtype) for g, t in zip(shared, targets, strict=True))
            assert graph is not None  # rows come from this rank's graph
            heads = rows.head_grads(graph, None if factor is None else factor.to(values.device))
            for leaf, g in zip(graph.leaves, heads, strict=True):
                if g is not None:
                    roots.append(leaf)
                    cotangents.append(g)
        if (self.log_scale is not None and self.log_scale.requires_grad
                and not self._owns_rule):
            roots.append(self.log_scale)
            # A new tensor: autograd may keep a cotangent as the .grad it creates. With a
            # scaler, S·(e^s ℓ − 1): its unscale_ leaves e^s ℓ − 1 of the raw losses.
            cotangents.append(_amp(info.scale_grad.clone() if every else torch.zeros_like(
                state.log_scale).index_copy(0, idx, info.scale_grad), amp))
        if roots:
            torch.autograd.backward(roots, cotangents, retain_graph=self.retain_graph)
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


def _amp(cotangent: Tensor, amp: Tensor | None) -> Tensor:
    """``S · cotangent`` computed in float32 at least, or the cotangent."""
    if amp is None:
        return cotangent
    return cotangent.to(torch.promote_types(cotangent.dtype, torch.float32)) * amp
