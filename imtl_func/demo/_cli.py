"""The command line of ``python -m imtl_func.demo``: flags, the run, what it prints and writes."""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from imtl_func.demo._data import METHODS, TASKS, load_data
from imtl_func.demo._plots import write_plots
from imtl_func.demo._report import format_table, to_json
from imtl_func.demo._train import History, train


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The demo's flags; ``--methods`` comes back as a list of method names."""
    parser = argparse.ArgumentParser(
        prog="python -m imtl_func.demo",
        description="Train one network on four digit tasks with equal weighting and IMTL "
                    "('loss', 'gradient', 'hybrid'); print held-out metrics and write plots.")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of " + ",".join(METHODS) + " (default: all)")
    parser.add_argument("--steps", type=int, default=400, help="training steps per method")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile(step, fullgraph=True) (slow to start on CPU)")
    parser.add_argument("--module", action="store_true",
                        help="use the stateful imtl_func.nn.IMTL module instead of the "
                             "functional step")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=20,
                        help="steps between held-out evaluations")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the model is tiny, and extra threads "
                             "only contend on a busy machine)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--no-plots", action="store_true", help="write only the table and JSON")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.eval_every < 1 or args.batch_size < 1 or args.threads < 1:
        parser.error("--eval-every, --batch-size and --threads must be positive")
    if args.compile and args.module:
        parser.error("--compile compiles the functional step; it does not apply to --module")
    args.methods = methods
    return args


def _require_extras(plots: bool) -> None:
    """Exit with the install line when the ``examples`` extra is missing."""
    needed = ["sklearn", "tqdm", *(["matplotlib"] if plots else [])]
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"the demo needs {', '.join(missing)}: "
                         "pip install 'imtl_func[examples]'")


def main(argv: Sequence[str] | None = None) -> dict[str, History]:
    """Run the demo from command-line arguments; return each method's :class:`History`."""
    args = parse_args(argv)
    _require_extras(plots=not args.no_plots)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # leave an in-process caller's setting as it was


def _run(args: argparse.Namespace) -> dict[str, History]:
    device = torch.device(args.device)
    data = load_data(device)
    n_train, n_test = data.x_train.shape[0], data.x_test.shape[0]
    print(f"digits: {n_train} train / {n_test} held-out images, tasks: "
          f"{', '.join(t.name for t in TASKS)}; {args.steps} steps x {len(args.methods)} methods "
          f"on {device}" + (" (compiled)" if args.compile else ""))
    histories = {
        method: train(method, data, steps=args.steps, seed=args.seed, lr=args.lr,
                      batch_size=args.batch_size, eval_every=args.eval_every,
                      compile=args.compile, use_module=args.module,
                      progress=not args.no_progress)
        for method in args.methods
    }
    table = format_table({m: h.final for m, h in histories.items()})
    print()
    print(table)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    paths = [] if args.no_plots else write_plots(histories, out)
    (out / "table.txt").write_text(table + "\n", encoding="utf-8")
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps(to_json(histories, args, table), indent=1),
                            encoding="utf-8")
    total = sum(h.seconds for h in histories.values())
    print(f"\ntraining took {total:.1f} s "
          f"({', '.join(f'{m} {h.seconds:.1f} s' for m, h in histories.items())})")
    print(f"wrote {', '.join(str(p) for p in [*paths, out / 'table.txt', metrics_path])}")
    return histories
