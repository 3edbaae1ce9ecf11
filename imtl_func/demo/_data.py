"""The demo's tasks and data: scikit-learn's digits, a fixed split, and the batch order."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


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

#: dtype of the data, the network and the IMTL state. float64 costs about nothing on this
#: overhead-bound model and keeps the printed table the same across CPUs and thread counts
#: (see "Reproducibility" in :mod:`imtl_func.demo`).
DTYPE = torch.float64


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


def load_data(device: str | torch.device = "cpu", test_fraction: float = 0.2,
              dtype: torch.dtype = DTYPE) -> Data:
    """scikit-learn's digits (bundled, no download), split 80/20 stratified by digit.

    The split uses ``random_state=0`` whatever the training seed, so every run is scored on the
    same 360 held-out images.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = torch.as_tensor(digits.data, dtype=dtype)  # [1797, 64], values 0..16
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
            (y >= 5).to(dtype).to(device),
            x.sum(dim=1).to(device),
        )

    return Data(*part(idx_train), *part(idx_test))


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
