"""imtl_func.nn.IMTL as a user runs it: the README usage block, and a short training run."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from imtl_func.nn import IMTL

device = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """A five-task network with a shared encoder and one linear head per task."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(12, 1) for _ in range(5))

    def forward(self, x):
        z = self.encoder(x)
        return z, [head(z) for head in self.heads]


def batches(num: int = 4):
    torch.manual_seed(1)
    for _ in range(num):
        x = torch.randn(32, 8, device=device)
        yield x, [k * x[:, k : k + 1] for k in range(1, 6)]


def test_readme_usage_feature_level():
    net = Net().to(device)
    start = [p.detach().clone() for p in net.parameters()]

    # --- the README block, as written ---
    imtl = IMTL(method="hybrid", num_losses=5, init_loss=None).to(device)
    params = itertools.chain(net.parameters(), imtl.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    for x, targets in batches():
        z = net.encoder(x)
        outputs = [head(z) for head in net.heads]
        l1, l2, l3, l4, l5 = (
            nn.functional.mse_loss(o, t) for o, t in zip(outputs, targets, strict=True))
        losses = [l1, l2, l3, l4, l5]
        shared, specific = imtl(z, losses)
        other_loss = 1e-4 * z.pow(2).mean()
        other_loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # ------------------------------------

    assert shared.shape == () and specific.shape == (5,)
    assert not shared.requires_grad and not specific.requires_grad
    assert imtl.finite
    assert all(not torch.equal(a, b) for a, b in zip(start, net.parameters(), strict=True))
    assert (imtl.log_scale.detach() != 0).all()  # the optimizer trained the scales


def test_readme_usage_parameter_level():
    net = Net().to(device)

    # --- the README block, as written ---
    imtl = IMTL(method="hybrid", num_losses=5, init_loss=None).to(device)
    params = itertools.chain(net.parameters(), imtl.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    for x, targets in batches():
        _, outputs = net(x)
        losses = [nn.functional.mse_loss(o, t) for o, t in zip(outputs, targets, strict=True)]
        grad_loss, scaled_losses = imtl.backward(
            shared_parameters=net.encoder.parameters(), losses=losses)
        other_loss = 1e-4 * sum(h.weight.pow(2).sum() for h in net.heads)
        other_loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # ------------------------------------

    assert grad_loss.shape == () and scaled_losses.shape == (5,)
    assert imtl.finite and (imtl.log_scale.detach() != 0).all()


def test_usage_without_num_losses_and_with_gradient_method():
    net = Net().to(device)
    imtl = IMTL(method="hybrid").to(device)  # sized by the first call
    gradient = IMTL(method="gradient")
    assert list(gradient.parameters()) == []
    optimizer = torch.optim.Adam(itertools.chain(net.parameters(), imtl.parameters()), lr=1e-3)
    for x, targets in batches(2):
        z, outputs = net(x)
        losses = [nn.functional.mse_loss(o, t) for o, t in zip(outputs, targets, strict=True)]
        imtl(z, losses)
        optimizer.step()
        optimizer.zero_grad()
    assert imtl.num_losses == 5 and (imtl.log_scale.detach() != 0).all()
    assert imtl.log_scale.device.type == torch.device(device).type


def test_training_run_balances_loss_scales():
    """Tasks whose losses differ by 1e2 each way: all decrease, and e^s·l approaches 1."""
    torch.manual_seed(0)
    c = torch.tensor([0.1, 1.0, 10.0])  # losses of order 1e-2, 1, 1e2
    a = torch.randn(3, 8)
    encoder = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 16), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(3))
    imtl = IMTL(method="hybrid")
    optimizer = torch.optim.Adam([
        {"params": itertools.chain(encoder.parameters(), heads.parameters())},
        {"params": imtl.parameters(), "lr": 0.1, "betas": (0.9, 0.9)},
    ], lr=1e-2)
    raw, scaled = [], []
    for _ in range(200):
        x = torch.randn(64, 8)
        y = c * (2 * torch.tanh(x @ a.T) + 0.5 * torch.randn(64, 3))
        z = encoder(x)
        losses = [((h(z)[:, 0] - y[:, t]) ** 2).mean() for t, h in enumerate(heads)]
        _, scaled_losses = imtl(z, losses)
        s = imtl.log_scale.detach().clone()
        optimizer.step()
        optimizer.zero_grad()
        raw.append(torch.stack(losses).detach())
        scaled.append(scaled_losses + s)  # e^s·l
    raw, scaled = torch.stack(raw), torch.stack(scaled)

    first, last = raw[:5].mean(0), raw[-30:].mean(0)
    assert (first[1:] / first[:-1] > 10).all()  # the loss scales really differ
    assert (last < 0.5 * first).all(), (first, last)  # every task learns
    assert scaled[0, 0] < 0.2 and scaled[0, 2] > 100  # scaled losses start far from 1 ...
    balanced = scaled[-30:].mean(0)
    assert ((balanced > 0.8) & (balanced < 1.25)).all(), balanced  # ... and end near 1
