"""The rows of the benchmark: one full training step each (forward, gradients, optimizer step).

Every row owns its own copy of the workload's model and its own ``torch.optim.Adam`` (Adam
keeps the parameters finite under loss scales up to 10^15), so the rows can be timed
interleaved without touching each other. Rows:

* ``ew``: equal weighting, one ``backward`` of ``Σ_t ℓ_t``: the floor.
* ``ew`` compiled: the same with the forward under ``torch.compile`` (AOTAutograd backward).
* ``loop-feature``: the usual public IMTL-G: T ``torch.autograd.grad`` calls, call t on the
  loss of task t (computed on its own, so it runs only head t's backward) w.r.t. the detached
  shared feature and head t; the paper's closed form in D, U; one backward of ``Σ α_t g_t``
  through the encoder.
* ``loop-param``: T ``torch.autograd.grad`` calls w.r.t. all shared parameters, the closed form
  on the flattened ``T × |θ|`` gradients.
* ``torchjd``: ``torchjd.autojac.mtl_backward`` then ``jac_to_grad`` with ``IMTLG`` (only when
  ``torchjd`` imports); it works on the Jacobian w.r.t. the shared parameters.
* ours: ``imtl_func.mtl_value_and_grad`` (feature level) or ``imtl_func.value_and_grad``
  (parameter level), method 'loss' | 'gradient' | 'hybrid', eager or
  ``torch.compile(step, fullgraph=True)``.
* ours ``feature-per-task``: the feature-level fast path, ``mtl_value_and_grad(encode,
  [loss_1, ..., loss_T])``: each task's loss function reads its own reference to the feature,
  one plain backward through the heads.
* ``nn.IMTL``: the imperative module (issue 3), feature and parameter level, when
  ``imtl_func.nn`` exists.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

import imtl_func as imtl
from benchmarks.models import Workload, decode, loss_list, per_task_losses

__all__ = [
    "Row",
    "RowSpec",
    "build_row",
    "has_nn_module",
    "has_torchjd",
    "paper_alpha",
]

LR = 1e-4


@dataclass(frozen=True)
class RowSpec:
    """What a row computes. ``method``: 'ew', 'gradient' (the loops, torchjd), 'loss',
    'hybrid'; ``impl``: 'ew', 'loop', 'torchjd', 'ours', 'nn'; ``level``: 'feature',
    'feature-per-task', 'parameter' or '-' (EW); ``mode``: 'eager' or 'compiled'."""

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


def has_nn_module() -> bool:
    """``imtl_func.nn.IMTL`` present on this checkout (issue 3)."""
    return importlib.util.find_spec("imtl_func.nn") is not None


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
    """A private copy of the workload's model and an Adam over all of its parameters."""

    def __init__(self, work: Workload) -> None:
        self.work = work
        self.encoder = copy.deepcopy(work.encoder)
        self.heads = copy.deepcopy(work.heads)
        self.shared = dict(self.encoder.named_parameters())
        self.task = dict(self.heads.named_parameters())
        self.params = [*self.shared.values(), *self.task.values()]
        self.opt = torch.optim.Adam(self.params, lr=LR)

    def losses(self, z: Tensor) -> Tensor:
        w = self.work
        return decode(w.name, self.task, z, w.y, w.scales)

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
    num_tasks = work.num_tasks

    def step() -> None:
        z = m.encoder(work.x)
        zd = z.detach().requires_grad_()
        losses = loss_list(work.name, m.task, zd, work.y, work.scales)
        rows = []
        for t in range(num_tasks):
            head = [m.task[f"{t}.weight"], m.task[f"{t}.bias"]]
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
        losses = loss_list(work.name, m.task, m.encoder(work.x), work.y, work.scales)
        rows = []
        for t in range(num_tasks):
            head = [m.task[f"{t}.weight"], m.task[f"{t}.bias"]]
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
    tasks_params = [[m.task[f"{t}.weight"], m.task[f"{t}.bias"]] for t in range(work.num_tasks)]

    def step() -> None:
        z = m.encoder(work.x)
        losses = loss_list(work.name, m.task, z, work.y, work.scales)
        mtl_backward(losses, features=z, tasks_params=tasks_params, shared_params=shared)
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

    if level == "feature":
        fn = imtl.mtl_value_and_grad(encode, dec, method)
    elif level == "feature-per-task":
        fn = imtl.mtl_value_and_grad(encode, per_task_losses(name, y, scales), method)
    else:
        fn = imtl.value_and_grad(loss_fn, method)
    holder: dict[str, Any] = {"state": fn.init(work.num_tasks, device=work.x.device)}
    if compiled:
        fn = torch.compile(fn, fullgraph=True, dynamic=False)

    def step() -> None:
        out = fn(m.shared, m.task, holder["state"], work.x)
        for key, p in m.shared.items():
            p.grad = out.grads.shared[key]
        for key, p in m.task.items():
            p.grad = out.grads.task[key]
        holder["state"] = out.state
        m.update()

    return Row(RowSpec("ours", method, level, "compiled" if compiled else "eager"), step, m.params)


def _nn_module(work: Workload, method: str, level: str) -> Row:
    """``imtl_func.nn.IMTL`` in an ordinary loop: ``imtl(z, losses)`` (feature level) or
    ``imtl.backward(shared_parameters=..., losses=...)`` (parameter level); the user's Adam
    trains its log-scales."""
    from imtl_func import nn as imtl_nn

    m = _Model(work)
    module = imtl_nn.IMTL(method=method, num_losses=work.num_tasks).to(work.x.device)
    m.opt.add_param_group({"params": list(module.parameters())})
    shared = list(m.shared.values())

    def step() -> None:
        z = m.encoder(work.x)
        losses = loss_list(work.name, m.task, z, work.y, work.scales)
        if level == "feature":
            module(z, losses)
        else:
            module.backward(shared_parameters=shared, losses=losses)
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
