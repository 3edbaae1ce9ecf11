"""End-to-end and unit tests of the digits demo (``python -m imtl_func.demo``).

Tiny step counts only: the whole file takes seconds. No assertion on which method wins.
"""

from __future__ import annotations

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch.func import functional_call, grad

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from imtl_func import demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--steps", "6", "--eval-every", "3", "--seed", "3"]


pytestmark = pytest.mark.usefixtures("one_thread")  # as the demo's CLI (tiny model)


@pytest.fixture(scope="module")
def data() -> demo.Data:
    return demo.load_data()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:
    """One tiny run of every method through ``main``; returns (out dir, stdout, histories)."""
    out = tmp_path_factory.mktemp("demo_a")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        histories = demo.main([*TINY, "--out", str(out)])
    return out, buf.getvalue(), histories


def test_run_prints_table_and_writes_files(tiny_run: tuple[Path, str, dict]) -> None:
    out, stdout, histories = tiny_run
    lines = stdout.splitlines()
    header = next(line for line in lines if line.startswith("method"))
    for t in demo.TASKS:
        assert t.name in header
    assert "Delta-m% vs ew" in header
    rows = {line.split()[0]: line for line in lines if line.split()[:1] and
            line.split()[0] in demo.METHODS}
    assert set(rows) == set(demo.METHODS)
    assert rows["ew"].rstrip().endswith("+0.00")
    # one best mark per task column, at least (ties may mark several)
    assert sum(row.count("*") for row in rows.values()) >= len(demo.TASKS)
    assert "wrote" in stdout and str(out) in stdout

    for name in ("metrics.png", "alpha.png", "scales.png", "cosine.png"):
        png = out / name
        assert png.stat().st_size > 5_000, name
        assert png.read_bytes()[:8] == PNG_MAGIC, name
    assert (out / "table.txt").read_text(encoding="utf-8").strip() in stdout

    blob = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert blob["config"]["steps"] == 6
    assert [t["name"] for t in blob["tasks"]] == [t.name for t in demo.TASKS]
    for method in demo.METHODS:
        entry = blob["methods"][method]
        assert entry["eval_steps"] == [0, 3, 6]
        assert len(entry["metrics"]) == 3
        assert all(math.isfinite(v) for v in entry["final"].values())
        assert entry["final"] == dict(zip([t.name for t in demo.TASKS],
                                          histories[method].final, strict=True))
        assert sorted(entry["cosine"]) == ["0", "3", "6"]
        assert entry["skipped_steps"] == 0
    assert blob["methods"]["ew"]["delta_m_vs_ew"] == 0.0
    # IMTL-G weights sum to one; 'gradient' keeps e^s = 1, 'loss' has no α (ones)
    for step_alpha in blob["methods"]["hybrid"]["alpha"]:
        assert sum(step_alpha) == pytest.approx(1.0, abs=1e-5)
    assert all(v == 1.0 for row in blob["methods"]["gradient"]["scale"] for v in row)
    assert all(v == 1.0 for row in blob["methods"]["loss"]["alpha"] for v in row)


def test_same_seed_same_table(tiny_run: tuple[Path, str, dict], tmp_path: Path) -> None:
    out_a, _, hist_a = tiny_run
    torch.set_num_threads(2)
    hist_b = demo.main([*TINY, "--out", str(tmp_path), "--no-progress", "--no-plots"])
    assert torch.get_num_threads() == 2  # main ran on 1 thread and restored the caller's 2
    table_a = (out_a / "table.txt").read_text(encoding="utf-8")
    assert (tmp_path / "table.txt").read_text(encoding="utf-8") == table_a
    for method in demo.METHODS:
        assert hist_b[method].metrics == hist_a[method].metrics
        assert torch.equal(hist_b[method].alpha, hist_a[method].alpha)
        assert torch.equal(hist_b[method].scale, hist_a[method].scale)
    assert not list(tmp_path.glob("*.png"))


def test_other_seed_other_start(data: demo.Data) -> None:
    a = demo.train("hybrid", data, steps=2, seed=0, progress=False)
    b = demo.train("hybrid", data, steps=2, seed=1, progress=False)
    assert a.metrics[0] != b.metrics[0]


def test_every_method_starts_from_the_same_network(tiny_run: tuple[Path, str, dict]) -> None:
    _, _, histories = tiny_run
    first = [h.metrics[0] for h in histories.values()]
    assert all(m == first[0] for m in first)
    cos0 = [h.cosine[0] for h in histories.values()]
    assert all(c == cos0[0] for c in cos0)


def test_ew_is_the_gradient_of_the_plain_sum(data: demo.Data) -> None:
    """The EW baseline ('loss' with frozen unit scales) is exactly ∇ Σ_t ℓ_t."""
    encoder, heads = demo.build_model(0, 312.0, 34.0)
    shared = {k: v.detach() for k, v in encoder.named_parameters()}
    task = {k: v.detach() for k, v in heads.named_parameters()}
    batch = data.train_batch(torch.arange(64))
    step, state = demo.make_step("ew", encoder, heads)
    out = step(shared, task, state, *batch)

    def total(sp: dict, tp: dict) -> torch.Tensor:
        z = functional_call(encoder, sp, (batch[0],))
        return demo.task_losses(functional_call(heads, tp, (z,)), *batch).sum()

    ref_shared, ref_task = grad(total, argnums=(0, 1))(shared, task)
    for k in shared:
        torch.testing.assert_close(out.grads.shared[k], ref_shared[k], rtol=1e-5, atol=1e-5)
    for k in task:
        torch.testing.assert_close(out.grads.task[k], ref_task[k], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.state.log_scale, torch.zeros(demo.NUM_TASKS))


def test_task_set_has_the_advertised_magnitudes(data: demo.Data) -> None:
    """Raw losses at initialisation span about four orders of magnitude (the demo's premise)."""
    encoder, heads = demo.build_model(0, data.ink_train.mean().item(),
                                      data.ink_train.std().item())
    with torch.no_grad():
        losses = demo.task_losses(heads(encoder(data.x_train)), *data.train_batch(
            torch.arange(data.x_train.shape[0])))
    cls, ge5, ink, recon = losses.tolist()
    assert 2.0 < cls < 2.6 and 0.6 < ge5 < 0.8
    assert 500 < ink < 3000
    assert 0.03 < recon < 0.3
    assert ink / recon > 1e3
    assert data.x_train.shape == (1437, 64) and data.x_test.shape == (360, 64)
    assert torch.equal(data.ink_test, (data.x_test * 16).sum(1).round())


def test_the_demo_computes_in_float64(data: demo.Data) -> None:
    """float64 keeps round-off differences between CPUs small (see the package docstring); the
    initial weights are drawn in float32 and cast, so they do not depend on the dtype."""
    assert demo.DTYPE is torch.float64
    assert {t.dtype for t in (data.x_train, data.ge5_train, data.ink_train, data.x_test,
                              data.ge5_test, data.ink_test)} == {torch.float64}
    encoder, heads = demo.build_model(0, 312.0, 34.0)
    params = [*encoder.parameters(), *heads.parameters()]
    assert {p.dtype for p in params} == {torch.float64}
    enc32, heads32 = demo.build_model(0, 312.0, 34.0, dtype=torch.float32)
    for p, p32 in zip(params, [*enc32.parameters(), *heads32.parameters()], strict=True):
        assert p32.dtype == torch.float32 and torch.equal(p, p32.double())
    _, state = demo.make_step("hybrid", encoder, heads)
    assert state.log_scale.dtype == torch.float64


def test_delta_m_sign_and_value() -> None:
    base = [100.0, 80.0, 20.0, 5.0]
    # class -10 % (worse), ink -50 % error (better): (−10 + 0 + 50 + 0) / 4
    assert demo.delta_m([90.0, 80.0, 10.0, 5.0], base) == pytest.approx(10.0)
    assert demo.delta_m(base, base) == 0.0
    assert demo.delta_m([100.0, 80.0, 40.0, 5.0], base) == pytest.approx(-25.0)


def test_table_marks_best_per_task() -> None:
    finals = {"ew": [90.0, 95.0, 6.0, 20.0], "hybrid": [96.0, 94.0, 8.0, 10.0]}
    table = demo.format_table(finals)
    rows = {line.split()[0]: line.split() for line in table.splitlines()[3:5]}
    assert rows["ew"][1:5] == ["90.00", "95.00*", "6.00*", "20.000"]
    assert rows["hybrid"][1:5] == ["96.00*", "94.00", "8.00", "10.000*"]
    expected = 100 * ((96 - 90) / 90 + (94 - 95) / 95 - (8 - 6) / 6 - (10 - 20) / 20) / 4
    assert float(rows["hybrid"][5]) == pytest.approx(expected, abs=0.01)
    assert "Delta-m%" not in demo.format_table({"hybrid": finals["hybrid"]})


def test_batch_order_covers_each_epoch_once() -> None:
    order = demo.batch_order(1437, 256, 12, seed=0)
    assert order.shape == (12, 256)
    epoch = order[:5].flatten()  # 5 full batches per epoch
    assert epoch.unique().numel() == epoch.numel()
    assert torch.equal(order, demo.batch_order(1437, 256, 12, seed=0))


def test_bad_flags_are_rejected() -> None:
    for argv in (["--methods", "ew,nope"], ["--steps", "0"], ["--compile", "--module"]):
        with pytest.raises(SystemExit):
            demo.parse_args(argv)
    with pytest.raises(ValueError, match="batch_size"):
        demo.batch_order(100, 101, 3, seed=0)


def test_module_path_matches_functional_path(data: demo.Data) -> None:
    """'gradient' has no scales, so nn.IMTL in a plain loop and the functional step must train
    the same network; EW with ``losses.sum().backward()`` must match the library's EW."""
    for method in ("gradient", "ew"):
        fun = demo.train(method, data, steps=5, seed=0, eval_every=5, progress=False)
        mod = demo.train(method, data, steps=5, seed=0, eval_every=5, progress=False,
                         use_module=True)
        torch.testing.assert_close(mod.train_loss, fun.train_loss, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mod.alpha, fun.alpha, rtol=1e-4, atol=1e-6)
        assert mod.final == pytest.approx(fun.final, rel=1e-3)


def test_module_flag(tmp_path: Path) -> None:
    demo.main(["--steps", "3", "--methods", "ew,hybrid", "--module", "--out", str(tmp_path),
               "--no-progress", "--no-plots"])
    assert (tmp_path / "metrics.json").exists()


def test_command_line_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m imtl_func.demo ...`` runs (in-process via runpy, to skip a second interpreter
    start-up): two steps, two methods, no plots."""
    argv = ["imtl_func.demo", "--steps", "2", "--methods", "ew,gradient",
            "--out", str(tmp_path / "out"), "--no-plots"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_module("imtl_func.demo", run_name="__main__", alter_sys=False)
    captured = capsys.readouterr()
    assert "Delta-m% vs ew" in captured.out
    assert "gradient:" in captured.err  # the tqdm bar
    blob = json.loads((tmp_path / "out" / "metrics.json").read_text(encoding="utf-8"))
    assert list(blob["methods"]) == ["ew", "gradient"]
