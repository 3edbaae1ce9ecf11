"""Task rows from an autograd graph the user already built (for :class:`imtl_func.nn.IMTL`).

The losses reach the shared tensors (``z`` or the shared parameters) through the heads. Walking
the graph once tells which leaves (head parameters) each task reaches and whether each task has
nodes of its own between its loss and ``z`` (separate heads). Then ONE backward of the scaled
losses, with a hook on each task's own nodes, gives every task's row at ``z`` and the heads'
gradients; otherwise (a head shared by the tasks, the parameter level) one backward per task.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["check_reached", "task_rows"]


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
        assert self.per_task is not None  # one of heads / per_task is set
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


def task_rows(losses: Sequence[Tensor], scales: Tensor, targets: Sequence[Tensor],
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


def check_reached(losses: list[Tensor], targets: list[Tensor], what: str) -> _Graph:
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
