"""The one-call steps against float64 references with T separate autograd calls."""

from __future__ import annotations

import optree
import pytest
import torch
from reference import make_problem, reference_grads
from torch.func import functional_call

import imtl_func as imtl

METHODS = ["loss", "gradient", "hybrid"]


def functional(model):
    shared = {k: v.detach() for k, v in model.encoder.named_parameters()}
    task = {k: v.detach() for k, v in model.heads.named_parameters()}

    def encode(p, x, y):
        return functional_call(model.encoder, p, (x,))

    def decode(p, z, x, y):
        return _heads(model, p, z, y)

    def loss_fn(sp, tp, x, y):
        return decode(tp, encode(sp, x, y), x, y)

    return shared, task, encode, decode, loss_fn


def _heads(model, p, z, y):
    losses = []
    for t in range(model.num_tasks):
        pred = torch.nn.functional.linear(z, p[f"{t}.weight"], p[f"{t}.bias"]).squeeze(-1)
        losses.append(((pred - y[:, t]) ** 2).mean() * 10.0**t)
    return torch.stack(losses)


def assert_close_list(got, expected, **kw):
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=False):
        torch.testing.assert_close(a, b, **kw)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_step_matches_reference(method, level):
    model, x, y = make_problem(num_tasks=3)
    shared, task, encode, decode, loss_fn = functional(model)
    log_scale = torch.tensor([0.3, -0.5, -2.0], dtype=torch.float64)
    if method == "gradient":
        log_scale = torch.zeros(3, dtype=torch.float64)
    state = imtl.preset(method).init(3, log_scale=log_scale, dtype=torch.float64)
    if level == "feature":
        step = imtl.mtl_value_and_grad(encode, decode, method)
    else:
        step = imtl.value_and_grad(loss_fn, method)
    out = step(shared, task, state, x, y)
    ref_shared, ref_heads, ref_alpha = reference_grads(model, x, y, method, log_scale, level)
    assert_close_list(list(out.grads.shared.values()), ref_shared, rtol=1e-9, atol=1e-12)
    assert_close_list(list(out.grads.task.values()), ref_heads, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.info.alpha, ref_alpha, rtol=1e-9, atol=1e-12)
    assert out.info.finite
    torch.testing.assert_close(out.losses, model.losses(model.encoder(x), y).detach())
    # The scale gradient e^s l - 1 and the state update.
    if method == "gradient":
        torch.testing.assert_close(out.state.log_scale, state.log_scale)
        assert torch.equal(out.info.scale_grad, torch.zeros(3, dtype=torch.float64))
    else:
        sgrad = torch.exp(log_scale) * out.losses - 1
        torch.testing.assert_close(out.info.scale_grad, sgrad)
        assert torch.all(torch.sign(out.state.log_scale - log_scale) == -torch.sign(sgrad))
    # Nothing returned carries an autograd graph.
    for g in [*out.grads.shared.values(), *out.grads.task.values(), out.info.alpha, out.losses]:
        assert not g.requires_grad


@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_equal_projections_of_the_shared_update(level):
    """The combined feature (or parameter) gradient projects equally on every unit task gradient."""
    model, x, y = make_problem(num_tasks=3)
    shared, task, encode, decode, loss_fn = functional(model)
    state = imtl.preset("gradient").init(3, dtype=torch.float64)
    if level == "parameter":
        out = imtl.value_and_grad(loss_fn, "gradient")(shared, task, state, x, y)
        _, jac = imtl.task_jacobian(lambda p: loss_fn(p, task, x, y), shared)
        flat_jac = torch.cat([j.reshape(3, -1) for j in jac.values()], 1)
        g = torch.cat([v.flatten() for v in out.grads.shared.values()])
    else:
        z = encode(shared, x, y)
        _, jz = imtl.task_jacobian(lambda zz: decode(task, zz, x, y), z)
        flat_jac = jz.reshape(3, -1)
        out = imtl.mtl_value_and_grad(encode, decode, "gradient")(shared, task, state, x, y)
        g = out.info.alpha @ flat_jac
    proj = flat_jac @ g / flat_jac.norm(dim=1)
    torch.testing.assert_close(proj, proj.mean().expand(3), rtol=1e-9, atol=0)
    torch.testing.assert_close(proj[0], out.info.stats.projection, rtol=1e-9, atol=0)


def test_losses_extra_bypasses_imtl():
    """Losses(task, extra): extra's plain gradient is added to every parameter, unweighted."""
    model, x, y = make_problem(num_tasks=3)
    shared, task, encode, decode, loss_fn = functional(model)

    def decode_extra(p, z, x, y):
        return imtl.Losses(decode(p, z, x, y), extra=0.1 * (z**2).mean() + p["0.weight"].sum())

    def loss_extra(sp, tp, x, y):
        reg = sum((v**2).sum() for v in sp.values())
        return imtl.Losses(loss_fn(sp, tp, x, y), extra=reg)

    for method in METHODS:
        log_scale = None if method == "gradient" else [0.1, -1.0, -3.0]
        state = imtl.preset(method).init(3, log_scale=log_scale, dtype=torch.float64)
        # feature level
        base = imtl.mtl_value_and_grad(encode, decode, method)(shared, task, state, x, y)
        both = imtl.mtl_value_and_grad(encode, decode_extra, method)(shared, task, state, x, y)
        extra_grad = torch.func.grad(
            lambda sp, tp: decode_extra(tp, encode(sp, x, y), x, y).extra, argnums=(0, 1)
        )(shared, task)
        for k in shared:
            expected = base.grads.shared[k] + extra_grad[0][k]
            torch.testing.assert_close(both.grads.shared[k], expected)
        for k in task:
            torch.testing.assert_close(both.grads.task[k], base.grads.task[k] + extra_grad[1][k])
        torch.testing.assert_close(both.info.alpha, base.info.alpha)
        torch.testing.assert_close(both.losses, base.losses)
        # parameter level
        base = imtl.value_and_grad(loss_fn, method)(shared, task, state, x, y)
        both = imtl.value_and_grad(loss_extra, method)(shared, task, state, x, y)
        for k in shared:
            torch.testing.assert_close(both.grads.shared[k], base.grads.shared[k] + 2 * shared[k])
        for k in task:
            torch.testing.assert_close(both.grads.task[k], base.grads.task[k])


@pytest.mark.parametrize("chunk_size", [1, 2])
def test_chunk_size_gives_the_same_result(chunk_size):
    model, x, y = make_problem(num_tasks=3)
    shared, task, encode, decode, loss_fn = functional(model)
    state = imtl.preset("hybrid").init(3, dtype=torch.float64)
    for make in (lambda **kw: imtl.mtl_value_and_grad(encode, decode, **kw),
                 lambda **kw: imtl.value_and_grad(loss_fn, **kw)):
        a = make()(shared, task, state, x, y)
        b = make(chunk_size=chunk_size)(shared, task, state, x, y)
        for k in shared:
            torch.testing.assert_close(a.grads.shared[k], b.grads.shared[k], rtol=1e-12, atol=0)
        torch.testing.assert_close(a.info.alpha, b.info.alpha, rtol=1e-12, atol=0)


def test_pytrees_nested_and_several_feature_tensors():
    """Nested tuple/dict parameters and a (tuple, dict) feature pytree."""
    torch.manual_seed(1)
    dt = torch.float64
    w1, w2 = torch.randn(4, 5, dtype=dt), torch.randn(4, 3, dtype=dt)
    shared = ({"a": w1}, [w2])
    task = {"h": (torch.randn(5, dtype=dt), torch.randn(3, dtype=dt)),
            "k": torch.randn(8, dtype=dt)}
    x = torch.randn(7, 4, dtype=dt)

    def encode(p, x):
        return (torch.tanh(x @ p[0]["a"]), {"b": torch.sin(x @ p[1][0])})

    def decode(p, feats, x):
        za, zb = feats[0], feats[1]["b"]
        return torch.stack([
            (za @ p["h"][0]).pow(2).mean(),
            (zb @ p["h"][1]).sin().mean() * 100,
            (torch.cat([za, zb], 1) @ p["k"]).cos().mean(),
        ])

    def loss_fn(sp, tp, x):
        return decode(tp, encode(sp, x), x)

    # Reference on flattened feature gradients with the paper's closed form.
    from reference import paper_alpha

    feats = encode(shared, x)
    _, jac = imtl.task_jacobian(lambda f: decode(task, f, x), feats)
    flat = torch.cat([jac[0].reshape(3, -1), jac[1]["b"].reshape(3, -1)], 1)
    alpha = paper_alpha(flat)
    state = imtl.preset("gradient").init(3, dtype=dt)
    out = imtl.mtl_value_and_grad(encode, decode, "gradient")(shared, task, state, x)
    torch.testing.assert_close(out.info.alpha, alpha)
    expected = torch.func.grad(lambda sp: (alpha * loss_fn(sp, task, x)).sum())(shared)
    torch.testing.assert_close(out.grads.shared, expected)
    assert isinstance(out.grads.shared, tuple) and isinstance(out.grads.shared[1], list)
    # parameter level: alpha from the Gramian of the nested-pytree Jacobian
    _, pj = imtl.task_jacobian(lambda sp: loss_fn(sp, task, x), shared)
    pflat = torch.cat([pj[0]["a"].reshape(3, -1), pj[1][0].reshape(3, -1)], 1)
    out = imtl.value_and_grad(loss_fn, "gradient")(shared, task, state, x)
    torch.testing.assert_close(out.info.alpha, paper_alpha(pflat))


def test_named_parameters_dict_with_requires_grad():
    """dict(model.named_parameters()) can be passed as is; nothing keeps a graph to them."""
    model, x, y = make_problem(num_tasks=2)
    shared = dict(model.encoder.named_parameters())
    task = dict(model.heads.named_parameters())

    def encode(p, x):
        return functional_call(model.encoder, p, (x,))

    def decode(p, z, y):
        return _heads(model, p, z, y)

    state = imtl.preset("hybrid").init(2, dtype=torch.float64)
    out = imtl.mtl_value_and_grad(encode, lambda p, z, x: decode(p, z, y))(shared, task, state, x)
    assert all(not g.requires_grad for g in out.grads.shared.values())
    assert all(p.grad is None for p in model.parameters())


def test_aux_outputs():
    model, x, y = make_problem(num_tasks=2)
    shared, task, encode, decode, _ = functional(model)

    def enc(p, x, y):
        z = encode(p, x, y)
        return z, {"zmean": z.mean()}

    def dec(p, z, x, y):
        losses = decode(p, z, x, y)
        return losses, losses.sum()

    state = imtl.preset("hybrid").init(2, dtype=torch.float64)
    out = imtl.mtl_value_and_grad(enc, dec, encoder_has_aux=True, has_aux=True)(
        shared, task, state, x, y)
    z = encode(shared, x, y)
    torch.testing.assert_close(out.aux[0]["zmean"], z.mean())
    torch.testing.assert_close(out.aux[1], decode(task, z, x, y).sum())
    plain = imtl.mtl_value_and_grad(encode, decode)(shared, task, state, x, y)
    assert plain.aux is None
    torch.testing.assert_close(out.grads.shared, plain.grads.shared)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("level", ["feature", "parameter"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_step_is_a_no_op(method, level, bad):
    model, x, y = make_problem(num_tasks=3)
    shared, task, encode, decode, loss_fn = functional(model)
    y = y.clone()
    y[0, 1] = bad
    log_scale = None if method == "gradient" else [0.5, 0.5, 0.5]
    state = imtl.preset(method).init(3, log_scale=log_scale, dtype=torch.float64)
    step = (imtl.mtl_value_and_grad(encode, decode, method) if level == "feature"
            else imtl.value_and_grad(loss_fn, method))
    out = step(shared, task, state, x, y)
    assert not out.info.finite
    for g in [*out.grads.shared.values(), *out.grads.task.values()]:
        assert torch.equal(g, torch.zeros_like(g))
    assert torch.equal(out.state.log_scale, state.log_scale)
    for a, b in zip(out.state.rule_state, state.rule_state, strict=False):
        assert torch.equal(a, b)
    assert torch.isfinite(out.info.alpha).all() or method == "loss"


def test_non_finite_gradient_with_finite_losses_is_a_no_op():
    """sqrt at 0 gives a finite loss but an infinite gradient in the encoder."""
    dt = torch.float64
    shared = {"w": torch.zeros(3, dtype=dt)}
    task = {"h": torch.ones(2, dtype=dt)}
    x = torch.ones(3, dtype=dt)

    def encode(p, x):
        return torch.sqrt(p["w"] * x).sum().reshape(1)

    def decode(p, z, x):
        return p["h"] * z.sum() + p["h"] ** 2

    state = imtl.preset("hybrid").init(2, dtype=dt)
    out = imtl.mtl_value_and_grad(encode, decode)(shared, task, state, x)
    assert torch.isfinite(out.losses).all()
    assert not out.info.finite
    assert torch.equal(out.grads.shared["w"], torch.zeros(3, dtype=dt))
    assert torch.equal(out.state.log_scale, state.log_scale)


def test_single_task_gets_weight_one():
    model, x, y = make_problem(num_tasks=1)
    shared, task, encode, decode, loss_fn = functional(model)
    state = imtl.preset("gradient").init(1, dtype=torch.float64)
    out = imtl.mtl_value_and_grad(encode, decode, "gradient")(shared, task, state, x, y)
    torch.testing.assert_close(out.info.alpha, torch.ones(1, dtype=torch.float64))
    expected = torch.func.grad(lambda sp: loss_fn(sp, task, x, y).sum())(shared)
    torch.testing.assert_close(out.grads.shared, expected)


def test_flip_negative():
    """Opposed-ish gradients with a negative common projection: flip_negative negates alpha."""
    dt = torch.float64
    # Three independent gradients whose equal-projection solution has c < 0 (found by search).
    g = torch.tensor([[-1.1, -1.8, 0.8], [-0.6, -0.6, 0.3], [-1.2, -0.4, -0.1]], dtype=dt)
    k = g @ g.T
    plain = imtl.preset("gradient")
    flip = imtl.preset("gradient", flip_negative=True)
    losses = torch.ones(3, dtype=dt)
    w0, _, i0 = plain.update(losses, k, plain.init(3, dtype=dt))
    w1, _, i1 = flip.update(losses, k, flip.init(3, dtype=dt))
    c = (i0.alpha @ g) @ (g[0] / g[0].norm())
    assert c < -0.3 and not i0.stats.degenerate
    # A step along -g then raises every task's loss to first order: <g, g_t> < 0 for all t.
    assert ((i0.alpha @ g) @ g.T < 0).all()
    torch.testing.assert_close(i0.stats.projection, c)
    torch.testing.assert_close(i1.alpha, -i0.alpha)
    torch.testing.assert_close(i1.stats.projection, -c)
    torch.testing.assert_close(w1.shared, -w0.shared)


def _per_task_decoders(model):
    def head(t):
        def loss(p, z, x, y):
            pred = torch.nn.functional.linear(z, p[f"{t}.weight"], p[f"{t}.bias"]).squeeze(-1)
            return ((pred - y[:, t]) ** 2).mean() * 10.0**t
        return loss
    return [head(t) for t in range(model.num_tasks)]


@pytest.mark.parametrize("method", METHODS)
def test_per_task_decoders_match_reference_and_the_batched_path(method):
    """A list of per-task losses (one plain backward through the heads) gives the same step."""
    model, x, y = make_problem(num_tasks=3)
    shared, task, encode, decode, _ = functional(model)
    log_scale = None if method == "gradient" else [0.3, -0.5, -2.0]
    state = imtl.preset(method).init(3, log_scale=log_scale, dtype=torch.float64)
    fast = imtl.mtl_value_and_grad(encode, _per_task_decoders(model), method)(
        shared, task, state, x, y)
    batched = imtl.mtl_value_and_grad(encode, decode, method)(shared, task, state, x, y)
    s = torch.tensor([0.0] * 3 if log_scale is None else log_scale, dtype=torch.float64)
    ref_shared, ref_heads, ref_alpha = reference_grads(model, x, y, method, s)
    assert_close_list(list(fast.grads.shared.values()), ref_shared, rtol=1e-9, atol=1e-12)
    assert_close_list(list(fast.grads.task.values()), ref_heads, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fast.info.alpha, ref_alpha, rtol=1e-9, atol=1e-12)
    for a, b in zip(optree.tree_leaves(fast[1:4]), optree.tree_leaves(batched[1:4]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(fast.losses, batched.losses)


def test_per_task_decoders_are_one_plain_backward():
    """No vmap: the per-task path never calls the batched pull-back."""
    model, x, y = make_problem(num_tasks=3)
    shared, task, encode, decode, _ = functional(model)
    state = imtl.preset("hybrid").init(3, dtype=torch.float64)
    calls = []
    import imtl_func._autodiff as autodiff

    grad, vmap = autodiff._grad, autodiff.vmap

    def spy_grad(*args, batched, **kwargs):
        calls.append(("grad", batched))
        return grad(*args, batched=batched, **kwargs)

    autodiff._grad = spy_grad
    autodiff.vmap = lambda *a, **k: calls.append(("vmap", True)) or vmap(*a, **k)
    try:
        imtl.mtl_value_and_grad(encode, _per_task_decoders(model))(shared, task, state, x, y)
        # A general decode that stacks T scalars: one backward per task through its head.
        imtl.mtl_value_and_grad(encode, decode)(shared, task, state, x, y)
        # Any other [T] tensor: one batched backward of the identity's rows.
        imtl.mtl_value_and_grad(
            encode, lambda p, z, x, y: torch.cat([v.reshape(1) for v in decode(p, z, x, y)])
        )(shared, task, state, x, y)
    finally:
        autodiff._grad, autodiff.vmap = grad, vmap
    plain, batched = ("grad", False), ("grad", True)
    assert calls == [plain, plain] + [plain] * 3 + [plain] + [batched, plain]


def test_per_task_decoder_errors():
    model, x, y = make_problem(num_tasks=2)
    shared, task, encode, _, _ = functional(model)
    with pytest.raises(TypeError, match=r"decode\[1\] must be a function"):
        imtl.mtl_value_and_grad(encode, [lambda p, z, x, y: z.sum(), 3])
    with pytest.raises(TypeError, match="or a non-empty list of T per-task loss functions"):
        imtl.mtl_value_and_grad(encode, [])
    with pytest.raises(ValueError, match="has_aux is not supported with per-task decoders"):
        imtl.mtl_value_and_grad(encode, [lambda p, z, x, y: z.sum()], has_aux=True)
    step = imtl.mtl_value_and_grad(encode, [lambda p, z, x, y: z.sum(), lambda p, z, x, y: z])
    with pytest.raises(ValueError, match=r"decode\[1\] must return a floating scalar loss, got "
                                         r"shape \(16, 6\)"):
        step(shared, task, imtl.preset("hybrid").init(2, dtype=torch.float64), x, y)


@pytest.mark.parametrize("level", ["feature", "per-task", "parameter"])
@pytest.mark.parametrize("method", ["loss", "gradient", "hybrid", "equal"])
def test_autograd_and_torch_func_backends_agree(level, method, monkeypatch):
    """Eager calls differentiate with plain autograd, traced ones with torch.func: same step."""
    import imtl_func._steps as steps_module

    model, x, y = make_problem(num_tasks=3)
    shared, task, encode, decode, loss_fn = functional(model)
    if level == "parameter":
        step = imtl.value_and_grad(loss_fn, method)
    else:
        step = imtl.mtl_value_and_grad(
            encode, _per_task_decoders(model) if level == "per-task" else decode, method)
    log_scale = None if method in ("gradient", "equal") else [0.3, -0.5, -2.0]
    state = step.init(3, log_scale=log_scale, dtype=torch.float64)
    results = []
    for autograd in (True, False):
        monkeypatch.setattr(steps_module, "use_autograd", lambda *a, flag=autograd: flag)
        results.append(step(shared, task, state, x, y))
    plain, func = results
    for a, b in zip(optree.tree_leaves(plain[:4]), optree.tree_leaves(func[:4]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, equal_nan=True)
    assert all(not g.requires_grad for g in optree.tree_leaves(plain.grads))


def test_backend_choice():
    """torch.func where autograd cannot record or where a transform or the compiler runs."""
    from imtl_func._autodiff import use_autograd

    x = torch.ones(2)
    assert use_autograd({"w": x}, (x,))
    with torch.inference_mode():
        y = torch.ones(2)
        assert not use_autograd({"w": x})
    assert not use_autograd({"w": x}, (y,))  # an inference tensor in the batch
    seen = []
    torch.func.vmap(lambda v: seen.append(use_autograd(v)) or v)(torch.ones(3, 2))
    assert seen == [False]
    torch.compile(lambda v: seen.append(use_autograd(v)) or v + 1, backend="eager",
                  fullgraph=False)(x)
    assert seen[1:] == [False]


@pytest.mark.parametrize("form", ["heads", "constant", "leaf", "extra"])
def test_stacked_decode_rows_match_the_batched_backward(form, monkeypatch):
    """A stacked decode's rows come from one backward per scalar (a constant loss: a zero row;
    a stacked parameter or an extra loss: the batched backward); torch.func agrees."""
    import imtl_func._steps as steps_module

    model, x, y = make_problem(num_tasks=3)
    shared, task, encode, decode, _ = functional(model)
    task = {**task, "a": torch.tensor(0.7, dtype=torch.float64)}

    def dec(p, z, x, y):
        losses = decode(p, z, x, y)
        if form == "constant":
            return torch.stack([losses[0], torch.tensor(0.5, dtype=z.dtype), losses[2]])
        if form == "leaf":
            return torch.stack([losses[0], p["a"], losses[2]])
        if form == "extra":
            return imtl.Losses(losses, (z**2).mean())
        return losses

    step = imtl.mtl_value_and_grad(encode, dec, "hybrid")
    state = step.init(3, log_scale=[0.3, -0.5, -2.0], dtype=torch.float64)
    results = []
    for autograd in (True, False):
        monkeypatch.setattr(steps_module, "use_autograd", lambda *a, flag=autograd: flag)
        results.append(step(shared, task, state, x, y))
    for a, b in zip(optree.tree_leaves(results[0][:4]), optree.tree_leaves(results[1][:4]),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, equal_nan=True)
    if form == "constant":
        assert results[0].info.grad_norm[1] == 0


@pytest.mark.parametrize("method", ["loss", "hybrid"])
def test_steps_ignore_the_callers_grad_mode(method):
    """Called under torch.no_grad (e.g. from an evaluation helper) a step still differentiates,
    and never writes .grad of the parameters it was given."""
    model, x, y = make_problem(num_tasks=3)
    _, _, encode, _, _ = functional(model)
    shared = dict(model.encoder.named_parameters())
    task = dict(model.heads.named_parameters())
    step = imtl.mtl_value_and_grad(encode, _per_task_decoders(model), method)
    state = step.init(3, dtype=torch.float64)
    plain = step(shared, task, state, x, y)
    with torch.no_grad():
        quiet = step(shared, task, state, x, y)
    for a, b in zip(optree.tree_leaves(plain[:4]), optree.tree_leaves(quiet[:4]), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert all(p.grad is None for p in model.parameters())


def test_a_torch_without_the_transform_hook_takes_the_torch_func_path(monkeypatch):
    """If a torch release drops the private hook that tells whether a torch.func transform
    runs, steps fall back to torch.func (slower, same numbers) instead of failing."""
    from imtl_func._autodiff import use_autograd

    monkeypatch.delattr(torch._C._functorch, "peek_interpreter_stack")
    assert not use_autograd({"w": torch.ones(2)})
    model, x, y = make_problem(num_tasks=3)
    shared, task, encode, decode, _ = functional(model)
    step = imtl.mtl_value_and_grad(encode, decode, "hybrid")
    assert bool(step(shared, task, step.init(3, dtype=torch.float64), x, y).info.finite)
