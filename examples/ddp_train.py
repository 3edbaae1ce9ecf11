"""Data-parallel IMTL with torch.distributed: every rank trains on its slice of each global batch.

    torchrun --nproc-per-node 2 examples/ddp_train.py            # CPU: gloo
    torchrun --nproc-per-node 8 examples/ddp_train.py            # one process per GPU: nccl
    torchrun --nproc-per-node 2 examples/ddp_train.py --module   # nn.IMTL + DDP

The same script runs both ways: the backend follows the device.

* Functional (default): the step gets ``reduce=imtl_func.distributed.all_sum()``: one
  all-reduce of the ``[T, T]`` Gramian, the task losses and the replica count gives every rank
  the α and loss scales of the global batch, a second one averages the gradients. No
  DistributedDataParallel wrapper (it would not see these gradients: the step computes them
  with torch.func).
* ``--module``: the network is wrapped in DistributedDataParallel and ``imtl_func.nn.IMTL``
  gets the same ``reduce``: the one all-reduce of the statistics (with which tasks each rank
  computed), then one backward through the DDP network, whose gradients DDP averages.

``--timeout`` (seconds, default 300) bounds how long a rank waits in a collective for the
others: a rank that crashed or stalled then ends the run with an error instead of holding the
others for torch's default timeout (30 minutes for gloo).
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel

import imtl_func as imtl
from imtl_func.distributed import all_sum
from imtl_func.nn import IMTL

NUM_TASKS = 4
SCALES = (1.0, 10.0, 0.1, 100.0)     # task losses of very different magnitudes


def make_data(n: int, dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole data set, identical on every rank (same seed): x [n, dim], y [n, T]."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, dim, generator=g)
    mix = torch.randn(dim, NUM_TASKS, generator=g)
    y = torch.tanh(x @ mix) + 0.1 * torch.randn(n, NUM_TASKS, generator=g)
    return x.to(device), y.to(device)


class Model(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(),
                                     nn.Linear(hidden, hidden), nn.Tanh())
        self.heads = nn.Linear(hidden, NUM_TASKS)     # one output per task

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return z, self.heads(z)


def task_losses(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[T]`` mean squared errors, scaled so that their magnitudes differ."""
    return ((pred - y) ** 2).mean(0) * torch.tensor(SCALES).to(pred)


def build_step(model: Model, method: str, reduce):
    def encode(params, x, y):
        return functional_call(model.encoder, params, (x,))

    def decode(params, z, x, y):
        return task_losses(functional_call(model.heads, params, (z,)), y)

    return imtl.mtl_value_and_grad(encode, decode, method, reduce=reduce)


class CountingReduce:
    """Wraps a reduce to record the bytes it sends per call (for the printout)."""

    def __init__(self, reduce):
        self.reduce, self.calls = reduce, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.numel() * x.element_size())
        return self.reduce(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="hybrid", choices=["loss", "gradient", "hybrid"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--module", action="store_true",
                        help="nn.IMTL with a DistributedDataParallel network")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds a rank waits in a collective before the run fails")
    args = parser.parse_args()

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of the "
                         f"world size {world} (equal local batches make the mean of the local "
                         "losses the loss of the global batch)")
    local = args.global_batch // world

    dim = 16
    torch.manual_seed(0)
    model = Model(dim, args.hidden).to(device)
    for p in model.parameters():                     # every rank starts from rank 0's weights
        dist.broadcast(p.data, src=0)
    shared = dict(model.encoder.named_parameters())
    reduce = CountingReduce(all_sum())
    x_all, y_all = make_data(4096, dim, device)
    order = torch.Generator().manual_seed(0)

    def my_batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(x_all), (args.global_batch,), generator=order)  # same on all ranks
        mine = idx[rank * local:(rank + 1) * local].to(device)
        return x_all[mine], y_all[mine]

    if args.module:
        log_scale = train_module(model, args, reduce, my_batch, rank, device)
    else:
        log_scale = train_functional(model, args, reduce, my_batch, rank, device)

    # every rank holds the same parameters and scales: check it
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()] + [log_scale.detach()])
    spread = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    low = flat.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    gap = float((spread - low).abs().max())
    if rank == 0:
        grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        shared_bytes = sum(p.numel() * p.element_size() for p in shared.values())
        # functional: [statistics, gradients] per step; module: [statistics], DDP the gradients
        per_step = reduce.calls[:1] if args.module else reduce.calls[:2]
        print(f"{world} ranks ({backend}), T = {NUM_TASKS}: IMTL all-reduce bytes per step "
              f"{per_step}; shared gradients {shared_bytes} B, all gradients {grad_bytes} B; "
              f"largest difference between ranks {gap:.1e}")
    dist.destroy_process_group()
    if gap != 0.0:
        raise SystemExit("ranks diverged")


def log(rank: int, i: int, steps: int, losses, alpha, scale) -> None:
    if rank == 0 and (i % 50 == 0 or i == steps - 1):
        fmt = lambda t: "[" + ", ".join(f"{v:.3g}" for v in t.tolist()) + "]"  # noqa: E731
        print(f"step {i:4d}  losses {fmt(losses)}  alpha {fmt(alpha)}  scale {fmt(scale)}",
              flush=True)


def train_functional(model: Model, args, reduce, my_batch, rank: int, device) -> torch.Tensor:
    """The functional step with ``reduce``: it averages the gradients itself (no DDP)."""
    shared = dict(model.encoder.named_parameters())
    task = dict(model.heads.named_parameters())
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    state = imtl.preset(args.method).init(NUM_TASKS, device=device)
    step = build_step(model, args.method, reduce)
    for i in range(args.steps):
        out = step(shared, task, state, *my_batch())
        state = out.state
        if bool(out.info.finite):                    # the same decision on every rank
            for name, p in shared.items():
                p.grad = out.grads.shared[name]
            for name, p in task.items():
                p.grad = out.grads.task[name]
            optimizer.step()
        log(rank, i, args.steps, out.losses, out.info.alpha, out.info.scale)
    return state.log_scale


def train_module(model: Model, args, reduce, my_batch, rank: int, device) -> torch.Tensor:
    """nn.IMTL with ``reduce`` on a DDP network: one backward through DDP per step."""
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    mtl = IMTL(args.method, NUM_TASKS, reduce=reduce).to(device)
    optimizer = torch.optim.Adam([*model.parameters(), *mtl.parameters()], lr=args.lr)
    for i in range(args.steps):
        x, y = my_batch()
        z, pred = ddp(x)
        losses = task_losses(pred, y)
        mtl(z, losses)                               # writes .grad; DDP averages the network's
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        if mtl.finite and bool(torch.isfinite(norm)):    # both the same on every rank
            optimizer.step()
        optimizer.zero_grad()
        global_losses = losses.detach().clone()
        dist.all_reduce(global_losses)               # for the printout only
        scale = torch.ones(NUM_TASKS) if mtl.log_scale is None else mtl.log_scale.exp()
        log(rank, i, args.steps, global_losses / dist.get_world_size(), mtl.info.alpha, scale)
    return torch.zeros(NUM_TASKS, device=device) if mtl.log_scale is None else mtl.log_scale


if __name__ == "__main__":
    main()
