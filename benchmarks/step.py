"""Step-time benchmark: IMTL steps against equal weighting, eager and compiled (issues 4, 13).

Usage::

    python -m benchmarks.step [--quick] [--out FILE.json] [--device cpu|cuda] [--threads 1,2]
                              [--targets]
    python -m benchmarks.step --render FILE.json [--targets]   # tables of a finished run

For every model (``mlp``, ``cnn``, ``dense``), task count T and thread setting, all rows (see
:mod:`benchmarks.rows`) are built on fresh copies of one model, warmed up, and timed in
interleaved rounds; the JSON holds per row the median and min step time, the ratios to EW
eager measured in the same rounds, the warm-up (compile) time and the peak step memory with
its ratio to EW's. The JSON is rewritten after every configuration, so an interrupted run
keeps what it finished. ``--targets`` prints each issue-13 target next to the measured figure.

``--quick`` runs tiny models, T ∈ {2, 4}, 1 thread, 1 warm-up and 3 timed steps, no compiled
rows (a ``torch.compile`` takes tens of seconds even for tiny graphs on CPU); it checks that
every row runs, not how fast.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import peak_step_bytes, profile_top_ops, time_rows
from benchmarks.models import FULL_SIZES, MODELS, QUICK_SIZES, make_workload
from benchmarks.rows import (
    BASE_LR,
    Row,
    RowSpec,
    build_row,
    has_nn_module,
    has_torchjd,
    library_path,
)

__all__ = [
    "check_targets",
    "main",
    "render_markdown",
    "render_targets",
    "row_specs",
    "update_readme",
]

METHODS = ("loss", "gradient", "hybrid")
LEVELS = ("feature-per-task", "feature", "parameter")
EW = RowSpec("ew", "ew", "-")
LOOP = RowSpec("loop", "gradient", "feature")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _words(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _max_param(text: str) -> dict[str, int]:
    """``'4'`` (every model) or ``'mlp=16,cnn=8'`` or both (``'4,mlp=16'``): ``{model: T}``,
    the key ``'*'`` for the bare number."""
    out: dict[str, int] = {}
    for item in _words(text):
        model, sep, value = item.rpartition("=")
        out[model if sep else "*"] = int(value)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny models, few steps (seconds)")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="default: cuda when available, else cpu",
    )
    p.add_argument(
        "--threads",
        type=_ints,
        default=None,
        help="comma list of torch.set_num_threads settings, each measured with its own EW "
        "(default 1,2; --quick: 1)",
    )
    p.add_argument(
        "--models", type=_words, default=None, help=f"comma list; default {','.join(MODELS)}"
    )
    p.add_argument("--tasks", type=_ints, default=None, help="comma list; default 4,16")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per row (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per row (default 2)")
    p.add_argument(
        "--compile-tasks",
        type=_ints,
        default=None,
        help="T values with compiled rows (default: 4; --quick: none)",
    )
    p.add_argument(
        "--compile-threads",
        type=_ints,
        default=None,
        help="thread settings with compiled rows (default: 1; each compile costs about half "
        "a minute of CPU here)",
    )
    p.add_argument(
        "--compile-methods",
        type=_words,
        default=None,
        help="methods with compiled rows (default: loss,gradient,hybrid)",
    )
    p.add_argument(
        "--compile-levels",
        type=_words,
        default=None,
        help="levels with compiled rows: feature-per-task, feature, parameter "
        "(default: feature-per-task)",
    )
    p.add_argument(
        "--max-param-tasks",
        type=str,
        default="4",
        help="largest T with parameter-level rows: '4' (every model, the default), "
        "'cnn=8', or '4,mlp=16'",
    )
    p.add_argument(
        "--slow-factor",
        type=float,
        default=4.0,
        help="a row whose warm-up step is slower than this many EW steps is timed in the "
        "first --slow-repeats rounds only (default 4; 0: never)",
    )
    p.add_argument("--slow-repeats", type=int, default=5, help="rounds for slow rows (default 5)")
    p.add_argument(
        "--rows",
        type=_words,
        default=None,
        help="keep only rows whose name contains one of these (EW eager is kept)",
    )
    p.add_argument(
        "--warm-compile-cache",
        action="store_true",
        help="reuse torch.compile's on-disk caches (default: a fresh, empty cache "
        "directory for this run, so compile times are cold-start times)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument(
        "--profile",
        type=_words,
        default=None,
        help="profile rows whose name contains one of these; top ops go in the JSON",
    )
    p.add_argument(
        "--targets",
        action="store_true",
        help="print the issue-13 targets next to the measured figures, met / missed",
    )
    p.add_argument(
        "--render",
        type=Path,
        default=None,
        help="print markdown tables of a finished JSON and exit",
    )
    p.add_argument(
        "--readme",
        type=Path,
        default=None,
        help=f"with --render: write the tables into this file between the lines {BEGIN!r} and "
        f"{END!r} instead of printing them",
    )
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    quick = args.quick
    args.threads = args.threads or ([1] if quick else [1, 2])
    args.models = args.models or list(MODELS)
    args.tasks = args.tasks or ([2, 4] if quick else [4, 16])
    args.repeats = args.repeats or (3 if quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    if args.compile_tasks is None:
        args.compile_tasks = [] if quick else [4]
    args.compile_threads = args.compile_threads or [1]
    args.compile_methods = args.compile_methods or list(METHODS)
    args.compile_levels = args.compile_levels or ["feature-per-task"]
    args.max_param = _max_param(args.max_param_tasks)
    return args


def row_specs(
    model: str, num_tasks: int, args: argparse.Namespace, threads: int | None = None
) -> list[RowSpec]:
    """The rows of one configuration, EW eager first (the baseline of every ratio)."""
    limit = args.max_param.get(model, args.max_param.get("*", 1 << 30))
    param_ok = num_tasks <= limit
    compiled = num_tasks in args.compile_tasks and (
        threads is None or threads in args.compile_threads
    )
    specs = [EW]
    if compiled:
        specs.append(RowSpec("ew", "ew", "-", "compiled"))
    specs.append(LOOP)
    for level in LEVELS:
        if level == "parameter":
            if not param_ok:
                continue
            specs.append(RowSpec("loop", "gradient", "parameter"))
            if has_torchjd():
                specs.append(RowSpec("torchjd", "gradient", "parameter"))
        for method in METHODS:
            specs.append(RowSpec("ours", method, level))
            if compiled and method in args.compile_methods and level in args.compile_levels:
                specs.append(RowSpec("ours", method, level, "compiled"))
        if has_nn_module() and level != "feature-per-task":
            for method in METHODS if level == "feature" else ("hybrid",):
                specs.append(RowSpec("nn", method, level))
    if args.rows:
        keep = [w.lower() for w in args.rows]
        specs = [s for s in specs if s == EW or any(k in s.name.lower() for k in keep)]
    return specs


def _cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The checkout's commit (and '+dirty' with local changes), or None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "imtl_func", "benchmarks"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty.strip() else "")


def _meta(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
        ),
        "quick": args.quick,
        "argv": args.argv,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "compiled_rows": {
            "tasks": args.compile_tasks,
            "threads": args.compile_threads,
            "methods": args.compile_methods,
            "levels": args.compile_levels,
        },
        "max_param_tasks": args.max_param,
        "slow_rows": (
            f"rows with a warm-up step over {args.slow_factor} x EW's timed in the first "
            f"{args.slow_repeats} rounds only"
            if args.slow_factor
            else "none"
        ),
        "optimizer": f"torch.optim.SGD(lr={BASE_LR:g} / 10^(T-1)), no momentum",
        "torchjd": has_torchjd(),
        "nn_module": has_nn_module(),
        "memory_method": (
            "torch.cuda.max_memory_allocated above memory_allocated before the step"
            if device.type == "cuda"
            else "torch.profiler(profile_memory=True) allocation records replayed "
            "in time order: peak live bytes above those live before the step"
        ),
        "ratio_note": (
            "ratio_paired = median over rounds of (row step / EW eager step in the "
            "same round); ratio_median = median / EW median; ratio_min = min / EW "
            "min; mem_ratio = peak_bytes / EW eager peak_bytes"
        ),
    }
    meta["git_commit"] = _git_commit()
    meta["imtl_func"] = library_path()
    if hasattr(os, "getloadavg"):
        meta["loadavg_start"] = list(os.getloadavg())
    return meta


def _paired(times: Sequence[float], base: Sequence[float]) -> float:
    """Median over the rounds both took part in (the first ones) of ``times / base``."""
    return statistics.median(a / b for a, b in zip(times, base, strict=False))


def _results(
    model: str,
    num_tasks: int,
    threads: int,
    rows: list[Row],
    timings: dict[str, Any],
    peaks: dict[str, int],
) -> list[dict[str, Any]]:
    ew = timings[EW.name]
    ew_peak = peaks.get(EW.name)
    out = []
    for row in rows:
        t = timings[row.name]
        peak = peaks.get(row.name)
        out.append(
            {
                "model": model,
                "num_tasks": num_tasks,
                "threads": threads,
                "row": row.name,
                "impl": row.spec.impl,
                "method": row.spec.method,
                "level": row.spec.level,
                "mode": row.spec.mode,
                "median_s": t.median_s,
                "min_s": t.min_s,
                "repeats": len(t.times_s),
                "ratio_paired": _paired(t.times_s, ew.times_s),
                "ratio_median": t.median_s / ew.median_s,
                "ratio_min": t.min_s / ew.min_s,
                "first_call_s": t.warmup_s[0] if t.warmup_s else None,
                "compile_s": t.compile_s if row.spec.mode == "compiled" else None,
                "peak_bytes": peak,
                "mem_ratio": peak / ew_peak if peak is not None and ew_peak else None,
                "finite": row.finite(),
                "times_s": t.times_s,
                "warmup_s": t.warmup_s,
            }
        )
    return out


def _cpu_s() -> float:
    """CPU seconds used so far by this process and its finished children (inductor's C++
    compiler runs), user and system; on a machine of its own at 1 thread this is the wall time
    the run would take."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every configuration; write the JSON after each one when ``args.out`` is set."""
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    if args.warm_compile_cache:
        return _run_configs(args, "warm (the user's torch.compile cache)")
    with tempfile.TemporaryDirectory(prefix="bench_inductor_") as cache:
        previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            return _run_configs(args, "cold (fresh TORCHINDUCTOR_CACHE_DIR for this run)")
        finally:
            if previous is None:
                del os.environ["TORCHINDUCTOR_CACHE_DIR"]
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def _run_configs(args: argparse.Namespace, cache: str) -> dict[str, Any]:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    report: dict[str, Any] = {
        "meta": _meta(args, device),
        "results": [],
        "configs": [],
        "profiles": [],
    }
    report["meta"]["compile_cache"] = cache
    start = time.perf_counter()
    for model in args.models:
        for num_tasks in args.tasks:
            work = make_workload(model, num_tasks, sizes[model], device=name)
            for threads in args.threads:
                specs = row_specs(model, num_tasks, args, threads)
                # Before building: inductor's CPU kernels take the thread count at compile time.
                torch.set_num_threads(threads)
                if any(spec.mode == "compiled" for spec in specs):
                    torch._dynamo.reset()  # fresh compile caches: compile time counted per config
                _run_one(report, args, device, model, num_tasks, threads, specs, work)
                report["meta"]["elapsed_s"] = time.perf_counter() - start
                if hasattr(os, "getloadavg"):
                    report["meta"]["loadavg_end"] = list(os.getloadavg())
                report["targets"] = check_targets(report["results"])
                if args.out:
                    _write(report, args.out)
            del work
    return report


def _run_one(
    report: dict[str, Any],
    args: argparse.Namespace,
    device: torch.device,
    model: str,
    num_tasks: int,
    threads: int,
    specs: list[RowSpec],
    work: Any,
) -> None:
    """Build, time and measure the rows of one configuration into ``report``."""
    cpu0, t0 = _cpu_s(), time.perf_counter()
    rows = [build_row(spec, work) for spec in specs]
    timings = time_rows(
        rows,
        warmup=args.warmup,
        repeats=args.repeats,
        device=device,
        slow_factor=args.slow_factor or None,
        slow_repeats=args.slow_repeats,
    )
    peaks: dict[str, int] = (
        {} if args.no_memory else peak_step_bytes({r.name: r.step for r in rows}, device)
    )
    results = _results(model, num_tasks, threads, rows, timings, peaks)
    report["results"].extend(results)
    for row in rows:
        if args.profile and any(k.lower() in row.name.lower() for k in args.profile):
            report["profiles"].append(
                {
                    "model": model,
                    "num_tasks": num_tasks,
                    "threads": threads,
                    "row": row.name,
                    "top_ops": profile_top_ops(row.step, device),
                }
            )
    config = {
        "model": model,
        "num_tasks": num_tasks,
        "threads": threads,
        "rows": len(rows),
        "wall_s": time.perf_counter() - t0,
        "cpu_s": _cpu_s() - cpu0,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    report["configs"].append(config)
    _log(
        f"{model} T={num_tasks} threads={threads}: {len(rows)} rows in {config['wall_s']:.0f} s "
        f"(CPU {config['cpu_s']:.0f} s, compiler subprocesses included)"
    )
    for r in results:
        mem = "" if r["mem_ratio"] is None else f"  mem x{r['mem_ratio']:.2f}"
        _log(f"  {r['row']:<40} {r['median_s'] * 1e3:9.2f} ms  x{r['ratio_paired']:.2f}{mem}")


# ---------------------------------------------------------------------------------------------
# Issue 13's targets
# ---------------------------------------------------------------------------------------------


TARGETS = (
    "per-task decoders eager",
    "per-task eager not slower than the naive loop",
    "nn.IMTL feature imtl(z, losses)",
    "general decode eager",
    "'loss'",
    "compiled vs EW eager",
    "compiled not slower than the same path eager",
    "feature-level peak memory",
)

Check = tuple[str, float | None, float | None, str]


def _mem_ratio(r: dict[str, Any], ew: dict[str, Any] | None) -> float | None:
    """Peak memory over EW eager's (recomputed for JSON files written before ``mem_ratio``)."""
    if r.get("mem_ratio") is not None:
        return r["mem_ratio"]
    peak, base = r.get("peak_bytes"), None if ew is None else ew.get("peak_bytes")
    return peak / base if peak is not None and base else None


def _row_checks(r: dict[str, Any], rows: dict[str, dict[str, Any]], num_tasks: int) -> list[Check]:
    """``(target, measured, limit, unit)`` for every target that row ``r`` is subject to;
    ``rows`` are the rows of its configuration by name (a ``None`` means: no limit at this
    T, or nothing measured)."""
    impl, method, level = r["impl"], r["method"], r["level"]
    ratio, eager = r["ratio_paired"], r["mode"] == "eager"
    out: list[Check] = []
    if impl == "ours" and level == "feature-per-task" and eager:
        out.append((TARGETS[0], ratio, {4: 1.10, 16: 1.25}.get(num_tasks), "x EW"))
        if (loop := rows.get(LOOP.name)) is not None:
            out.append((TARGETS[1], _paired(r["times_s"], loop["times_s"]), 1.0, "x LOOP"))
    if impl == "nn" and level == "feature":
        out.append((TARGETS[2], ratio, {4: 1.15, 16: 1.30}.get(num_tasks), "x EW"))
    if impl == "ours" and level == "feature" and eager:
        out.append((TARGETS[3], ratio, {4: 1.25}.get(num_tasks), "x EW"))
    if impl in ("ours", "nn") and method == "loss":
        out.append((TARGETS[4], ratio, 1.03, "x EW"))
    if impl == "ours" and not eager:
        if level != "parameter" or method == "loss":
            out.append((TARGETS[5], ratio, 1.05, "x EW"))
        if (same := rows.get(RowSpec(impl, method, level).name)) is not None:
            out.append((TARGETS[6], _paired(r["times_s"], same["times_s"]), 1.0, "x eager"))
    if impl in ("ours", "nn") and level.startswith("feature") and num_tasks == 4:
        out.append((TARGETS[7], _mem_ratio(r, rows.get(EW.name)), 2.5, "x EW memory"))
    return out


def check_targets(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every issue-13 target that a measured row is subject to, with its verdict.

    Ratios are paired medians against EW eager of the same configuration (model, T,
    threads); "not slower than" ratios are paired medians of the two rows' own steps.
    Targets ('ours' = the functional steps):

    * per-task decoders, eager: ≤ 1.10 × EW at T = 4, ≤ 1.25 × at T = 16; at every T not
      slower than LOOP feature (the naive loop);
    * nn.IMTL feature level ``imtl(z, losses)``: ≤ 1.15 × at T = 4, ≤ 1.3 × at T = 16;
    * general decode (ours feature), eager: ≤ 1.25 × at T = 4;
    * every 'loss' row (ours, nn.IMTL; any level, eager or compiled): ≤ 1.03 ×;
    * ours compiled, feature level (or 'loss'): ≤ 1.05 × EW eager; every ours compiled row:
      not slower than the same row eager;
    * feature-level peak step memory (ours, nn.IMTL) at T = 4: ≤ 2.5 × EW eager's.

    Returns:
        dicts ``{target, model, threads, num_tasks, row, measured, limit, unit, met}`` in the
        order of :data:`TARGETS`, then of the results; ``unit`` is ``'x EW'``, ``'x LOOP'``,
        ``'x eager'`` or ``'x EW memory'``.
    """
    groups: dict[tuple[Any, ...], dict[str, dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["model"], r.get("threads"), r["num_tasks"]), {})[r["row"]] = r
    out: list[dict[str, Any]] = []
    for (model, threads, num_tasks), rows in groups.items():
        for r in rows.values():
            for target, measured, limit, unit in _row_checks(r, rows, num_tasks):
                if measured is None or limit is None:
                    continue
                out.append(
                    {
                        "target": target,
                        "model": model,
                        "threads": threads,
                        "num_tasks": num_tasks,
                        "row": r["row"],
                        "measured": measured,
                        "limit": limit,
                        "unit": unit,
                        "met": measured <= limit,
                    }
                )
    return sorted(out, key=lambda c: TARGETS.index(c["target"]))


def render_targets(report: dict[str, Any]) -> str:
    """Markdown: one line per :func:`check_targets` entry, then met / missed per target and in
    all."""
    checks = check_targets(report["results"])
    lines = [
        "| target | model | threads | T | row | measured | limit | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        lines.append(
            f"| {c['target']} | {c['model']} | {c['threads'] or '–'} | {c['num_tasks']} | "
            f"{c['row']} | "
            f"{c['measured']:.2f} {c['unit']} | ≤ {c['limit']:.2f} | "
            f"{'met' if c['met'] else '**missed**'} |"
        )
    lines += ["", "| target | met | missed |", "|---|---|---|"]
    for target in TARGETS:
        mine = [c["met"] for c in checks if c["target"] == target]
        if mine:
            lines.append(f"| {target} | {sum(mine)} | {len(mine) - sum(mine)} |")
    met = sum(c["met"] for c in checks)
    lines += ["", f"{met} of {len(checks)} targets met, {len(checks) - met} missed."]
    return "\n".join(lines)


def _write(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"


def _cell(r: dict[str, Any], ew_peak: int | None, repeats: int | None) -> str:
    peak = r.get("peak_bytes")
    mem = "–" if peak is None else f"{peak / 2**20:.1f}"
    if peak is not None and ew_peak:
        mem += f" (×{peak / ew_peak:.2f})"
    flag = "" if r["finite"] else " (diverged)"
    steps = r.get("repeats", len(r["times_s"]))
    if repeats is not None and steps < repeats:
        flag += f" [{steps} steps]"
    return (
        f"{_fmt_ms(r['median_s'])} (×{r['ratio_paired']:.2f}) / {_fmt_ms(r['min_s'])} / {mem}{flag}"
    )


def render_markdown(report: dict[str, Any]) -> str:
    """Markdown tables of a run: per model and thread setting, one line per row, one column
    per T.

    A cell reads ``median ms (×EW paired) / min ms / peak MB (×EW peak)``, with the number of
    timed steps when a slow row got fewer; compile times follow.
    """
    results = report["results"]
    meta = report.get("meta", {})
    repeats = meta.get("repeats")
    default_threads = meta.get("threads")
    lines: list[str] = []
    groups = dict.fromkeys((r["model"], r.get("threads", default_threads)) for r in results)
    for model, threads in groups:
        mine = [
            r
            for r in results
            if r["model"] == model and r.get("threads", default_threads) == threads
        ]
        tasks = sorted({r["num_tasks"] for r in mine})
        names = list(dict.fromkeys(r["row"] for r in mine))
        cell = {(r["row"], r["num_tasks"]): r for r in mine}
        ew_peak = {t: cell[(EW.name, t)].get("peak_bytes") for t in tasks if (EW.name, t) in cell}
        what = "" if threads is None else f", {threads} thread{'s' if threads != 1 else ''}"
        lines += [
            f"**{model}{what}** — cell: median ms (× EW, paired) / min ms / peak MB (× EW)",
            "",
            "| row | " + " | ".join(f"T={t}" for t in tasks) + " |",
            "|---|" + "---|" * len(tasks),
        ]
        for name in names:
            cells = [
                "–" if (name, t) not in cell else _cell(cell[(name, t)], ew_peak.get(t), repeats)
                for t in tasks
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        compiled = [r for r in mine if r["compile_s"] is not None]
        if compiled:
            lines += [
                "",
                "compile time (warm-up beyond steady steps): "
                + ", ".join(
                    f"{r['row']} T={r['num_tasks']}: {r['compile_s']:.0f} s" for r in compiled
                ),
            ]
        lines.append("")
    return "\n".join(lines)


def update_readme(path: Path, tables: str) -> None:
    """Replace the text between the ``BEGIN`` and ``END`` marker lines of ``path``."""
    text = path.read_text()
    head, sep, rest = text.partition(BEGIN + "\n")
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise ValueError(f"{path} has no {BEGIN} ... {END} block")
    path.write_text(f"{head}{BEGIN}\n{tables.rstrip()}\n{END}{tail}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        tables = render_markdown(report)
        if args.readme:
            update_readme(args.readme, tables)
        else:
            print(tables)
        if args.targets:
            print(render_targets(report))
        return None
    report = run(args)
    if args.out is None:
        print(json.dumps(report, indent=1))
    if args.targets:
        print(render_targets(report))
    return report


if __name__ == "__main__":
    main()
