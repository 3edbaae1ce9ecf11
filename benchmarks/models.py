"""Benchmark workloads: a shared encoder, T task heads, synthetic data, loss scales 10^(t-1).

Three models:

* ``mlp``: encoder ``128 → 1024 → 1024`` (Linear + ReLU twice), batch 256; head t is
  ``Linear(1024, 1)`` with a mean-squared-error loss against a Gaussian target.
* ``cnn``: encoder of 4 conv layers on ``3 × 32 × 32`` images (3→32 stride 1, 32→64, 64→128,
  128→128 stride 2, ReLU after each), flattened to a ``128·4·4 = 2048`` feature, batch 64;
  head t is ``Linear(2048, 10)`` with a cross-entropy loss against random labels.
* ``dense`` (dense prediction, issue 13): encoder of 3 conv layers on ``3 × 32 × 32`` images
  (3→32 stride 1, 32→64 stride 2, 64→64 stride 1, ReLU after each) giving a feature map
  ``z`` of shape ``[B, 64, 16, 16]``, batch 16; head t is two 3×3 convs on the map
  (64→16, ReLU, 16→K_t) giving a per-pixel output ``[B, K_t, 16, 16]``. Even tasks are
  per-pixel classification (``K = 8`` classes, cross-entropy averaged over pixels, like
  semantic segmentation), odd tasks per-pixel regression (``K = 1``, mean-squared error, like
  depth).

Task t (0-based) has its loss multiplied by ``10^t``, so the raw losses span T orders of
magnitude: the regime IMTL is meant for. No BatchNorm, so the encoder has no buffers and every
row of the benchmark runs the same arithmetic.

Head parameters are named as in ``heads.named_parameters()`` (``'{t}.weight'`` for a linear
head, ``'{t}.0.weight'`` and ``'{t}.2.weight'`` for a conv head); the head functions below read
them from a flat dict, so the same function serves every row.
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
    "MODELS",
    "QUICK_SIZES",
    "Size",
    "Workload",
    "decode",
    "head_forward",
    "loss_list",
    "make_workload",
    "per_task_losses",
    "task_loss",
]

MODELS = ("mlp", "cnn", "dense")


@dataclass(frozen=True)
class Size:
    """Dimensions of one model; the full ones are the benchmark's, the quick ones are tiny.

    Attributes:
        batch: batch size B.
        widths: MLP: input width and hidden widths. CNN / dense: conv channels, input first.
        image: image side (CNN, dense).
        head: dense: hidden channels of each conv head.
        classes: classes of a classification head (CNN; dense even tasks).
    """

    batch: int
    widths: tuple[int, ...]
    image: int = 32
    head: int = 0
    classes: int = 10


FULL_SIZES = {
    "mlp": Size(batch=256, widths=(128, 1024, 1024)),
    "cnn": Size(batch=64, widths=(3, 32, 64, 128, 128), image=32),
    "dense": Size(batch=16, widths=(3, 32, 64, 64), image=32, head=16, classes=8),
}
QUICK_SIZES = {
    "mlp": Size(batch=8, widths=(16, 32, 32)),
    "cnn": Size(batch=4, widths=(3, 4, 8, 8, 8), image=8),
    "dense": Size(batch=2, widths=(3, 4, 8, 8), image=8, head=4, classes=3),
}


@dataclass
class Workload:
    """One benchmark configuration: a model and one fixed batch.

    Attributes:
        name: one of :data:`MODELS`.
        encoder: shared module, ``x -> z``; ``z`` is ``[B, D]`` (mlp, cnn) or a feature map
            ``[B, C, H, W]`` (dense).
        heads: ``nn.ModuleList`` of T heads (see :func:`head_forward`).
        x: ``[B, ...]`` input batch.
        y: T targets: ``[B]`` float (mlp), ``[B]`` int64 labels (cnn); dense: ``[B, H, W]``
            int64 class maps (even t) or float maps (odd t).
        scales: ``[T]`` loss multipliers ``10^t``.
    """

    name: str
    encoder: nn.Module
    heads: nn.ModuleList
    x: Tensor
    y: tuple[Tensor, ...]
    scales: Tensor

    @property
    def num_tasks(self) -> int:
        return len(self.heads)

    def head_keys(self, t: int) -> list[str]:
        """Names of head t's parameters in ``dict(heads.named_parameters())``."""
        return [k for k, _ in self.heads.named_parameters() if k.split(".", 1)[0] == str(t)]


def _mlp_encoder(widths: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(widths):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    return nn.Sequential(*layers)


def _conv_encoder(channels: tuple[int, ...], strides: list[int], flatten: bool) -> nn.Module:
    layers: list[nn.Module] = []
    for (c_in, c_out), stride in zip(itertools.pairwise(channels), strides, strict=True):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, *([nn.Flatten()] if flatten else []))


def _dense_classes(size: Size, t: int) -> int:
    """Output channels of dense head t: classes (even t) or one regression channel (odd t)."""
    return size.classes if t % 2 == 0 else 1


def _dense_head(size: Size, t: int) -> nn.Module:
    c = size.widths[-1]
    return nn.Sequential(
        nn.Conv2d(c, size.head, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(size.head, _dense_classes(size, t), 3, padding=1),
    )


def make_workload(
    name: str, num_tasks: int, size: Size, *, device: str = "cpu", seed: int = 0
) -> Workload:
    """Build the model and its synthetic batch (deterministic in ``seed``).

    Returns:
        a :class:`Workload` on ``device``.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    heads: nn.ModuleList
    if name == "mlp":
        encoder = _mlp_encoder(size.widths)
        x = torch.randn(size.batch, size.widths[0], generator=gen)
        y = tuple(torch.randn(size.batch, generator=gen) for _ in range(num_tasks))
        heads = nn.ModuleList(nn.Linear(size.widths[-1], 1) for _ in range(num_tasks))
    elif name == "cnn":
        strides = [1] + [2] * (len(size.widths) - 2)
        encoder = _conv_encoder(size.widths, strides, flatten=True)
        side = size.image // 2 ** (len(size.widths) - 2)
        x = torch.randn(size.batch, size.widths[0], size.image, size.image, generator=gen)
        y = tuple(
            torch.randint(0, size.classes, (size.batch,), generator=gen) for _ in range(num_tasks)
        )
        feature = size.widths[-1] * side * side
        heads = nn.ModuleList(nn.Linear(feature, size.classes) for _ in range(num_tasks))
    elif name == "dense":
        encoder = _conv_encoder(size.widths, [1, 2, 1], flatten=False)
        side = size.image // 2
        x = torch.randn(size.batch, size.widths[0], size.image, size.image, generator=gen)
        shape = (size.batch, side, side)
        y = tuple(
            torch.randint(0, size.classes, shape, generator=gen)
            if t % 2 == 0
            else torch.randn(shape, generator=gen)
            for t in range(num_tasks)
        )
        heads = nn.ModuleList(_dense_head(size, t) for t in range(num_tasks))
    else:
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    scales = 10.0 ** torch.arange(num_tasks, dtype=torch.float32)
    return Workload(
        name,
        encoder.to(device),
        heads.to(device),
        x.to(device),
        tuple(v.to(device) for v in y),
        scales.to(device),
    )


def head_forward(name: str, head_params: dict[str, Tensor], t: int, z: Tensor) -> Tensor:
    """Head t's prediction from the shared feature.

    Returns:
        ``[B, 1]`` (mlp), ``[B, 10]`` (cnn) or ``[B, K_t, H, W]`` (dense).
    """
    p = head_params
    if name == "dense":
        h = F.relu(F.conv2d(z, p[f"{t}.0.weight"], p[f"{t}.0.bias"], padding=1))
        return F.conv2d(h, p[f"{t}.2.weight"], p[f"{t}.2.bias"], padding=1)
    return F.linear(z, p[f"{t}.weight"], p[f"{t}.bias"])


def task_loss(name: str, t: int, pred: Tensor, target: Tensor) -> Tensor:
    """Unscaled loss of head t: MSE (mlp; dense odd t, averaged over pixels) or cross-entropy
    (cnn; dense even t, averaged over pixels)."""
    if name == "mlp" or (name == "dense" and t % 2 == 1):
        return F.mse_loss(pred.squeeze(1), target)
    return F.cross_entropy(pred, target)


def _scaled_loss(
    name: str,
    head_params: dict[str, Tensor],
    t: int,
    z: Tensor,
    y: tuple[Tensor, ...],
    scales: Tensor,
) -> Tensor:
    return scales[t] * task_loss(name, t, head_forward(name, head_params, t, z), y[t])


def loss_list(
    name: str, head_params: dict[str, Tensor], z: Tensor, y: tuple[Tensor, ...], scales: Tensor
) -> list[Tensor]:
    """The T scaled task losses from the shared feature, each with its own graph after ``z``.

    Args:
        head_params: every head's parameters, named as in ``heads.named_parameters()``.
        z: the shared feature (``[B, D]`` or ``[B, C, H, W]``).
        y: T targets; scales: ``[T]``.

    Returns:
        T scalars ``10^t · loss_t``.
    """
    return [_scaled_loss(name, head_params, t, z, y, scales) for t in range(len(y))]


def per_task_losses(
    name: str, y: tuple[Tensor, ...], scales: Tensor
) -> list[Callable[..., Tensor]]:
    """T loss functions ``loss_t(head_params, z, *batch) -> 10^t · loss_t`` (a scalar), the
    per-task form that ``imtl_func.mtl_value_and_grad(encode, [loss_1, ..., loss_T])`` takes."""

    def make(t: int) -> Callable[..., Tensor]:
        def loss(head_params: dict[str, Tensor], z: Tensor, *batch: Tensor) -> Tensor:
            return _scaled_loss(name, head_params, t, z, y, scales)

        return loss

    return [make(t) for t in range(len(y))]


def decode(
    name: str, head_params: dict[str, Tensor], z: Tensor, y: tuple[Tensor, ...], scales: Tensor
) -> Tensor:
    """:func:`loss_list` stacked: ``[T]`` losses ``10^t · loss_t``, a pure function."""
    return torch.stack(loss_list(name, head_params, z, y, scales))
