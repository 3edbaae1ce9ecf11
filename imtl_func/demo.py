"""Multi-task training demo on scikit-learn's handwritten digits: equal weighting vs IMTL.

Run it with ``python -m imtl_func.demo`` (needs the ``examples`` extra:
``pip install "imtl_func[examples]"``). It trains the same network, from the same
initialisation and on the same batches, once per method, prints a table of held-out metrics
and writes plots and a JSON of every number to ``--out`` (default ``./demo_out``).

The task set
------------
One shared encoder reads an 8×8 digit (1,797 real scans shipped inside scikit-learn, no
network needed) and four heads read its 32-dimensional feature:

========  ==============================  ================================  ===============
task      target                          loss (raw units)                  held-out metric
========  ==============================  ================================  ===============
class     digit 0–9                       cross-entropy, starts at ≈ 2.3    accuracy ↑
ge5       digit ≥ 5 (binary)              binary cross-entropy, ≈ 0.7       accuracy ↑
ink       total ink, Σ pixels (185–433)   MSE in ink units², ≈ 1,100        RMSE ↓
recon     the 64 pixels, scaled to [0,1]  per-pixel MSE, ≈ 0.18             MSE ↓
========  ==============================  ================================  ===============

Why these four:

* **Loss magnitudes nearly four orders apart.** The raw losses range from ≈ 0.2 (reconstruction)
  to ≈ 1,100 (ink, in the units a user would naturally write). Under equal weighting the sum of
  losses, hence the encoder's gradient, is dominated by the ink regression; IMTL-L's scales
  ``e^{s}`` are meant to undo exactly this, and IMTL-G's weights to undo it in gradient space.
* **Different needs of one small shared feature.** Class and ``≥ 5`` need the digit's
  identity; the ink total is almost unrelated to it (correlation 0.02 with the digit value,
  per-class means 303–330 against a spread of 34) and needs how much was written;
  reconstruction needs every pixel. All four go through one 32-dimensional feature. Measured
  there, the task gradients are close to orthogonal (``cosine.png``; |cos| ≤ 0.11 at
  initialisation), so what makes equal weighting fail here is mainly the magnitude gap, the
  part IMTL is built to remove; the cosines show where the tasks start to pull together or
  apart as training goes on.
* **Four kinds of heads.** Classification (cross-entropy), a binary decision (logistic), a
  scalar regression and a dense 64-output regression: the usual mix of a real multi-task model.
* **Cheap.** The whole comparison runs in well under two minutes on two CPU cores.

The ink head predicts in raw units as ``mean + std · linear(z)``, with the training set's
mean (312) and standard deviation (34) as fixed constants, the usual de-normalising output of
a regression head. Without it a head trained with Adam (whose steps are about ``lr`` per
parameter whatever the gradient's size) would spend the whole run walking its bias to 312 and
its weights to tens. The loss is still the MSE in raw ink units: it starts near the target's
variance (≈ 1,100), and at initialisation its gradient at the shared feature is 2·10³ to
8·10⁴ times larger than the other tasks'.

Protocol: a fixed stratified 80/20 split (``random_state=0``, independent of ``--seed``); the
seed sets the network initialisation and the batch order, identical for every method. Each
method trains with Adam on the gradients the library returns (equal weighting is the library's
``'loss'`` method with frozen scales ``e^{s} = 1``, i.e. the gradient of ``Σ_t ℓ_t``).
The summary column is the multi-task literature's Δm%: the mean over tasks of the relative
change of the held-out metric against equal weighting, signed so that better is positive.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import imtl_func as imtl

__all__ = [
    "METHODS",
    "TASKS",
    "Data",
    "Heads",
    "History",
    "TaskSpec",
    "build_model",
    "delta_m",
    "evaluate",
    "format_table",
    "load_data",
    "main",
    "task_losses",
    "train",
]


class TaskSpec(NamedTuple):
    """One task of the demo: its name, the metric's label and direction."""

    name: str
    metric: str
    higher_is_better: bool


TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("class", "acc %", True),
    TaskSpec("ge5", "acc %", True),
    TaskSpec("ink", "RMSE", False),
    TaskSpec("recon", "MSE x1e3", False),
)
NUM_TASKS = len(TASKS)

#: Method names accepted by ``--methods``; "ew" is equal weighting.
METHODS: tuple[str, ...] = ("ew", "loss", "gradient", "hybrid")

FEATURE_DIM = 32
HIDDEN_DIM = 128
PIXELS = 64
#: Adam learning rate of the log-scales under ``--module`` (the functional step's default scale
#: rule, :func:`imtl_func.scale_newton`, moves them by at most 0.1 per step).
MODULE_SCALE_LR = 0.1


# --------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Data:
    """Train and held-out tensors. ``x``: ``[N, 64]`` pixels in [0, 1]; ``cls``: ``[N]`` int64;
    ``ge5``: ``[N]`` float (0/1); ``ink``: ``[N]`` float, Σ of the raw 0–16 pixels."""

    x_train: Tensor
    cls_train: Tensor
    ge5_train: Tensor
    ink_train: Tensor
    x_test: Tensor
    cls_test: Tensor
    ge5_test: Tensor
    ink_test: Tensor

    def train_batch(self, index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(x, cls, ge5, ink)`` at the given training rows."""
        return (self.x_train[index], self.cls_train[index], self.ge5_train[index],
                self.ink_train[index])

    def test_batch(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The whole held-out set as ``(x, cls, ge5, ink)``."""
        return self.x_test, self.cls_test, self.ge5_test, self.ink_test


def load_data(device: str | torch.device = "cpu", test_fraction: float = 0.2) -> Data:
    """scikit-learn's digits (bundled, no download), split 80/20 stratified by digit.

    The split uses ``random_state=0`` whatever the training seed, so every run is scored on the
    same 360 held-out images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = torch.as_tensor(digits.data, dtype=torch.float32)  # [1797, 64], values 0..16
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        list(range(len(labels))), test_size=test_fraction, random_state=0,
        stratify=digits.target)

    def part(idx: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        i = torch.as_tensor(idx)
        x, y = pixels[i], labels[i]
        return (
            (x / 16.0).to(device),
            y.to(device),
            (y >= 5).to(torch.float32).to(device),
            x.sum(dim=1).to(device),
        )

    return Data(*part(idx_train), *part(idx_test))


# -------------------------------------------------------------------------------------- model


class Heads(nn.Module):
    """The four task heads on the shared ``[B, 32]`` feature.

    The ink head predicts in raw ink units as ``ink_mean + ink_std · linear(z)`` with the two
    constants fixed from the training set (see the module docstring).
    """

    def __init__(self, ink_mean: float, ink_std: float, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.cls = nn.Linear(feature_dim, 10)
        self.ge5 = nn.Linear(feature_dim, 1)
        self.ink = nn.Linear(feature_dim, 1)
        self.recon = nn.Linear(feature_dim, PIXELS)
        self.ink_mean = float(ink_mean)
        self.ink_std = float(ink_std)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``z [B, F]`` -> (class logits ``[B, 10]``, ge5 logit ``[B]``, ink ``[B]``,
        reconstruction ``[B, 64]``)."""
        ink = self.ink_mean + self.ink_std * self.ink(z).squeeze(-1)
        return self.cls(z), self.ge5(z).squeeze(-1), ink, torch.sigmoid(self.recon(z))


def build_model(seed: int, ink_mean: float, ink_std: float,
                device: str | torch.device = "cpu") -> tuple[nn.Module, Heads]:
    """Shared encoder ``64 -> 128 -> 32`` (ReLU) and the heads, initialised from ``seed``
    (without touching the global random state)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    encoder = nn.Sequential(
        nn.Linear(PIXELS, HIDDEN_DIM), nn.ReLU(),
        nn.Linear(HIDDEN_DIM, FEATURE_DIM), nn.ReLU(),
    )
    heads = Heads(ink_mean, ink_std)
    torch.random.set_rng_state(gen_state)
    return encoder.to(device), heads.to(device)


def task_losses(outputs: Sequence[Tensor], x: Tensor, cls: Tensor, ge5: Tensor, ink: Tensor
                ) -> Tensor:
    """The four raw losses ``[4]`` from the heads' outputs (see :meth:`Heads.forward`)."""
    logits, ge5_logit, ink_pred, recon = outputs
    return torch.stack([
        F.cross_entropy(logits, cls),
        F.binary_cross_entropy_with_logits(ge5_logit, ge5),
        F.mse_loss(ink_pred, ink),
        F.mse_loss(recon, x),
    ])


@torch.no_grad()
def evaluate(encoder: nn.Module, heads: Heads, batch: Sequence[Tensor]) -> list[float]:
    """Held-out metrics, in :data:`TASKS` order: class acc %, ge5 acc %, ink RMSE, recon MSE×1e3.
    """
    x, cls, ge5, ink = batch
    logits, ge5_logit, ink_pred, recon = heads(encoder(x))
    return [
        100.0 * (logits.argmax(-1) == cls).float().mean().item(),
        100.0 * ((ge5_logit > 0).float() == ge5).float().mean().item(),
        (ink_pred - ink).pow(2).mean().sqrt().item(),
        1e3 * (recon - x).pow(2).mean().item(),
    ]


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
    return imtl.imtl_g_weights(imtl.gramian(jac)).cosine.float()


# ------------------------------------------------------------------------------------ training


@dataclass
class History:
    """Everything one method's run recorded. Per-step arrays are ``[steps, T]``."""

    method: str
    eval_steps: list[int] = field(default_factory=list)
    metrics: list[list[float]] = field(default_factory=list)  # [evals][T]
    train_loss: Tensor | None = None
    alpha: Tensor | None = None
    scale: Tensor | None = None
    cosine: dict[int, list[list[float]]] = field(default_factory=dict)
    seconds: float = 0.0
    skipped_steps: int = 0

    @property
    def final(self) -> list[float]:
        """Held-out metrics after the last step."""
        return self.metrics[-1]


def make_transform(method: str) -> imtl.Transform:
    """The library transform for a demo method ("ew": the 'equal' preset)."""
    return imtl.preset("equal" if method == "ew" else method)


def make_step(method: str, encoder: nn.Module, heads: Heads, compile: bool = False
              ) -> Callable[..., imtl.StepResult]:
    """The feature-level IMTL step (``imtl.mtl_value_and_grad``) for this encoder and heads.

    ``step(shared_params, task_params, state, x, cls, ge5, ink) -> StepResult``.
    """

    def encode(shared_params: dict[str, Tensor], x: Tensor, *targets: Tensor) -> Tensor:
        return functional_call(encoder, shared_params, (x,))

    def decode(task_params: dict[str, Tensor], z: Tensor, x: Tensor, cls: Tensor, ge5: Tensor,
               ink: Tensor) -> Tensor:
        return task_losses(functional_call(heads, task_params, (z,)), x, cls, ge5, ink)

    step = imtl.mtl_value_and_grad(encode, decode, make_transform(method))
    return torch.compile(step, fullgraph=True) if compile else step


def batch_order(num_train: int, batch_size: int, steps: int, seed: int) -> Tensor:
    """``[steps, batch_size]`` training indices: shuffled epochs, last partial batch dropped."""
    if not 1 <= batch_size <= num_train:
        raise ValueError(f"batch_size must be in [1, {num_train}], got {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    per_epoch = num_train // batch_size
    epochs = math.ceil(steps / per_epoch)
    rows = [torch.randperm(num_train, generator=gen)[: per_epoch * batch_size]
            .view(per_epoch, batch_size) for _ in range(epochs)]
    return torch.cat(rows)[:steps]


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
                                 device)
    params = [*encoder.parameters(), *heads.parameters()]
    order = batch_order(data.x_train.shape[0], batch_size, steps, seed).to(device)
    probe = data.train_batch(torch.arange(min(256, data.x_train.shape[0]), device=device))
    probe_at = set(checkpoints(steps))

    hist = History(method)
    hist.train_loss = torch.full((steps, NUM_TASKS), float("nan"))
    hist.alpha = torch.full((steps, NUM_TASKS), float("nan"))
    hist.scale = torch.full((steps, NUM_TASKS), float("nan"))

    if use_module:
        step_fn = _module_stepper(method, encoder, heads, params, lr)
    else:
        step_fn = _functional_stepper(method, encoder, heads, params, lr, compile, device)

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


StepFn = Callable[[Sequence[Tensor]], tuple[Tensor, Tensor, Tensor, bool]]


def _functional_stepper(method: str, encoder: nn.Module, heads: Heads, params: list[Tensor],
                        lr: float, compile: bool, device: torch.device) -> StepFn:
    """One training step through ``imtl.mtl_value_and_grad``, Adam on the returned gradients."""
    step = make_step(method, encoder, heads, compile)
    opt = torch.optim.Adam(params, lr=lr, foreach=True)
    shared = dict(encoder.named_parameters())
    task = dict(heads.named_parameters())
    state = {"imtl": make_transform(method).init(NUM_TASKS, device=device)}

    def run(batch: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, bool]:
        out = step(shared, task, state["imtl"], *batch)
        ok = bool(out.info.finite)
        if ok:
            for name, g in out.grads.shared.items():
                shared[name].grad = g
            for name, g in out.grads.task.items():
                task[name].grad = g
            opt.step()
        state["imtl"] = out.state
        return out.losses.cpu(), out.info.alpha.float().cpu(), out.info.scale.float().cpu(), ok

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
    try:
        from imtl_func.nn import IMTL
    except ImportError as err:  # the module lands separately (issue 3)
        raise SystemExit("--module needs imtl_func.nn.IMTL, which this version does not "
                         f"have ({err})") from err
    device = next(encoder.parameters()).device
    module = IMTL(method=method, num_losses=NUM_TASKS).to(device) if method != "ew" else None
    groups: list[dict[str, Any]] = [{"params": params}]
    if module is not None and module.log_scale is not None:
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
        ok = module.finite
        if ok:
            opt.step()
        info = module.info
        return (losses.detach().cpu(), info.alpha.float().cpu(), info.scale.float().cpu(), ok)

    return run


# ------------------------------------------------------------------------------ table, Δm%


def delta_m(metrics: Sequence[float], baseline: Sequence[float],
            tasks: Sequence[TaskSpec] = TASKS) -> float:
    """Δm% against a baseline: ``100/T Σ_t ±(M_t − B_t) / B_t``, + for higher-is-better metrics
    and − for lower-is-better ones, so that a positive value means better than the baseline."""
    total = 0.0
    for m, b, spec in zip(metrics, baseline, tasks, strict=True):
        sign = 1.0 if spec.higher_is_better else -1.0
        total += sign * (m - b) / abs(b)
    return 100.0 * total / len(tasks)


def format_table(finals: dict[str, list[float]], baseline: str | None = "ew",
                 tasks: Sequence[TaskSpec] = TASKS) -> str:
    """Plain-text table: one row per method, best value per task marked with ``*``, and Δm%
    against ``baseline`` when it is among the methods."""
    methods = list(finals)
    headers = ["method", *[f"{t.name} {t.metric}" for t in tasks]]
    directions = ["", *[("higher" if t.higher_is_better else "lower") + " better" for t in tasks]]
    has_base = baseline is not None and baseline in finals
    if has_base:
        headers.append(f"Delta-m% vs {baseline}")
        directions.append("higher better")
    best = []
    for j, t in enumerate(tasks):
        values = [finals[m][j] for m in methods]
        best.append(max(values) if t.higher_is_better else min(values))
    digits = [2, 2, 2, 3]
    rows = []
    for m in methods:
        cells = [m]
        for j in range(len(tasks)):
            v = finals[m][j]
            mark = "*" if round(v, digits[j]) == round(best[j], digits[j]) else " "
            cells.append(f"{v:.{digits[j]}f}{mark}")
        if has_base:
            cells.append(f"{delta_m(finals[m], finals[baseline], tasks):+.2f} ")
        rows.append(cells)
    widths = [max(len(r[k]) for r in [headers, directions, *rows]) for k in range(len(headers))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *[c.rjust(w) for c, w in zip(cells[1:], widths[1:],
                                                                 strict=True)]]).rstrip()

    rule = "-" * len(line(headers))
    out = [line(headers), line(directions), rule, *[line(r) for r in rows], rule,
           "* best per task (held-out set)"]
    return "\n".join(out)


# -------------------------------------------------------------------------------------- plots


def _colors() -> dict[str, str]:
    return {"ew": "tab:gray", "loss": "tab:blue", "gradient": "tab:orange", "hybrid": "tab:green"}


def _smooth(values: Tensor, window: int) -> Tensor:
    """Trailing moving average along dim 0 of ``[steps, T]`` (same length)."""
    if window <= 1 or values.shape[0] < 2:
        return values
    csum = torch.cat([torch.zeros(1, values.shape[1]), values.cumsum(0)])
    idx = torch.arange(1, values.shape[0] + 1)
    lo = (idx - window).clamp(min=0)
    return (csum[idx] - csum[lo]) / (idx - lo)[:, None]


def plot_metrics(histories: dict[str, History], path: Path, dpi: int = 100) -> Path:
    """Held-out metric curves: one panel per task, one line per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.2), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, NUM_TASKS)
    colors = _colors()
    for j, (ax, spec) in enumerate(zip(axes, TASKS, strict=True)):
        for name, h in histories.items():
            ax.plot(h.eval_steps, [m[j] for m in h.metrics], label=name,
                    color=colors.get(name), lw=1.4)
        ax.set_title(f"{spec.name}: {spec.metric} ({'higher' if spec.higher_is_better else 'lower'}"
                     " better)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if not spec.higher_is_better:
            values = [m[j] for h in histories.values() for m in h.metrics]
            if min(values) > 0 and max(values) > 10 * min(values):
                ax.set_yscale("log")
        else:
            finals = [h.final[j] for h in histories.values()]
            ax.set_ylim(max(0.0, min(finals) - 15), 100.5)
    axes[0].legend(fontsize=8)
    fig.suptitle("Held-out metrics during training (digits, same init and batches)", fontsize=10)
    fig.savefig(path)
    return path


def _per_step_plot(histories: dict[str, History], attr: str, methods: Sequence[str],
                   ylabel: str, title: str, path: Path) -> Path | None:
    """Per-step values of ``attr`` (``[steps, T]``), one panel per method; a log axis when
    every value is positive, a symmetric-log one otherwise (IMTL-G weights may be negative)."""
    from matplotlib.figure import Figure

    chosen = [m for m in methods if m in histories]
    if not chosen:
        return None
    fig = Figure(figsize=(5 * len(chosen), 3.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(chosen), squeeze=False)[0]
    for ax, name in zip(axes, chosen, strict=True):
        values: Tensor = getattr(histories[name], attr)
        steps = torch.arange(1, values.shape[0] + 1)
        window = max(1, values.shape[0] // 50)
        smooth = _smooth(values, window)
        for j, spec in enumerate(TASKS):
            line = ax.plot(steps, smooth[:, j], label=spec.name, lw=1.4)[0]
            if window > 1:
                ax.plot(steps, values[:, j], color=line.get_color(), lw=0.5, alpha=0.25)
        ax.set_title(f"{name}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        finite = values[torch.isfinite(values)]
        if finite.numel() and bool((finite > 0).all()):
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog", linthresh=1e-3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path)
    return path


def plot_cosines(histories: dict[str, History], path: Path) -> Path:
    """Cosine matrices of the task gradients at the shared feature, methods × checkpoints."""
    from matplotlib.figure import Figure

    names = list(histories)
    cols = max(len(h.cosine) for h in histories.values())
    fig = Figure(figsize=(2.4 * cols + 0.8, 2.3 * len(names)), dpi=100, layout="constrained")
    axes = fig.subplots(len(names), cols, squeeze=False)
    labels = [t.name for t in TASKS]
    image = None
    for r, name in enumerate(names):
        for c, (step, mat) in enumerate(sorted(histories[name].cosine.items())):
            ax = axes[r][c]
            image = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
            for a in range(NUM_TASKS):
                for b in range(NUM_TASKS):
                    ax.text(b, a, f"{mat[a][b]:.2f}", ha="center", va="center", fontsize=6)
            ax.set_xticks(range(NUM_TASKS), labels, fontsize=6, rotation=45)
            ax.set_yticks(range(NUM_TASKS), labels, fontsize=6)
            ax.set_title(f"{name}, step {step}", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="cosine")
    fig.suptitle("Cosine of task gradients w.r.t. the shared feature (probe batch)", fontsize=10)
    fig.savefig(path)
    return path


def write_plots(histories: dict[str, History], out: Path) -> list[Path]:
    """All PNGs of the run into ``out``; returns their paths."""
    paths = [plot_metrics(histories, out / "metrics.png")]
    alpha = _per_step_plot(histories, "alpha", ["gradient", "hybrid"], "α_t",
                           "IMTL-G weights α on the (scaled) task gradients", out / "alpha.png")
    scale = _per_step_plot(histories, "scale", ["loss", "hybrid"], "e^s_t",
                           "IMTL-L loss scales e^s", out / "scales.png")
    paths += [p for p in (alpha, scale) if p is not None]
    paths.append(plot_cosines(histories, out / "cosine.png"))
    return paths


# ----------------------------------------------------------------------------------------- CLI


def _to_json(histories: dict[str, History], args: argparse.Namespace, table: str) -> dict[str, Any]:
    finals = {m: h.final for m, h in histories.items()}
    base = finals.get("ew")
    every = max(1, args.steps // 200)
    return {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "tasks": [t._asdict() for t in TASKS],
        "table": table,
        "methods": {
            m: {
                "final": dict(zip([t.name for t in TASKS], h.final, strict=True)),
                "delta_m_vs_ew": None if base is None else delta_m(h.final, base),
                "seconds": h.seconds,
                "skipped_steps": h.skipped_steps,
                "eval_steps": h.eval_steps,
                "metrics": h.metrics,
                "cosine": {str(k): v for k, v in h.cosine.items()},
                "every": every,
                "train_loss": _finite_list(h.train_loss, every),
                "alpha": _finite_list(h.alpha, every),
                "scale": _finite_list(h.scale, every),
            }
            for m, h in histories.items()
        },
    }


def _finite_list(values: Tensor | None, every: int) -> list[list[float | None]] | None:
    """Every ``every``-th row as a list; NaN as JSON null."""
    if values is None:
        return None
    rows = values[every - 1 :: every].tolist()
    return [[v if math.isfinite(v) else None for v in row] for row in rows]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m imtl_func.demo",
        description="Train one network on four digit tasks with equal weighting and IMTL "
                    "('loss', 'gradient', 'hybrid'); print held-out metrics and write plots.")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of " + ",".join(METHODS) + " (default: all)")
    parser.add_argument("--steps", type=int, default=400, help="training steps per method")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile(step, fullgraph=True) (slow to start on CPU)")
    parser.add_argument("--module", action="store_true",
                        help="use the stateful imtl_func.nn.IMTL module instead of the "
                             "functional step")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=20,
                        help="steps between held-out evaluations")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the model is tiny, and extra threads "
                             "only contend on a busy machine)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--no-plots", action="store_true", help="write only the table and JSON")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.eval_every < 1 or args.batch_size < 1 or args.threads < 1:
        parser.error("--eval-every, --batch-size and --threads must be positive")
    if args.compile and args.module:
        parser.error("--compile compiles the functional step; it does not apply to --module")
    args.methods = methods
    return args


def _require_extras(plots: bool) -> None:
    """Exit with the install line when the ``examples`` extra is missing."""
    import importlib.util

    needed = ["sklearn", "tqdm", *(["matplotlib"] if plots else [])]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"the demo needs {', '.join(missing)}: "
                         "pip install 'imtl_func[examples]'")


def main(argv: Sequence[str] | None = None) -> dict[str, History]:
    """Run the demo from command-line arguments; return each method's :class:`History`."""
    args = parse_args(argv)
    _require_extras(plots=not args.no_plots)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # leave an in-process caller's setting as it was


def _run(args: argparse.Namespace) -> dict[str, History]:
    device = torch.device(args.device)
    data = load_data(device)
    n_train, n_test = data.x_train.shape[0], data.x_test.shape[0]
    print(f"digits: {n_train} train / {n_test} held-out images, tasks: "
          f"{', '.join(t.name for t in TASKS)}; {args.steps} steps x {len(args.methods)} methods "
          f"on {device}" + (" (compiled)" if args.compile else ""))
    histories: dict[str, History] = {}
    for method in args.methods:
        histories[method] = train(
            method, data, steps=args.steps, seed=args.seed, lr=args.lr,
            batch_size=args.batch_size, eval_every=args.eval_every, compile=args.compile,
            use_module=args.module, progress=not args.no_progress)

    table = format_table({m: h.final for m, h in histories.items()})
    print()
    print(table)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    paths = [] if args.no_plots else write_plots(histories, out)
    (out / "table.txt").write_text(table + "\n", encoding="utf-8")
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(_to_json(histories, args, table), indent=1),
                            encoding="utf-8")
    total = sum(h.seconds for h in histories.values())
    print(f"\ntraining took {total:.1f} s "
          f"({', '.join(f'{m} {h.seconds:.1f} s' for m, h in histories.items())})")
    print(f"wrote {', '.join(str(p) for p in [*paths, out / 'table.txt', metrics_path])}")
    return histories


if __name__ == "__main__":
    main()
