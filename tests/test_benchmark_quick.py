"""The step benchmark (benchmarks/): its --quick mode, its reference IMTL-G, its memory meter.

No timing is asserted: the machine running the tests may be loaded; only that every promised
row runs, and that the figures written are well-formed and consistent.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import peak_step_bytes  # noqa: E402
from benchmarks.models import FULL_SIZES, MODELS, make_workload  # noqa: E402
from benchmarks.rows import (  # noqa: E402
    has_nn_module,
    has_torchjd,
    paper_alpha,
)
from benchmarks.step import (  # noqa: E402
    BEGIN,
    END,
    check_targets,
    main,
    render_markdown,
    render_targets,
    update_readme,
)

METHODS = ("loss", "gradient", "hybrid")
EAGER_OURS = [
    f"ours {m} {lvl} eager" for m in METHODS for lvl in ("feature", "feature-per-task", "parameter")
]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``python -m benchmarks.step --quick --tasks 2 --targets``, run in-process, read back
    from JSON."""
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    threads = torch.get_num_threads()
    main(["--quick", "--tasks", "2", "--targets", "--out", str(out)])
    assert torch.get_num_threads() == threads  # restored for the other tests
    return json.loads(out.read_text())


def test_quick_writes_every_row(quick_report: dict) -> None:
    expected = {"EW eager", "LOOP feature eager", "LOOP parameter eager", *EAGER_OURS}
    if has_torchjd():
        expected.add("torchjd IMTLG parameter eager")
    if has_nn_module():
        expected |= {f"nn.IMTL {m} feature eager" for m in METHODS}
        expected.add("nn.IMTL hybrid parameter eager")
    results = quick_report["results"]
    for model in MODELS:
        rows = {r["row"] for r in results if r["model"] == model and r["num_tasks"] == 2}
        assert rows == expected, model
    assert len(results) == len(MODELS) * len(expected)
    assert {r["threads"] for r in results} == {1}


def test_quick_figures_are_consistent(quick_report: dict) -> None:
    meta = quick_report["meta"]
    assert meta["quick"] is True and meta["repeats"] == 3 and meta["device"] == "cpu"
    assert meta["torch"] == torch.__version__ and meta["threads"] == [1]
    assert meta["optimizer"].startswith("torch.optim.SGD")
    for r in quick_report["results"]:
        assert r["repeats"] == len(r["times_s"]) and 1 <= r["repeats"] <= 3
        assert len(r["warmup_s"]) == 1
        assert 0 < r["min_s"] <= r["median_s"] <= max(r["times_s"])
        assert r["ratio_paired"] > 0 and r["ratio_median"] > 0
        assert isinstance(r["peak_bytes"], int) and r["peak_bytes"] > 0
        assert r["mem_ratio"] > 0
        assert r["finite"] is True and r["compile_s"] is None
        if r["row"] == "EW eager":
            assert r["ratio_paired"] == r["ratio_median"] == r["ratio_min"] == 1.0
            assert r["mem_ratio"] == 1.0 and r["repeats"] == 3
    assert quick_report["targets"] == check_targets(quick_report["results"])


def test_render_markdown_has_a_line_per_row(quick_report: dict) -> None:
    text = render_markdown(quick_report)
    assert text.count("| EW eager | ") == len(MODELS)
    assert text.count("| ours hybrid feature eager | ") == len(MODELS)
    assert "**dense, 1 thread**" in text


def test_update_readme_replaces_only_the_marked_block(quick_report: dict, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold table\n{END}\noutro\n")
    update_readme(readme, render_markdown(quick_report))
    text = readme.read_text()
    assert text.startswith(f"intro\n{BEGIN}\n**mlp, 1 thread**") and text.endswith(
        f"{END}\noutro\n"
    )
    assert "old table" not in text and text.count("| EW eager | ") == len(MODELS)
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="no"):
        update_readme(readme, "x")


def test_paper_closed_form_solves_the_imtl_g_conditions() -> None:
    """α sums to 1 and ``Σ α_s g_s`` has equal projections on every unit task gradient."""
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(4, 50, generator=gen, dtype=torch.float64)
    grads = grads * torch.tensor([[1.0], [10.0], [1e3], [1e-2]], dtype=torch.float64)
    units = grads / grads.norm(dim=1, keepdim=True)
    # T linear equations in α: (Σ_s α_s g_s)·(u_1 − u_t) = 0 for t ≥ 2, and Σ_s α_s = 1.
    system = torch.cat([(grads @ (units[:1] - units[1:]).T).T, torch.ones(1, 4).double()])
    rhs = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    alpha = paper_alpha(grads)
    torch.testing.assert_close(alpha, torch.linalg.solve(system, rhs))
    proj = units @ (alpha @ grads)
    torch.testing.assert_close(proj, proj[0].expand(4))


def test_cpu_peak_memory_sees_live_tensors() -> None:
    n = 1 << 20  # 4 MiB of float32

    def two_live() -> None:
        a = torch.ones(n)
        b = torch.ones(n)
        del a, b

    def one_at_a_time() -> None:
        for _ in range(3):
            a = torch.ones(n)
            del a

    peaks = peak_step_bytes({"two": two_live, "one": one_at_a_time}, torch.device("cpu"))
    assert 8 * n <= peaks["two"] < 8 * n + 4096
    assert 4 * n <= peaks["one"] < 4 * n + 4096


def test_threads_list_gives_each_setting_its_own_ew(tmp_path: Path) -> None:
    out = tmp_path / "threads.json"
    threads = torch.get_num_threads()
    argv = ["--quick", "--models", "mlp", "--tasks", "2", "--threads", "1,2", "--no-memory"]
    main([*argv, "--rows", "LOOP feature", "--warmup", "0", "--out", str(out)])
    assert torch.get_num_threads() == threads
    report = json.loads(out.read_text())
    assert report["meta"]["threads"] == [1, 2]
    got = [(r["threads"], r["row"], r["repeats"]) for r in report["results"]]
    row = "LOOP feature eager"
    assert got == [(1, "EW eager", 3), (1, row, 3), (2, "EW eager", 3), (2, row, 3)]
    assert all(r["peak_bytes"] is None and r["mem_ratio"] is None for r in report["results"])
    assert [(c["threads"], c["rows"]) for c in report["configs"]] == [(1, 2), (2, 2)]
    assert render_markdown(report).count("| EW eager | ") == 2


def test_dense_workload_shapes_and_scaled_losses() -> None:
    import torch.nn.functional as F

    from benchmarks.models import decode, head_forward, loss_list, per_task_losses

    size = FULL_SIZES["dense"]
    work = make_workload("dense", 3, size)
    z = work.encoder(work.x)
    assert z.shape == (16, 64, 16, 16)
    params = dict(work.heads.named_parameters())
    assert work.head_keys(1) == ["1.0.weight", "1.0.bias", "1.2.weight", "1.2.bias"]
    preds = [head_forward("dense", params, t, z) for t in range(3)]
    assert [p.shape for p in preds] == [(16, 8, 16, 16), (16, 1, 16, 16), (16, 8, 16, 16)]
    assert work.y[0].dtype == torch.int64 and work.y[1].dtype == torch.float32
    assert work.y[0].shape == work.y[1].shape == (16, 16, 16)
    expected = torch.stack(
        [
            F.cross_entropy(preds[0], work.y[0]),
            10 * F.mse_loss(preds[1][:, 0], work.y[1]),
            100 * F.cross_entropy(preds[2], work.y[2]),
        ]
    )
    torch.testing.assert_close(decode("dense", params, z, work.y, work.scales), expected)
    torch.testing.assert_close(
        torch.stack(loss_list("dense", params, z, work.y, work.scales)), expected
    )
    per_task = per_task_losses("dense", work.y, work.scales)
    torch.testing.assert_close(torch.stack([f(params, z, work.x) for f in per_task]), expected)


def test_slow_rows_take_part_in_the_first_rounds_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import harness
    from benchmarks.rows import Row, RowSpec

    # Each fake step returns the duration the (patched) timer reports for it.
    monkeypatch.setattr(harness, "_timed", lambda fn, device: fn())
    rows = [
        Row(RowSpec("ew", "ew", "-"), lambda: 1.0),  # type: ignore[arg-type, return-value]
        Row(RowSpec("loop", "gradient", "feature"), lambda: 4.0),  # type: ignore[arg-type, return-value]
        Row(RowSpec("loop", "gradient", "parameter"), lambda: 4.5),  # type: ignore[arg-type, return-value]
    ]
    got = harness.time_rows(
        rows, warmup=1, repeats=6, device=torch.device("cpu"), slow_factor=4.0, slow_repeats=2
    )
    assert [len(got[r.name].times_s) for r in rows] == [6, 6, 2]
    assert got["LOOP parameter eager"].times_s == [4.5, 4.5]
    plain = harness.time_rows(rows, warmup=1, repeats=6, device=torch.device("cpu"))
    assert [len(plain[r.name].times_s) for r in rows] == [6, 6, 6]


def _result(
    row: str,
    impl: str,
    method: str,
    level: str,
    mode: str,
    num_tasks: int,
    step: float,
    mem: float = 1.0,
) -> dict:
    """A result record of three rounds against an EW step of 1 s (so the ratio is ``step``)."""
    return {
        "model": "dense",
        "threads": 1,
        "num_tasks": num_tasks,
        "row": row,
        "impl": impl,
        "method": method,
        "level": level,
        "mode": mode,
        "ratio_paired": step,
        "times_s": [step] * 3,
        "mem_ratio": mem,
    }


def test_targets_verdicts() -> None:
    per_task = "feature-per-task"
    results = []
    for t in (4, 16):
        results += [
            _result("EW eager", "ew", "ew", "-", "eager", t, 1.0),
            _result("LOOP feature eager", "loop", "gradient", "feature", "eager", t, 1.2),
            _result("ours loss feature-per-task eager", "ours", "loss", per_task, "eager", t, 1.02),
            _result(
                "ours gradient feature-per-task eager",
                "ours",
                "gradient",
                per_task,
                "eager",
                t,
                1.11,
                mem=2.6,
            ),
            _result("nn.IMTL hybrid feature eager", "nn", "hybrid", "feature", "eager", t, 1.29),
            _result("ours hybrid feature eager", "ours", "hybrid", "feature", "eager", t, 1.3),
        ]
    results += [
        _result(
            "ours gradient feature-per-task compiled",
            "ours",
            "gradient",
            per_task,
            "compiled",
            4,
            1.06,
        ),
        _result("ours hybrid parameter eager", "ours", "hybrid", "parameter", "eager", 4, 3.0),
        _result(
            "ours hybrid parameter compiled", "ours", "hybrid", "parameter", "compiled", 4, 2.7
        ),
    ]
    got = {
        (c["target"], c["row"], c["num_tasks"], round(c["measured"], 4), c["limit"], c["met"])
        for c in check_targets(results)
    }
    loss, grad = "ours loss feature-per-task eager", "ours gradient feature-per-task eager"
    nn_row, comp = "nn.IMTL hybrid feature eager", "ours gradient feature-per-task compiled"
    expected = {
        ("per-task decoders eager", loss, 4, 1.02, 1.10, True),
        ("per-task decoders eager", grad, 4, 1.11, 1.10, False),
        ("per-task decoders eager", loss, 16, 1.02, 1.25, True),
        ("per-task decoders eager", grad, 16, 1.11, 1.25, True),
        ("per-task eager not slower than the naive loop", loss, 4, 0.85, 1.0, True),
        ("per-task eager not slower than the naive loop", grad, 4, 0.925, 1.0, True),
        ("per-task eager not slower than the naive loop", loss, 16, 0.85, 1.0, True),
        ("per-task eager not slower than the naive loop", grad, 16, 0.925, 1.0, True),
        ("nn.IMTL feature imtl(z, losses)", nn_row, 4, 1.29, 1.15, False),
        ("nn.IMTL feature imtl(z, losses)", nn_row, 16, 1.29, 1.30, True),
        ("general decode eager", "ours hybrid feature eager", 4, 1.3, 1.25, False),
        ("'loss'", loss, 4, 1.02, 1.03, True),
        ("'loss'", loss, 16, 1.02, 1.03, True),
        ("compiled vs EW eager", comp, 4, 1.06, 1.05, False),
        ("compiled not slower than the same path eager", comp, 4, 0.955, 1.0, True),
        (
            "compiled not slower than the same path eager",
            "ours hybrid parameter compiled",
            4,
            0.9,
            1.0,
            True,
        ),
        ("feature-level peak memory", loss, 4, 1.0, 2.5, True),
        ("feature-level peak memory", grad, 4, 2.6, 2.5, False),
        ("feature-level peak memory", nn_row, 4, 1.0, 2.5, True),
        ("feature-level peak memory", "ours hybrid feature eager", 4, 1.0, 2.5, True),
        ("feature-level peak memory", comp, 4, 1.0, 2.5, True),
    }
    assert got == expected
    text = render_targets({"results": results})
    assert (
        "| compiled vs EW eager | dense | 1 | 4 | " + comp + " | 1.06 x EW | ≤ 1.05 | **missed** |"
        in text
    )
    assert "| 'loss' | 2 | 0 |\n| compiled vs EW eager | 0 | 1 |\n" in text
    assert text.endswith("16 of 21 targets met, 5 missed.")
