"""The demo's summary: Δm%, the printed table and the JSON of every recorded number."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from imtl_func.demo._data import TASKS, TaskSpec
from imtl_func.demo._train import History


def delta_m(metrics: Sequence[float], baseline: Sequence[float],
            tasks: Sequence[TaskSpec] = TASKS) -> float:
    """Δm% against a baseline: ``100/T Σ_t ±(M_t − B_t) / B_t``, + for higher-is-better metrics
    and − for lower-is-better ones, so that a positive value means better than the baseline."""
    total = 0.0
    for m, b, spec in zip(metrics, baseline, tasks, strict=True):
        sign = 1.0 if spec.higher_is_better else -1.0
        total += sign * (m - b) / abs(b)
    return 100.0 * total / len(tasks)


def format_table(finals: dict[str, list[float]], baseline: str | None = "ew",
                 tasks: Sequence[TaskSpec] = TASKS) -> str:
    """Plain-text table: one row per method, best value per task marked with ``*``, and Δm%
    against ``baseline`` when it is among the methods."""
    methods = list(finals)
    headers = ["method", *[f"{t.name} {t.metric}" for t in tasks]]
    directions = ["", *[("higher" if t.higher_is_better else "lower") + " better" for t in tasks]]
    base = finals[baseline] if baseline is not None and baseline in finals else None
    if base is not None:
        headers.append(f"Delta-m% vs {baseline}")
        directions.append("higher better")
    best = []
    for j, t in enumerate(tasks):
        values = [finals[m][j] for m in methods]
        best.append(max(values) if t.higher_is_better else min(values))
    digits = [2, 2, 2, 3]
    rows = []
    for m in methods:
        cells = [m]
        for j in range(len(tasks)):
            v = finals[m][j]
            mark = "*" if round(v, digits[j]) == round(best[j], digits[j]) else " "
            cells.append(f"{v:.{digits[j]}f}{mark}")
        if base is not None:
            cells.append(f"{delta_m(finals[m], base, tasks):+.2f} ")
        rows.append(cells)
    widths = [max(len(r[k]) for r in [headers, directions, *rows]) for k in range(len(headers))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *[c.rjust(w) for c, w in zip(cells[1:], widths[1:],
                                                                 strict=True)]]).rstrip()

    rule = "-" * len(line(headers))
    out = [line(headers), line(directions), rule, *[line(r) for r in rows], rule,
           "* best per task (held-out set)"]
    return "\n".join(out)


def to_json(histories: dict[str, History], args: argparse.Namespace, table: str) -> dict[str, Any]:
    """Configuration, table, and per method: final metrics, Δm% against "ew" (None without
    it), held-out curves, cosines, and every ``every``-th step's losses, α and e^s."""
    finals = {m: h.final for m, h in histories.items()}
    base = finals.get("ew")
    every = max(1, args.steps // 200)
    return {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "tasks": [t._asdict() for t in TASKS],
        "table": table,
        "methods": {
            m: {
                "final": dict(zip([t.name for t in TASKS], h.final, strict=True)),
                "delta_m_vs_ew": None if base is None else delta_m(h.final, base),
                "seconds": h.seconds,
                "skipped_steps": h.skipped_steps,
                "eval_steps": h.eval_steps,
                "metrics": h.metrics,
                "cosine": {str(k): v for k, v in h.cosine.items()},
                "every": every,
                "train_loss": _finite_list(h.train_loss, every),
                "alpha": _finite_list(h.alpha, every),
                "scale": _finite_list(h.scale, every),
            }
            for m, h in histories.items()
        },
    }


def _finite_list(values: Tensor, every: int) -> list[list[float | None]]:
    """Every ``every``-th row of ``[steps, T]`` as a list; NaN as JSON null."""
    rows = values[every - 1 :: every].tolist()
    return [[v if math.isfinite(v) else None for v in row] for row in rows]
