"""The demo's PNGs: held-out curves, IMTL-G weights, IMTL-L scales and gradient cosines."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from imtl_func.demo._data import NUM_TASKS, TASKS
from imtl_func.demo._train import History

COLORS = {"ew": "tab:gray", "loss": "tab:blue", "gradient": "tab:orange", "hybrid": "tab:green"}


def _smooth(values: Tensor, window: int) -> Tensor:
    """Trailing moving average along dim 0 of ``[steps, T]`` (same length)."""
    if window <= 1 or values.shape[0] < 2:
        return values
    csum = torch.cat([torch.zeros(1, values.shape[1]), values.cumsum(0)])
    idx = torch.arange(1, values.shape[0] + 1)
    lo = (idx - window).clamp(min=0)
    return (csum[idx] - csum[lo]) / (idx - lo)[:, None]


def plot_metrics(histories: dict[str, History], path: Path, dpi: int = 100) -> Path:
    """Held-out metric curves: one panel per task, one line per method."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.2), dpi=dpi, layout="constrained")
    axes = fig.subplots(1, NUM_TASKS)
    for j, (ax, spec) in enumerate(zip(axes, TASKS, strict=True)):
        for name, h in histories.items():
            ax.plot(h.eval_steps, [m[j] for m in h.metrics], label=name,
                    color=COLORS.get(name), lw=1.4)
        ax.set_title(f"{spec.name}: {spec.metric} ({'higher' if spec.higher_is_better else 'lower'}"
                     " better)", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if not spec.higher_is_better:
            values = [m[j] for h in histories.values() for m in h.metrics]
            if min(values) > 0 and max(values) > 10 * min(values):
                ax.set_yscale("log")
        else:
            finals = [h.final[j] for h in histories.values()]
            ax.set_ylim(max(0.0, min(finals) - 15), 100.5)
    axes[0].legend(fontsize=8)
    fig.suptitle("Held-out metrics during training (digits, same init and batches)", fontsize=10)
    fig.savefig(path)
    return path


def _per_step_plot(histories: dict[str, History], attr: str, methods: Sequence[str],
                   ylabel: str, title: str, path: Path) -> Path | None:
    """Per-step values of ``attr`` (``[steps, T]``), one panel per method; a log axis when
    every value is positive, a symmetric-log one otherwise (IMTL-G weights may be negative)."""
    from matplotlib.figure import Figure

    chosen = [m for m in methods if m in histories]
    if not chosen:
        return None
    fig = Figure(figsize=(5 * len(chosen), 3.2), dpi=100, layout="constrained")
    axes = fig.subplots(1, len(chosen), squeeze=False)[0]
    for ax, name in zip(axes, chosen, strict=True):
        values: Tensor = getattr(histories[name], attr)
        steps = torch.arange(1, values.shape[0] + 1)
        window = max(1, values.shape[0] // 50)
        smooth = _smooth(values, window)
        for j, spec in enumerate(TASKS):
            line = ax.plot(steps, smooth[:, j], label=spec.name, lw=1.4)[0]
            if window > 1:
                ax.plot(steps, values[:, j], color=line.get_color(), lw=0.5, alpha=0.25)
        ax.set_title(f"{name}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        finite = values[torch.isfinite(values)]
        if finite.numel() and bool((finite > 0).all()):
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog", linthresh=1e-3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path)
    return path


def plot_cosines(histories: dict[str, History], path: Path) -> Path:
    """Cosine matrices of the task gradients at the shared feature, methods × checkpoints."""
    from matplotlib.figure import Figure

    names = list(histories)
    cols = max(len(h.cosine) for h in histories.values())
    fig = Figure(figsize=(2.4 * cols + 0.8, 2.3 * len(names)), dpi=100, layout="constrained")
    axes = fig.subplots(len(names), cols, squeeze=False)
    labels = [t.name for t in TASKS]
    image = None
    for r, name in enumerate(names):
        for c, (step, mat) in enumerate(sorted(histories[name].cosine.items())):
            ax = axes[r][c]
            image = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
            for a in range(NUM_TASKS):
                for b in range(NUM_TASKS):
                    ax.text(b, a, f"{mat[a][b]:.2f}", ha="center", va="center", fontsize=6)
            ax.set_xticks(range(NUM_TASKS), labels, fontsize=6, rotation=45)
            ax.set_yticks(range(NUM_TASKS), labels, fontsize=6)
            ax.set_title(f"{name}, step {step}", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="cosine")
    fig.suptitle("Cosine of task gradients w.r.t. the shared feature (probe batch)", fontsize=10)
    fig.savefig(path)
    return path


def write_plots(histories: dict[str, History], out: Path) -> list[Path]:
    """All PNGs of the run into ``out``; returns their paths."""
    paths = [plot_metrics(histories, out / "metrics.png")]
    alpha = _per_step_plot(histories, "alpha", ["gradient", "hybrid"], "α_t",
                           "IMTL-G weights α on the (scaled) task gradients", out / "alpha.png")
    scale = _per_step_plot(histories, "scale", ["loss", "hybrid"], "e^s_t",
                           "IMTL-L loss scales e^s", out / "scales.png")
    paths += [p for p in (alpha, scale) if p is not None]
    paths.append(plot_cosines(histories, out / "cosine.png"))
    return paths
