"""Data-parallel IMTL: 2 gloo processes on loopback against one process on the global batch.

One spawn (two fresh interpreters, about 5 s) runs every scenario; the workers save what they
computed and the parent compares it with single-process runs on the concatenated batch.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import imtl_func as imtl
from imtl_func import distributed as imtl_dist
from imtl_func.nn import IMTL

WORLD = 2
STEPS = 20
NUM_TASKS = 3
LOCAL_BATCH = 4
IN, HIDDEN = 5, 8
LR = 0.05
NAN_STEP = 7
METHODS = ("loss", "gradient", "hybrid")
LEVELS = ("feature", "parameter")
TIMEOUT_S = 60.0


# ----------------------------------------------------------------------------- the problem

def init_params(seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    shared = {"w": torch.randn(HIDDEN, IN, generator=g) / IN**0.5,
              "b": 0.1 * torch.randn(HIDDEN, generator=g)}
    task = {"w": torch.randn(NUM_TASKS, HIDDEN, generator=g) / HIDDEN**0.5,
            "b": torch.zeros(NUM_TASKS)}
    return shared, task


def encode(p, x, y):
    return torch.tanh(x @ p["w"].T + p["b"])


def decode(p, z, x, y):
    pred = z @ p["w"].T + p["b"]                                    # [B, T]
    per_task = ((pred - y) ** 2).mean(0)                            # [T]
    return per_task * torch.tensor([1.0, 10.0, 0.1])                # different loss magnitudes


def loss_fn(sp, tp, x, y):
    return decode(tp, encode(sp, x, y), x, y)


def encode_gated(p, x, y, c):
    """``encode`` times ``|b_0 − c_i|`` per example: 1 normally; for ``c_i = b_0`` the feature
    is 0 (finite losses, finite feature Gramian) but the encoder's backward gives 0/0 = NaN."""
    return encode(p, x, y) * torch.sqrt((p["b"][0] - c) ** 2)[:, None]


def decode_gated(p, z, x, y, c):
    return decode(p, z, x, y)


def global_batch(step: int, nan: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's global batch; rank r holds rows ``r*LOCAL_BATCH:(r+1)*LOCAL_BATCH``."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(WORLD * LOCAL_BATCH, IN, generator=g)
    y = torch.stack([x[:, 0] - x[:, 1], -x[:, 0] + 0.5 * x[:, 2], x[:, 3] * x[:, 4]], 1)
    y = y + 0.1 * torch.randn(y.shape, generator=g)
    if nan and step == NAN_STEP:
        x[LOCAL_BATCH, 0] = float("nan")                            # first row of rank 1
    return x, y


def local_batch(step: int, rank: int, nan: bool = False):
    x, y = global_batch(step, nan)
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return x[rows], y[rows]


def train(level: str, method: str, reduce=None, rank: int | None = None, nan: bool = False,
          nan_backward: bool = False):
    """20 SGD steps; ``rank=None`` is one process on the global batch.

    ``nan``: a NaN input on rank 1 at ``NAN_STEP``; ``nan_backward`` (feature level): finite
    losses there, but a NaN in the encoder's backward pass.
    """
    shared, task = init_params()
    state = imtl.preset(method).init(NUM_TASKS)
    if nan_backward:
        step = imtl.mtl_value_and_grad(encode_gated, decode_gated, method, reduce=reduce)
    elif level == "feature":
        step = imtl.mtl_value_and_grad(encode, decode, method, reduce=reduce)
    else:
        step = imtl.value_and_grad(loss_fn, method, reduce=reduce)
    alphas, finite, losses = [], [], []
    for i in range(STEPS):
        batch = global_batch(i, nan) if rank is None else local_batch(i, rank, nan)
        if nan_backward:
            c = shared["b"][0].detach() + torch.ones(WORLD * LOCAL_BATCH)
            if i == NAN_STEP:
                c[LOCAL_BATCH] = shared["b"][0].detach()              # first row of rank 1
            batch = (*batch, c if rank is None else c.chunk(WORLD)[rank])
        out = step(shared, task, state, *batch)
        shared = {k: v - LR * out.grads.shared[k] for k, v in shared.items()}
        task = {k: v - LR * out.grads.task[k] for k, v in task.items()}
        state = out.state
        alphas.append(out.info.alpha)
        finite.append(out.info.finite)
        losses.append(out.losses)
    return {"shared": shared, "task": task, "state": state, "alpha": torch.stack(alphas),
            "finite": torch.stack(finite), "losses": torch.stack(losses),
            "grad_norm": out.info.grad_norm}


class Net(nn.Module):
    """The same problem as a module: ``forward(x, c=None) -> (z, predictions [B, T])``."""

    def __init__(self):
        super().__init__()
        shared, task = init_params()
        self.encoder = nn.Linear(IN, HIDDEN)
        self.heads = nn.Linear(HIDDEN, NUM_TASKS)
        with torch.no_grad():
            for layer, p in ((self.encoder, shared), (self.heads, task)):
                layer.weight.copy_(p["w"])
                layer.bias.copy_(p["b"])

    def forward(self, x, c=None):
        z = torch.tanh(self.encoder(x))
        if c is not None:     # as encode_gated: NaN in the backward pass where c_i = b_0
            z = z * torch.sqrt((self.encoder.bias[0] - c) ** 2)[:, None]
        return z, self.heads(z)


def train_module(method: str, reduce=None, rank: int | None = None, nan: bool = False,
                 nan_backward: bool = False):
    """20 SGD steps of nn.IMTL; ``rank`` given: the network wrapped in DDP, the local slice."""
    net = Net()
    model = net if rank is None else DistributedDataParallel(net)
    module = IMTL(method, NUM_TASKS, reduce=reduce)
    optimizer = torch.optim.SGD([*net.parameters(), *module.parameters()], lr=LR)
    alphas, finite = [], []
    for i in range(STEPS):
        x, y = global_batch(i, nan) if rank is None else local_batch(i, rank, nan)
        c = None
        if nan_backward:
            c = net.encoder.bias[0].detach() + torch.ones(WORLD * LOCAL_BATCH)
            if i == NAN_STEP:
                c[LOCAL_BATCH] = net.encoder.bias[0].detach()
            c = c if rank is None else c.chunk(WORLD)[rank]
        z, pred = model(x, c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            module(z, decode_losses(pred, y))
        # DDP has averaged the gradients: a NaN on one rank is a NaN on all of them
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf"))
        ok = module.finite and bool(torch.isfinite(norm))
        if ok:
            optimizer.step()
        optimizer.zero_grad()
        alphas.append(module.info.alpha.detach().clone())
        finite.append(torch.tensor(ok))
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    scales = None if module.log_scale is None else module.log_scale.detach().clone()
    return {"params": params, "log_scale": scales, "alpha": torch.stack(alphas),
            "finite": torch.stack(finite)}


def decode_losses(pred, y):
    return ((pred - y) ** 2).mean(0) * torch.tensor([1.0, 10.0, 0.1])


# ----------------------------------------------------------------------------- the workers

@contextlib.contextmanager
def _gloo(rank: int, port: int, seconds: float) -> Iterator[None]:
    """One worker's gloo process group (one intra-op thread), destroyed on the way out."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=seconds))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _worker(rank: int, port: int, out_dir: str) -> None:
    with _gloo(rank, port, 30):
        reduce = imtl_dist.all_sum()
        results = {}
        for level in LEVELS:
            for method in METHODS:
                results[level, method] = train(level, method, reduce, rank)
        results["nan"] = train("feature", "hybrid", reduce, rank, nan=True)
        results["nan", "parameter"] = train("parameter", "hybrid", reduce, rank, nan=True)
        results["nan", "backward"] = train("feature", "hybrid", reduce, rank, nan_backward=True)
        for method in METHODS:
            results["module", method] = train_module(method, reduce, rank)
        results["module", "nan"] = train_module("hybrid", reduce, rank, nan=True)
        results["module", "backward"] = train_module("hybrid", reduce, rank, nan_backward=True)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args, nprocs: int = WORLD, timeout: float = TIMEOUT_S) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` processes; kill them all past ``timeout``.

    Forked where the platform can (the children inherit the imported torch and torch.func,
    whose first import costs seconds), spawned elsewhere.
    """
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method=method)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers still running after {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    train("feature", "hybrid")          # import what the workers need once, before the fork
    spawn(_worker, _free_port(), str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ----------------------------------------------------------------------------- the checks

def _assert_tree_equal(a, b):
    for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b),
                    strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def _assert_tree_close(a, b, atol):
    for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b),
                    strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("level", LEVELS)
def test_two_ranks_equal_one_process_on_the_global_batch(ranks, level, method):
    got = ranks[0][level, method]
    ref = train(level, method)
    assert bool(ref["finite"].all())
    # every rank holds exactly the same α, state and parameters
    _assert_tree_equal(got, ranks[1][level, method])
    torch.testing.assert_close(got["alpha"], ref["alpha"], rtol=0, atol=1e-6)
    torch.testing.assert_close(got["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
    _assert_tree_close(got["state"], ref["state"], atol=1e-6)
    _assert_tree_close((got["shared"], got["task"]), (ref["shared"], ref["task"]), atol=1e-5)
    if method != "loss":   # the Gramian is that of the global batch, not R times it
        torch.testing.assert_close(got["grad_norm"], ref["grad_norm"], rtol=1e-5, atol=0)
    if method != "gradient":  # the scales moved: the check is not vacuous
        assert float(got["state"].log_scale.abs().min()) > 0.03
    if method != "loss":
        assert float((got["alpha"][-1] - 1 / NUM_TASKS).abs().max()) > 0.01


NAN_CASES = {"nan": dict(level="feature", nan=True),
             ("nan", "parameter"): dict(level="parameter", nan=True),
             ("nan", "backward"): dict(level="feature", nan_backward=True)}


@pytest.mark.parametrize("key", list(NAN_CASES), ids=["loss", "loss-parameter", "backward"])
def test_a_non_finite_value_on_one_rank_makes_every_rank_skip(ranks, key):
    r0, r1 = ranks[0][key], ranks[1][key]
    expected = torch.ones(STEPS, dtype=torch.bool)
    expected[NAN_STEP] = False
    assert torch.equal(r0["finite"], expected)
    assert torch.equal(r1["finite"], expected)
    _assert_tree_equal((r0["shared"], r0["task"], r0["state"]),
                       (r1["shared"], r1["task"], r1["state"]))
    # the same as one process that skipped the same step
    ref = train(method="hybrid", **NAN_CASES[key])
    assert torch.equal(ref["finite"], expected)
    _assert_tree_close((r0["shared"], r0["task"]), (ref["shared"], ref["task"]), atol=1e-5)
    _assert_tree_close(r0["state"], ref["state"], atol=1e-6)


def _example_worker(rank: int, port: int, steps: int, *flags: str) -> None:
    """Run examples/ddp_train.py's main() as torchrun would (its environment variables)."""
    import importlib.util
    import sys

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    path = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"
    spec = importlib.util.spec_from_file_location("ddp_train", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.argv = ["ddp_train.py", "--steps", str(steps), "--hidden", "16", *flags]
    module.main()      # raises SystemExit if the ranks diverged


@pytest.mark.parametrize("flags", [(), ("--module",)], ids=["functional", "module"])
def test_the_torchrun_example_runs_on_two_gloo_ranks(capfd, flags):
    train("feature", "hybrid")
    spawn(_example_worker, _free_port(), 5, *flags)
    out = capfd.readouterr().out
    assert "step    4" in out
    # 612 float32 parameters; T = 4: (16 + 4 + 1) float64 statistics, nn.IMTL with the T
    # per-task activity counts too: (16 + 8 + 1)
    expected = "[200]" if flags else "[168, 2448]"
    assert f"all-reduce bytes per step {expected}; shared gradients 2176 B, all gradients 2448 B"\
        in out
    assert "largest difference between ranks 0.0e+00" in out


@pytest.mark.parametrize("method", METHODS)
def test_imtl_module_under_ddp_equals_one_process(ranks, method):
    got, other = ranks[0]["module", method], ranks[1]["module", method]
    ref = train_module(method)
    assert bool(ref["finite"].all())
    _assert_tree_equal(got, other)
    torch.testing.assert_close(got["alpha"], ref["alpha"], rtol=0, atol=1e-6)
    _assert_tree_close(got["params"], ref["params"], atol=1e-5)
    if method != "gradient":
        torch.testing.assert_close(got["log_scale"], ref["log_scale"], rtol=0, atol=1e-6)
        assert float(got["log_scale"].abs().max()) > 0.5   # the scales moved
    if method == "gradient":  # no scales (which the module leaves to the user's optimizer)
        torch.testing.assert_close(got["alpha"], ranks[0]["feature", method]["alpha"], rtol=0,
                                   atol=1e-6)


@pytest.mark.parametrize("case", ["nan", "backward"])
def test_imtl_module_under_ddp_skips_on_every_rank(ranks, case):
    r0, r1 = ranks[0]["module", case], ranks[1]["module", case]
    expected = torch.ones(STEPS, dtype=torch.bool)
    expected[NAN_STEP] = False
    assert torch.equal(r0["finite"], expected)
    assert torch.equal(r1["finite"], expected)
    _assert_tree_equal(r0, r1)
    ref = train_module("hybrid", nan=case == "nan", nan_backward=case == "backward")
    assert torch.equal(ref["finite"], expected)
    _assert_tree_close(r0["params"], ref["params"], atol=1e-5)
    torch.testing.assert_close(r0["log_scale"], ref["log_scale"], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- divergent tasks

# Which tasks each rank computes at each step (rank 0, rank 1): a task switched off on one rank,
# every task off on one rank, a task off everywhere, and nothing on anywhere.
ACTIVITY = [((1, 1, 1), (1, 1, 1)),
            ((1, 0, 1), (1, 1, 1)),
            ((0, 0, 0), (1, 1, 0)),
            ((1, 1, 1), (0, 1, 1)),
            ((0, 0, 0), (0, 0, 0)),
            ((0, 1, 1), (1, 0, 1))]
TASK_SCALES = (1.0, 10.0, 0.1)


class TaskNet(nn.Module):
    """One head per task (a head whose task is off is not run), or one head for all tasks."""

    def __init__(self, shared_head: bool = False):
        super().__init__()
        torch.manual_seed(5)
        self.encoder = nn.Linear(IN, HIDDEN)
        self.heads = (nn.Linear(HIDDEN, NUM_TASKS) if shared_head else
                      nn.ModuleList(nn.Linear(HIDDEN, 1) for _ in range(NUM_TASKS)))

    def head(self, t, z):
        if isinstance(self.heads, nn.Linear):
            return self.heads(z)[:, t]
        return self.heads[t](z).squeeze(-1)

    def forward(self, x, y, active):
        """Task t's loss on this slice; a task that is off: a NaN constant (no graph)."""
        z = torch.tanh(self.encoder(x))
        nan = torch.tensor(float("nan"))
        return z, [TASK_SCALES[t] * ((self.head(t, z) - y[:, t]) ** 2).mean()
                   if on else nan for t, on in enumerate(active)]


def train_diverging(method: str, reduce=None, rank: int | None = None,
                    shared_head: bool = False):
    """SGD steps with the tasks of ACTIVITY; ``rank=None``: one process on the global batch,
    where task t's loss is its mean over the slices of the ranks that compute it.

    The network's gradients are averaged over the ranks as DDP does (a missing gradient counts
    as zeros): DDP itself cannot reduce a head that gets no gradient on some rank.
    """
    net = TaskNet(shared_head)
    model = net
    module = IMTL(method, NUM_TASKS, reduce=reduce)
    optimizer = torch.optim.SGD([*net.parameters(), *module.parameters()], lr=LR)
    alphas, active = [], []
    for i, per_rank in enumerate(ACTIVITY):
        x, y = global_batch(i)
        if rank is None:
            rows = [torch.cat([torch.arange(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
                               for r in range(WORLD) if per_rank[r][t]] or [torch.arange(0)])
                    for t in range(NUM_TASKS)]
            z, _ = model(x, y, (0,) * NUM_TASKS)
            losses = []
            for t in range(NUM_TASKS):
                if len(rows[t]):
                    pred = net.head(t, z[rows[t]])
                    losses.append(TASK_SCALES[t] * ((pred - y[rows[t], t]) ** 2).mean())
                else:
                    losses.append(torch.tensor(float("nan")))
        else:
            x, y = local_batch(i, rank)
            z, losses = model(x, y, per_rank[rank])
        module(z, losses)
        if rank is not None:
            for p in net.parameters():
                grad = torch.zeros_like(p) if p.grad is None else p.grad
                dist.all_reduce(grad)
                p.grad = grad / WORLD
        optimizer.step()
        optimizer.zero_grad()
        alphas.append(None if module.info is None else module.info.alpha.detach().clone())
        active.append(module.active)
    scales = None if module.log_scale is None else module.log_scale.detach().clone()
    return {"params": {k: v.detach().clone() for k, v in net.named_parameters()},
            "log_scale": scales, "alpha": alphas, "active": active}


def _diverging_worker(rank: int, port: int, out_dir: str) -> None:
    with _gloo(rank, port, 15):
        reduce = imtl_dist.all_sum()
        results = {(method, shared): train_diverging(method, reduce, rank, shared)
                   for method in METHODS for shared in (False, True)}
        # an error on rank 1 only (its losses do not depend on the z it passes): every rank
        # raises, and the next call pairs the same collectives again
        module, net = IMTL("hybrid", NUM_TASKS, reduce=reduce), TaskNet()
        z, losses = net(*local_batch(0, rank), (1, 1, 1))
        try:
            module(z.detach().requires_grad_() if rank == 1 else z, losses)
            results["error"] = None
        except (ValueError, RuntimeError) as exc:
            results["error"] = f"{type(exc).__name__}: {exc}"
        if rank == 0:          # evaluation on one rank: no communication under no_grad
            with torch.no_grad():
                module(*net(*local_batch(2, rank), (1, 1, 1)))
        z, losses = net(*local_batch(1, rank), (1, 1, 1))
        module(z, losses)
        results["after"] = module.info.alpha
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def diverging(tmp_path_factory):
    out = tmp_path_factory.mktemp("diverging")
    train_diverging("hybrid")
    spawn(_diverging_worker, _free_port(), str(out), timeout=40.0)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("shared_head", [False, True], ids=["separate-heads", "one-head"])
@pytest.mark.parametrize("method", METHODS)
def test_ranks_with_different_active_tasks_agree_with_one_process(diverging, method,
                                                                  shared_head):
    """A task on on any rank is on: its loss is the mean over the ranks that compute it, its
    gradient that of the examples of those ranks; a rank with no task on still joins in."""
    got, other = diverging[0][method, shared_head], diverging[1][method, shared_head]
    ref = train_diverging(method, shared_head=shared_head)
    on_anywhere = [tuple(bool(a or b) for a, b in zip(*per_rank, strict=True))
                   for per_rank in ACTIVITY]
    assert got["active"] == other["active"] == ref["active"] == on_anywhere
    for a, b, r in zip(got["alpha"], other["alpha"], ref["alpha"], strict=True):
        assert (a is None) == (b is None) == (r is None)
        if a is not None:
            assert torch.equal(a, b)
            torch.testing.assert_close(a, r, rtol=0, atol=1e-6)
    _assert_tree_equal(got["params"], other["params"])
    _assert_tree_close(got["params"], ref["params"], atol=1e-6)
    if method != "gradient":
        assert torch.equal(got["log_scale"], other["log_scale"])
        torch.testing.assert_close(got["log_scale"], ref["log_scale"], rtol=0, atol=1e-6)
        assert float(got["log_scale"].abs().min()) > 0.01          # every scale moved


def test_an_error_on_one_rank_is_raised_on_every_rank(diverging):
    """The ranks then go on in step; a no_grad call on one rank alone (evaluation) does not
    communicate."""
    assert diverging[1]["error"].startswith("ValueError: no active loss depends on the feature z")
    assert diverging[0]["error"] == ("RuntimeError: IMTL: 1 other rank(s) raised an error in "
                                     "this call (see their output); every rank stops here")
    assert torch.equal(diverging[0]["after"], diverging[1]["after"])


def test_the_example_sets_a_timeout_on_the_process_group(monkeypatch):
    """A stalled rank must not hang the others for torch's default 30 minutes."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "examples" / "ddp_train.py"
    spec = importlib.util.spec_from_file_location("ddp_train_timeout", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen = {}

    def fake_init(*args, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(dist, "init_process_group", fake_init)
    for argv, want in [([], 300.0), (["--timeout", "42"], 42.0)]:
        monkeypatch.setattr(sys, "argv", ["ddp_train.py", *argv])
        with pytest.raises(SystemExit):
            module.main()
        assert seen["timeout"].total_seconds() == want


def test_module_refuses_the_parameter_level_call_with_reduce():
    net = Net()
    module = IMTL("hybrid", NUM_TASKS, reduce=CountingReduce())
    x, y = local_batch(0, 0)
    _, pred = net(x)
    with pytest.raises(NotImplementedError, match="all-reduced"):
        module.backward(shared_parameters=net.encoder.parameters(), losses=decode_losses(pred, y))


# ----------------------------------------------------------------------------- one process

class CountingReduce:
    """A stand-in for ``R`` identical replicas: ``R · x``; records the bytes of every call."""

    def __init__(self, replicas: int = 2):
        self.replicas = replicas
        self.calls: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.numel() * x.element_size())
        return self.replicas * x


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("method", METHODS)
def test_identical_replicas_give_the_single_process_update(level, method):
    shared, task = init_params()
    state = imtl.preset(method).init(NUM_TASKS)
    make = imtl.mtl_value_and_grad if level == "feature" else imtl.value_and_grad
    fn = (encode, decode) if level == "feature" else (loss_fn,)
    x, y = local_batch(0, 0)
    ref = make(*fn, method)(shared, task, state, x, y)
    got = make(*fn, method, reduce=CountingReduce(3))(shared, task, state, x, y)
    torch.testing.assert_close(got.info.alpha, ref.info.alpha, rtol=0, atol=1e-7)
    _assert_tree_close((got.grads, got.state, got.losses), (ref.grads, ref.state, ref.losses),
                       atol=1e-6)
    if method != "loss":
        # feature level: three copies of the batch make a feature three times as long, whose
        # per-example gradients are a third: the global norm is the local one / sqrt(3)
        factor = 3**-0.5 if level == "feature" else 1.0
        torch.testing.assert_close(got.info.grad_norm, ref.info.grad_norm * factor)


def _payload(level: str, num_tasks: int) -> tuple[list[int], int, int]:
    """Bytes per reduction for a T-task step, and the bytes of the shared / task gradients."""
    shared = {"w": torch.randn(HIDDEN, IN), "b": torch.randn(HIDDEN)}
    task = {"w": torch.randn(num_tasks, HIDDEN), "b": torch.randn(num_tasks)}
    x, y = torch.randn(LOCAL_BATCH, IN), torch.randn(LOCAL_BATCH, num_tasks)

    def dec(p, z, x, y):
        return (((z @ p["w"].T + p["b"]) - y) ** 2).mean(0)

    counter = CountingReduce()
    if level == "feature":
        step = imtl.mtl_value_and_grad(encode, dec, "hybrid", reduce=counter)
    else:
        step = imtl.value_and_grad(lambda sp, tp, x, y: dec(tp, encode(sp, x, y), x, y),
                                   "hybrid", reduce=counter)
    out = step(shared, task, imtl.preset("hybrid").init(num_tasks), x, y)
    assert bool(out.info.finite)
    nbytes = [sum(v.numel() * v.element_size() for v in p.values()) for p in (shared, task)]
    return counter.calls, nbytes[0], nbytes[1]


def test_feature_level_payload_is_one_small_float64_vector_then_the_gradients():
    calls, shared_bytes, task_bytes = _payload("feature", 4)
    assert calls == [(4 * 4 + 4 + 1) * 8, shared_bytes + task_bytes]
    assert calls[0] == 168


def test_parameter_level_payload_is_the_jacobian_then_the_task_gradients():
    calls, shared_bytes, task_bytes = _payload("parameter", 4)
    assert calls == [4 * shared_bytes + (4 + 1) * 4, task_bytes]


def test_reduce_must_return_the_shape_it_was_given():
    shared, task = init_params()
    step = imtl.mtl_value_and_grad(encode, decode, "hybrid", reduce=lambda x: x.sum())
    with pytest.raises(ValueError, match="sum over replicas"):
        step(shared, task, imtl.preset("hybrid").init(NUM_TASKS), *local_batch(0, 0))


def test_all_sum_needs_no_process_group_until_called():
    psum = imtl_dist.all_sum()
    assert callable(psum)


@pytest.mark.parametrize("level", LEVELS)
def test_an_extra_loss_goes_through_the_reduction(level):
    def dec(p, z, x, y):
        return imtl.Losses(decode(p, z, x, y), 1e-2 * (z**2).mean())

    shared, task = init_params()
    state = imtl.preset("hybrid").init(NUM_TASKS)
    x, y = local_batch(0, 0)
    if level == "feature":
        make = lambda **kw: imtl.mtl_value_and_grad(encode, dec, "hybrid", **kw)  # noqa: E731
    else:
        fn = lambda sp, tp, x, y: dec(tp, encode(sp, x, y), x, y)  # noqa: E731
        make = lambda **kw: imtl.value_and_grad(fn, "hybrid", **kw)  # noqa: E731
    ref = make()(shared, task, state, x, y)
    counter = CountingReduce(2)
    got = make(reduce=counter)(shared, task, state, x, y)
    torch.testing.assert_close(got.info.alpha, ref.info.alpha, rtol=0, atol=1e-7)
    _assert_tree_close((got.grads, got.state), (ref.grads, ref.state), atol=1e-6)
    stats = (NUM_TASKS**2 + NUM_TASKS + 1 + 1) * 8 if level == "feature" else None
    if stats is not None:
        assert counter.calls[0] == stats
