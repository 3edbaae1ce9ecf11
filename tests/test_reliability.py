"""Inputs real training produces: extreme loss scales, non-positive losses, float16 models,
foreign states and other inputs that used to fail silently or obscurely."""

from __future__ import annotations

import math

import numpy as np
import optree
import pytest
import torch
from torch.func import functional_call

import imtl_func as imtl

T = 3


def _model(dtype=torch.float32, num_tasks=T, seed=0):
    torch.manual_seed(seed)
    enc = torch.nn.Linear(6, 8).to(dtype)
    heads = torch.nn.ModuleList(torch.nn.Linear(8, 1) for _ in range(num_tasks)).to(dtype)
    shared = {k: v.detach() for k, v in enc.named_parameters()}
    task = {k: v.detach() for k, v in heads.named_parameters()}

    def encode(p, x, y):
        return functional_call(enc, p, (x,)).relu()

    def head(t, factor):
        def loss(tp, z, x, y):
            sub = {k.split(".", 1)[1]: v for k, v in tp.items() if k.startswith(f"{t}.")}
            out = functional_call(heads[t], sub, (z,)).squeeze(-1)
            return ((out - y[:, t]) ** 2).mean() * factor
        return loss

    def decoders(factors):
        return [head(t, f) for t, f in enumerate(factors)]

    def decode(factors):
        fns = decoders(factors)
        return lambda tp, z, x, y: torch.stack([f(tp, z, x, y) for f in fns])

    x = torch.randn(32, 6).to(dtype)
    y = torch.randn(32, num_tasks).to(dtype)
    return encode, decoders, decode, shared, task, x, y


# ---------------------------------------------------------------- loss-scale overflow (item 1)


@pytest.mark.parametrize("s1", [100.0, -110.0])
def test_extreme_log_scales_are_bounded_and_both_paths_agree(s1):
    encode, decoders, decode, shared, task, x, y = _model()
    factors = [1.0, 1.0, 1.0]
    outs = []
    for dec in (decode(factors), decoders(factors)):
        step = imtl.mtl_value_and_grad(encode, dec, "hybrid")
        state = step.init(T, log_scale=[0.0, s1, 0.0])
        outs.append(step(shared, task, state, x, y))
    for out in outs:
        assert bool(out.info.finite)
        assert float(out.info.scale[1]) == pytest.approx(math.exp(math.copysign(40.0, s1)),
                                                         rel=1e-5)
        assert abs(float(out.state.log_scale[1])) <= 40.0
    general, per_task = outs
    torch.testing.assert_close(per_task.info.alpha, general.info.alpha, rtol=1e-4, atol=1e-6)
    for a, b in zip(per_task.grads.shared.values(), general.grads.shared.values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_log_scale_bound_depends_on_the_compute_dtype():
    from imtl_func._scales import log_scale_bound, loss_scales

    assert log_scale_bound(torch.float32) == 40.0
    assert log_scale_bound(torch.float16) == pytest.approx(math.log(65504.0) - 1.0)
    e = loss_scales(torch.tensor([100.0, -100.0]), torch.float16)
    assert torch.isfinite(e.half()).all() and (e.half() > 0).all()


# ---------------------------------------------------------------- non-positive losses (item 2)


@pytest.mark.parametrize("value", [-0.5, 0.0, float("nan")])
def test_a_non_positive_loss_holds_its_scale_and_is_flagged(value):
    tx = imtl.preset("loss")
    state = tx.init(2)
    losses = torch.tensor([value, 4.0])
    for _ in range(60):
        _, state, info = tx.update(losses, None, state)
    assert float(state.log_scale[0]) == 0.0
    assert info.held.tolist() == [True, False]
    if value == value:  # -0.5 and 0: the other task's scale still learns
        assert bool(info.finite)
        assert float(state.log_scale[1]) == pytest.approx(-math.log(4.0), abs=0.05)
    else:  # NaN trips the gate: nothing moves
        assert not bool(info.finite) and float(state.log_scale[1]) == 0.0


def test_a_negative_loss_task_trains_the_others():
    encode, decoders, _, shared, task, x, y = _model()
    fns = decoders([1.0, 1.0, 1.0])
    nll = [fns[0], fns[1], lambda tp, z, x, y: fns[2](tp, z, x, y) - 10.0]  # always negative
    step = imtl.mtl_value_and_grad(encode, nll, "hybrid")
    state = step.init(T)
    for _ in range(30):
        out = step(shared, task, state, x, y)
        assert bool(out.info.finite)
        shared = {k: v - 0.05 * out.grads.shared[k] for k, v in shared.items()}
        task = {k: v - 0.05 * out.grads.task[k] for k, v in task.items()}
        state = out.state
    assert out.info.held.tolist() == [False, False, True]
    assert float(state.log_scale[2]) == 0.0
    assert torch.isfinite(state.log_scale).all()


# ---------------------------------------------------------------- float16 models (item 3)


def test_a_float16_model_with_losses_from_1e_6_to_1e3_trains():
    num_tasks = 4
    encode, decoders, _, shared, task, x, y = _model(torch.float16, num_tasks)
    step = imtl.mtl_value_and_grad(encode, decoders([1e-6, 1e-3, 1.0, 1e3]), "hybrid")
    state = step.init(num_tasks)
    assert state.log_scale.dtype == torch.float32  # state in float32 for a float16 model
    skipped, first = 0, None
    for _ in range(150):
        out = step(shared, task, state, x, y)
        skipped += int(not bool(out.info.finite))
        first = out.losses.float() if first is None else first
        shared = {k: v - 1e-4 * out.grads.shared[k] for k, v in shared.items()}
        task = {k: v - 1e-4 * out.grads.task[k] for k, v in task.items()}
        state = out.state
    assert skipped == 0  # v1: e^s passed 65504 and 288 of 400 steps were skipped
    # The smallest loss wants s = 13.8 but float16 caps e^s at e^10.09 = 24,100.
    assert float(state.log_scale[0]) == pytest.approx(math.log(65504.0) - 1.0, abs=1e-5)
    assert float(state.log_scale[3]) < -5.0
    assert float(out.losses[3]) < float(first[3])


# ---------------------------------------------------------------- obscure inputs (item 7)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_init_refuses_non_real_floating_dtypes(dtype):
    with pytest.raises(TypeError, match="dtype must be a real floating dtype for the IMTL state"):
        imtl.preset("hybrid").init(2, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_state_is_kept_in_float32(dtype):
    assert imtl.preset("hybrid").init(2, dtype=dtype).log_scale.dtype == torch.float32


@pytest.mark.parametrize("bad", [None, (torch.zeros(2), ()), [torch.zeros(2)]])
def test_a_state_that_is_not_an_imtl_state(bad):
    encode, decoders, _, shared, task, x, y = _model()
    step = imtl.mtl_value_and_grad(encode, decoders([1, 1, 1]), "hybrid")
    with pytest.raises(TypeError, match=r"state must be the IMTLState returned by init or by the "
                                        r"previous step, got .*; create it with step.init"):
        step(shared, task, bad, x, y)


def test_a_state_of_another_scale_rule():
    encode, decoders, _, shared, task, x, y = _model()
    step = imtl.mtl_value_and_grad(encode, decoders([1, 1, 1]), "hybrid")  # scale_newton
    foreign = imtl.preset("hybrid", scale_rule=imtl.scale_adam()).init(T)
    with pytest.raises(ValueError, match=r"state.rule_state is a AdamState but this step's "
                                         r"transform keeps a NewtonState"):
        step(shared, task, foreign, x, y)
    with pytest.raises(ValueError, match=r"state.rule_state is a tuple but this step's transform "
                                         r"keeps a NewtonState"):
        step(shared, task, imtl.preset("gradient").init(T), x, y)


def test_a_state_with_another_number_of_tasks():
    encode, decoders, _, shared, task, x, y = _model()
    step = imtl.mtl_value_and_grad(encode, decoders([1, 1, 1]), "hybrid")
    with pytest.raises(ValueError, match="got 3 task losses but the IMTL state holds 2 tasks"):
        step(shared, task, step.init(2), x, y)


def test_a_half_precision_state_made_by_hand():
    encode, decoders, _, shared, task, x, y = _model()
    step = imtl.mtl_value_and_grad(encode, decoders([1, 1, 1]), "hybrid")
    state = step.init(T)
    with pytest.raises(ValueError, match=r"state.log_scale must be a float32 or float64 \[T\] "
                                         r"tensor, got torch.float16"):
        step(shared, task, state._replace(log_scale=state.log_scale.half()), x, y)


@pytest.mark.parametrize(("make", "message"), [
    (lambda z: np.ones(tuple(z.shape), dtype=np.float32),
     "must hold only torch tensors, found ndarray; convert arrays with torch.as_tensor"),
    (lambda z: z.to(torch.complex64), "holds a tensor of dtype torch.complex64"),
])
def test_encode_returning_numpy_or_complex(make, message):
    encode, decoders, _, shared, task, x, y = _model()
    step = imtl.mtl_value_and_grad(lambda p, x, y: make(encode(p, x, y)), decoders([1, 1, 1]))
    with pytest.raises(TypeError, match=message):
        step(shared, task, step.init(T), x, y)


@pytest.mark.parametrize("method", ["loss", "equal", "hybrid"])
def test_detached_losses_are_refused_not_trained_as_zero(method):
    encode, decoders, decode, shared, task, x, y = _model()
    dec = decode([1, 1, 1])
    step = imtl.mtl_value_and_grad(encode, lambda tp, z, x, y: dec(tp, z, x, y).detach(), method)
    with pytest.raises(ValueError, match="decode returned losses that do not depend on the "
                                         "parameters or the features"):
        step(shared, task, step.init(T), x, y)
    fns = decoders([1, 1, 1])
    fns[1] = lambda tp, z, x, y, f=fns[1]: f(tp, z, x, y).detach()
    step = imtl.mtl_value_and_grad(encode, fns, method)
    with pytest.raises(ValueError, match=r"decode\[1\] returned losses that do not depend"):
        step(shared, task, step.init(T), x, y)


def test_gramian_on_another_device_than_the_losses():
    tx = imtl.preset("gradient")
    with pytest.raises(ValueError, match="the Gramian is on meta but the losses on cpu"):
        tx.update(torch.ones(2), torch.eye(2, device="meta"), tx.init(2))


# ---------------------------------------------------------------- the gate says what and where


def test_the_gate_reports_what_was_not_finite_and_for_which_task():
    encode, decoders, _, shared, task, x, y = _model()
    fns = decoders([1.0, 1.0, 1.0])
    fns[1] = lambda tp, z, x, y, f=fns[1]: f(tp, z, x, y) * float("nan")
    step = imtl.mtl_value_and_grad(encode, fns, "hybrid")
    state = step.init(T)
    out = step(shared, task, state, x, y)
    assert not bool(out.info.finite)
    assert out.info.nonfinite.losses.tolist() == [False, True, False]
    assert out.info.nonfinite.gramian.tolist() == [False, True, False]
    assert not bool(out.info.nonfinite.scales.any())
    assert all(torch.equal(a, b) for a, b in zip(out.state, state, strict=False)
               if isinstance(a, torch.Tensor))
    assert all(bool((g == 0).all()) for g in out.grads.shared.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_gate_zeroing_is_exact_and_never_nan(dtype):
    """Kept leaves come back bit for bit (-0.0, inf, NaN, subnormals included); dropped ones
    are +0.0 whatever they held; integer leaves and leaves with a graph go through where."""
    from imtl_func._tree import zeros_where_not

    x = torch.tensor([1.5, -0.0, float("inf"), float("nan"), -3.0, 1e-40], dtype=torch.float64)
    x = x.to(dtype)
    tree = {"f": x, "i": torch.tensor([3, -4]), "g": torch.ones(2, requires_grad=True)}
    kept = zeros_where_not(torch.tensor(True), tree)
    assert torch.equal(kept["f"].view(torch.int8), x.view(torch.int8))
    assert kept["f"].dtype == dtype and torch.equal(kept["i"], tree["i"])
    dropped = zeros_where_not(torch.tensor(False), tree)
    assert torch.equal(dropped["f"].view(torch.int8), torch.zeros_like(x).view(torch.int8))
    assert torch.equal(dropped["i"], torch.zeros(2, dtype=torch.int64))
    assert dropped["g"].requires_grad and torch.equal(dropped["g"], torch.zeros(2))
    # The kept leaf is a new tensor: zeroing never writes into what the caller holds.
    assert kept["f"].data_ptr() != x.data_ptr()


@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_in_place_zeroing_never_touches_what_the_step_reports(level):
    """An identity loss returns its cotangent as the gradient, and that cotangent is the weight
    vector the step also reports: a skipped step zeroes the gradients, not info.scale."""
    by_loss = imtl.weighting(lambda k, losses: torch.softmax(-losses, 0), needs_gramian=False)
    tx = imtl.transform(by_loss)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    task = {"a": torch.tensor(2.0, dtype=torch.float64), "b": nan}
    shared = {"w": torch.ones(3, dtype=torch.float64)}
    if level == "feature":
        step = imtl.mtl_value_and_grad(
            lambda p: p["w"], lambda tp, z: torch.stack([tp["a"] * z.sum(), tp["b"]]), tx)
    else:
        step = imtl.value_and_grad(
            lambda sp, tp: torch.stack([tp["a"] * sp["w"].sum(), tp["b"]]), tx)
    result = step(shared, task, step.init(2, dtype=torch.float64))
    assert not bool(result.info.finite)
    assert torch.equal(result.info.scale, torch.ones(2, dtype=torch.float64))
    for g in optree.tree_leaves(result.grads):
        assert torch.equal(g, torch.zeros_like(g))
    assert torch.equal(task["a"], torch.tensor(2.0, dtype=torch.float64))
    assert torch.equal(shared["w"], torch.ones(3, dtype=torch.float64))
