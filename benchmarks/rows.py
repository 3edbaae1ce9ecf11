"""The rows of the benchmark: one full training step each (forward, gradients, optimizer step).

Every row owns its own copy of the workload's model and its own plain SGD (no momentum, no
weight decay; see :func:`learning_rate`), so the rows can be timed interleaved without
touching each other. Rows:

* ``ew``: equal weighting, one ``backward`` of ``Σ_t ℓ_t``: the floor.
* ``ew`` compiled: the same with the forward under ``torch.compile`` (AOTAutograd backward).
* ``loop-feature``: the usual public IMTL-G (the naive loop): T ``torch.autograd.grad`` calls,
  call t on the loss of task t (computed on its own, so it runs only head t's backward) w.r.t.
  the detached shared feature and head t; the paper's closed form in D, U; one backward of
  ``Σ α_t g_t`` through the encoder.
* ``loop-param``: T ``torch.autograd.grad`` calls w.r.t. all shared parameters, the closed form
  on the flattened ``T × |θ|`` gradients.
* ``torchjd``: ``torchjd.autojac.mtl_backward`` then ``jac_to_grad`` with ``IMTLG`` (only when
  ``torchjd`` imports); it works on the Jacobian w.r.t. the shared parameters.
* ours: the functional steps, method 'loss' | 'gradient' | 'hybrid', eager or
  ``torch.compile(step, fullgraph=True)``; level ``feature`` (one general ``decode`` returning
  the ``[T]`` losses), ``feature-per-task`` (the per-task decoders ``[loss_1, ..., loss_T]``)
  or ``parameter``.
* ``nn.IMTL``: the imperative module, ``imtl(z, losses)`` (feature level) or
  ``imtl.backward(shared_parameters=..., losses=...)`` (parameter level).

Every call into ``imtl_func`` is in the block marked "imtl_func API" below, so that an API
change is adapted there and nowhere else.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

import imtl_func as imtl
from benchmarks.models import Workload, decode, loss_list, per_task_losses

__all__ = [
    "BASE_LR",
    "Row",
    "RowSpec",
    "build_row",
    "has_nn_module",
    "has_torchjd",
    "learning_rate",
    "library_path",
    "paper_alpha",
]

BASE_LR = 1e-2


# ---------------------------------------------------------------------------------------------
# imtl_func API: the only place the benchmark calls the library (today's API).
# To adapt to `step.init(num_tasks)` on the returned step: change `functional_step` only.
# ---------------------------------------------------------------------------------------------


def library_path() -> str:
    """Folder of the ``imtl_func`` that the benchmark imports (recorded in the JSON)."""
    return str(Path(imtl.__file__).parent)


def has_nn_module() -> bool:
    """``imtl_func.nn.IMTL`` present on this checkout."""
    return importlib.util.find_spec("imtl_func.nn") is not None


def functional_step(
    level: str,
    method: str,
    encode: Callable[..., Tensor],
    decoder: Callable[..., Tensor] | Sequence[Callable[..., Tensor]],
    loss_fn: Callable[..., Tensor],
    num_tasks: int,
    device: torch.device,
) -> tuple[Callable[..., Any], Any]:
    """The library's one-call step for ``level`` and its initial state.

    Args:
        level: ``'feature'`` / ``'feature-per-task'`` (``decoder`` is one ``decode`` / T loss
            functions) or ``'parameter'`` (``loss_fn(shared, task, x) -> [T]``).

    Returns:
        ``(step, state)``, ``step(shared, task, state, x) -> out`` (read with
        :func:`unpack_step`).
    """
    if level == "parameter":
        fn = imtl.value_and_grad(loss_fn, method)
    else:
        fn = imtl.mtl_value_and_grad(encode, decoder, method)
    return fn, fn.init(num_tasks, device=device)


def unpack_step(out: Any) -> tuple[dict[str, Tensor], dict[str, Tensor], Any]:
    """``(shared grads, task grads, new state)`` of a step's result."""
    return out.grads.shared, out.grads.task, out.state


def nn_module(method: str, num_tasks: int, device: torch.device) -> torch.nn.Module:
    """``imtl_func.nn.IMTL`` for ``num_tasks`` losses (its log-scales are parameters)."""
    from imtl_func import nn as imtl_nn

    return imtl_nn.IMTL(method=method, num_losses=num_tasks).to(device)


def nn_call(module: Any, level: str, z: Tensor, shared: list[Tensor], losses: list[Tensor]) -> None:
    """One ``nn.IMTL`` call: feature level ``module(z, losses)`` or parameter level
    ``module.backward(shared_parameters=..., losses=...)``; the gradients land in ``.grad``."""
    if level == "feature":
        module(z, losses)
    else:
        module.backward(shared_parameters=shared, losses=losses)


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowSpec:
    """What a row computes. ``method``: 'ew', 'gradient' (the loops, torchjd), 'loss',
    'hybrid'; ``impl``: 'ew', 'loop', 'torchjd', 'ours', 'nn'; ``level``: 'feature' (general
    decode; nn.IMTL: ``imtl(z, losses)``), 'feature-per-task', 'parameter' or '-' (EW);
    ``mode``: 'eager' or 'compiled'."""

    impl: str
    method: str
    level: str
    mode: str = "eager"

    @property
    def name(self) -> str:
        base = {"ew": "EW", "loop": "LOOP", "torchjd": "torchjd IMTLG", "nn": "nn.IMTL"}.get(
            self.impl, "ours"
        )
        parts = [base]
        if self.impl in ("ours", "nn"):
            parts.append(self.method)
        if self.level != "-":
            parts.append(self.level)
        parts.append(self.mode)
        return " ".join(parts)


@dataclass
class Row:
    """A built row: ``step()`` runs one full training step in place."""

    spec: RowSpec
    step: Callable[[], None]
    params: list[Tensor] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    def finite(self) -> bool:
        """Whether every parameter is still finite (a row that diverged is flagged in the JSON)."""
        return all(bool(torch.isfinite(p).all()) for p in self.params)


def has_torchjd() -> bool:
    """``torchjd`` importable (optional; not a dependency of imtl_func)."""
    try:
        import torchjd.aggregation  # noqa: F401, RUF100
        import torchjd.autojac  # noqa: F401
    except Exception:
        return False
    return True


def learning_rate(work: Workload) -> float:
    """Plain SGD's step size: ``BASE_LR / 10^(T−1)``.

    EW's gradient carries the largest loss scale ``10^(T−1)``; dividing by it keeps every row's
    parameters finite over the benchmark's few dozen steps at T = 16 (an SGD step of 10^15
    times a unit gradient would not be). The step size does not change the arithmetic timed.
    """
    return BASE_LR / float(work.scales.max())


def paper_alpha(grads: Tensor) -> Tensor:
    """IMTL-G weights from the paper's closed form, as public code computes them.

    ``D = [g_1 − g_t]_t``, ``U = [u_1 − u_t]_t``, ``α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹``,
    ``α_1 = 1 − Σ α_{2:T}``. The ``N``-wide products run in the gradients' dtype; the
    ``(T−1) × (T−1)`` solve in float64 (``torch.inverse`` in float32 loses the 10^15 range).

    Args:
        grads: ``[T, N]`` task gradients, T ≥ 2.

    Returns:
        ``[T]`` α in ``grads.dtype``.
    """
    units = grads / grads.norm(dim=1, keepdim=True)
    d = grads[:1] - grads[1:]
    u = units[:1] - units[1:]
    lhs = (grads[0] @ u.T).double()  # [T-1]
    mat = (d @ u.T).double()  # [T-1, T-1]
    rest = torch.linalg.solve(mat.T, lhs)  # row vector times inverse
    return torch.cat([(1 - rest.sum()).reshape(1), rest]).to(grads.dtype)


class _Model:
    """A private copy of the workload's model and a plain SGD over all of its parameters."""

    def __init__(self, work: Workload) -> None:
        self.work = work
        self.encoder = copy.deepcopy(work.encoder)
        self.heads = copy.deepcopy(work.heads)
        self.shared = dict(self.encoder.named_parameters())
        self.task = dict(self.heads.named_parameters())
        self.head = [[self.task[k] for k in work.head_keys(t)] for t in range(work.num_tasks)]
        self.params = [*self.shared.values(), *self.task.values()]
        self.opt = torch.optim.SGD(self.params, lr=learning_rate(work))

    def losses(self, z: Tensor) -> Tensor:
        w = self.work
        return decode(w.name, self.task, z, w.y, w.scales)

    def loss_list(self, z: Tensor) -> list[Tensor]:
        w = self.work
        return loss_list(w.name, self.task, z, w.y, w.scales)

    def update(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _ew(work: Workload, compiled: bool) -> Row:
    m = _Model(work)

    def total() -> Tensor:
        return m.losses(m.encoder(work.x)).sum()

    loss_fn = torch.compile(total, fullgraph=True, dynamic=False) if compiled else total

    def step() -> None:
        loss_fn().backward()
        m.update()

    return Row(RowSpec("ew", "ew", "-", "compiled" if compiled else "eager"), step, m.params)


def _loop_feature(work: Workload) -> Row:
    m = _Model(work)

    def step() -> None:
        z = m.encoder(work.x)
        zd = z.detach().requires_grad_()
        losses = m.loss_list(zd)
        rows = []
        for t, head in enumerate(m.head):
            g_z, *g_head = torch.autograd.grad(losses[t], [zd, *head])
            rows.append(g_z.reshape(-1))
            for p, g in zip(head, g_head, strict=True):
                p.grad = g
        grads = torch.stack(rows)
        alpha = paper_alpha(grads)
        z.backward((alpha @ grads).view_as(z))
        m.update()

    return Row(RowSpec("loop", "gradient", "feature"), step, m.params)


def _loop_param(work: Workload) -> Row:
    m = _Model(work)
    num_tasks = work.num_tasks
    shared = list(m.shared.values())

    def step() -> None:
        losses = m.loss_list(m.encoder(work.x))
        rows = []
        for t, head in enumerate(m.head):
            grads = torch.autograd.grad(losses[t], [*shared, *head], retain_graph=t < num_tasks - 1)
            rows.append(torch.cat([g.reshape(-1) for g in grads[: len(shared)]]))
            for p, g in zip(head, grads[len(shared) :], strict=True):
                p.grad = g
        jac = torch.stack(rows)
        combined = paper_alpha(jac) @ jac
        for p, g in zip(shared, combined.split([p.numel() for p in shared]), strict=True):
            p.grad = g.view_as(p)
        m.update()

    return Row(RowSpec("loop", "gradient", "parameter"), step, m.params)


def _torchjd(work: Workload) -> Row:
    from torchjd.aggregation import IMTLG
    from torchjd.autojac import jac_to_grad, mtl_backward

    m = _Model(work)
    aggregator = IMTLG()
    shared = list(m.shared.values())

    def step() -> None:
        z = m.encoder(work.x)
        mtl_backward(m.loss_list(z), features=z, tasks_params=m.head, shared_params=shared)
        jac_to_grad(shared, aggregator)
        m.update()

    return Row(RowSpec("torchjd", "gradient", "parameter"), step, m.params)


def _ours(work: Workload, method: str, level: str, compiled: bool) -> Row:
    m = _Model(work)
    encoder, name, y, scales = m.encoder, work.name, work.y, work.scales

    def encode(params: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(encoder, params, (x,))

    def dec(task_params: dict[str, Tensor], z: Tensor, x: Tensor) -> Tensor:
        return decode(name, task_params, z, y, scales)

    def loss_fn(params: dict[str, Tensor], task_params: dict[str, Tensor], x: Tensor) -> Tensor:
        return dec(task_params, encode(params, x), x)

    decoder = per_task_losses(name, y, scales) if level == "feature-per-task" else dec
    fn, state = functional_step(
        level, method, encode, decoder, loss_fn, work.num_tasks, work.x.device
    )
    if compiled:
        fn = torch.compile(fn, fullgraph=True, dynamic=False)
    holder: dict[str, Any] = {"state": state}

    def step() -> None:
        g_shared, g_task, holder["state"] = unpack_step(
            fn(m.shared, m.task, holder["state"], work.x)
        )
        for key, p in m.shared.items():
            p.grad = g_shared[key]
        for key, p in m.task.items():
            p.grad = g_task[key]
        m.update()

    return Row(RowSpec("ours", method, level, "compiled" if compiled else "eager"), step, m.params)


def _nn_module(work: Workload, method: str, level: str) -> Row:
    """``imtl_func.nn.IMTL`` in an ordinary loop; the user's SGD trains its log-scales."""
    m = _Model(work)
    module = nn_module(method, work.num_tasks, work.x.device)
    if extra := list(module.parameters()):
        m.opt.add_param_group({"params": extra})
    shared = list(m.shared.values())

    def step() -> None:
        z = m.encoder(work.x)
        nn_call(module, level, z, shared, m.loss_list(z))
        m.update()

    return Row(RowSpec("nn", method, level), step, m.params)


def build_row(spec: RowSpec, work: Workload) -> Row:
    """Build the row ``spec`` on its own copy of ``work``."""
    compiled = spec.mode == "compiled"
    if spec.impl == "ew":
        return _ew(work, compiled)
    if spec.impl == "loop":
        return _loop_feature(work) if spec.level == "feature" else _loop_param(work)
    if spec.impl == "torchjd":
        return _torchjd(work)
    if spec.impl == "ours":
        return _ours(work, spec.method, spec.level, compiled)
    if spec.impl == "nn":
        return _nn_module(work, spec.method, spec.level)
    raise ValueError(f"unknown row {spec}")
