"""Every input error says what is wrong and what to do."""

from __future__ import annotations

import pytest
import torch

import imtl_func as imtl

F64 = torch.float64


def enc(p, x):
    return x @ p["w"]


def dec(p, z, x):
    return torch.stack([(z @ p["a"]).pow(2).mean(), (z @ p["b"]).pow(2).mean()])


SHARED = {"w": torch.randn(3, 4)}
TASK = {"a": torch.randn(4), "b": torch.randn(4)}
X = torch.randn(5, 3)


def run(decode=dec, shared=SHARED, task=TASK, state=None, method="hybrid", **kw):
    state = imtl.preset(method).init(2) if state is None else state
    return imtl.mtl_value_and_grad(enc, decode, method, **kw)(shared, task, state, X)


def test_unknown_method():
    with pytest.raises(ValueError, match=r"method must be one of \('loss', 'gradient', 'hybrid', "
                                         r"'equal'\) or a Transform"):
        imtl.preset("imtl")
    with pytest.raises(ValueError, match="method must be one of"):
        imtl.mtl_value_and_grad(enc, dec, "Hybrid")
    with pytest.raises(ValueError, match="method must be one of"):
        imtl.nn.IMTL(method="grad")


@pytest.mark.parametrize("value", [0, -1, 2.0, True, None])
def test_bad_num_tasks(value):
    with pytest.raises(ValueError, match="num_tasks must be a positive int"):
        imtl.preset("hybrid").init(value)


def test_losses_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"must have shape \[T\] \(one scalar per task\), got "
                                         r"\(2, 5\); reduce each task's loss to a scalar"):
        run(lambda p, z, x: torch.stack([z @ p["a"], z @ p["b"]]))
    with pytest.raises(ValueError, match=r"shape \[T\].*got \(\)"):
        run(lambda p, z, x: (z @ p["a"]).mean())


def test_losses_not_a_tensor():
    with pytest.raises(TypeError, match=r"must be a tensor of shape \[T\], got list; stack"):
        run(lambda p, z, x: [(z @ p["a"]).mean(), (z @ p["b"]).mean()])


def test_integer_losses():
    with pytest.raises(TypeError, match=r"task losses must be floating point, got dtype "
                                        r"torch\.int64"):
        imtl.preset("loss").update(torch.tensor([1, 2]), None, imtl.preset("loss").init(2))


def test_task_count_mismatch_with_state():
    with pytest.raises(ValueError, match="got 2 task losses but the IMTL state holds 3 tasks; "
                                         "create the state with num_tasks=2"):
        run(state=imtl.preset("hybrid").init(3))
    with pytest.raises(ValueError, match="got 2 task losses but the IMTL state holds 3"):
        step = imtl.value_and_grad(lambda s, t, x: dec(t, enc(s, x), x))
        step(SHARED, TASK, step.init(3), X)


def test_empty_parameter_trees():
    with pytest.raises(ValueError, match=r"shared_params is empty: pass a pytree"):
        run(shared={})
    with pytest.raises(ValueError, match=r"task_params is empty"):
        run(task=())


def test_integer_parameters():
    with pytest.raises(TypeError, match=r"shared_params holds a tensor of dtype torch.int64; only "
                                        r"real floating-point tensors can be differentiated here"):
        run(shared={"w": torch.ones(3, 4, dtype=torch.int64)})


def test_non_tensor_parameters():
    with pytest.raises(TypeError, match="task_params must hold only torch tensors, found float; "
                                        "convert arrays"):
        run(task={"a": 1.0, "b": torch.ones(4)})


def test_bad_extra_loss():
    def decode(p, z, x):
        return imtl.Losses(dec(p, z, x), extra=z.pow(2).mean(0))

    with pytest.raises(ValueError, match=r"Losses.extra must be a floating scalar tensor, got "
                                         r"shape \(4,\)"):
        run(decode)


def test_has_aux_without_aux():
    with pytest.raises(ValueError, match=r"was declared has_aux=True, so it must return "
                                         r"\(losses, aux\)"):
        run(has_aux=True)


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size must be None or a positive int, got 0"):
        imtl.mtl_value_and_grad(enc, dec, chunk_size=0)


def test_transform_with_extra_options():
    with pytest.raises(ValueError, match="pass scale_rule and flip_negative to "
                                         r"imtl_func.preset\(\) or build the Transform"):
        imtl.mtl_value_and_grad(enc, dec, imtl.preset(), flip_negative=True)


def test_bad_scale_rule():
    with pytest.raises(TypeError, match=r"scale_rule must be a ScaleRule \(e.g. "
                                        r"imtl_func.scale_newton\(\)\) or None, got function"):
        imtl.preset("loss", scale_rule=lambda g: g)


@pytest.mark.parametrize(("factory", "kwargs", "message"), [
    (imtl.scale_newton, {"lr": 0.0}, "lr must be > 0, got 0.0"),
    (imtl.scale_newton, {"momentum": 1.0}, "momentum must be < 1.0, got 1.0"),
    (imtl.scale_newton, {"lr": float("nan")}, "lr must be finite, got nan"),
    (imtl.scale_adam, {"b2": -0.1}, "b2 must be >= 0.0, got -0.1"),
    (imtl.scale_sgd, {"lr": "1"}, "lr must be a number, got str"),
])
def test_bad_scale_rule_hyperparameters(factory, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        factory(**kwargs)


def test_bad_initial_log_scale():
    with pytest.raises(ValueError, match=r"log_scale must have 3 entries \(one per task\), got "
                                         r"shape \(2,\)"):
        imtl.preset("hybrid").init(3, log_scale=[0.0, 1.0])
    with pytest.raises(ValueError, match="log_scale must be finite"):
        imtl.preset("hybrid").init(2, log_scale=[0.0, float("inf")])
    with pytest.raises(ValueError, match=r"this transform has no loss scales \(scale_rule=None\): "
                                         "log_scale must be None"):
        imtl.preset("gradient").init(2, log_scale=[1.0, 0.0])


def test_gramian_errors():
    with pytest.raises(ValueError, match=r"gramian must be a \[T, T\] tensor with T >= 1, got "
                                         r"\(2, 3\)"):
        imtl.imtl_g_weights(torch.ones(2, 3))
    with pytest.raises(TypeError, match=r"gramian must be a real floating-point tensor, got "
                                        r"dtype torch\.int64"):
        imtl.imtl_g_weights(torch.eye(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="every Jacobian leaf needs the same leading task axis"):
        imtl.gramian({"a": torch.ones(2, 3), "b": torch.ones(3, 3)})
    with pytest.raises(ValueError, match="the Jacobian pytree has no tensor leaves"):
        imtl.gramian({})


def test_update_needs_a_gramian():
    tx = imtl.preset("gradient")
    with pytest.raises(ValueError, match="this transform's weighting needs the Gramian of "
                                         "the task gradients"):
        tx.update(torch.ones(2), None, tx.init(2))
    with pytest.raises(ValueError, match=r"gramian is \(3, 3\) but there are 2 task losses"):
        tx.update(torch.ones(2), torch.eye(3), tx.init(2))


def test_errors_come_before_tracing_under_compile():
    """The same messages are raised while torch.compile traces the step."""
    step = torch.compile(imtl.mtl_value_and_grad(enc, dec), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="got 2 task losses but the IMTL state holds 3"):
        step(SHARED, TASK, imtl.preset("hybrid").init(3), X)


def test_state_on_another_device():
    state = imtl.preset("hybrid").init(2, device="meta")
    with pytest.raises(ValueError, match=r"the losses are on cpu but the IMTL state on meta; "
                                         r"create the state with step.init\(\.\.\., "
                                         r"device='cpu'\)"):
        imtl.preset().update(torch.ones(2), torch.eye(2), state)
