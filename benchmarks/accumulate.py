"""Gradient accumulation (issue 12 item 3): cost of the exact two passes, error of the shortcut.

```bash
python -m benchmarks.accumulate error            # demo digits model: shortcut vs exact
python -m benchmarks.accumulate time             # MLP / CNN of benchmarks.models: step times
python -m benchmarks.accumulate time --quick     # tiny, checks that the script runs
```

* ``error``: the demo's model (scikit-learn digits, encoder 64 → 128 → 32, four heads whose
  raw losses span four orders of magnitude), a batch of 256 split into M micro-batches. The
  exact accumulation (:func:`imtl_func.accumulate`) equals one step on the 256 (checked here to
  float64 rounding); the shortcut is one ordinary step per micro-batch, all from the same state,
  gradients averaged (α of the shortcut: the mean of the micro-batches' α). Figures at the
  initialisation and after 300 hybrid steps of Adam on batches of 256; relative errors are
  ``‖approx − exact‖ / ‖exact‖`` over every shared parameter.
* ``time``: one step's gradients (no optimizer) on the big batch, M ordinary steps on its
  micro-batches (gradients summed), and the exact accumulation on the same micro-batches;
  interleaved rounds, median milliseconds and the paired ratio to the big step (median over
  rounds of row / big step in the same round); peak tensor memory of one call (CPU: the profiler's
  allocation records, :func:`benchmarks.harness.peak_step_bytes`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import optree
import torch
import torch.nn.functional as F
from torch.func import functional_call

import imtl_func as imtl
from benchmarks import models
from benchmarks.harness import peak_step_bytes


def split(batch: tuple[torch.Tensor, ...], m: int) -> list[tuple[torch.Tensor, ...]]:
    parts = [t.chunk(m) for t in batch]
    return [tuple(p[i] for p in parts) for i in range(m)]


def flat(tree: object) -> torch.Tensor:
    return torch.cat([x.reshape(-1).double() for x in optree.tree_leaves(tree)])


def rel(a: object, b: object) -> float:
    fa, fb = flat(a), flat(b)
    return float((fa - fb).norm() / fb.norm())


# ------------------------------------------------------------------------------------- error


def average(trees: list[object]) -> object:
    return optree.tree_map(lambda *g: sum(g) / len(g), *trees)


def error(ms: list[int], train_steps: int) -> None:
    from imtl_func import demo

    data = demo.load_data()
    ink_mean, ink_std = float(data.ink_train.mean()), float(data.ink_train.std())
    encoder, heads = demo.build_model(0, ink_mean, ink_std)
    encoder, heads = encoder.double(), heads.double()

    def encode(p, x, *targets):
        return functional_call(encoder, p, (x,))

    def decode(p, z, x, cls, ge5, ink):
        return demo.task_losses(functional_call(heads, p, (z,)), x, cls, ge5, ink)

    def batch_at(index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.double() if t.is_floating_point() else t
                     for t in data.train_batch(index))

    shared = {k: v.detach().clone() for k, v in encoder.named_parameters()}
    task = {k: v.detach().clone() for k, v in heads.named_parameters()}
    order = demo.batch_order(len(data.x_train), 256, train_steps + 1, seed=0)
    big_step = imtl.mtl_value_and_grad(encode, decode, "hybrid")
    state = big_step.init(4, dtype=torch.float64)

    def report(label: str, shared, task, state_h) -> None:
        batch = batch_at(order[-1])
        print(f"\n{label}")
        print("                 same state for every micro-batch                        |  "
              "state chained "
              "through the micro-batches\n"
              "method    M  shared rel.err  ‖ᾱ−α‖/‖α‖  max|α_m−α|  max|α_m−α|/α  |  "
              "shared rel.err  max|Δs|   | exact vs big (max rel.err)")
        for method in ("gradient", "hybrid", "loss"):
            step = imtl.mtl_value_and_grad(encode, decode, method)
            st = state_h if method != "gradient" else step.init(4, dtype=torch.float64)
            big = step(shared, task, st, *batch)
            acc = imtl.accumulate(step)
            for m in ms:
                micro = split(batch, m)
                exact = acc(shared, task, st, micro)
                check = max(rel(exact.grads, big.grads), rel(exact.info.alpha, big.info.alpha),
                            rel(exact.state.log_scale, big.state.log_scale)
                            if method != "gradient" else 0.0)
                outs = [step(shared, task, st, *b) for b in micro]
                alphas = torch.stack([o.info.alpha for o in outs])
                a_rel = float((alphas.mean(0) - exact.info.alpha).norm()
                              / exact.info.alpha.norm())
                a_max = float((alphas - exact.info.alpha).abs().max())
                a_task = float(((alphas - exact.info.alpha).abs()
                                / exact.info.alpha.abs()).max())
                chained, s = [], st
                for b in micro:
                    chained.append(step(shared, task, s, *b))
                    s = chained[-1].state
                ds = float((s.log_scale - exact.state.log_scale).abs().max())
                print(f"{method:8s} {m:2d}  "
                      f"{rel(average([o.grads.shared for o in outs]), exact.grads.shared):14.2e}"
                      f"  {a_rel:10.2e}  {a_max:10.2e}  {a_task:12.2e}  |  "
                      f"{rel(average([o.grads.shared for o in chained]), exact.grads.shared):14.2e}"
                      f"  {ds:8.2e}  | {check:.1e}")
            if method == "hybrid":
                print("         exact α:", [round(float(a), 4) for a in big.info.alpha],
                      " e^s:", [round(float(a), 4) for a in big.info.scale],
                      " cos:", [round(float(big.info.cosine[i, j]), 3)
                                for i in range(4) for j in range(i + 1, 4)])

    report("at initialisation (state: s = 0)", shared, task, state)
    params = {"shared": shared, "task": task}
    opt_state = (optree.tree_map(torch.zeros_like, params),
                 optree.tree_map(torch.zeros_like, params))
    for i in range(train_steps):
        out = big_step(params["shared"], params["task"], state, *batch_at(order[i]))
        state = out.state
        grads = {"shared": out.grads.shared, "task": out.grads.task}
        params, opt_state = adam(params, grads, opt_state, i + 1)
    report(f"after {train_steps} hybrid steps (Adam, lr 3e-3, batches of 256)",
           params["shared"], params["task"], state)


def adam(params, grads, moments, t, lr=3e-3, b1=0.9, b2=0.999, eps=1e-8):
    """One Adam step on pytrees; ``moments`` is ``(m, v)``, two pytrees like ``params``."""
    m = optree.tree_map(lambda m, g: b1 * m + (1 - b1) * g, moments[0], grads)
    v = optree.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, moments[1], grads)
    params = optree.tree_map(
        lambda p, m, v: p - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps),
        params, m, v)
    return params, (m, v)


# -------------------------------------------------------------------------------------- time


def workload_fns(name: str, size: models.Size, num_tasks: int, per_task: bool):
    w = models.make_workload(name, num_tasks, size)
    shared = {k: v.detach() for k, v in w.encoder.named_parameters()}
    task = {k: v.detach() for k, v in w.heads.named_parameters()}

    def encode(p, x, y):
        return functional_call(w.encoder, p, (x,))

    def decode(p, z, x, y):
        return models.decode(name, p, z, y.T, w.scales)

    def head(t):
        def loss(p, z, x, y):
            pred = F.linear(z, p[f"{t}.weight"], p[f"{t}.bias"])
            return w.scales[t] * models.task_loss(name, pred, y[:, t])
        return loss

    dec = [head(t) for t in range(num_tasks)] if per_task else decode
    return shared, task, encode, dec, (w.x, w.y.T.contiguous())


def time_config(name: str, size: models.Size, per_task: bool, method: str, repeats: int,
                m: int) -> None:
    shared, task, encode, dec, batch = workload_fns(name, size, 4, per_task)
    step = imtl.mtl_value_and_grad(encode, dec, method)
    acc = imtl.accumulate(step)
    state = step.init(4)
    micro = split(batch, m)

    def big() -> None:
        step(shared, task, state, *batch)

    def naive() -> None:
        grads = None
        for b in micro:
            g = step(shared, task, state, *b).grads
            grads = g if grads is None else optree.tree_map(torch.add, grads, g)

    def exact() -> None:
        acc(shared, task, state, micro)

    rows: dict[str, Callable[[], None]] = {"big step": big, f"{m} steps": naive,
                                           "exact accumulate": exact}
    for fn in rows.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in rows}
    names = list(rows)
    for r in range(repeats):
        for k in names[r % 3:] + names[: r % 3]:
            t0 = time.perf_counter()
            rows[k]()
            times[k].append(time.perf_counter() - t0)
    peak = peak_step_bytes(rows, torch.device("cpu"))
    form = "per-task" if per_task else "general"
    base = times["big step"]
    print(f"\n{name} (batch {size.batch}, T=4, {form} decode), {method}")
    for k in names:
        paired = statistics.median(t / b for t, b in zip(times[k], base, strict=True))
        print(f"  {k:17s} {statistics.median(times[k]) * 1e3:8.1f} ms "
              f"({min(times[k]) * 1e3:7.1f})  x{paired:4.2f}  peak {peak[k] / 2**20:7.1f} MiB")


def time_it(quick: bool, repeats: int, m: int) -> None:
    torch.set_num_threads(1)
    sizes = models.QUICK_SIZES if quick else models.FULL_SIZES
    print(f"threads 1, {repeats} interleaved rounds, median ms per step (min in brackets), "
          f"x: median over rounds of (row / big step of the same round); M = {m}")
    for name in ("mlp", "cnn"):
        for per_task in (False, True):
            for method in ("hybrid", "gradient", "loss"):
                time_config(name, sizes[name], per_task, method, repeats, m)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["error", "time"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=300)
    args = parser.parse_args()
    if args.part == "error":
        error([2, 4, 8] if not args.quick else [2], 3 if args.quick else args.train_steps)
    else:
        time_it(args.quick, 2 if args.quick else args.repeats, args.m)


if __name__ == "__main__":
    main()
