"""Timing, peak memory and profiles of benchmark rows.

Timing: every row is warmed up (its first calls hold any ``torch.compile`` work, reported
separately), then the rows are timed one step at a time in interleaved rounds, the order
rotated every round, so that a burst of load on a shared machine lands on every row alike.
Rows far slower than the baseline can be limited to the first few rounds. Each step is
bracketed by a device synchronisation on CUDA.

Peak memory: the most tensor memory that one step holds above what was live before it.
On CUDA that is ``torch.cuda.max_memory_allocated`` (after ``reset_peak_memory_stats``) minus
``torch.cuda.memory_allocated`` before the step. On CPU no such counter exists (``tracemalloc``
does not see torch's allocator, and the process RSS keeps freed pages), so the step is run
once under ``torch.profiler`` with ``profile_memory=True``: the profiler records every
allocation and free of torch's CPU allocator with its size and time, and replaying those
records in time order gives the same quantity exactly.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.rows import Row

__all__ = ["Timing", "peak_step_bytes", "profile_top_ops", "time_rows"]


@dataclass
class Timing:
    """Step times of one row, in seconds."""

    warmup_s: list[float] = field(default_factory=list)
    times_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def compile_s(self) -> float:
        """Warm-up time beyond what the same number of steady steps costs (≥ 0)."""
        return max(0.0, sum(self.warmup_s) - len(self.warmup_s) * self.median_s)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_rows(
    rows: Sequence[Row],
    *,
    warmup: int,
    repeats: int,
    device: torch.device,
    slow_factor: float | None = None,
    slow_repeats: int | None = None,
) -> dict[str, Timing]:
    """Warm up every row, then time ``repeats`` steps of each in rotated interleaved rounds.

    A row whose last warm-up step took more than ``slow_factor`` times that of ``rows[0]``
    (the baseline) takes part only in the first ``slow_repeats`` rounds, so that a few very
    slow rows do not set the run's length; its paired ratios use those rounds.

    Returns:
        ``{row.name: Timing}``.
    """
    out = {row.name: Timing() for row in rows}
    for row in rows:
        for _ in range(warmup):
            out[row.name].warmup_s.append(_timed(row.step, device))
    budget = {row.name: repeats for row in rows}
    if slow_factor is not None and slow_repeats is not None and warmup > 0:
        base = out[rows[0].name].warmup_s[-1]
        for row in rows[1:]:
            if out[row.name].warmup_s[-1] > slow_factor * base:
                budget[row.name] = min(repeats, slow_repeats)
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            active = [row for row in rows if r < budget[row.name]]
            shift = r % len(active)
            for row in [*active[shift:], *active[:shift]]:
                out[row.name].times_s.append(_timed(row.step, device))
    finally:
        gc.enable()
    return out


def peak_step_bytes(fns: Mapping[str, Callable[[], None]], device: torch.device) -> dict[str, int]:
    """Peak tensor bytes held during one call of each ``fn`` above those live before it.

    On CPU all calls run inside one profiler session (starting one costs about a second),
    each inside a ``record_function`` range that attributes the allocation records to it.
    """
    gc.collect()
    if device.type == "cuda":
        out = {}
        for name, fn in fns.items():
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            torch.cuda.synchronize(device)
            out[name] = int(torch.cuda.max_memory_allocated(device) - base)
        return out
    tags = {f"peak_step_bytes[{i}]": name for i, name in enumerate(fns)}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for tag, name in tags.items():
            with record_function(tag):
                fns[name]()
    events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
    spans = {e.name(): (e.start_ns(), e.end_ns()) for e in events if e.name() in tags}
    records = sorted(
        (e.start_ns(), e.nbytes())
        for e in events
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    out = {}
    for tag, name in tags.items():
        lo, hi = spans[tag]
        live = peak = 0
        for when, nbytes in records:
            if lo <= when <= hi:
                live += nbytes
                peak = max(peak, live)
        out[name] = peak
    return out


def profile_top_ops(
    fn: Callable[[], None], device: torch.device, *, steps: int = 5, top: int = 12
) -> list[dict[str, float | str | int]]:
    """The ops that take the most self time over ``steps`` calls of ``fn``.

    Returns:
        up to ``top`` dicts ``{op, calls, self_ms_per_step, share}`` (``share`` of the total
        self time), sorted by self time.
    """
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    stats = prof.key_averages()
    total = sum(getattr(e, key) for e in stats) or 1.0
    ranked = sorted(stats, key=lambda e: getattr(e, key), reverse=True)[:top]
    return [
        {
            "op": e.key,
            "calls_per_step": e.count // steps,
            "self_ms_per_step": getattr(e, key) / 1e3 / steps,
            "share": getattr(e, key) / total,
        }
        for e in ranked
    ]
