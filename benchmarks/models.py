"""Benchmark workloads: a shared encoder, T linear heads, synthetic data, loss scales 10^(t-1).

Two models, as in issue 4:

* ``mlp``: encoder ``128 → 1024 → 1024`` (Linear + ReLU twice), batch 256; head t is
  ``Linear(1024, 1)`` with a mean-squared-error loss against a Gaussian target.
* ``cnn``: encoder of 4 conv layers on ``3 × 32 × 32`` images (3→32 stride 1, 32→64, 64→128,
  128→128 stride 2, ReLU after each), flattened to a ``128·4·4 = 2048`` feature, batch 64;
  head t is ``Linear(2048, 10)`` with a cross-entropy loss against random labels.

Task t (0-based) has its loss multiplied by ``10^t``, so the raw losses span T orders of
magnitude: the regime IMTL is meant for. No BatchNorm, so the encoder has no buffers and every
row of the benchmark runs the same arithmetic.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FULL_SIZES",
    "QUICK_SIZES",
    "Size",
    "Workload",
    "decode",
    "loss_list",
    "make_workload",
    "per_task_losses",
]


@dataclass(frozen=True)
class Size:
    """Dimensions of one model; the full ones are the issue's, the quick ones are tiny."""

    batch: int
    # MLP: input width and hidden widths. CNN: image side and conv channels.
    widths: tuple[int, ...]
    image: int = 32


FULL_SIZES = {
    "mlp": Size(batch=256, widths=(128, 1024, 1024)),
    "cnn": Size(batch=64, widths=(3, 32, 64, 128, 128), image=32),
}
QUICK_SIZES = {
    "mlp": Size(batch=8, widths=(16, 32, 32)),
    "cnn": Size(batch=4, widths=(3, 4, 8, 8, 8), image=8),
}


@dataclass
class Workload:
    """One benchmark configuration: a model and one fixed batch.

    Attributes:
        name: ``'mlp'`` or ``'cnn'``.
        encoder: shared module, ``x -> z`` with ``z`` of shape ``[B, D]``.
        heads: ``nn.ModuleList`` of T ``nn.Linear(D, C)`` heads.
        x: ``[B, ...]`` input batch.
        y: ``[T, B]`` targets (float for the MLP, int64 labels for the CNN).
        scales: ``[T]`` loss multipliers ``10^t``.
    """

    name: str
    encoder: nn.Module
    heads: nn.ModuleList
    x: Tensor
    y: Tensor
    scales: Tensor

    @property
    def num_tasks(self) -> int:
        return len(self.heads)


def _mlp_encoder(widths: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(widths):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers)


def _cnn_encoder(channels: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (c_in, c_out) in enumerate(itertools.pairwise(channels)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten())


def make_workload(
    name: str, num_tasks: int, size: Size, *, device: str = "cpu", seed: int = 0
) -> Workload:
    """Build the model and its synthetic batch (deterministic in ``seed``).

    Returns:
        a :class:`Workload` on ``device``; heads have ``C = 1`` (MLP) or ``C = 10`` (CNN).
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if name == "mlp":
        encoder = _mlp_encoder(size.widths)
        feature, out = size.widths[-1], 1
        x = torch.randn(size.batch, size.widths[0], generator=gen)
        y = torch.randn(num_tasks, size.batch, generator=gen)
    elif name == "cnn":
        encoder = _cnn_encoder(size.widths)
        side = size.image // 2 ** (len(size.widths) - 2)
        feature, out = size.widths[-1] * side * side, 10
        x = torch.randn(size.batch, size.widths[0], size.image, size.image, generator=gen)
        y = torch.randint(0, out, (num_tasks, size.batch), generator=gen)
    else:
        raise ValueError(f"unknown model {name!r}; expected 'mlp' or 'cnn'")
    heads = nn.ModuleList(nn.Linear(feature, out) for _ in range(num_tasks))
    scales = 10.0 ** torch.arange(num_tasks, dtype=torch.float32)
    return Workload(
        name, encoder.to(device), heads.to(device), x.to(device), y.to(device), scales.to(device)
    )


def task_loss(name: str, pred: Tensor, target: Tensor) -> Tensor:
    """Unscaled loss of one head: MSE (``pred [B, 1]``) or cross-entropy (``pred [B, 10]``)."""
    if name == "mlp":
        return F.mse_loss(pred.squeeze(-1), target)
    return F.cross_entropy(pred, target)


def loss_list(
    name: str, head_params: dict[str, Tensor], z: Tensor, y: Tensor, scales: Tensor
) -> list[Tensor]:
    """The T scaled task losses from the shared feature, each with its own graph after ``z``.

    Args:
        head_params: ``{'{t}.weight': [C, D], '{t}.bias': [C]}`` for every head t
            (the names of ``heads.named_parameters()``).
        z: ``[B, D]`` shared feature.
        y: ``[T, B]`` targets; scales: ``[T]``.

    Returns:
        T scalars ``10^t · loss_t``.
    """
    return [
        scales[t]
        * task_loss(name, F.linear(z, head_params[f"{t}.weight"], head_params[f"{t}.bias"]), y[t])
        for t in range(y.shape[0])
    ]


def per_task_losses(name: str, y: Tensor, scales: Tensor) -> list[Callable[..., Tensor]]:
    """T loss functions ``loss_t(head_params, z, *batch) -> 10^t · loss_t`` (a scalar), the
    per-task form that ``imtl_func.mtl_value_and_grad(encode, [loss_1, ..., loss_T])`` takes."""

    def make(t: int) -> Callable[..., Tensor]:
        def loss(head_params: dict[str, Tensor], z: Tensor, *batch: Tensor) -> Tensor:
            pred = F.linear(z, head_params[f"{t}.weight"], head_params[f"{t}.bias"])
            return scales[t] * task_loss(name, pred, y[t])

        return loss

    return [make(t) for t in range(y.shape[0])]


def decode(
    name: str, head_params: dict[str, Tensor], z: Tensor, y: Tensor, scales: Tensor
) -> Tensor:
    """:func:`loss_list` stacked: ``[T]`` losses ``10^t · loss_t``, a pure function."""
    return torch.stack(loss_list(name, head_params, z, y, scales))
