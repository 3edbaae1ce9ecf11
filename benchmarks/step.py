"""Step-time benchmark: IMTL steps against equal weighting, eager and compiled (issue 4).

Usage::

    python -m benchmarks.step [--quick] [--out FILE.json] [--device cpu|cuda] [--threads N]
    python -m benchmarks.step --render FILE.json      # markdown tables of a finished run

For every model (``mlp``, ``cnn``) and task count T, all rows (see :mod:`benchmarks.rows`)
are built on copies of one model, warmed up, and timed in interleaved rounds; the JSON holds
per row the median and min step time, the ratios to EW measured in the same run, the
warm-up (compile) time and the peak step memory. The JSON is rewritten after every
configuration, so an interrupted run keeps what it finished.

``--quick`` runs tiny models, T ∈ {2, 3}, 1 warm-up and 3 timed steps, no compiled rows (a
``torch.compile`` takes tens of seconds even for tiny graphs on CPU); it checks that every row
runs, not how fast.
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

import imtl_func as imtl
from benchmarks.harness import peak_step_bytes, profile_top_ops, time_rows
from benchmarks.models import FULL_SIZES, QUICK_SIZES, make_workload
from benchmarks.rows import (
    Row,
    RowSpec,
    build_row,
    has_nn_module,
    has_torchjd,
)

__all__ = ["main", "render_markdown", "row_specs", "update_readme"]

METHODS = ("loss", "gradient", "hybrid")
LEVELS = ("feature", "feature-per-task", "parameter")
EW = RowSpec("ew", "ew", "-")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _words(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny models, few steps (< 1 min)")
    p.add_argument("--out", type=Path, default=None, help="JSON file to write")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="default: cuda when available, else cpu",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's; --quick: 1)",
    )
    p.add_argument("--models", type=_words, default=None, help="comma list; default mlp,cnn")
    p.add_argument("--tasks", type=_ints, default=None, help="comma list; default 2,4,8,16")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per row (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per row (default 2)")
    p.add_argument(
        "--compile-tasks",
        type=_ints,
        default=None,
        help="T values with compiled rows (default: 4; --quick: none)",
    )
    p.add_argument(
        "--compile-methods",
        type=_words,
        default=None,
        help="methods with compiled rows (default: hybrid)",
    )
    p.add_argument(
        "--max-param-tasks",
        type=str,
        default="",
        help="e.g. 'cnn=8': largest T with parameter-level rows for a model",
    )
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
        "--render",
        type=Path,
        default=None,
        help="print markdown tables of a finished JSON and exit",
    )
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    quick = args.quick
    if quick and args.threads is None:
        args.threads = 1
    args.models = args.models or ["mlp", "cnn"]
    args.tasks = args.tasks or ([2, 3] if quick else [2, 4, 8, 16])
    args.repeats = args.repeats or (3 if quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    if args.compile_tasks is None:
        args.compile_tasks = [] if quick else [4]
    args.compile_methods = args.compile_methods or ["hybrid"]
    args.max_param = {
        k: int(v) for k, v in (item.split("=") for item in _words(args.max_param_tasks))
    }
    return args


def row_specs(model: str, num_tasks: int, args: argparse.Namespace) -> list[RowSpec]:
    """The rows of one configuration, EW eager first."""
    param_ok = num_tasks <= args.max_param.get(model, 1 << 30)
    compiled = num_tasks in args.compile_tasks
    specs = [EW]
    if compiled:
        specs.append(RowSpec("ew", "ew", "-", "compiled"))
    specs.append(RowSpec("loop", "gradient", "feature"))
    if param_ok:
        specs.append(RowSpec("loop", "gradient", "parameter"))
        if has_torchjd():
            specs.append(RowSpec("torchjd", "gradient", "parameter"))
    for method in METHODS:
        for level in LEVELS:
            if level == "parameter" and not param_ok:
                continue
            specs.append(RowSpec("ours", method, level))
            if compiled and method in args.compile_methods:
                specs.append(RowSpec("ours", method, level, "compiled"))
    if has_nn_module():
        specs.append(RowSpec("nn", "hybrid", "feature"))
        if param_ok:
            specs.append(RowSpec("nn", "hybrid", "parameter"))
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
        "threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
        ),
        "quick": args.quick,
        "argv": args.argv,
        "repeats": args.repeats,
        "warmup": args.warmup,
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
            "min"
        ),
    }
    meta["git_commit"] = _git_commit()
    meta["imtl_func"] = str(Path(imtl.__file__).parent)
    if hasattr(os, "getloadavg"):
        meta["loadavg_start"] = list(os.getloadavg())
    return meta


def _results(
    model: str,
    num_tasks: int,
    rows: list[Row],
    timings: dict[str, Any],
    peaks: dict[str, int | None],
) -> list[dict[str, Any]]:
    ew = timings[EW.name]
    out = []
    for row in rows:
        t = timings[row.name]
        paired = [a / b for a, b in zip(t.times_s, ew.times_s, strict=True)]
        out.append(
            {
                "model": model,
                "num_tasks": num_tasks,
                "row": row.name,
                "impl": row.spec.impl,
                "method": row.spec.method,
                "level": row.spec.level,
                "mode": row.spec.mode,
                "median_s": t.median_s,
                "min_s": t.min_s,
                "ratio_paired": statistics.median(paired),
                "ratio_median": t.median_s / ew.median_s,
                "ratio_min": t.min_s / ew.min_s,
                "first_call_s": t.warmup_s[0] if t.warmup_s else None,
                "compile_s": t.compile_s if row.spec.mode == "compiled" else None,
                "peak_bytes": peaks.get(row.name),
                "finite": row.finite(),
                "times_s": t.times_s,
                "warmup_s": t.warmup_s,
            }
        )
    return out


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every configuration; write the JSON after each one when ``args.out`` is set."""
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
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
    report: dict[str, Any] = {"meta": _meta(args, device), "results": [], "profiles": []}
    report["meta"]["compile_cache"] = cache
    start = time.perf_counter()
    for model in args.models:
        for num_tasks in args.tasks:
            specs = row_specs(model, num_tasks, args)
            if any(spec.mode == "compiled" for spec in specs):
                torch._dynamo.reset()  # fresh compile caches: compile time counted per config
            work = make_workload(model, num_tasks, sizes[model], device=name)
            rows = [build_row(spec, work) for spec in specs]
            t0 = time.perf_counter()
            timings = time_rows(rows, warmup=args.warmup, repeats=args.repeats, device=device)
            peaks: dict[str, int] = (
                {} if args.no_memory else peak_step_bytes({r.name: r.step for r in rows}, device)
            )
            results = _results(model, num_tasks, rows, timings, peaks)
            report["results"].extend(results)
            for row in rows:
                if args.profile and any(k.lower() in row.name.lower() for k in args.profile):
                    report["profiles"].append(
                        {
                            "model": model,
                            "num_tasks": num_tasks,
                            "row": row.name,
                            "top_ops": profile_top_ops(row.step, device),
                        }
                    )
            _log(f"{model} T={num_tasks}: {len(rows)} rows in {time.perf_counter() - t0:.0f} s")
            for r in results:
                _log(f"  {r['row']:<36} {r['median_s'] * 1e3:9.2f} ms  x{r['ratio_paired']:.2f}")
            report["meta"]["elapsed_s"] = time.perf_counter() - start
            if hasattr(os, "getloadavg"):
                report["meta"]["loadavg_end"] = list(os.getloadavg())
            if args.out:
                _write(report, args.out)
            del rows, work
    return report


def _write(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"


def render_markdown(report: dict[str, Any]) -> str:
    """Markdown tables of a run: per model, one line per row, one column per T.

    A cell reads ``median ms (×EW paired) · min ms · peak MB``; compile times follow.
    """
    results = report["results"]
    lines: list[str] = []
    for model in dict.fromkeys(r["model"] for r in results):
        mine = [r for r in results if r["model"] == model]
        tasks = sorted({r["num_tasks"] for r in mine})
        names = list(dict.fromkeys(r["row"] for r in mine))
        cell = {(r["row"], r["num_tasks"]): r for r in mine}
        lines += [
            f"**{model}** — cell: median ms (× EW, paired) / min ms / peak MB",
            "",
            "| row | " + " | ".join(f"T={t}" for t in tasks) + " |",
            "|---|" + "---|" * len(tasks),
        ]
        for name in names:
            cells = []
            for t in tasks:
                r = cell.get((name, t))
                if r is None:
                    cells.append("–")
                    continue
                peak = "–" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
                flag = "" if r["finite"] else " (diverged)"
                cells.append(
                    f"{_fmt_ms(r['median_s'])} (×{r['ratio_paired']:.2f}) / "
                    f"{_fmt_ms(r['min_s'])} / {peak}{flag}"
                )
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
        tables = render_markdown(json.loads(args.render.read_text()))
        if args.readme:
            update_readme(args.readme, tables)
        else:
            print(tables)
        return None
    report = run(args)
    if args.out is None:
        print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
