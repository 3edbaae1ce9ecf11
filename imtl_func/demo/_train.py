"""Training one method; the only module of the demo that calls ``imtl_func``.

The library is used in four places, all in the first section below: :func:`make_step` (the
functional step and its initial state), :func:`_functional_stepper` (reads the step's result),
:func:`_module_stepper` (``imtl_func.nn.IMTL``) and :func:`feature_cosine` (the building blocks).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

import imtl_func as imtl
from imtl_func.demo._data import NUM_TASKS, Data, batch_order
from imtl_func.demo._model import Heads, build_model, evaluate, task_losses

#: Adam learning rate of the log-scales under ``--module`` (the functional step's default scale
#: rule, :func:`imtl_func.scale_newton`, moves them by at most 0.1 per step).
MODULE_SCALE_LR = 0.1

#: ``run(batch) -> (losses [T], alpha [T], scale [T], finite)``, all on the CPU: one training step.
StepFn = Callable[[Sequence[Tensor]], tuple[Tensor, Tensor, Tensor, bool]]

# ------------------------------------------------------------------ the calls into imtl_func


def make_step(method: str, encoder: nn.Module, heads: Heads, compile: bool = False
              ) -> tuple[Callable[..., imtl.StepResult], imtl.IMTLState]:
    """The feature-level IMTL step (``imtl.mtl_value_and_grad``) for this encoder and heads, and
    its initial state (on the encoder's device, in its dtype).

    ``step(shared_params, task_params, state, x, cls, ge5, ink) -> StepResult``. "ew" (equal
    weighting) is the ``'equal'`` preset: the gradient of Σ_t ℓ_t.
    """

    def encode(shared_params: dict[str, Tensor], x: Tensor, *targets: Tensor) -> Tensor:
        return functional_call(encoder, shared_params, (x,))

    def decode(task_params: dict[str, Tensor], z: Tensor, x: Tensor, cls: Tensor, ge5: Tensor,
               ink: Tensor) -> Tensor:
        return task_losses(functional_call(heads, task_params, (z,)), x, cls, ge5, ink)

    step = imtl.mtl_value_and_grad(encode, decode, "equal" if method == "ew" else method)
    p = next(encoder.parameters())
    state = step.init(NUM_TASKS, dtype=p.dtype, device=p.device)
    return (torch.compile(step, fullgraph=True) if compile else step), state


def _functional_stepper(method: str, encoder: nn.Module, heads: Heads, params: list[Tensor],
                        lr: float, compile: bool) -> StepFn:
    """One training step through :func:`make_step`, Adam on the returned gradients."""
    step, state = make_step(method, encoder, heads, compile)
    opt = torch.optim.Adam(params, lr=lr, foreach=True)
    shared = dict(encoder.named_parameters())
    task = dict(heads.named_parameters())

    def run(batch: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, bool]:
        nonlocal state
        out = step(shared, task, state, *batch)
        ok = bool(out.info.finite)
        if ok:
            for name, g in out.grads.shared.items():
                shared[name].grad = g
            for name, g in out.grads.task.items():
                task[name].grad = g
            opt.step()
        state = out.state
        return out.losses.cpu(), out.info.alpha.cpu(), out.info.scale.cpu(), ok

    return run


def _module_stepper(method: str, encoder: nn.Module, heads: Heads, params: list[Tensor],
                    lr: float) -> StepFn:
    """One training step in an ordinary loop with the stateful ``imtl_func.nn.IMTL`` module
    (``--module``): ``imtl(z, losses)`` fills ``.grad``, then ``optimizer.step()``.

    Equal weighting is ``losses.sum().backward()``. The log-scales are trained by the same Adam,
    in their own parameter group with learning rate :data:`MODULE_SCALE_LR` (Adam moves each
    parameter by about its learning rate per step, and the ink scale has to travel to
    ``s ≈ −7``).
    """
    p = next(encoder.parameters())
    module = None if method == "ew" else imtl.nn.IMTL(method=method, num_losses=NUM_TASKS)
    groups: list[dict[str, Any]] = [{"params": params}]
    if module is not None:
        module.to(p.device, p.dtype)
        if module.log_scale is not None:
            groups.append({"params": [module.log_scale], "lr": MODULE_SCALE_LR})
    opt = torch.optim.Adam(groups, lr=lr, foreach=True)
    ones = torch.ones(NUM_TASKS)

    def run(batch: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, bool]:
        x, cls, ge5, ink = batch
        opt.zero_grad(set_to_none=True)
        z = encoder(x)
        losses = task_losses(heads(z), x, cls, ge5, ink)
        if module is None:
            losses.sum().backward()
            opt.step()
            return losses.detach().cpu(), ones, ones, True
        module(z, list(losses.unbind()))
        ok, info = module.finite, module.info
        assert info is not None  # None only when no loss takes part; all four always do
        if ok:
            opt.step()
        return losses.detach().cpu(), info.alpha.cpu(), info.scale.cpu(), ok

    return run


def feature_cosine(encoder: nn.Module, heads: Heads, batch: Sequence[Tensor]) -> Tensor:
    """``[4, 4]`` cosines of the raw task gradients at the shared feature (over ``batch``).

    Uses the library's building blocks: one batched backward through the heads
    (:func:`imtl_func.task_jacobian`), the Gramian, and the cosine matrix read off it.
    """
    x, cls, ge5, ink = batch
    head_params = {k: v.detach() for k, v in heads.named_parameters()}
    with torch.no_grad():
        z = encoder(x)

    def losses_at(feature: Tensor) -> Tensor:
        return task_losses(functional_call(heads, head_params, (feature,)), x, cls, ge5, ink)

    _, jac = imtl.task_jacobian(losses_at, z)
    return imtl.imtl_g_weights(imtl.gramian(jac)).cosine


# ---------------------------------------------------------------------------- the training loop


@dataclass
class History:
    """Everything one method's run recorded. Per-step arrays are ``[steps, T]`` float32 (NaN
    until the step has run)."""

    method: str
    train_loss: Tensor
    alpha: Tensor
    scale: Tensor
    eval_steps: list[int] = field(default_factory=list)
    metrics: list[list[float]] = field(default_factory=list)  # [evals][T]
    cosine: dict[int, list[list[float]]] = field(default_factory=dict)
    seconds: float = 0.0
    skipped_steps: int = 0

    @property
    def final(self) -> list[float]:
        """Held-out metrics after the last step."""
        return self.metrics[-1]


def checkpoints(steps: int, count: int = 3) -> list[int]:
    """Steps at which the gradient cosines are probed: 0, evenly spaced, and the last."""
    return sorted({round(i * steps / (count - 1)) for i in range(count)})


def train(
    method: str,
    data: Data,
    *,
    steps: int,
    seed: int,
    lr: float = 3e-3,
    batch_size: int = 256,
    eval_every: int = 20,
    compile: bool = False,
    use_module: bool = False,
    progress: bool = True,
) -> History:
    """Train one method from the seed's initialisation; return its :class:`History`."""
    from tqdm.auto import tqdm

    device = data.x_train.device
    encoder, heads = build_model(seed, data.ink_train.mean().item(), data.ink_train.std().item(),
                                 device, data.x_train.dtype)
    params: list[Tensor] = [*encoder.parameters(), *heads.parameters()]
    order = batch_order(data.x_train.shape[0], batch_size, steps, seed).to(device)
    probe = data.train_batch(torch.arange(min(256, data.x_train.shape[0]), device=device))
    probe_at = set(checkpoints(steps))

    def blank() -> Tensor:
        return torch.full((steps, NUM_TASKS), float("nan"))

    hist = History(method, blank(), blank(), blank())
    if use_module:
        step_fn = _module_stepper(method, encoder, heads, params, lr)
    else:
        step_fn = _functional_stepper(method, encoder, heads, params, lr, compile)

    def record(i: int) -> None:
        hist.eval_steps.append(i)
        hist.metrics.append(evaluate(encoder, heads, data.test_batch()))
        if i in probe_at:
            hist.cosine[i] = feature_cosine(encoder, heads, probe).tolist()

    start = time.perf_counter()
    record(0)
    bar = tqdm(range(steps), desc=f"{method:>8}", disable=not progress, leave=True,
               dynamic_ncols=True, file=sys.stderr)
    for i in bar:
        losses, alpha, scale, ok = step_fn(data.train_batch(order[i]))
        hist.train_loss[i], hist.alpha[i], hist.scale[i] = losses, alpha, scale
        hist.skipped_steps += int(not ok)
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            record(i + 1)
            m = hist.metrics[-1]
            bar.set_postfix_str(f"acc {m[0]:.1f} | ink {m[2]:.1f}", refresh=False)
    bar.close()
    hist.seconds = time.perf_counter() - start
    return hist
