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

import imtl_func as imtl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import peak_step_bytes  # noqa: E402
from benchmarks.rows import (  # noqa: E402
    has_nn_module,
    has_torchjd,
    paper_alpha,
)
from benchmarks.step import BEGIN, END, main, render_markdown, update_readme  # noqa: E402

EAGER_OURS = [
    f"ours {m} {lvl} eager"
    for m in ("loss", "gradient", "hybrid")
    for lvl in ("feature", "feature-per-task", "parameter")
]


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``python -m benchmarks.step --quick --tasks 2``, run in-process, read back from JSON."""
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    threads = torch.get_num_threads()
    main(["--quick", "--tasks", "2", "--out", str(out)])
    assert torch.get_num_threads() == threads  # restored for the other tests
    return json.loads(out.read_text())


def test_quick_writes_every_row(quick_report: dict) -> None:
    expected = {"EW eager", "LOOP feature eager", "LOOP parameter eager", *EAGER_OURS}
    if has_torchjd():
        expected.add("torchjd IMTLG parameter eager")
    if has_nn_module():
        expected |= {"nn.IMTL hybrid feature eager", "nn.IMTL hybrid parameter eager"}
    results = quick_report["results"]
    for model in ("mlp", "cnn"):
        rows = {r["row"] for r in results if r["model"] == model and r["num_tasks"] == 2}
        assert rows == expected, model
    assert len(results) == 2 * len(expected)


def test_quick_figures_are_consistent(quick_report: dict) -> None:
    meta = quick_report["meta"]
    assert meta["quick"] is True and meta["repeats"] == 3 and meta["device"] == "cpu"
    assert meta["torch"] == torch.__version__
    for r in quick_report["results"]:
        assert len(r["times_s"]) == 3 and len(r["warmup_s"]) == 1
        assert 0 < r["min_s"] <= r["median_s"] <= max(r["times_s"])
        assert r["ratio_paired"] > 0 and r["ratio_median"] > 0
        assert isinstance(r["peak_bytes"], int) and r["peak_bytes"] > 0
        assert r["finite"] is True and r["compile_s"] is None
        if r["row"] == "EW eager":
            assert r["ratio_paired"] == r["ratio_median"] == r["ratio_min"] == 1.0


def test_render_markdown_has_a_line_per_row(quick_report: dict) -> None:
    text = render_markdown(quick_report)
    assert text.count("| EW eager | ") == 2
    assert text.count("| ours hybrid feature eager | ") == 2


def test_update_readme_replaces_only_the_marked_block(quick_report: dict, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold table\n{END}\noutro\n")
    update_readme(readme, render_markdown(quick_report))
    text = readme.read_text()
    assert text.startswith(f"intro\n{BEGIN}\n**mlp**") and text.endswith(f"{END}\noutro\n")
    assert "old table" not in text and text.count("| EW eager | ") == 2
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="no"):
        update_readme(readme, "x")


def test_paper_closed_form_matches_gramian_weights() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(4, 50, generator=gen, dtype=torch.float64)
    grads = grads * torch.tensor([[1.0], [10.0], [1e3], [1e-2]], dtype=torch.float64)
    alpha = paper_alpha(grads)
    torch.testing.assert_close(alpha, imtl.imtl_g_weights(grads @ grads.T).alpha)
    combined = alpha @ grads
    proj = grads @ combined / grads.norm(dim=1)
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
