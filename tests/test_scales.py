"""IMTL-L scaled losses and the scale rules."""

from __future__ import annotations

import math

import pytest
import torch

import imtl_func as imtl


def test_scaled_losses_and_their_gradient():
    losses = torch.tensor([0.5, 2.0, 300.0], dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.1, -0.7, -5.0], dtype=torch.float64, requires_grad=True)
    scaled = imtl.scale_losses(losses, s)
    torch.testing.assert_close(scaled, torch.exp(s) * losses - s)
    (ds,) = torch.autograd.grad(scaled.sum(), s)
    torch.testing.assert_close(imtl.scale_grad(losses, s), ds)
    assert not imtl.scale_grad(losses, s).requires_grad


def _run(rule, loss_values, steps, method="hybrid"):
    tx = imtl.preset(method, scale_rule=rule)
    losses = torch.tensor(loss_values, dtype=torch.float64)
    t = len(loss_values)
    state = tx.init(t, dtype=torch.float64)
    k = torch.eye(t, dtype=torch.float64)
    for _ in range(steps):
        _, state, _ = tx.update(losses, k if tx.needs_gramian else None, state)
    return state


LOSSES = [1e-3, 3e-2, 1.0, 17.0, 1e3]


@pytest.mark.parametrize("method", ["loss", "hybrid"])
def test_default_rule_converges_to_minus_log_loss(method):
    state = _run(None, LOSSES, 200, method)
    expected = torch.tensor([-math.log(x) for x in LOSSES], dtype=torch.float64)
    torch.testing.assert_close(state.log_scale, expected, atol=1e-2, rtol=0)
    state = _run(None, LOSSES, 400, method)
    torch.testing.assert_close(state.log_scale, expected, atol=1e-6, rtol=0)


def test_default_rule_steps_are_bounded_by_lr():
    tx = imtl.preset("loss", scale_rule=imtl.scale_newton(lr=0.1))
    state = tx.init(2, dtype=torch.float64)
    _, new, _ = tx.update(torch.tensor([1e-9, 1e9], dtype=torch.float64), None, state)
    delta = new.log_scale - state.log_scale
    assert (delta.abs() <= 0.1 + 1e-12).all()
    assert delta[0] > 0 > delta[1]


def test_adam_rule_converges():
    state = _run(imtl.scale_adam(lr=0.05), LOSSES, 3000, "loss")
    expected = torch.tensor([-math.log(x) for x in LOSSES], dtype=torch.float64)
    torch.testing.assert_close(state.log_scale, expected, atol=2e-2, rtol=0)


def test_plain_sgd_diverges_for_large_losses_where_the_default_does_not():
    sgd = _run(imtl.scale_sgd(lr=0.1), [1e3], 50, "loss")
    # SGD overshoots to the bound on |s| (40) and oscillates far from s* = -6.9.
    assert torch.isfinite(sgd.log_scale).all()
    assert (sgd.log_scale + math.log(1e3)).abs().max() > 20
    newton = _run(None, [1e3], 50, "loss")
    assert torch.isfinite(newton.log_scale).all()
    assert -math.log(1e3) - 0.5 < newton.log_scale.item() < 0


def test_sgd_rule_converges_for_small_losses():
    state = _run(imtl.scale_sgd(lr=0.5), [0.5, 2.0], 200, "loss")
    torch.testing.assert_close(state.log_scale, torch.tensor([math.log(2), -math.log(2)],
                                                             dtype=torch.float64))


def test_frozen_rule_keeps_scales():
    state = _run(imtl.scale_frozen(), [0.5, 2.0], 5, "loss")
    assert torch.equal(state.log_scale, torch.zeros(2, dtype=torch.float64))


def test_noisy_losses_fixed_point_is_mean_scaled_loss_one():
    """With noisy losses the default rule settles where E[e^s l] = 1, IMTL-L's own root."""
    gen = torch.Generator().manual_seed(0)
    tx = imtl.preset("loss")
    state = tx.init(1, dtype=torch.float64)
    history = []
    for i in range(4000):
        loss = 10.0 * (1 + 0.3 * torch.randn(1, generator=gen, dtype=torch.float64)).abs()
        _, state, _ = tx.update(loss, None, state)
        if i >= 1000:
            history.append(state.log_scale.item())
    mean_s = sum(history) / len(history)
    assert abs(mean_s - (-math.log(10.0))) < 0.05


def test_gradient_method_has_no_scales():
    state = _run(None, [5.0, 0.1], 10, "gradient")
    assert torch.equal(state.log_scale, torch.zeros(2, dtype=torch.float64))
