"""One suite for every weighting × scale rule × path: the invariants each combination keeps.

Paths: feature level with one ``decode``, feature level with per-task decoders, parameter level,
and ``nn.IMTL`` given the same transform. Invariants: shapes and structure, finiteness, the paths
agree, ``torch.compile(fullgraph=True)`` equals eager, permuting the tasks permutes ``α`` and
leaves the shared update unchanged, and the gate makes a step with a NaN loss a no-op.
"""

from __future__ import annotations

import itertools

import optree
import pytest
import torch
from torch.func import functional_call

import imtl_func as imtl

T = 3
F64 = torch.float64


def _inverse_norm(gramian, losses):
    """A user weighting: α_t ∝ 1 / ‖g_t‖ (every task's gradient at unit length), Σα = 1."""
    w = 1 / gramian.to(F64).diagonal().clamp_min(1e-300).sqrt()
    return w / w.sum()


WEIGHTINGS = {
    "imtl_g": imtl.imtl_g,
    "equal": imtl.equal,
    "inverse_norm": lambda: imtl.weighting(_inverse_norm),
}
RULES = {
    "none": lambda: None,
    "newton": imtl.scale_newton,
    "adam": imtl.scale_adam,
    "sgd": lambda: imtl.scale_sgd(0.05),
    "frozen": imtl.scale_frozen,
}
PATHS = ["decode", "per_task", "parameter"]
CASES = list(itertools.product(WEIGHTINGS, RULES))


def _problem(order=(0, 1, 2), nan_task=None):
    torch.manual_seed(0)
    enc = torch.nn.Linear(5, 6).double()
    heads = torch.nn.ModuleList(torch.nn.Linear(6, 1) for _ in range(T)).double()
    factors = torch.tensor([1.0, 30.0, 0.2], dtype=F64)
    shared = {k: v.detach() for k, v in enc.named_parameters()}
    task = {k: v.detach() for k, v in heads.named_parameters()}
    x, y = torch.randn(16, 5, dtype=F64), torch.randn(16, T, dtype=F64)

    def encode(p, x, y):
        return torch.tanh(functional_call(enc, p, (x,)))

    def head(t):
        def loss(tp, z, x, y):
            sub = {k.split(".", 1)[1]: v for k, v in tp.items() if k.startswith(f"{t}.")}
            value = ((functional_call(heads[t], sub, (z,)).squeeze(-1) - y[:, t]) ** 2).mean()
            return value * (float("nan") if t == nan_task else factors[t])
        return loss

    per_task = [head(t) for t in order]

    def decode(tp, z, x, y):
        return torch.stack([f(tp, z, x, y) for f in per_task])

    def loss_fn(sp, tp, x, y):
        return decode(tp, encode(sp, x, y), x, y)

    return encode, per_task, decode, loss_fn, shared, task, x, y


def _transform(weighting, rule):
    return imtl.transform(WEIGHTINGS[weighting](), RULES[rule]())


def _step(path, tx, problem):
    encode, per_task, decode, loss_fn, *_ = problem
    if path == "parameter":
        return imtl.value_and_grad(loss_fn, tx)
    return imtl.mtl_value_and_grad(encode, per_task if path == "per_task" else decode, tx)


def _run(path, tx, problem, steps=3, compiled=False):
    *_, shared, task, x, y = problem
    step = _step(path, tx, problem)
    state = step.init(T, dtype=F64)
    call = torch.compile(step, fullgraph=True, backend="eager") if compiled else step
    outs = []
    for _ in range(steps):
        out = call(shared, task, state, x, y)
        outs.append(out)
        state = out.state
    return outs


def _close(a, b, **kw):
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b), strict=True):
        torch.testing.assert_close(x, y, equal_nan=True, **kw)


@pytest.mark.parametrize(("weighting", "rule"), CASES)
def test_shapes_finiteness_and_paths_agree(weighting, rule):
    tx = _transform(weighting, rule)
    problem = _problem()
    runs = {path: _run(path, tx, problem) for path in PATHS}
    *_, shared, task, _, _ = problem
    for outs in runs.values():
        for out in outs:
            assert bool(out.info.finite)
            assert out.info.alpha.shape == (T,) and out.info.scale.shape == (T,)
            assert out.info.nonfinite.losses.shape == (T,)
            assert optree.tree_structure(out.grads.shared) == optree.tree_structure(shared)
            assert optree.tree_structure(out.grads.task) == optree.tree_structure(task)
            assert optree.tree_structure(out.state) == optree.tree_structure(
                tx.init(T, dtype=F64))
            assert all(torch.isfinite(g).all() for g in optree.tree_leaves(out.grads))
    # Feature level: one decode and per-task decoders are the same computation.
    _close([o[:4] for o in runs["decode"]], [o[:4] for o in runs["per_task"]],
           rtol=1e-9, atol=1e-12)
    if not tx.needs_gramian:  # without a Gramian, the level makes no difference
        _close([o[:4] for o in runs["decode"]], [o[:4] for o in runs["parameter"]],
               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("weighting", "rule"), [c for c in CASES if c[1] in ("none", "newton")])
@pytest.mark.parametrize("path", PATHS)
def test_compiled_fullgraph_equals_eager(weighting, rule, path):
    tx = _transform(weighting, rule)
    problem = _problem()
    eager = _run(path, tx, problem, steps=2)
    torch._dynamo.reset()
    compiled = _run(path, tx, problem, steps=2, compiled=True)
    _close([o[:4] for o in compiled], [o[:4] for o in eager], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("weighting", "rule"), CASES)
@pytest.mark.parametrize("path", ["per_task", "parameter"])
def test_permuting_the_tasks_permutes_alpha_and_keeps_the_shared_update(weighting, rule, path):
    tx = _transform(weighting, rule)
    order = (2, 0, 1)
    base = _run(path, tx, _problem(), steps=2)[-1]
    perm = _run(path, tx, _problem(order), steps=2)[-1]
    idx = torch.tensor(order)
    torch.testing.assert_close(perm.info.alpha, base.info.alpha[idx], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(perm.state.log_scale, base.state.log_scale[idx], rtol=1e-9,
                               atol=1e-12)
    _close(perm.grads, base.grads, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("weighting", "rule"), CASES)
@pytest.mark.parametrize("path", PATHS)
def test_a_nan_loss_trips_the_gate(weighting, rule, path):
    tx = _transform(weighting, rule)
    problem = _problem(nan_task=1)
    *_, shared, task, x, y = problem
    step = _step(path, tx, problem)
    state = step.init(T, dtype=F64)
    out = step(shared, task, state, x, y)
    assert not bool(out.info.finite)
    assert out.info.nonfinite.losses.tolist() == [False, True, False]
    assert all(bool((g == 0).all()) for g in optree.tree_leaves(out.grads))
    _close(out.state, state, rtol=0, atol=0)


@pytest.mark.parametrize(("weighting", "rule"), CASES)
def test_the_module_runs_the_same_transform(weighting, rule):
    """``nn.IMTL(transform)`` writes the feature-level step's gradients and moves the scales
    with the transform's rule."""
    tx = _transform(weighting, rule)
    problem = _problem()
    ref = _run("decode", tx, problem, steps=2)
    torch.manual_seed(0)
    enc = torch.nn.Linear(5, 6).double()
    heads = torch.nn.ModuleList(torch.nn.Linear(6, 1) for _ in range(T)).double()
    *_, x, y = problem
    factors = [1.0, 30.0, 0.2]
    module = imtl.nn.IMTL(tx, num_losses=T).double()
    for k in range(2):
        for p in [*enc.parameters(), *heads.parameters()]:
            p.grad = None
        z = torch.tanh(enc(x))
        losses = [((h(z).squeeze(-1) - y[:, t]) ** 2).mean() * factors[t]
                  for t, h in enumerate(heads)]
        module(z, losses)
        grads = dict(enc.named_parameters())
        for name, p in grads.items():
            torch.testing.assert_close(p.grad, ref[k].grads.shared[name], rtol=1e-9, atol=1e-12)
        for name, p in heads.named_parameters():
            torch.testing.assert_close(p.grad, ref[k].grads.task[name], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(module.info.alpha, ref[k].info.alpha, rtol=1e-9, atol=1e-12)
        if tx.learns_scales:
            torch.testing.assert_close(module.log_scale, ref[k].state.log_scale, rtol=1e-9,
                                       atol=1e-12)
