"""examples/lightning_train.py: IMTL in Lightning's manual optimization, on the CPU.

Both LightningModules (``nn.IMTL`` and the functional step) under ``32-true`` and
``bf16-mixed``; one step against a float64 reference with T separate autograd calls; a skipped
non-finite batch; a checkpoint round trip that resumes bit for bit; what ``16-mixed`` does on a
CPU.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from reference import paper_alpha
from torch.utils.data import DataLoader

from imtl_func.nn import IMTL


def _load_example():
    path = Path(__file__).resolve().parents[1] / "examples" / "lightning_train.py"
    spec = importlib.util.spec_from_file_location("lightning_train", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


lt = _load_example()
VARIANTS = sorted(lt.VARIANTS)
T = lt.NUM_TASKS

# Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")


def loader(dataset=None) -> DataLoader:
    """64 samples in 4 batches of 16, in order (a resumed run sees the same batches)."""
    return DataLoader(lt.make_data() if dataset is None else dataset, batch_size=16)


def build(variant: str, seed: int = 0, optimizer=None):
    """The example's LightningModule, seeded; ``optimizer(params)`` replaces its Adam."""
    cls = lt.VARIANTS[variant]
    if optimizer is not None:
        cls = type(cls.__name__, (cls,), {"configure_optimizers":
                                          lambda self: optimizer(self.parameters())})
    torch.manual_seed(seed)
    return cls()


def full_losses(model) -> torch.Tensor:
    """``[T]`` task losses of the model on the whole data set."""
    x, y = lt.make_data().tensors
    with torch.no_grad():
        pred = model.net.heads(model.net.encoder(x))
    return torch.stack([lt.task_loss(t, pred, y) for t in range(T)])


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------- one step, exactly


def reference_step(net, x, y, lr: float):
    """Parameters after one SGD step of hybrid IMTL at s = 0 (float64): α by the paper's closed
    form on the T feature gradients (T separate autograd calls), the encoder gets
    ``J_zᵀ Σ_t α_t ∇_z ℓ_t``, the heads ``∇ Σ_t ℓ_t``. Also the raw losses."""
    net = copy.deepcopy(net).double()
    x, y = x.double(), y.double()
    z = net.encoder(x)
    pred = net.heads(z)
    losses = [lt.task_loss(t, pred, y) for t in range(T)]
    g = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1)
                     for loss in losses])
    alpha = paper_alpha(g)
    encoder, heads = dict(net.encoder.named_parameters()), dict(net.heads.named_parameters())
    g_enc = torch.autograd.grad(z, list(encoder.values()),
                                grad_outputs=(alpha @ g).reshape(z.shape), retain_graph=True)
    g_heads = torch.autograd.grad(sum(losses), list(heads.values()))
    after = {f"net.encoder.{k}": p - lr * d
             for (k, p), d in zip(encoder.items(), g_enc, strict=True)}
    after |= {f"net.heads.{k}": p - lr * d for (k, p), d in zip(heads.items(), g_heads,
                                                                 strict=True)}
    return after, torch.stack(losses).detach()


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_step_is_the_imtl_update(variant):
    lr = 0.1
    model = build(variant, optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    x, y = lt.make_data().tensors
    expected, losses = reference_step(model.net, x[:16], y[:16], lr)
    before = state(model)
    params = [{k: v.detach().clone() for k, v in part.named_parameters()}
              for part in (model.net.encoder, model.net.heads)]
    trainer = lt.trainer(1)
    trainer.fit(model, loader())
    after = state(model)
    assert trainer.global_step == 1 and int(model.skipped) == 0
    for name, value in expected.items():
        assert not torch.allclose(before[name].double(), value, atol=1e-3), name  # it moved
        torch.testing.assert_close(after[name].double(), value, atol=2e-6, rtol=0)
    if variant == "module":
        # nn.IMTL's log-scales: dL/ds = e^s ℓ − 1 = ℓ − 1 at s = 0, one SGD step
        torch.testing.assert_close(after["imtl.log_scale"].double(), -lr * (losses - 1),
                                   atol=1e-6, rtol=0)
    else:
        # the step's own scale rule moved the buffers: toward s = −log ℓ, as the same step
        # called outside Lightning
        assert torch.equal(torch.sign(after["imtl_state.log_scale"]),
                           -torch.sign(torch.log(losses)).float())
        direct = model.imtl_step(*params, model.imtl_step.init(T), x[:16], y[:16]).state
        torch.testing.assert_close(after["imtl_state.log_scale"], direct.log_scale)
        torch.testing.assert_close(after["imtl_state.rule_state__mean_grad"],
                                   direct.rule_state.mean_grad)


# ---------------------------------------------------------------------- precisions


@pytest.mark.parametrize("variant", VARIANTS)
def test_32_true_and_bf16_mixed_train(variant):
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        model = build(variant)
        start = full_losses(model)
        trainer = lt.trainer(5, precision)
        trainer.fit(model, loader())
        end = full_losses(model)
        assert trainer.global_step == 5 and int(model.skipped) == 0
        assert (end < 0.8 * start).all(), (precision, start, end)   # every task improved
        results[precision] = state(model)
    plugin = trainer.precision_plugin
    assert isinstance(plugin, MixedPrecision) and plugin.precision == "bf16-mixed"
    full, bf16 = results["32-true"], results["bf16-mixed"]
    gaps = {k: float((full[k].float() - bf16[k].float()).abs().max()) for k in full}
    assert max(gaps.values()) > 0, "bf16-mixed ran in float32"   # autocast was on
    assert max(gaps.values()) < 5e-3, gaps                        # and close to float32
    assert all(v.dtype in (torch.float32, torch.long) for v in bf16.values())


@pytest.mark.parametrize("variant", VARIANTS)
def test_16_mixed_on_cpu_runs_as_bf16_mixed(variant):
    """Lightning refuses fp16 autocast on a CPU: it warns and runs bf16-mixed instead."""
    model, reference = build(variant), build(variant)
    with pytest.warns(UserWarning, match=r"AMP with fp16 is not supported on CPU\. Using "
                                         r"`precision='bf16-mixed'` instead"):
        trainer = lt.trainer(3, "16-mixed")
    assert trainer.precision_plugin.precision == "bf16-mixed"
    assert trainer.precision_plugin.scaler is None
    trainer.fit(model, loader())
    lt.trainer(3, "bf16-mixed").fit(reference, loader())
    got, expected = state(model), state(reference)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.parametrize("variant", ["module", "functional"])
def test_16_mixed_with_a_grad_scaler(variant):
    """float16 autocast and a GradScaler on the CPU, forced with the precision plugin; both
    variants take Lightning's scaler in on_fit_start. One SGD step against the float64
    reference, to float16 autocast's precision (5e-3 on parameters of size ~0.5)."""
    lr = 0.1
    sgd = lambda p: torch.optim.SGD(p, lr=lr)  # noqa: E731
    model = build(variant, optimizer=sgd)
    x, y = lt.make_data().tensors
    expected, _ = reference_step(model.net, x[:16], y[:16], lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)  # no overflow at the first step
    trainer = lt.trainer(1, None, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(model, loader())
    after = state(model)
    for name, value in expected.items():
        torch.testing.assert_close(after[name].double(), value, atol=5e-3, rtol=0)


# ---------------------------------------------------------------------- non-finite batches


class Snapshots(Callback):
    """The module's state and the optimizer's step count after every training batch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.optimizer_steps: list[int] = []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.states.append(state(module))
        adam = trainer.optimizers[0].state
        self.optimizer_steps.append(int(next(iter(adam.values()))["step"]) if adam else 0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_nonfinite_batch_is_skipped(variant):
    data = lt.make_data()
    data.tensors[1][16:32, 1] = float("nan")          # batch 1: task 1's targets
    model, snapshots = build(variant), Snapshots()
    trainer = lt.trainer(4, callbacks=[snapshots])
    if variant == "module":
        with pytest.warns(RuntimeWarning, match="IMTL: a loss, a loss scale or a task gradient "
                                                "is not finite"):
            trainer.fit(model, loader(data))
    else:
        trainer.fit(model, loader(data))
    # the skipped batch does not count as a step: 5 batches for max_steps=4
    assert int(model.skipped) == 1 and trainer.global_step == 4
    assert snapshots.optimizer_steps == [1, 1, 2, 3, 4]
    first, skipped, third = snapshots.states[:3]
    for name in first:
        expected = first[name] + (name == "skipped")
        assert torch.equal(skipped[name], expected), name     # nothing moved, state kept
    assert not torch.equal(third["net.heads.weight"], skipped["net.heads.weight"])
    assert all(torch.isfinite(v).all() for v in snapshots.states[-1].values())


# ---------------------------------------------------------------------- checkpoints


def _imtl_keys(variant: str) -> list[str]:
    if variant == "module":
        return ["imtl.log_scale"]
    return ["imtl_state.log_scale", "imtl_state.rule_state__mean_grad"]


# Lightning's advice for manual optimization (save the pre-step state) and for ckpt_path (pass
# the callbacks again): neither applies, the checkpoint holds the state after the step.
@pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_round_trip_resumes_exactly(variant, tmp_path):
    every = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=4,
                            save_top_k=-1)
    straight = build(variant)
    lt.trainer(8, enable_checkpointing=True, callbacks=[every]).fit(straight, loader())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step=4.ckpt", "step=8.ckpt"]

    checkpoint = torch.load(tmp_path / "step=4.ckpt", weights_only=False)
    saved = checkpoint["state_dict"]
    assert checkpoint["global_step"] == 4 and int(saved["skipped"]) == 0
    for key in _imtl_keys(variant):
        assert saved[key].shape == (T,) and saved[key].abs().min() > 0, key  # moved off zero
        assert not torch.equal(saved[key], straight.state_dict()[key]), key  # and on after

    resumed = build(variant, seed=1)                  # other weights: all come from the file
    trainer = lt.trainer(8)
    trainer.fit(resumed, loader(), ckpt_path=tmp_path / "step=4.ckpt")
    assert trainer.global_step == 8
    got, expected = state(resumed), state(straight)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key

    # the IMTL state in the checkpoint matters: resuming from a fresh one diverges
    for key in _imtl_keys(variant):
        saved[key] = torch.zeros_like(saved[key])
    torch.save(checkpoint, tmp_path / "fresh_imtl.ckpt")
    forgetful = build(variant, seed=1)
    lt.trainer(8).fit(forgetful, loader(), ckpt_path=tmp_path / "fresh_imtl.ckpt")
    assert not torch.equal(state(forgetful)["net.heads.weight"], expected["net.heads.weight"])


# ---------------------------------------------------------------------- pieces


def test_state_buffers_round_trip_and_names():
    model = build("functional")
    buffers = model.imtl_state
    assert [n for n, _ in buffers.named_buffers()] == ["log_scale", "rule_state__mean_grad"]
    new = buffers.get()._replace(log_scale=torch.tensor([0.5, -1.0, 2.0]))
    buffers.set(new)
    assert torch.equal(buffers.get().log_scale, torch.tensor([0.5, -1.0, 2.0]))
    assert type(buffers.get()) is type(new)
    with pytest.raises(ValueError, match=r"^the new state has the structure PyTreeSpec\(.*\), "
                                         r"not PyTreeSpec\(.*\)$"):
        buffers.set((new.log_scale,))


def test_sized_imtl_gives_an_exact_model_summary():
    """A lazily sized nn.IMTL makes Lightning's summary warn; the example passes num_losses."""

    def summary_warnings(model) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lt.trainer(1, enable_model_summary=True).fit(model, loader())
        return [str(w.message) for w in caught if "UninitializedParameter" in str(w.message)]

    assert summary_warnings(build("module")) == []
    lazy = build("module")
    lazy.imtl = IMTL("hybrid")                         # num_losses=None
    found = summary_warnings(lazy)
    assert len(found) == 1 and "may be inaccurate" in found[0]
    assert lazy.imtl.num_losses == T                   # sized by its first call


def test_the_example_script_runs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning_train.py", "--variant", "functional",
                                      "--steps", "5"])
    lt.main()
    out = capsys.readouterr().out
    assert "functional hybrid 32-true: task losses [" in out
    assert "5 optimizer steps, 0 batches skipped" in out
