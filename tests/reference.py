"""Slow, obviously-correct references: T separate autograd calls and the paper's closed form."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def paper_alpha(grads: Tensor) -> Tensor:
    """IMTL-G weights by the paper's closed form.

    grads: [T, P]. D = [g_1 − g_t]_t, U = [u_1 − u_t]_t (t = 2..T),
    α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹, α_1 = 1 − Σ α_{2:T}.
    """
    if grads.shape[0] == 1:
        return torch.ones(1, dtype=grads.dtype)
    units = grads / grads.norm(dim=1, keepdim=True)
    d = grads[0] - grads[1:]
    u = units[0] - units[1:]
    rest = grads[0] @ u.T @ torch.linalg.inv(d @ u.T)
    return torch.cat([1 - rest.sum(0, keepdim=True), rest])


class Model(nn.Module):
    """A small encoder and T linear heads; task t's loss is scaled by 10^t."""

    def __init__(self, num_tasks: int = 3, d_in: int = 4, d_hidden: int = 6):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(),
                                     nn.Linear(d_hidden, d_hidden), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(d_hidden, 1) for _ in range(num_tasks))
        self.num_tasks = num_tasks

    def losses(self, z: Tensor, y: Tensor) -> Tensor:
        return torch.stack([
            ((head(z).squeeze(-1) - y[:, t]) ** 2).mean() * 10.0**t
            for t, head in enumerate(self.heads)
        ])


def make_problem(num_tasks: int = 3, batch: int = 16, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    model = Model(num_tasks).to(dtype)
    x = torch.randn(batch, 4, dtype=dtype)
    y = torch.randn(batch, num_tasks, dtype=dtype)
    return model, x, y


def reference_grads(model: Model, x: Tensor, y: Tensor, method: str, log_scale: Tensor,
                    level: str = "feature"):
    """Gradients of every parameter by T separate autograd calls (float64).

    Returns (shared grads list, head grads list, alpha).
    """
    shared = list(model.encoder.parameters())
    heads = list(model.heads.parameters())
    z = model.encoder(x)
    losses = model.losses(z, y)
    scale = torch.exp(log_scale).to(losses.dtype)
    if method == "gradient":
        scale = torch.ones_like(losses)
    if method == "loss":
        total = (scale * losses).sum()
        return (list(torch.autograd.grad(total, shared, retain_graph=True)),
                list(torch.autograd.grad(total, heads)), torch.ones_like(losses))
    wrt = [z] if level == "feature" else shared
    rows = []
    for t in range(len(losses)):
        g = torch.autograd.grad(losses[t], wrt, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([gi.flatten() for gi in g]) * scale[t])
    alpha = paper_alpha(torch.stack(rows))
    weights = alpha * scale
    g_shared = torch.autograd.grad((weights * losses).sum(), shared, retain_graph=True)
    g_heads = torch.autograd.grad((scale * losses).sum(), heads)
    return list(g_shared), list(g_heads), alpha
