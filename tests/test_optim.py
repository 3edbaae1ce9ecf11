"""apply_updates and IMTL.step: a non-finite step leaves a torch.optim optimizer bit-identical;
float16 mixed precision with torch.amp.GradScaler (amp_scale, IMTL(grad_scaler=...))."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import imtl_func as imtl
from imtl_func._gramian import gramian
from imtl_func._tree import contract
from imtl_func.nn import IMTL

T = 3
pytestmark = pytest.mark.usefixtures("one_thread")

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(8, 1) for _ in range(T))


def make_data(seed: int = 0, n: int = 32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :T] + 0.1 * torch.randn(n, T, generator=g)) * torch.tensor([0.1, 1.0, 10.0])
    return x, y


def make_net(dtype: torch.dtype = torch.float32) -> Net:
    torch.manual_seed(0)
    return Net().to(dtype)


def per_task(t: int, scaler: torch.amp.GradScaler | None = None) -> Callable[..., Tensor]:
    def loss(p: dict[str, Tensor], z: Tensor, x: Tensor, y: Tensor) -> Tensor:
        pred = F.linear(z, p[f"{t}.weight"], p[f"{t}.bias"]).squeeze(1)
        value = F.mse_loss(pred.to(y.dtype), y[:, t])
        return value if scaler is None else imtl.amp_scale(value, scaler)

    return loss


def make_step(net: Net, method: str = "hybrid",
              scaler: torch.amp.GradScaler | None = None) -> imtl.Step:
    def encode(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return functional_call(net.encoder, p, (x,))

    return imtl.mtl_value_and_grad(encode, [per_task(t, scaler) for t in range(T)], method)


def params_of(net: Net) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    return dict(net.encoder.named_parameters()), dict(net.heads.named_parameters())


def snapshot(modules: list[nn.Module], opt: torch.optim.Optimizer) -> tuple[list[Tensor], dict]:
    params = [p.detach().clone() for m in modules for p in m.parameters()]
    return params, copy.deepcopy(opt.state_dict())


def assert_identical(a: object, b: object, where: str = "") -> None:
    """Recursive equality; tensors exactly equal with the same dtype (NaN where NaN)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype, where
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def moved(before: list[Tensor], modules: list[nn.Module]) -> float:
    now = [p.detach() for m in modules for p in m.parameters()]
    return max((p - q).abs().max().item() for p, q in zip(now, before, strict=True))


# ------------------------------------------------------------------ skipped steps, functional


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_apply_updates_skips_a_non_finite_step_bit_identically(opt_name: str) -> None:
    net = make_net()
    shared, task = params_of(net)
    step = make_step(net)
    state = step.init(T)
    opt = OPTIMIZERS[opt_name](net.parameters())
    x, y = make_data()
    for _ in range(2):
        out = step(shared, task, state, x, y)
        state = out.state
        assert imtl.apply_updates(opt, out, shared, task) is True
    before, opt_state = snapshot([net], opt)

    bad = y.clone()
    bad[0, 1] = float("nan")
    out = step(shared, task, state, x, bad)
    assert not out.info.finite
    assert imtl.apply_updates(opt, out, shared, task) is False
    assert_identical([p.detach() for p in net.parameters()], before, "params")
    assert_identical(opt.state_dict(), opt_state, "state_dict")
    assert_identical(out.state, state, "imtl state")

    # What the helper prevents: the zero gradients of the skipped step, stepped, move the net.
    for params, grads in ((shared, out.grads.shared), (task, out.grads.task)):
        for name, g in grads.items():
            assert not g.any()
            params[name].grad = g
    opt.step()
    assert moved(before, [net]) > 1e-4


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_apply_updates_on_finite_steps_is_the_plain_optimizer_step(opt_name: str) -> None:
    nets = [make_net(), make_net()]
    opts = [OPTIMIZERS[opt_name](n.parameters()) for n in nets]
    steps = [make_step(n) for n in nets]
    states = [s.init(T) for s in steps]
    x, y = make_data()
    for it in range(3):
        for i, (net, opt, step) in enumerate(zip(nets, opts, steps, strict=True)):
            shared, task = params_of(net)
            out = step(shared, task, states[i], x, y)
            states[i] = out.state
            if i == 0:
                assert imtl.apply_updates(opt, out, shared, task)
                grad = out.grads.shared["0.weight"]  # installed, not copied
                assert net.encoder[0].weight.grad.data_ptr() == grad.data_ptr()
            else:
                for params, grads in ((shared, out.grads.shared), (task, out.grads.task)):
                    for name, g in grads.items():
                        params[name].grad = g.clone()
                opt.step()
        assert moved([p.detach() for p in nets[1].parameters()], [nets[0]]) == 0, it
    assert_identical(opts[0].state_dict(), opts[1].state_dict())


def test_apply_updates_errors() -> None:
    net = make_net()
    shared, task = params_of(net)
    step = make_step(net)
    out = step(shared, task, step.init(T), *make_data())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer, got list"):
        imtl.apply_updates([opt], out, shared, task)
    with pytest.raises(TypeError, match="result must be the StepResult a step returned, got "
                                        "tuple"):
        imtl.apply_updates(opt, tuple(out), shared, task)
    with pytest.raises(TypeError, match=r"scaler must be a torch\.amp\.GradScaler or None, "
                                        r"got float"):
        imtl.apply_updates(opt, out, shared, task, scaler=2.0**16)
    with pytest.raises(ValueError, match="task_params must have the structure of the gradients"):
        imtl.apply_updates(opt, out, shared, list(task.values()))
    with pytest.raises(ValueError, match="shared_params must have the structure"):
        imtl.apply_updates(opt, out, None, task)
    computed = {k: v * 1 for k, v in shared.items()}
    with pytest.raises(ValueError, match=r"shared_params\['0.bias'\] is not a leaf tensor; "
                                         r"pass the optimizer's parameters themselves"):
        imtl.apply_updates(opt, out, computed, task)
    encoder_only = torch.optim.SGD(net.encoder.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"task_params\['0.bias'\] \(shape \(1,\)\) is not "
                                         r"in the optimizer's param_groups"):
        imtl.apply_updates(encoder_only, out, shared, task)
    empty = out._replace(grads=imtl.Grads({}, None))
    with pytest.raises(ValueError, match="shared_params and task_params hold no tensor"):
        imtl.apply_updates(opt, empty, {}, None)
    assert all(p.grad is None for p in net.parameters())  # no error wrote anything


def test_write_grads_writes_or_marks_an_overflow_and_never_steps() -> None:
    """write_grads: the gradients of a finite step (the tensors themselves); nothing for a
    non-finite one; with a scaler an inf on the first parameter, which the scaler's own step
    reads as an overflow (skipped, scale halved). It never calls the optimizer."""
    net = make_net()
    shared, task = params_of(net)
    step = make_step(net)
    state = step.init(T)
    x, y = make_data()
    out = step(shared, task, state, x, y)
    assert imtl.write_grads(out, shared, task) is True
    for params, grads in ((shared, out.grads.shared), (task, out.grads.task)):
        for name, g in grads.items():
            assert params[name].grad.data_ptr() == g.data_ptr()  # no copy
            assert torch.equal(params[name].grad, g)
    bad = y.clone()
    bad[0, 1] = float("nan")
    out_bad = step(shared, task, state, x, bad)
    net.zero_grad(set_to_none=True)
    assert imtl.write_grads(out_bad, shared, task) is False
    assert all(p.grad is None for p in net.parameters())

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before, _ = snapshot([net], opt)
    assert imtl.write_grads(out_bad, shared, task, scaler=scaler) is False
    first = shared[sorted(shared)[0]]  # the first leaf (optree orders dict keys)
    assert torch.isinf(first.grad).all()
    assert all(p.grad is None for p in net.parameters() if p is not first)
    scaler.step(opt)  # what a framework's opt.step() does with its scaler
    scaler.update()
    assert_identical([p.detach() for p in net.parameters()], before, "params")
    assert scaler.get_scale() == 2.0**9
    with pytest.raises(TypeError, match="write_grads: result must be the StepResult"):
        imtl.write_grads(tuple(out), shared, task)
    with pytest.raises(TypeError, match=r"write_grads: scaler must be a torch\.amp\.GradScaler"):
        imtl.write_grads(out, shared, task, scaler=1.0)
    with pytest.raises(ValueError, match="write_grads: task_params must have the structure"):
        imtl.write_grads(out, shared, list(task.values()))


# ------------------------------------------------------------------ skipped steps, nn.IMTL


def module_iteration(net: Net, module: IMTL, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
                     *, autocast: bool = False) -> tuple[list[Tensor], bool]:
    opt.zero_grad(set_to_none=False)  # zero tensors, not None: a plain step would move Adam
    with torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
        z = net.encoder(x)
        losses = [F.mse_loss(h(z).squeeze(1).to(y.dtype), y[:, t])
                  for t, h in enumerate(net.heads)]
    module(z, losses)
    return losses, module.step(opt)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_module_step_skips_a_non_finite_call_bit_identically(opt_name: str) -> None:
    net, module = make_net(), IMTL("hybrid", num_losses=T)
    opt = OPTIMIZERS[opt_name]([*net.parameters(), *module.parameters()])
    x, y = make_data()
    for _ in range(2):
        assert module_iteration(net, module, opt, x, y)[1] is True
    before, opt_state = snapshot([net, module], opt)
    bad = y.clone()
    bad[0, 2] = float("inf")
    with pytest.warns(RuntimeWarning, match="not finite"):
        _, ran = module_iteration(net, module, opt, x, bad)
    assert ran is False and not module.finite
    assert_identical([p.detach() for m in (net, module) for p in m.parameters()], before)
    assert_identical(opt.state_dict(), opt_state, "state_dict")
    opt.step()  # what module.step prevented: the zeroed .grad still moves the parameters
    assert moved(before, [net, module]) > 1e-4


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_module_step_on_finite_calls_is_the_plain_optimizer_step(opt_name: str) -> None:
    runs = []
    for use_helper in (True, False):
        net, module = make_net(), IMTL("hybrid", num_losses=T)
        opt = OPTIMIZERS[opt_name]([*net.parameters(), *module.parameters()])
        x, y = make_data()
        for _ in range(3):
            if use_helper:
                assert module_iteration(net, module, opt, x, y)[1]
            else:
                opt.zero_grad(set_to_none=False)
                z = net.encoder(x)
                module(z, [F.mse_loss(h(z).squeeze(1), y[:, t])
                           for t, h in enumerate(net.heads)])
                opt.step()
        runs.append(([p.detach() for m in (net, module) for p in m.parameters()],
                     opt.state_dict()))
    assert_identical(runs[0], runs[1])


# ------------------------------------------------------------------ amp_scale


def test_amp_scale_keeps_the_value_and_scales_the_gradient() -> None:
    x = torch.tensor([0.3, 2.5, 7.0], requires_grad=True)
    y = imtl.amp_scale(x * 2, 1024.0)
    assert y.dtype == x.dtype and torch.equal(y, x.detach() * 2)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([2048.0, 4096.0, 6144.0]))

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    h = torch.tensor([0.5, 3.0], dtype=torch.float16, requires_grad=True)
    out = imtl.amp_scale(h, scaler)  # 2^20 is beyond float16: only the backward overflows
    assert out.dtype == torch.float16 and torch.equal(out, h.detach())
    out.sum().backward()
    assert torch.isinf(h.grad).all()

    w = torch.ones(2, requires_grad=True)
    imtl.amp_scale(w, torch.tensor(8.0)).sum().backward()
    assert torch.equal(w.grad, torch.full((2,), 8.0))


def test_amp_scale_errors() -> None:
    with pytest.raises(TypeError, match=r"floating-point tensor, got torch\.int64"):
        imtl.amp_scale(torch.tensor([1, 2]), 2.0)
    with pytest.raises(TypeError, match="losses must be a floating-point tensor, got list"):
        imtl.amp_scale([1.0], 2.0)
    with pytest.raises(TypeError, match=r"scale must be a torch\.amp\.GradScaler, a tensor or "
                                        r"a number, got str"):
        imtl.amp_scale(torch.ones(2), "2")
    with pytest.raises(TypeError, match=r"grad_scaler must be a torch\.amp\.GradScaler or None, "
                                        r"got float"):
        IMTL("hybrid", num_losses=2, grad_scaler=2.0**16)


# ------------------------------------------------------------------ GradScaler, exact scaling


def _all_grads(modules: list[nn.Module]) -> list[Tensor]:
    return [p.grad.clone() for m in modules for p in m.parameters()]


@pytest.mark.parametrize("method", ["hybrid", "gradient", "loss"])
@pytest.mark.parametrize("level", ["feature", "parameter"])
def test_module_with_grad_scaler_gives_the_unscaled_gradients(method: str, level: str) -> None:
    """A power-of-two scale commutes with every rounding: after unscale_, .grad, α and the
    log-scales' gradient are bit-identical to the run without a scaler."""
    x, y = make_data()
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        net = make_net(torch.float64)
        module = IMTL(method, num_losses=T, grad_scaler=scaler).double()
        if module.log_scale is not None:
            with torch.no_grad():
                module.log_scale.copy_(torch.tensor([0.4, -0.3, -1.2]))
        opt = torch.optim.Adam([*net.parameters(), *module.parameters()], lr=1e-2)
        z = net.encoder(x.double())
        losses = [F.mse_loss(h(z).squeeze(1), y[:, t].double()) for t, h in enumerate(net.heads)]
        if level == "feature":
            module(z, losses)
        else:
            module.backward(net.encoder.parameters(), losses)
        if scaler is not None:
            scaled = _all_grads([net, module])
            scaler.unscale_(opt)
        grads = _all_grads([net, module])
        assert module.step(opt)
        if scaler is not None:
            scaler.update()
            assert scaler.get_scale() == 2.0**12
        results.append((grads, module.info, [p.detach().clone() for p in net.parameters()]))
    assert_identical(results[1][0], results[0][0], "grads")
    assert_identical(list(results[1][1]), list(results[0][1]), "info")
    assert_identical(results[1][2], results[0][2], "params after the step")
    assert_identical(scaled, [g * 2.0**12 for g in results[0][0]], "scaled grads")
    if method != "gradient":
        log_scale_grad = results[0][0][-1]
        assert log_scale_grad.abs().min() > 1e-3  # e^{s} ℓ − 1 of the raw losses, not 0


def test_module_with_transform_and_grad_scaler_moves_scales_on_raw_losses() -> None:
    x, y = make_data()
    states = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**16)):
        net = make_net(torch.float64)
        module = IMTL(imtl.preset("hybrid"), num_losses=T, grad_scaler=scaler).double()
        opt = torch.optim.SGD(net.parameters(), lr=1e-2)
        for _ in range(3):
            module_iteration(net, module, opt, x.double(), y.double())
            if scaler is not None:
                scaler.update()
        states.append(([b.clone() for b in module.buffers()],
                       [p.detach().clone() for p in net.parameters()]))
    assert_identical(states[1], states[0])
    assert states[0][0][0].abs().min() > 1e-2  # the log-scales moved


def test_functional_step_with_amp_scale_gives_the_unscaled_update() -> None:
    x, y = make_data()
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**14)):
        net = make_net(torch.float64)
        shared, task = params_of(net)
        step = make_step(net, "hybrid", scaler)
        state = step.init(T, dtype=torch.float64)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(3):
            out = step(shared, task, state, x.double(), y.double())
            state = out.state
            assert imtl.apply_updates(opt, out, shared, task, scaler=scaler)
            if scaler is not None:
                scaler.update()
        runs.append(([p.detach().clone() for p in net.parameters()], state, out.info.alpha))
    assert_identical(runs[1], runs[0])


def test_disabled_grad_scaler_is_ignored() -> None:
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    net, module = make_net(), IMTL("hybrid", num_losses=T, grad_scaler=scaler)
    opt = torch.optim.Adam([*net.parameters(), *module.parameters()], lr=1e-2)
    x, y = make_data()
    assert module_iteration(net, module, opt, x, y)[1]
    before, opt_state = snapshot([net, module], opt)
    bad = y.clone()
    bad[3, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):
        assert module_iteration(net, module, opt, x, bad)[1] is False
    assert all(not p.grad.isnan().any() for p in net.parameters())  # nothing written
    assert_identical(opt.state_dict(), opt_state)

    shared, task = params_of(net)
    step = make_step(net)
    out = step(shared, task, step.init(T), x, bad)
    assert imtl.apply_updates(opt, out, shared, task, scaler=scaler) is False
    assert_identical([p.detach() for m in (net, module) for p in m.parameters()], before)


# ------------------------------------------------------------------ float16 autocast on CPU


def test_gramian_and_contraction_ignore_autocast() -> None:
    g = torch.Generator().manual_seed(1)
    rows = {"a": torch.randn(T, 40, 7, generator=g), "b": torch.randn(T, 5, generator=g)}
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.float16):
        k16, c16 = gramian(rows), contract(w, rows)
    assert k16.dtype == torch.float32 and torch.equal(k16, gramian(rows))
    assert_identical(c16, contract(w, rows))


def test_functional_step_under_float16_autocast_keeps_parameter_dtypes() -> None:
    net = make_net()
    shared, task = params_of(net)
    for method in ("hybrid", "gradient"):
        step = make_step(net, method)
        with torch.autocast("cpu", dtype=torch.float16):
            out = step(shared, task, step.init(T), *make_data())
        assert out.info.finite
        for grads in (out.grads.shared, out.grads.task):
            assert {g.dtype for g in grads.values()} == {torch.float32}


def _fp16_run(kind: str, iterations: int = 120) -> dict:
    """Train under float16 autocast with a GradScaler starting at 2^40 (overflows at first)."""
    torch.manual_seed(0)
    net = Net()
    x, y = make_data(n=64)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=20)
    scales, ran_log, imtl_finite, losses_log = [], [], [], []
    if kind == "module":
        module = IMTL("hybrid", num_losses=T, grad_scaler=scaler)
        opt = torch.optim.Adam([*net.parameters(), *module.parameters()], lr=1e-2)
    else:
        shared, task = params_of(net)
        step = make_step(net, "hybrid", scaler)
        state = step.init(T)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the scaler's skips are silent, as in plain AMP
        for _ in range(iterations):
            if kind == "module":
                losses, ran = module_iteration(net, module, opt, x, y, autocast=True)
                losses, finite = torch.stack(losses).detach(), module.finite
                log_scale = module.log_scale.detach()
            else:
                with torch.autocast("cpu", dtype=torch.float16):
                    out = step(shared, task, state, x, y)
                state = out.state
                ran = imtl.apply_updates(opt, out, shared, task, scaler=scaler)
                losses, finite, log_scale = out.losses, bool(out.info.finite), state.log_scale
            scaler.update()
            scales.append(scaler.get_scale())
            ran_log.append(ran)
            imtl_finite.append(finite)
            losses_log.append(losses)
    params_finite = all(torch.isfinite(p).all() for p in net.parameters())
    return {"scales": scales, "ran": ran_log, "imtl_finite": imtl_finite,
            "losses": torch.stack(losses_log), "log_scale": log_scale,
            "adam_steps": int(opt.state_dict()["state"][0]["step"]),
            "params_finite": params_finite}


@pytest.mark.parametrize("kind", ["module", "functional"])
def test_float16_autocast_grad_scaler_skips_then_recovers(kind: str) -> None:
    run = _fp16_run(kind)
    ran, scales = run["ran"], run["scales"]
    first_ok = ran.index(True)
    # Overflow at 2^40: every step is skipped and the scale halves, until it fits float16.
    assert not any(ran[:first_ok]) and first_ok >= 10
    assert scales[:first_ok] == [2.0 ** (39 - i) for i in range(first_ok)]
    assert not run["imtl_finite"][0]  # IMTL's gate tripped (task gradients overflowed) ...
    assert run["imtl_finite"][first_ok]  # ... and agrees once the scale fits
    # Then training proceeds: most later steps run (the scale grows every 20 steps and backs
    # off when that overflows), the Adam count is the number that ran.
    assert sum(ran[first_ok:]) >= 0.9 * len(ran[first_ok:])
    assert run["adam_steps"] == sum(ran)
    assert run["params_finite"]
    start, end = run["losses"][0], run["losses"][-1]
    assert (end < 0.6 * start).all(), (start, end)
    assert torch.isfinite(run["log_scale"]).all() and run["log_scale"].abs().max() > 0.05
