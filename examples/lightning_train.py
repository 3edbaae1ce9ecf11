"""IMTL in PyTorch Lightning, with manual optimization: the module and the functional step.

    python examples/lightning_train.py                          # nn.IMTL, float32
    python examples/lightning_train.py --variant functional     # imtl_func.mtl_value_and_grad
    python examples/lightning_train.py --precision bf16-mixed   # autocast to bfloat16

Requires the ``lightning`` extra: ``pip install -e ".[lightning]"``, or the two ``pip install``
lines of ``.ci/run``, which leave the installed torch build alone.

IMTL computes the gradients itself, so both LightningModules turn Lightning's automatic
optimization off (``self.automatic_optimization = False``) and call ``opt.step()`` themselves,
or skip it when IMTL met a non-finite loss or gradient:

* :class:`ModuleIMTL`: ``imtl_func.nn.IMTL`` writes every ``.grad`` (network and log-scales,
  which the optimizer trains); the log-scales are a parameter of the LightningModule, so they
  are in its checkpoint.
* :class:`FunctionalIMTL`: ``imtl_func.mtl_value_and_grad`` with one loss function per task
  returns the gradients and the new IMTL state; :func:`imtl_func.write_grads` writes the
  gradients into ``.grad`` (nothing when the step was not finite), then ``opt.step()`` runs
  as in :class:`ModuleIMTL` (:func:`imtl_func.apply_updates` does both outside Lightning). The
  state lives in buffers (:class:`StateBuffers`), so it is in the checkpoint and follows the
  module across devices.

Both count the skipped steps in a buffer, ``skipped``. In manual optimization Lightning counts
``trainer.global_step`` (and so ``max_steps``) in ``opt.step()`` calls: a skipped batch does not
count.

``nn.IMTL(num_losses=None)`` sizes its log-scales on the first call; until then they are an
``UninitializedParameter``, and Lightning's model summary warns that its parameter count may be
inaccurate. Passing ``num_losses`` (as here) avoids the warning.

Precision: ``32-true``, ``bf16-mixed`` and ``16-mixed`` (float16 with a GradScaler) work with
both. IMTL runs the backward itself, so both take Lightning's GradScaler in ``on_fit_start``:
:class:`ModuleIMTL` hands it to ``nn.IMTL``; :class:`FunctionalIMTL` scales its losses with
:func:`imtl_func.amp_scale` and writes the gradients with :func:`imtl_func.write_grads`, and
Lightning's ``opt.step()`` unscales, skips an overflow and updates the scale. On a CPU, Lightning
replaces ``16-mixed`` by ``bf16-mixed`` unless a precision plugin forces it (see
docs/guides/lightning.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning as L
import optree
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import imtl_func as imtl
from imtl_func.nn import IMTL

NUM_TASKS = 3
SCALES = (1.0, 10.0, 0.1)              # task losses of very different magnitudes


def make_data(n: int = 64, dim: int = 8, seed: int = 0) -> TensorDataset:
    """A regression data set: x ``[n, dim]``, y ``[n, T]`` (T smooth targets plus noise)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    mix = torch.randn(dim, NUM_TASKS, generator=g)
    y = torch.tanh(x @ mix) + 0.1 * torch.randn(n, NUM_TASKS, generator=g)
    return TensorDataset(x, y)


class Net(nn.Module):
    """A shared encoder and one linear output per task (``heads``: hidden -> T)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh())
        self.heads = nn.Linear(hidden, NUM_TASKS)


def task_loss(t: int, pred: Tensor, y: Tensor) -> Tensor:
    """Task t's mean squared error times ``SCALES[t]``, a scalar; pred and y are ``[B, T]``."""
    return ((pred[:, t] - y[:, t]) ** 2).mean() * SCALES[t]


class ModuleIMTL(L.LightningModule):
    """``imtl_func.nn.IMTL`` on the shared feature; the optimizer trains the log-scales."""

    def __init__(self, method: str = "hybrid", dim: int = 8, hidden: int = 16,
                 lr: float = 1e-2) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.lr = lr
        self.net = Net(dim, hidden)
        self.imtl = IMTL(method, num_losses=NUM_TASKS)     # sized now: no lazy parameter
        self.register_buffer("skipped", torch.zeros((), dtype=torch.long))

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        z = self.net.encoder(x)
        pred = self.net.heads(z)
        losses = [task_loss(t, pred, y) for t in range(NUM_TASKS)]
        self.imtl(z, losses)                  # writes .grad of the net and the log-scales
        if not self.imtl.finite:
            self.skipped += 1
        if self.imtl.finite or self.imtl.grad_scaler is not None:
            opt.step()  # with 16-mixed, Lightning's scaler unscales and skips a non-finite step
        self.log_dict({f"loss_{t}": loss.detach().float() for t, loss in enumerate(losses)})

    def on_fit_start(self) -> None:
        # 16-mixed: IMTL runs the backward itself, so it scales it with Lightning's GradScaler.
        self.imtl.grad_scaler = getattr(self.trainer.precision_plugin, "scaler", None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)   # the log-scales included


class StateBuffers(nn.Module):
    """An IMTL state (any pytree of tensors) kept as buffers, so it is checkpointed and moved.

    ``get()`` rebuilds the state; ``set(state)`` stores a new one (same structure). The buffer
    names follow the state's fields (``log_scale``, ``rule_state__mean_grad``, ...).
    """

    def __init__(self, state: Any) -> None:
        super().__init__()
        paths, leaves, self._spec = optree.tree_flatten_with_path(state)
        self._names = [_leaf_name(state, path) for path in paths]
        for name, leaf in zip(self._names, leaves, strict=True):
            self.register_buffer(name, leaf.clone())

    def get(self) -> Any:
        return optree.tree_unflatten(self._spec, [getattr(self, n) for n in self._names])

    def set(self, state: Any) -> None:
        leaves, spec = optree.tree_flatten(state)
        if spec != self._spec:
            raise ValueError(f"the new state has the structure {spec}, not {self._spec}")
        for name, leaf in zip(self._names, leaves, strict=True):
            setattr(self, name, leaf.detach())


def _leaf_name(tree: Any, path: tuple[Any, ...]) -> str:
    """A buffer name for the leaf at ``path``: NamedTuple field names, joined by ``__``."""
    parts = []
    for key in path:
        parts.append(tree._fields[key] if hasattr(tree, "_fields") else str(key))
        tree = tree[key]
    return "__".join(parts)


class FunctionalIMTL(L.LightningModule):
    """``imtl_func.mtl_value_and_grad`` with one loss function per task; state in buffers."""

    def __init__(self, method: str = "hybrid", dim: int = 8, hidden: int = 16,
                 lr: float = 1e-2) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.lr = lr
        self.net = Net(dim, hidden)
        losses = [partial(self._task_loss, t) for t in range(NUM_TASKS)]
        self.imtl_step = imtl.mtl_value_and_grad(self._encode, losses, method)
        self.imtl_state = StateBuffers(self.imtl_step.init(NUM_TASKS))
        self.register_buffer("skipped", torch.zeros((), dtype=torch.long))
        self.scaler: torch.amp.GradScaler | None = None

    def _encode(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return functional_call(self.net.encoder, params, (x,))

    def _task_loss(self, t: int, params: dict[str, Tensor], z: Tensor, x: Tensor,
                   y: Tensor) -> Tensor:
        loss = task_loss(t, functional_call(self.net.heads, params, (z,)), y)
        # 16-mixed: the gradients through the loss scaled by Lightning's GradScaler.
        return loss if self.scaler is None else imtl.amp_scale(loss, self.scaler)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        x, y = batch
        opt = self.optimizers()
        opt.zero_grad()
        params = (dict(self.net.encoder.named_parameters()),
                  dict(self.net.heads.named_parameters()))
        out = self.imtl_step(*params, self.imtl_state.get(), x, y)
        self.imtl_state.set(out.state)        # the gate kept the old state if not finite
        # .grad of the params; if not finite, nothing (or with a scaler an inf, its overflow)
        finite = imtl.write_grads(out, *params, scaler=self.scaler)
        if not finite:
            self.skipped += 1
        if finite or self.scaler is not None:
            opt.step()  # with 16-mixed, Lightning's scaler unscales and skips a non-finite step
        self.log_dict({f"loss_{t}": loss.float() for t, loss in enumerate(out.losses)})

    def on_fit_start(self) -> None:
        self.scaler = getattr(self.trainer.precision_plugin, "scaler", None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=self.lr)


VARIANTS = {"module": ModuleIMTL, "functional": FunctionalIMTL}


def trainer(max_steps: int, precision: str | None = "32-true", **kwargs: Any) -> L.Trainer:
    """A quiet single-CPU Trainer (no logger, no progress bar, no checkpoints unless asked).

    ``precision=None`` leaves it to a precision plugin in ``plugins``.
    """
    options = dict(accelerator="cpu", devices=1, max_steps=max_steps, precision=precision,
                   logger=False, enable_progress_bar=False, enable_checkpointing=False,
                   enable_model_summary=False)
    return L.Trainer(**{**options, **kwargs})


class LossHistory(L.Callback):
    """Records the task losses that the module logged at every training batch."""

    def __init__(self) -> None:
        self.losses: list[list[float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        metrics = trainer.callback_metrics
        self.losses.append([float(metrics[f"loss_{t}"]) for t in range(NUM_TASKS)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="module", choices=sorted(VARIANTS))
    parser.add_argument("--method", default="hybrid", choices=["loss", "gradient", "hybrid"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = VARIANTS[args.variant](args.method)
    loader = DataLoader(make_data(256), batch_size=32, shuffle=True)
    history = LossHistory()
    run = trainer(args.steps, args.precision, callbacks=[history])
    run.fit(model, loader)
    fmt = lambda v: "[" + ", ".join(f"{x:.3g}" for x in v) + "]"  # noqa: E731
    print(f"{args.variant} {args.method} {args.precision}: task losses {fmt(history.losses[0])} "
          f"at the first batch, {fmt(history.losses[-1])} at the last; {run.global_step} "
          f"optimizer steps, {int(model.skipped)} batches skipped")


if __name__ == "__main__":
    main()
