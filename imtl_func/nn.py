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

The math is the functional core's pipeline (``weigh``: reduce and propose; ``gate``). The module
only moves tensors between the existing autograd graph and the core. A backward of the scaled
losses that stops at the shared tensors gives every task's gradient with respect to them and the
heads' gradients: ONE backward when each loss reaches ``z`` through nodes of its own (separate
heads: a hook on each of those nodes keeps its task's row apart), else one backward per task
(a head shared by the tasks, or the parameter level). Then one ``torch.autograd.backward``
writes everything: ``z`` (or the shared parameters) with the IMTL combination, the heads'
parameters with the gradients already computed. The heads are thus back-propagated once, as in
``sum(losses).backward()``; the extra cost is the ``T × |z|`` rows, their Gramian and the
weighting ('loss' and 'equal' need no rows: one backward in all).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from imtl_func import _checks, _reduce
from imtl_func._gate import gate
from imtl_func._optim import scaler_step
from imtl_func._pipeline import rows_gramian, weigh
from imtl_func._presets import preset
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


class _Graph(NamedTuple):
    """The autograd graph between the losses and the shared tensors (the targets).

    Attributes:
        leaves: the leaves the losses reach without passing through a target (the heads'
            parameters, and any other tensor a loss reaches without ``z``), in the order found.
        leaf_tasks: per leaf, the tasks (positions in the walked losses) that reach it.
        consumers: the nodes with a non-leaf target among their inputs: ``(node, [(input,
            target)], tasks that reach the node)``.
        reached: per target, whether some loss reaches it.
        hookable: every path from a loss to a target enters it through a consumer node (False
            when a loss is a target itself, or a target is a leaf).
    """

    leaves: list[Tensor]
    leaf_tasks: list[set[int]]
    consumers: list[tuple[Any, list[tuple[int, int]], set[int]]]
    reached: list[bool]
    hookable: bool

    @property
    def separate(self) -> bool:
        """Each loss reaches the targets through consumer nodes of its own (separate heads)."""
        return self.hookable and all(len(tasks) == 1 for _, _, tasks in self.consumers)


def _walk(roots: Sequence[Tensor], targets: Sequence[Tensor]) -> _Graph:
    """Walk the autograd graph from each loss down to the targets (no backward pass).

    The walk stops at every target: a non-leaf target by its edge ``(grad_fn, output_nr)``
    (another output of the same node is walked on), a leaf target by its ``AccumulateGrad``
    node. Reading the graph only, it validates the inputs before any ``.grad`` is touched.
    Each loss is walked on its own (to tell which tasks reach a node) only for non-leaf
    targets, where the walks end at ``z``; with leaf targets (the parameter level) one walk
    covers every loss, and the task sets are incomplete (they are then not used).
    """
    edges = {(id(t.grad_fn), t.output_nr): i for i, t in enumerate(targets)
             if t.grad_fn is not None}
    leaf_targets = {id(t): i for i, t in enumerate(targets) if t.grad_fn is None}
    reached = [False] * len(targets)
    hookable = not leaf_targets
    leaves: list[Tensor] = []
    leaf_tasks: list[set[int]] = []
    leaf_index: dict[int, int] = {}
    consumers: dict[int, tuple[Any, list[tuple[int, int]], set[int]]] = {}
    one_walk: set[int] | None = None if hookable else set()

    def visit_leaf(variable: Tensor, task: int) -> None:
        if id(variable) in leaf_targets:
            reached[leaf_targets[id(variable)]] = True
            return
        if id(variable) not in leaf_index:
            leaf_index[id(variable)] = len(leaves)
            leaves.append(variable)
            leaf_tasks.append(set())
        leaf_tasks[leaf_index[id(variable)]].add(task)

    def consumer(node: Any) -> set[int]:
        if id(node) not in consumers:
            inputs = [(k, edges[id(n), nr]) for k, (n, nr) in enumerate(node.next_functions)
                      if n is not None and (id(n), nr) in edges]
            consumers[id(node)] = (node, inputs, set())
        return consumers[id(node)][2]

    for task, root in enumerate(roots):
        if root.grad_fn is None:
            if root.requires_grad:
                visit_leaf(root, task)
            continue
        if (id(root.grad_fn), root.output_nr) in edges:        # the loss is a target itself
            reached[edges[id(root.grad_fn), root.output_nr]] = True
            hookable = False
            continue
        stack, seen = [root.grad_fn], set() if one_walk is None else one_walk
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            variable = getattr(node, "variable", None)
            if variable is not None:
                visit_leaf(variable, task)
                continue
            for nxt, nr in node.next_functions:
                if nxt is None:
                    continue
                i = edges.get((id(nxt), nr))
                if i is None:
                    stack.append(nxt)
                else:
                    reached[i] = True
                    consumer(node).add(task)
    return _Graph(leaves, leaf_tasks, list(consumers.values()), reached, hookable)


@contextlib.contextmanager
def _hooks_paused(tensors: Sequence[Tensor]) -> Iterator[None]:
    """The tensor hooks registered on ``tensors`` (``register_hook``) do not fire inside.

    Tensor hooks live in an ordered dict that autograd reads when it fires them; emptying it
    and putting the same hooks back (in their order) pauses them without re-registering.
    """
    saved = []
    for t in tensors:
        hooks = getattr(t, "_backward_hooks", None)
        if isinstance(hooks, dict) and hooks:
            saved.append((hooks, list(hooks.items())))
            hooks.clear()
    try:
        yield
    finally:
        for hooks, items in saved:
            hooks.clear()
            hooks.update(items)


class _Rows(NamedTuple):
    """The scaled task gradients: ``rows`` per target ``[T, *shape]`` (row t: ``c_t ∇ℓ_t``), and
    the heads' gradients, either summed over the tasks (``heads``, one backward for every task)
    or per task (``per_task[t][j]``; None where task t does not reach leaf j)."""

    rows: list[Tensor]
    heads: list[Tensor | None] | None
    per_task: list[list[Tensor | None]] | None

    def head_grads(self, graph: _Graph, factor: Tensor | None) -> list[Tensor | None]:
        """Per leaf ``Σ_t f_t c_t ∇ℓ_t`` (``f``: the data-parallel factor, or ones)."""
        if self.heads is not None:
            if factor is None:
                return self.heads
            # Separate heads: each leaf belongs to one task (checked before this path).
            return [None if g is None else g * factor[min(tasks)].to(g.dtype)
                    for g, tasks in zip(self.heads, graph.leaf_tasks, strict=True)]
        out: list[Tensor | None] = []
        for j in range(len(graph.leaves)):
            total = None
            for t, grads in enumerate(self.per_task):
                g = grads[j]
                if g is not None:
                    g = g if factor is None else g * factor[t].to(g.dtype)
                    total = g if total is None else total + g
            out.append(total)
        return out


def _task_rows(losses: Sequence[Tensor], scales: Tensor, targets: Sequence[Tensor],
               graph: _Graph, one_pass: bool) -> _Rows:
    """Every task's gradient w.r.t. the targets (and the heads'), scaled by ``scales``.

    * ``one_pass`` (separate heads): ONE backward of ``Σ_t c_t ℓ_t`` that stops at the targets:
      a hook on each consumer node takes what it sends to a target (its task's row) and sends
      nothing on. The heads' gradients come out summed; the cost is that of ``Σ_t ℓ_t``'s
      backward through the heads.
    * otherwise one backward per task (shared heads, parameter level): each stops at the
      targets (a hook on each non-leaf target records what arrives and passes zeros on).

    Either way nothing reaches the encoder, so a leaf reached both through ``z`` and directly
    (tied weights) gets only its direct part, and the user's tensor hooks on the targets and
    leaves are paused: they fire once, in the backward that writes the gradients.
    """
    inputs = [*targets, *graph.leaves]
    roots = [x.reshape(()) for x in losses]
    cots = [c.to(x.dtype) for c, x in zip(scales.unbind(0), roots, strict=True)]
    # The rows go straight into one [T, ...] buffer per target while the gradient that
    # arrives is still in cache (stacking them afterwards costs another pass over T·|z|).
    rows = [t.new_empty((len(losses), *t.shape)) for t in targets]
    filled = [[False] * len(targets) for _ in losses]

    def put(task: int, i: int, grad: Tensor) -> None:
        if filled[task][i]:
            rows[i][task].add_(grad)
        else:
            rows[i][task].copy_(grad)
            filled[task][i] = True

    def zero_unfilled() -> None:
        for task, done in enumerate(filled):
            for i, ok in enumerate(done):
                if not ok:
                    rows[i][task].zero_()

    if one_pass:
        def take(task: int, edges: list[tuple[int, int]]) -> Callable[..., Any]:
            def hook(grad_inputs: tuple[Tensor | None, ...], _: Any) -> tuple[Any, ...]:
                out = list(grad_inputs)
                for k, i in edges:
                    g, out[k] = out[k], None
                    if g is not None:
                        put(task, i, g)
                return tuple(out)
            return hook

        handles = [node.register_hook(take(min(tasks), edges))
                   for node, edges, tasks in graph.consumers]
        try:
            with _hooks_paused(inputs):
                grads = torch.autograd.grad(roots, inputs, cots, retain_graph=True,
                                            allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        zero_unfilled()
        return _Rows(rows, list(grads[len(targets):]), None)

    current = [0]

    def record(i: int) -> Callable[[Tensor], Tensor]:
        def hook(grad: Tensor) -> Tensor:
            put(current[0], i, grad)
            return grad.new_zeros(()).expand(grad.shape)     # no memory, no fill
        return hook

    per_task: list[list[Tensor | None]] = []
    with _hooks_paused(inputs):
        handles = [t.register_hook(record(i)) for i, t in enumerate(targets)
                   if t.grad_fn is not None]
        try:
            for task, (root, cot) in enumerate(zip(roots, cots, strict=True)):
                current[0] = task
                grads = torch.autograd.grad(root, inputs, cot, retain_graph=True,
                                            allow_unused=True)
                for i, t in enumerate(targets):
                    if t.grad_fn is None and grads[i] is not None:
                        put(task, i, grads[i])
                per_task.append(list(grads[len(targets):]))
        finally:
            for handle in handles:
                handle.remove()
    zero_unfilled()
    return _Rows(rows, None, per_task)


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
                graph = _check_reached(mine_items, targets, what)
            if self._tx.needs_gramian and mine:
                # Rows of the scaled losses c_t ℓ_t (c = e^{s}, known before the update): the
                # heads' gradients then come out of the same backward passes.
                scales = self._tx.loss_scales(state, values.dtype)[mine]
                if amp is not None:  # S·c: every .grad written is S times the gradient
                    scales = scales * amp.to(scales.dtype)
                one_pass = graph.separate and (self._reduce is None or all(
                    len(tasks) == 1 for tasks in graph.leaf_tasks))
                rows = _task_rows(mine_items, scales, targets, graph, one_pass)
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
            on, vector, k, factor = self._reduced(values, local, k, targets, error)
        self.active = tuple(i in on for i in range(len(items)))
        if not on:
            self.info = None
            return IMTLOutput(scaled.new_zeros(()), scaled)
        every = len(on) == len(items)
        idx = None if every else torch.tensor(on, device=values.device)
        sub = state if every else _take(state, idx, len(items))
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
            self._store(new_sub if every else _put(state, new_sub, idx, len(items)))

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

    def _reduced(self, values: Tensor, local: list[bool], k_local: Tensor | None,
                 targets: list[Tensor], error: Exception | None
                 ) -> tuple[list[int], Tensor, Tensor | None, Tensor]:
        """Data parallel: the global statistics of the tasks active on any rank.

        Every rank joins the one reduction, whatever it computed (or if it failed). Returns the
        tasks active on some rank, their global losses and Gramian, and ``R / R_t``.
        """
        num = len(local)
        mask = torch.tensor(local, device=values.device)
        k_full = None
        if self._tx.needs_gramian:
            # The same dtype on every rank (the weights depend on it): the targets', ≥ float32.
            dtype = torch.float32
            for t in targets:
                dtype = torch.promote_types(dtype, t.dtype)
            k_full = torch.zeros(num, num, dtype=dtype, device=values.device)
            if k_local is not None and error is None:
                mine = torch.tensor([i for i, a in enumerate(local) if a], device=values.device)
                k_full[mine[:, None], mine[None, :]] = k_local.to(dtype)
        stats = _reduce.active_statistics(self._reduce, values, mask, k_full,
                                          failed=error is not None)
        if error is not None:
            raise error
        if stats.failed:
            raise RuntimeError(f"IMTL: {stats.failed} other rank(s) raised an error in this call "
                               "(see their output); every rank stops here")
        on = [i for i, c in enumerate(stats.counts.tolist()) if c > 0]
        if not on:
            return on, stats.losses, None, stats.counts
        idx = torch.tensor(on, device=values.device)
        k = None if stats.gramian is None else stats.gramian[idx[:, None], idx[None, :]]
        return on, stats.losses[idx], k, stats.replicas / stats.counts[idx]

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


def _check_reached(losses: list[Tensor], targets: list[Tensor], what: str) -> _Graph:
    """Raise unless every target requires grad and some active loss depends on it; return the
    graph between the losses and the targets (:func:`_walk`)."""
    for i, t in enumerate(targets):
        if not t.requires_grad:
            raise ValueError(f"{what} #{i} (shape {tuple(t.shape)}) does not require grad, so no "
                             "loss can depend on it; pass the encoder output itself, not a "
                             "detached copy")
    graph = _walk(losses, targets)
    for i, ok in enumerate(graph.reached):
        if not ok:
            raise ValueError(f"no active loss depends on {what} #{i} (shape "
                             f"{tuple(targets[i].shape)}); pass the tensors that lead to the "
                             "losses (DistributedDataParallel with find_unused_parameters=True "
                             "returns copies of its outputs: see the IMTL docs)")
    return graph
