"""Every public step under torch.compile(fullgraph=True) gives the eager result (CPU)."""

from __future__ import annotations

import optree
import pytest
import torch
from reference import make_problem
from test_steps import functional

import imtl_func as imtl


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    la, lb = optree.tree_leaves(a), optree.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        if x.is_floating_point():
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, equal_nan=True)
        else:
            assert torch.equal(x, y)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# fullgraph=True is a property of Dynamo's capture, the same for every backend; "aot_eager" also
# runs AOTAutograd's functionalization but skips Inductor's code generation, which costs most of
# the compile time on a 2-core CI machine. One case runs the default Inductor backend end to end.
CASES = [
    ("feature", "hybrid", "inductor"),
    ("feature", "gradient", "aot_eager"),
    ("feature", "loss", "aot_eager"),
    ("parameter", "hybrid", "aot_eager"),
    ("parameter", "gradient", "aot_eager"),
    ("parameter", "loss", "aot_eager"),
]


@pytest.mark.parametrize(("level", "method", "backend"), CASES)
def test_compiled_step_matches_eager(level, method, backend):
    model, x, y = make_problem(num_tasks=3, dtype=torch.float32)
    shared, task, encode, decode, loss_fn = functional(model)
    log_scale = None if method == "gradient" else [0.2, -1.0, -3.0]
    state = imtl.preset(method).init(3, log_scale=log_scale)
    step = (imtl.mtl_value_and_grad(encode, decode, method) if level == "feature"
            else imtl.value_and_grad(loss_fn, method))
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    eager_state, compiled_state = state, state
    for i in range(3):  # the state threads through: no recompilation, same trajectory
        xb, yb = x + 0.1 * i, y * (1 + i)
        e = step(shared, task, eager_state, xb, yb)
        c = compiled(shared, task, compiled_state, xb, yb)
        assert_same(c, e)
        eager_state, compiled_state = e.state, c.state
    assert bool(c.info.finite)


def test_compiled_step_skips_non_finite_like_eager():
    model, x, y = make_problem(num_tasks=3, dtype=torch.float32)
    shared, task, encode, decode, _ = functional(model)
    y = y.clone()
    y[0, 0] = float("nan")
    state = imtl.preset("hybrid").init(3)
    step = imtl.mtl_value_and_grad(encode, decode, "hybrid")
    c = torch.compile(step, fullgraph=True, backend="aot_eager")(shared, task, state, x, y)
    e = step(shared, task, state, x, y)
    assert not c.info.finite and not e.info.finite
    # Eagerly each task's row is its own backward, so the NaN stays in task 0's row; the
    # compiled step's batched backward carries 0 · NaN into every row.
    assert e.info.nonfinite.gramian.tolist() == [True, False, False]
    assert c.info.nonfinite.gramian.tolist() == [True, True, True]
    no_k = c.info.nonfinite._replace(gramian=e.info.nonfinite.gramian)
    assert_same(c._replace(info=c.info._replace(nonfinite=no_k)), e)


def test_compiled_transform_update_matches_eager():
    tx = imtl.preset("hybrid")
    state = tx.init(4)
    torch.manual_seed(0)
    g = torch.randn(4, 9)
    losses = torch.tensor([0.1, 1.0, 10.0, 100.0])
    e = tx.update(losses, imtl.gramian(g), state)
    c = torch.compile(tx.update, fullgraph=True)(losses, imtl.gramian(g), state)
    assert_same(c, e)


def test_compiled_per_task_step_matches_eager():
    from test_steps import _per_task_decoders

    model, x, y = make_problem(num_tasks=3, dtype=torch.float32)
    shared, task, encode, _, _ = functional(model)
    state = imtl.preset("hybrid").init(3, log_scale=[0.2, -1.0, -3.0])
    step = imtl.mtl_value_and_grad(encode, _per_task_decoders(model), "hybrid")
    c = torch.compile(step, fullgraph=True, backend="aot_eager")(shared, task, state, x, y)
    assert_same(c, step(shared, task, state, x, y))
