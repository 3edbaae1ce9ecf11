"""Tests of imtl_func.nn.IMTL: .grad against the functional core and a float64 paper reference."""

from __future__ import annotations

import copy
import io
import itertools
import warnings

import pytest
import torch
from reference import paper_alpha
from torch import nn
from torch.func import functional_call

import imtl_func as imtl
from imtl_func.nn import IMTL

METHODS = ("hybrid", "gradient", "loss")
LEVELS = ("feature", "parameter")
LOG_SCALE = (0.3, -0.7, 1.1)
TOL = {"rtol": 1e-9, "atol": 1e-11}


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self, num_tasks: int = 3, width: int = 6, shared_head: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, width), nn.Tanh())
        self.heads = (nn.Linear(width, num_tasks) if shared_head else
                      nn.ModuleList(nn.Linear(width, 1) for _ in range(num_tasks)))


def make_problem(seed: int = 0, num_tasks: int = 3, shared_head: bool = False):
    torch.manual_seed(seed)
    net = Net(num_tasks, shared_head=shared_head).double()
    x = torch.randn(16, 4, dtype=torch.float64)
    ys = [c * torch.randn(16, 1, dtype=torch.float64) for c in (0.1, 1.0, 10.0)[:num_tasks]]
    return net, x, ys


def forward(net: Net, x, ys):
    z = net.encoder(x)
    if isinstance(net.heads, nn.Linear):  # one head for every task: column t is task t's
        out = net.heads(z)
        return z, [((out[:, t : t + 1] - y) ** 2).mean() for t, y in enumerate(ys)]
    return z, [((h(z) - y) ** 2).mean() for h, y in zip(net.heads, ys, strict=True)]


def make_module(method: str, num_tasks: int = 3, log_scale=LOG_SCALE) -> IMTL:
    module = IMTL(method=method, num_losses=num_tasks).double()
    if module.log_scale is not None:
        with torch.no_grad():
            module.log_scale.copy_(torch.tensor(log_scale[:num_tasks], dtype=torch.float64))
    return module


def run_module(method: str, level: str, net: Net, x, ys, module: IMTL | None = None):
    module = make_module(method, len(ys)) if module is None else module
    z, losses = forward(net, x, ys)
    if level == "feature":
        out = module(z, losses)
    else:
        out = module.backward(shared_parameters=net.encoder.parameters(), losses=losses)
    return module, out


def grads_of(params) -> list:
    return [None if p.grad is None else p.grad.clone() for p in params]


def assert_grads(net, want) -> None:
    """Every parameter's .grad equals ``want`` (a grads_of list) to TOL."""
    for a, b in zip(grads_of(net.parameters()), want, strict=True):
        torch.testing.assert_close(a, b, **TOL)


# ----------------------------------------------------------------------------- references


def reference(method: str, level: str, net: Net, x, ys, log_scale):
    """float64 (shared grads, head grads, scale grad) with T separate autograd calls."""
    shared = list(net.encoder.parameters())
    heads = list(net.heads.parameters())
    s = torch.as_tensor(log_scale, dtype=torch.float64).clone().requires_grad_()
    z, losses = forward(net, x, ys)
    if method == "gradient":
        scaled = list(losses)
    else:
        scaled = [torch.exp(s[t]) * losses[t] - s[t] for t in range(len(losses))]
    if method == "loss":
        out = torch.autograd.grad(sum(scaled), [*shared, *heads, s])
        return list(out[: len(shared)]), list(out[len(shared):-1]), out[-1]

    wrt = [z] if level == "feature" else shared
    rows = []
    for t in range(len(scaled)):  # one autograd call per task
        g = torch.autograd.grad(scaled[t], wrt, retain_graph=True)
        rows.append(torch.cat([x.reshape(-1) for x in g]))
    g = torch.stack(rows)
    combined = paper_alpha(g) @ g
    if level == "feature":
        shared_g = list(torch.autograd.grad(z, shared, grad_outputs=combined.view_as(z),
                                            retain_graph=True))
    else:
        shared_g = list(torch.split(combined, [p.numel() for p in shared]))
        shared_g = [v.view_as(p) for v, p in zip(shared_g, shared, strict=True)]
    head_g = list(torch.autograd.grad(sum(scaled), heads, retain_graph=True))
    s_grad = None
    if method == "hybrid":
        (s_grad,) = torch.autograd.grad(sum(scaled), s)
    return shared_g, head_g, s_grad


def core(method: str, level: str, net: Net, x, ys, log_scale):
    """The functional core's StepResult for the same network and scales."""
    shared = {k: v.detach() for k, v in net.encoder.named_parameters()}
    task = [{k: v.detach() for k, v in h.named_parameters()} for h in net.heads]

    def encode(sp, x, ys=None):
        return functional_call(net.encoder, sp, (x,))

    def decode(tp, z, x, ys):
        return torch.stack([((functional_call(h, p, (z,)) - y) ** 2).mean()
                            for h, p, y in zip(net.heads, tp, ys, strict=True)])

    def loss_fn(sp, tp, x, ys):
        return decode(tp, encode(sp, x), x, ys)

    rule = None if method == "gradient" else imtl.scale_frozen()
    s0 = None if method == "gradient" else torch.tensor(log_scale[: len(ys)], dtype=torch.float64)
    if level == "feature":
        step = imtl.mtl_value_and_grad(encode, decode, method, scale_rule=rule)
    else:
        step = imtl.value_and_grad(loss_fn, method, scale_rule=rule)
    state = step.init(len(ys), log_scale=s0, dtype=torch.float64)
    return step(shared, task, state, x, ys)


# ----------------------------------------------------------------------------- equality


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("method", METHODS)
def test_grads_equal_core_and_paper_reference(method, level):
    net, x, ys = make_problem()
    module, _ = run_module(method, level, net, x, ys)
    shared = grads_of(net.encoder.parameters())
    heads = grads_of(net.heads.parameters())

    ref_shared, ref_heads, ref_s = reference(method, level, net, x, ys, LOG_SCALE)
    for got, want in zip(shared + heads, ref_shared + ref_heads, strict=True):
        torch.testing.assert_close(got, want, **TOL)

    step = core(method, level, net, x, ys, LOG_SCALE)
    core_shared = list(step.grads.shared.values())
    core_heads = [g for d in step.grads.task for g in d.values()]
    for got, want in zip(shared + heads, core_shared + core_heads, strict=True):
        torch.testing.assert_close(got, want, **TOL)

    if method == "gradient":
        assert list(module.parameters()) == []
    else:
        torch.testing.assert_close(module.log_scale.grad, ref_s if method == "hybrid" else
                                   step.info.scale_grad, **TOL)
        torch.testing.assert_close(module.log_scale.grad, step.info.scale_grad, **TOL)
    torch.testing.assert_close(module.info.alpha, step.info.alpha, **TOL)
    assert module.finite and module.active == (True, True, True)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("method", METHODS)
def test_a_head_shared_by_every_task_gives_the_reference_grads(method, level):
    """One head for all tasks (one backward per task instead of one for all)."""
    net, x, ys = make_problem(shared_head=True)
    module, _ = run_module(method, level, net, x, ys)
    ref_shared, ref_heads, ref_s = reference(method, level, net, x, ys, LOG_SCALE)
    got = grads_of(net.parameters())
    for a, b in zip(got, ref_shared + ref_heads, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    if method == "hybrid":
        torch.testing.assert_close(module.log_scale.grad, ref_s, **TOL)


@pytest.mark.parametrize("method", METHODS)
def test_returned_values_are_detached_and_documented(method):
    net, x, ys = make_problem()
    module, (grad_loss, scaled) = run_module(method, "feature", net, x, ys)
    assert grad_loss.grad_fn is None and not grad_loss.requires_grad and grad_loss.shape == ()
    assert scaled.grad_fn is None and not scaled.requires_grad and scaled.shape == (3,)
    with torch.no_grad():
        raw = torch.stack(forward(net, x, ys)[1])
    s = torch.tensor(LOG_SCALE, dtype=torch.float64) * (method != "gradient")
    want = torch.exp(s) * raw - s
    torch.testing.assert_close(scaled, want.double(), **TOL)
    torch.testing.assert_close(grad_loss, (module.info.alpha * want).sum(), **TOL)


@pytest.mark.parametrize("level", LEVELS)
def test_gradients_accumulate_like_backward(level):
    net, x, ys = make_problem()
    params = [*net.parameters()]
    module, _ = run_module("hybrid", level, net, x, ys)
    once = [*grads_of(params), module.log_scale.grad.clone()]
    for p in [*params, module.log_scale]:
        p.grad = p.grad + 1.0
    run_module("hybrid", level, net, x, ys, module)  # no zero_grad: accumulates
    twice = [*grads_of(params), module.log_scale.grad]
    for a, b in zip(once, twice, strict=True):
        torch.testing.assert_close(b, 2 * a + 1.0, **TOL)


def test_one_backward_for_the_rows_and_one_to_write_the_gradients(monkeypatch):
    """Separate heads: one backward through the heads gives every task row, one more writes the
    gradients; a head shared by the tasks or the parameter level: one backward per task; 'loss'
    needs no rows: one backward in all."""
    calls = []
    grad, backward = torch.autograd.grad, torch.autograd.backward

    def counting_grad(*args, **kwargs):
        calls.append("batched" if kwargs.get("is_grads_batched") else "grad")
        return grad(*args, **kwargs)

    def counting_backward(*args, **kwargs):
        calls.append("backward")
        return backward(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    monkeypatch.setattr(torch.autograd, "backward", counting_backward)
    for method, level, shared_head, want in [
            ("hybrid", "feature", False, ["grad", "backward"]),
            ("gradient", "feature", False, ["grad", "backward"]),
            ("hybrid", "feature", True, ["grad"] * 3 + ["backward"]),
            ("gradient", "parameter", False, ["grad"] * 3 + ["backward"]),
            ("loss", "feature", False, ["backward"]),
            ("loss", "parameter", True, ["backward"])]:
        net, x, ys = make_problem(shared_head=shared_head)
        calls.clear()
        run_module(method, level, net, x, ys)
        assert calls == want, (method, level, shared_head)


def test_tensor_losses_and_multi_tensor_feature():
    net, x, ys = make_problem()
    # a [T] tensor of losses is accepted
    run_module("hybrid", "feature", net, x, ys)
    want = grads_of(net.parameters())
    net.zero_grad()
    module = make_module("hybrid")
    z, losses = forward(net, x, ys)
    module(z, torch.stack(losses))
    assert_grads(net, want)

    # a feature split into two tensors gives the gradients of the concatenated feature
    net.zero_grad()
    module = make_module("hybrid")
    z = net.encoder(x)
    z1, z2 = z[:, :2], z[:, 2:]
    zz = torch.cat([z1, z2], dim=1)
    losses = [((h(zz) - y) ** 2).mean() for h, y in zip(net.heads, ys, strict=True)]
    module((z1, z2), losses)
    assert_grads(net, want)


def test_nested_shared_parameters_as_in_the_original_readme():
    net, x, ys = make_problem()
    run_module("gradient", "parameter", net, x, ys)
    want = grads_of(net.parameters())
    net.zero_grad()
    module = make_module("gradient")
    _, losses = forward(net, x, ys)
    module.backward(shared_parameters=[net.encoder.parameters()], losses=losses)
    assert_grads(net, want)


def test_opposite_gradients_give_a_zero_shared_update():
    """g_2 = -2 g_1: no nonzero direction has equal projections, so the encoder gets exactly 0."""
    net, x, _ = make_problem()
    module = IMTL(method="gradient", num_losses=2)
    z = net.encoder(x)
    out = net.heads[0](z).mean()
    module(z, [out, -2 * out])
    assert bool(module.info.stats.degenerate)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in net.encoder.parameters())
    (want,) = torch.autograd.grad(-net.heads[0](net.encoder(x)).mean(), net.heads[0].bias)
    torch.testing.assert_close(net.heads[0].bias.grad, want, **TOL)  # heads: Σ_t ∇ℓ_t


# ----------------------------------------------------------------------------- skipping tasks


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("method", METHODS)
def test_requires_grad_false_equals_training_without_that_task(method, level):
    net_a, x, ys = make_problem()
    net_b = copy.deepcopy(net_a)
    imtl_a = make_module(method, 3)
    imtl_b = make_module(method, 2, log_scale=(LOG_SCALE[0], LOG_SCALE[2]))
    heads_b = [net_b.heads[0], net_b.heads[2]]
    opt_a = torch.optim.Adam(itertools.chain(net_a.parameters(), imtl_a.parameters()), lr=0.05)
    opt_b = torch.optim.Adam(itertools.chain(net_b.parameters(), imtl_b.parameters()), lr=0.05)
    for _ in range(4):
        z, losses = forward(net_a, x, ys)
        losses[1] = losses[1].detach()  # task 1 switched off, still passed for logging
        if level == "feature":
            out = imtl_a(z, losses)
        else:
            out = imtl_a.backward(shared_parameters=net_a.encoder.parameters(), losses=losses)
        assert imtl_a.active == (True, False, True)
        assert out.scaled_losses.shape == (3,)
        assert all(p.grad is None for p in net_a.heads[1].parameters())
        if imtl_a.log_scale is not None:
            assert imtl_a.log_scale.grad[1] == 0

        z = net_b.encoder(x)
        losses_b = [((h(z) - y) ** 2).mean() for h, y in zip(heads_b, (ys[0], ys[2]), strict=True)]
        if level == "feature":
            imtl_b(z, losses_b)
        else:
            imtl_b.backward(shared_parameters=net_b.encoder.parameters(), losses=losses_b)
        for opt in (opt_a, opt_b):
            opt.step()
            opt.zero_grad()

    kept = [*net_a.encoder.parameters(), *net_a.heads[0].parameters(), *net_a.heads[2].parameters()]
    kept_b = [*net_b.encoder.parameters(), *heads_b[0].parameters(), *heads_b[1].parameters()]
    for a, b in zip(kept, kept_b, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    for a, b in zip(net_a.heads[1].parameters(), net_b.heads[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # never updated
    if imtl_a.log_scale is not None:
        torch.testing.assert_close(imtl_a.log_scale[[0, 2]], imtl_b.log_scale, **TOL)
        assert imtl_a.log_scale[1].item() == pytest.approx(LOG_SCALE[1])


def test_every_loss_skipped_is_a_no_op():
    net, x, ys = make_problem()
    module = make_module("hybrid")
    with torch.no_grad():
        z, losses = forward(net, x, ys)
        grad_loss, scaled = module(z, losses)
    assert all(p.grad is None for p in [*net.parameters(), *module.parameters()])
    assert module.info is None and module.active == (False, False, False)
    assert grad_loss == 0 and torch.isfinite(scaled).all()


# ----------------------------------------------------------------------------- lazy size, state


def test_size_from_first_call_with_optimizer_built_before():
    net, x, ys = make_problem()
    module = IMTL(method="hybrid").double()
    assert module.num_losses is None
    optimizer = torch.optim.SGD(itertools.chain(net.parameters(), module.parameters()), lr=0.1)
    z, losses = forward(net, x, ys)
    module(z, losses)
    assert module.num_losses == 3 and module.log_scale.shape == (3,)
    with torch.no_grad():
        raw = torch.stack(forward(net, x, ys)[1])
    torch.testing.assert_close(module.log_scale.grad, raw - 1, **TOL)  # s = 0: e^0 l - 1
    optimizer.step()
    torch.testing.assert_close(module.log_scale.detach(), -0.1 * (raw - 1), **TOL)


def test_init_loss_sets_initial_log_scales():
    module = IMTL(method="loss", init_loss=[0.5, -1.0])
    assert module.num_losses == 2
    torch.testing.assert_close(module.log_scale.detach(), torch.tensor([0.5, -1.0]))
    assert torch.equal(IMTL(num_losses=4).log_scale.detach(), torch.zeros(4))


def test_state_dict_round_trip():
    module = IMTL(method="hybrid", init_loss=[0.1, 0.2, 0.3])
    fresh = IMTL(method="hybrid", num_losses=3)
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(fresh.log_scale, module.log_scale)

    lazy = IMTL(method="hybrid")  # unsized: sized by the load
    lazy.load_state_dict(module.state_dict())
    assert lazy.num_losses == 3 and torch.equal(lazy.log_scale, module.log_scale)

    unsized = IMTL(method="loss")
    other = IMTL(method="loss")
    other.load_state_dict(unsized.state_dict())
    assert other.num_losses is None
    with pytest.raises(RuntimeError, match="unsized"):
        fresh.load_state_dict(unsized.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        IMTL(num_losses=2).load_state_dict(module.state_dict())

    assert IMTL(method="gradient", num_losses=3).state_dict() == {}


def test_frozen_scales_get_no_gradient():
    net, x, ys = make_problem()
    module = make_module("hybrid")
    module.log_scale.requires_grad_(False)
    run_module("hybrid", "feature", net, x, ys, module)
    assert module.log_scale.grad is None
    assert all(p.grad is not None for p in net.parameters())


def test_graph_is_kept_for_other_losses():
    net, x, ys = make_problem()
    module = make_module("hybrid")
    z, losses = forward(net, x, ys)
    module(z, losses)
    before = net.encoder[0].weight.grad.clone()
    other_loss = 1e-3 * (z**2).mean()  # shares the encoder graph, bypasses IMTL
    other_loss.backward()
    (extra,) = torch.autograd.grad(1e-3 * (net.encoder(x) ** 2).mean(), net.encoder[0].weight)
    torch.testing.assert_close(net.encoder[0].weight.grad, before + extra, **TOL)


# ----------------------------------------------------------------------------- errors


def test_clear_errors():
    net, x, ys = make_problem()
    with pytest.raises(ValueError, match="method"):
        IMTL(method="grad")
    with pytest.raises(ValueError, match="init_loss has 2 entries"):
        IMTL(num_losses=3, init_loss=[0.0, 0.0])
    with pytest.raises(ValueError, match="no loss scales"):
        IMTL(method="gradient", init_loss=[0.0])

    module = make_module("hybrid")
    z, losses = forward(net, x, ys)
    with pytest.raises(ValueError, match="got 2 losses but was built for 3"):
        module(z, losses[:2])
    with pytest.raises(ValueError, match=r"losses\[1\] must be a scalar"):
        module(z, [losses[0], torch.stack(losses), losses[2]])
    with pytest.raises(TypeError, match=r"losses\[0\] must be a scalar tensor"):
        module(z, [1.0, *losses[1:]])
    with pytest.raises(ValueError, match="no active loss depends on the feature z"):
        module(net.encoder(x), losses)
    with pytest.raises(ValueError, match="does not require grad"):
        module(z.detach(), losses)
    unused = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"no active loss depends on shared parameter #4"):
        module.backward(shared_parameters=[*net.encoder.parameters(), unused], losses=losses)
    assert all(p.grad is None for p in net.parameters())  # errors come before any .grad write
    for method in METHODS:
        with pytest.raises(ValueError, match="shared parameter"):
            make_module(method).backward(shared_parameters=[unused], losses=losses)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_non_finite_leaves_grad_untouched_and_reports(kind, level):
    net, x, ys = make_problem()
    module = make_module("hybrid")
    params = [*net.parameters(), module.log_scale]
    net.heads[0].weight.grad = torch.full_like(net.heads[0].weight, 7.0)
    before = grads_of(params)
    z, losses = forward(net, x, ys)
    if kind == "loss":
        losses[2] = losses[2] * float("nan")
    else:  # finite loss, infinite gradient (sqrt at 0)
        losses[2] = losses[2] + torch.sqrt(z[0, 0] - z[0, 0].detach())
    with pytest.warns(RuntimeWarning, match="not finite"):
        if level == "feature":
            module(z, losses)
        else:
            module.backward(shared_parameters=net.encoder.parameters(), losses=losses)
    assert not module.finite
    for a, b in zip(grads_of(params), before, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)

    z, losses = forward(net, x, ys)  # the next finite batch works
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(z, losses)
    assert module.finite


# ----------------------------------------------------------------------------- hooks


def feature_combination(net: Net, x, ys, log_scale) -> torch.Tensor:
    """float64 reference of what z receives ('hybrid'): Σ_t α_t ∇_z L_t, paper's α."""
    z, losses = forward(net, x, ys)
    s = torch.as_tensor(log_scale, dtype=torch.float64)
    rows = torch.stack([torch.autograd.grad(torch.exp(s[t]) * losses[t], z)[0].reshape(-1)
                        for t in range(len(losses))])
    return (paper_alpha(rows) @ rows).view_as(z)


@pytest.mark.parametrize("level", LEVELS)
def test_a_logging_hook_on_a_shared_tensor_sees_what_it_receives(level):
    """A hook calling .detach() (a common logging hook) works, fires once per call and sees the
    IMTL gradient of the tensor it is on; hooks on the heads see the head gradient."""
    net, x, ys = make_problem()
    run_module("hybrid", level, net, x, ys)
    want = grads_of(net.parameters())
    net.zero_grad()
    seen, seen_head = [], []
    z, losses = forward(net, x, ys)
    shared = z if level == "feature" else net.encoder[0].weight
    handles = [shared.register_hook(lambda g: seen.append(g.detach().clone())),
               net.heads[2].weight.register_hook(lambda g: seen_head.append(g.detach()))]
    module = make_module("hybrid")
    if level == "feature":
        module(z, losses)
    else:
        module.backward(shared_parameters=net.encoder.parameters(), losses=losses)
    for h in handles:
        h.remove()
    assert_grads(net, want)
    assert len(seen) == 1 and len(seen_head) == 1
    expected = feature_combination(net, x, ys, LOG_SCALE) if level == "feature" else want[0]
    torch.testing.assert_close(seen[0], expected, **TOL)
    torch.testing.assert_close(seen_head[0], net.heads[2].weight.grad, **TOL)


def test_a_hook_on_z_replaces_what_the_encoder_receives():
    net, x, ys = make_problem()
    run_module("hybrid", "feature", net, x, ys)
    want = grads_of(net.parameters())
    net.zero_grad()
    z, losses = forward(net, x, ys)
    z.register_hook(lambda g: 2 * g)
    make_module("hybrid")(z, losses)
    n_enc = len(list(net.encoder.parameters()))
    assert_grads(net, [2 * g if i < n_enc else g for i, g in enumerate(want)])


def test_a_parameter_used_by_the_encoder_and_a_head_gets_both_parts():
    """Tied weights: a parameter reached both through z and directly by a head gets the IMTL
    combination through z plus the head's own (scaled) gradient."""
    torch.manual_seed(3)
    w = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))
    x = torch.randn(16, 4, dtype=torch.float64)
    ys = [torch.randn(16, dtype=torch.float64) for _ in range(3)]
    s = torch.tensor(LOG_SCALE, dtype=torch.float64)

    def losses_of(z):
        heads = [z.sum(1), (z @ w).sum(1), (z * z).mean(1)]   # head 1 reuses w directly
        return [((h - y) ** 2).mean() for h, y in zip(heads, ys, strict=True)]

    z = torch.tanh(x @ w.T)
    module = make_module("hybrid")
    module(z, losses_of(z))
    # reference: direct path of head 1 (z held constant) + encoder path of the combination
    zc = torch.tanh(x @ w.T).detach()
    (direct,) = torch.autograd.grad(torch.exp(s[1]) * losses_of(zc)[1], w)
    z = torch.tanh(x @ w.T)
    zr = z.detach().requires_grad_()
    rows = torch.stack([torch.autograd.grad(torch.exp(s[t]) * loss, zr)[0].reshape(-1)
                        for t, loss in enumerate(losses_of(zr))])
    (through,) = torch.autograd.grad(z, w, grad_outputs=(paper_alpha(rows) @ rows).view_as(z))
    torch.testing.assert_close(w.grad, direct + through, **TOL)


# ----------------------------------------------------------------------------- checks


def test_an_unsized_module_saved_before_its_first_call_loads_with_weights_only():
    buffer = io.BytesIO()
    torch.save(IMTL(method="hybrid").state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    lazy = IMTL(method="hybrid")
    lazy.load_state_dict(state)
    assert lazy.num_losses is None
    used = IMTL(method="hybrid").double()
    used.load_state_dict(state)
    net, x, ys = make_problem()
    z, losses = forward(net, x, ys)
    used(z, losses)
    assert used.num_losses == 3
    want = reference("hybrid", "feature", net, x, ys, (0.0, 0.0, 0.0))
    got = grads_of(net.parameters())
    for a, b in zip(got, [*want[0], *want[1]], strict=True):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(used.log_scale.grad, want[2], **TOL)


def test_log_scales_beyond_the_bound_give_the_functional_steps_finite_grads():
    """init_loss=[0, 100, 0]: the step uses e^{clamp(s)} like the functional core."""
    net, x, ys = make_problem()
    s = (0.0, 100.0, 0.0)
    module = IMTL(method="hybrid", init_loss=s).double()
    z, losses = forward(net, x, ys)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(z, losses)
    assert module.finite
    got = grads_of(net.parameters())
    assert all(bool(torch.isfinite(g).all()) for g in got)
    step = core("hybrid", "feature", net, x, ys, s)
    assert bool(step.info.finite)
    torch.testing.assert_close(step.info.scale[1], torch.tensor(40.0, dtype=torch.float64).exp())
    want = [*step.grads.shared.values(), *(g for d in step.grads.task for g in d.values())]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=0)
    torch.testing.assert_close(module.log_scale.grad, step.info.scale_grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(module.info.alpha, step.info.alpha, **TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    net, x, ys = make_problem()
    run_module("hybrid", "feature", net, x, ys)
    want = grads_of(net.parameters())
    net_c = copy.deepcopy(net).cuda()
    net_c.zero_grad()
    module = make_module("hybrid").cuda()
    run_module("hybrid", "feature", net_c, x.cuda(), [y.cuda() for y in ys], module)
    for a, b in zip(grads_of(net_c.parameters()), want, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-7, atol=1e-9)
    assert module.log_scale.grad.is_cuda
