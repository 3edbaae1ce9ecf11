"""nn.Modules through torch.func.functional_call: a CNN encoder with BatchNorm in train mode."""

from __future__ import annotations

import copy

import torch
from reference import paper_alpha
from torch import nn
from torch.func import functional_call

import imtl_func as imtl

T = 3


def make_cnn():
    torch.manual_seed(0)
    encoder = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
    ).double()
    heads = nn.ModuleList(
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1)) for _ in range(T)
    ).double()
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    y = torch.randn(6, T, dtype=torch.float64)
    return encoder, heads, x, y


def head_losses(heads, z, y):
    return torch.stack([((h(z).squeeze(-1) - y[:, t]) ** 2).mean() * 10.0**t
                        for t, h in enumerate(heads)])


def test_batchnorm_buffers_come_back_updated_and_gradients_match():
    encoder, heads, x, y = make_cnn()
    encoder.train()
    reference = copy.deepcopy(encoder)
    params = {k: v.detach() for k, v in encoder.named_parameters()}
    buffers = {k: v.detach() for k, v in encoder.named_buffers()}
    head_params = {k: v.detach() for k, v in heads.named_parameters()}

    def encode(p, buffers, x, y):
        # Clone the buffers inside the differentiated function, update the clones, return them.
        new_buffers = {k: v.clone() for k, v in buffers.items()}
        z = functional_call(encoder, (p, new_buffers), (x,))
        return z, new_buffers

    def decode(hp, z, buffers, x, y):
        return head_losses(lambda_heads(hp), z, y)

    def lambda_heads(hp):
        return [lambda z, t=t: functional_call(heads[t], _sub(hp, f"{t}."), (z,))
                for t in range(T)]

    state = imtl.preset("gradient").init(T, dtype=torch.float64)
    step = imtl.mtl_value_and_grad(encode, decode, "gradient", encoder_has_aux=True)
    out = step(params, head_params, state, buffers, x, y)
    new_buffers, _ = out.aux

    # The same module in an ordinary forward pass updates its running statistics identically.
    z_ref = reference(x)
    for k, v in reference.named_buffers():
        torch.testing.assert_close(new_buffers[k], v, rtol=1e-12, atol=1e-12)
        assert not torch.equal(new_buffers[k], buffers[k]) or "num_batches" in k
    assert new_buffers["1.num_batches_tracked"] == 1
    # The inputs were not mutated.
    for k, v in encoder.named_buffers():
        torch.testing.assert_close(buffers[k], v)

    # Gradients: T autograd calls w.r.t. z and the paper's closed form.
    losses = head_losses(heads, z_ref, y)
    rows = torch.stack([torch.autograd.grad(losses[t], z_ref, retain_graph=True)[0].flatten()
                        for t in range(T)])
    alpha = paper_alpha(rows)
    torch.testing.assert_close(out.info.alpha, alpha)
    expected = torch.autograd.grad((alpha * losses).sum(), list(reference.parameters()))
    for (k, _), g in zip(reference.named_parameters(), expected, strict=True):
        torch.testing.assert_close(out.grads.shared[k], g, rtol=1e-9, atol=1e-12)


def _sub(tree, prefix):
    return {k[len(prefix):]: v for k, v in tree.items() if k.startswith(prefix)}
