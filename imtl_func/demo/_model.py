"""The demo's network (shared encoder, four heads), its four raw losses and held-out metrics."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imtl_func.demo._data import DTYPE

FEATURE_DIM = 32
HIDDEN_DIM = 128
PIXELS = 64


class Heads(nn.Module):
    """The four task heads on the shared ``[B, 32]`` feature.

    The ink head predicts in raw ink units as ``ink_mean + ink_std · linear(z)`` with the two
    constants fixed from the training set (see :mod:`imtl_func.demo`).
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
                device: str | torch.device = "cpu", dtype: torch.dtype = DTYPE
                ) -> tuple[nn.Module, Heads]:
    """Shared encoder ``64 -> 128 -> 32`` (ReLU) and the heads, initialised from ``seed``
    (without touching the global random state). The initial values are drawn in float32 and then
    cast, so they are the same whatever ``dtype``."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    encoder = nn.Sequential(
        nn.Linear(PIXELS, HIDDEN_DIM), nn.ReLU(),
        nn.Linear(HIDDEN_DIM, FEATURE_DIM), nn.ReLU(),
    )
    heads = Heads(ink_mean, ink_std)
    torch.random.set_rng_state(gen_state)
    return encoder.to(device, dtype), heads.to(device, dtype)


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
    """Held-out metrics, in ``TASKS`` order: class acc %, ge5 acc %, ink RMSE, recon MSE×1e3."""
    x, cls, ge5, ink = batch
    logits, ge5_logit, ink_pred, recon = heads(encoder(x))
    return [
        100.0 * (logits.argmax(-1) == cls).float().mean().item(),
        100.0 * ((ge5_logit > 0).to(ge5.dtype) == ge5).float().mean().item(),
        (ink_pred - ink).pow(2).mean().sqrt().item(),
        1e3 * (recon - x).pow(2).mean().item(),
    ]
