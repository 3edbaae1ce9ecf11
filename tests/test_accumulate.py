"""Exact gradient accumulation: M micro-batches give the step of their concatenation."""

from __future__ import annotations

import optree
import pytest
import torch
import torch.nn.functional as F

import imtl_func as imtl

METHODS = ["loss", "gradient", "hybrid", "equal"]
FORMS = ["general", "per_task"]
T = 3


def make_problem(batch=32, dtype=torch.float64, seed=0):
    """An encoder 6 -> 16 -> 8 (tanh) and three heads: 3-class CE, a regression in raw units
    (MSE in the hundreds) and a binary task."""
    g = torch.Generator().manual_seed(seed)

    def dense(i, o):
        return {"w": torch.randn(o, i, generator=g, dtype=dtype) / i**0.5,
                "b": 0.1 * torch.randn(o, generator=g, dtype=dtype)}

    shared = {"l1": dense(6, 16), "l2": dense(16, 8)}
    heads = {"cls": dense(8, 3), "reg": dense(8, 1), "bin": dense(8, 1)}
    x = torch.randn(batch, 6, generator=g, dtype=dtype)
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    target = 20 * x[:, 2] - 10 * x[:, 3] + 3
    flag = (x[:, 4] + x[:, 5] > 0).to(dtype)
    return shared, heads, (x, labels, target, flag)


def lin(p, h):
    return h @ p["w"].T + p["b"]


def encode(p, x, labels, target, flag):
    return torch.tanh(lin(p["l2"], torch.tanh(lin(p["l1"], x))))


def loss_cls(p, z, x, labels, target, flag):
    return F.cross_entropy(lin(p["cls"], z), labels)


def loss_reg(p, z, x, labels, target, flag):
    return F.mse_loss(lin(p["reg"], z).squeeze(1), target)


def loss_bin(p, z, x, labels, target, flag):
    return F.binary_cross_entropy_with_logits(lin(p["bin"], z).squeeze(1), flag)


HEADS = [loss_cls, loss_reg, loss_bin]


def decode(p, z, *batch):
    return torch.stack([f(p, z, *batch) for f in HEADS])


def make_step(method, form, **kw):
    return imtl.mtl_value_and_grad(encode, decode if form == "general" else HEADS, method, **kw)


def split(batch, sizes):
    parts = [t.split(sizes) for t in batch]
    return [tuple(p[m] for p in parts) for m in range(len(sizes))]


def start_state(method, dtype=torch.float64):
    tx = imtl.preset(method)
    log_scale = [0.3, -4.0, 0.5] if tx.learns_scales else None
    return tx.init(T, log_scale=log_scale, dtype=dtype)


def assert_same_result(got, expected, rtol=1e-6, atol=1e-9):
    """Every tensor of two StepResults (losses, grads, state, info) agrees."""
    g_leaves, g_spec = optree.tree_flatten(got, none_is_leaf=False)
    e_leaves, e_spec = optree.tree_flatten(expected, none_is_leaf=False)
    assert g_spec == e_spec
    for a, b in zip(g_leaves, e_leaves, strict=True):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True)


def rel(a, b):
    a = torch.cat([x.reshape(-1) for x in optree.tree_leaves(a)])
    b = torch.cat([x.reshape(-1) for x in optree.tree_leaves(b)])
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", METHODS)
def test_four_micro_batches_equal_one_big_batch(method, form):
    shared, heads, batch = make_problem()
    step = make_step(method, form)
    state = start_state(method)
    big = step(shared, heads, state, *batch)
    acc = imtl.accumulate(step)
    out = acc(shared, heads, state, split(batch, [8, 8, 8, 8]))
    assert bool(big.info.finite)
    assert_same_result(out, big)
    if method in ("gradient", "hybrid"):
        # Not a test that cannot fail: one step per micro-batch (its own α each, the same
        # state) is measurably different on this problem.
        naive = [step(shared, heads, state, *b) for b in split(batch, [8, 8, 8, 8])]
        shared_naive = optree.tree_map(lambda *g: sum(g) / 4, *[o.grads.shared for o in naive])
        assert rel(shared_naive, big.grads.shared) > 1e-3
        alpha_naive = torch.stack([o.info.alpha for o in naive])
        assert (alpha_naive - big.info.alpha).abs().max() > 1e-3
    if method == "loss":
        assert not torch.equal(out.state.log_scale, state.log_scale)  # the state did move


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", ["loss", "hybrid"])
def test_unequal_micro_batches_with_their_sizes_as_weights(method, form):
    shared, heads, batch = make_problem(batch=30)
    step = make_step(method, form)
    state = start_state(method)
    big = step(shared, heads, state, *batch)
    sizes = [4, 11, 7, 8]
    acc = imtl.accumulate(step)
    out = acc(shared, heads, state, split(batch, sizes), weights=sizes)
    assert_same_result(out, big)
    same = torch.tensor(sizes, dtype=torch.float64)  # a tensor of weights: the same
    assert_same_result(acc(shared, heads, state, split(batch, sizes), weights=same), big)
    # Equal weights on unequal micro-batches weigh every micro-batch alike: another batch.
    equal = acc(shared, heads, state, split(batch, sizes))
    assert (equal.losses - big.losses).abs().max() > 1e-3


def test_one_micro_batch_is_the_step():
    shared, heads, batch = make_problem(batch=12)
    step = make_step("hybrid", "general")
    state = start_state("hybrid")
    assert_same_result(imtl.accumulate(step)(shared, heads, state, [batch]),
                       step(shared, heads, state, *batch), rtol=1e-12, atol=1e-14)


def test_extra_loss_and_aux():
    shared, heads, batch = make_problem()

    def decode_extra(p, z, *b):
        reg = 1e-3 * sum((w ** 2).sum() for w in optree.tree_leaves(p))
        return imtl.Losses(decode(p, z, *b), reg + (z ** 2).mean()), z.detach().mean(1)

    def encode_aux(p, *b):
        return encode(p, *b), b[0][:, 0]

    step = imtl.mtl_value_and_grad(encode_aux, decode_extra, "hybrid", has_aux=True,
                                   encoder_has_aux=True)
    state = start_state("hybrid")
    big = step(shared, heads, state, *batch)
    out = imtl.accumulate(step)(shared, heads, state, split(batch, [8, 8, 16]),
                                weights=[8, 8, 16])
    # aux: per micro-batch (encoder_aux, decoder_aux) of pass 2; together the big batch's.
    assert [tuple(a.shape[0] for a in aux) for aux in out.aux] == [(8, 8), (8, 8), (16, 16)]
    for part in range(2):
        torch.testing.assert_close(torch.cat([aux[part] for aux in out.aux]), big.aux[part])
    assert_same_result(out._replace(aux=None), big._replace(aux=None))


def test_the_stages_and_the_early_look():
    shared, heads, batch = make_problem()
    step = make_step("hybrid", "per_task")
    acc = imtl.accumulate(step)
    state = acc.init(T, log_scale=[0.3, -4.0, 0.5], dtype=torch.float64)
    micro = split(batch, [16, 16])
    stats = None
    for b in micro:
        stats = acc.statistics(shared, heads, state, stats, *b)
    assert isinstance(stats, imtl.AccumulatedStats)
    assert stats.weight == 2 and stats.extra is None and stats.gramian.shape == (T, T)
    plan = acc.weigh(state, stats)
    big = step(shared, heads, state, *batch)
    assert bool(plan.info.finite)
    torch.testing.assert_close(plan.info.alpha, big.info.alpha, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(stats.losses / 2, big.losses, rtol=1e-12, atol=0)
    grads = None
    for b in micro:
        grads, aux = acc.gradients(shared, heads, plan, grads, *b)
        assert aux is None
    assert_same_result(acc.finish(plan, grads), big)


def test_a_nan_in_one_micro_batch_skips_the_whole_step():
    shared, heads, batch = make_problem()
    x = batch[0].clone()
    x[13, 2] = float("nan")  # micro-batch 1 of 4
    batch = (x, *batch[1:])
    for form in FORMS:
        step = make_step("hybrid", form)
        state = start_state("hybrid")
        acc = imtl.accumulate(step)
        big = step(shared, heads, state, *batch)
        out = acc(shared, heads, state, split(batch, [8, 8, 8, 8]))
        assert not bool(out.info.finite) and not bool(big.info.finite)
        for a, b in zip(out.info.nonfinite, big.info.nonfinite, strict=True):
            assert torch.equal(a, b)
        assert out.info.nonfinite.losses.all()  # every task's big-batch loss is NaN
        for g in optree.tree_leaves(out.grads):
            assert torch.equal(g, torch.zeros_like(g))
        for a, b in zip(optree.tree_leaves(out.state), optree.tree_leaves(state), strict=True):
            assert torch.equal(a, b)
        stats = None
        for b in split(batch, [8, 8, 8, 8]):
            stats = acc.statistics(shared, heads, state, stats, *b)
        assert not bool(acc.weigh(state, stats).info.finite)  # known before pass 2


def test_a_nan_only_in_the_encoder_backward_trips_the_gate_at_the_end():
    shared, heads, batch = make_problem()
    shared = {**shared, "a": torch.tensor(2.0, dtype=torch.float64)}

    def encode_sqrt(p, x, *rest):
        # d/da sqrt(a x0²) = x0² / (2 sqrt(a x0²)) is 0/0 where x0 = 0; the forward is finite.
        return encode(p, x, *rest) * torch.sqrt(p["a"] * x[:, :1] ** 2)

    x = batch[0].clone()
    x[21, 0] = 0.0  # micro-batch 2 of 4
    batch = (x, *batch[1:])
    step = imtl.mtl_value_and_grad(encode_sqrt, decode, "gradient")
    state = start_state("gradient")
    acc = imtl.accumulate(step)
    stats = None
    for b in split(batch, [8, 8, 8, 8]):
        stats = acc.statistics(shared, heads, state, stats, *b)
    assert bool(acc.weigh(state, stats).info.finite)  # the statistics are finite
    out = acc(shared, heads, state, split(batch, [8, 8, 8, 8]))
    big = step(shared, heads, state, *batch)
    assert not bool(out.info.finite) and not bool(big.info.finite)
    assert bool(out.info.nonfinite.gradients) and not out.info.nonfinite.losses.any()
    assert all(torch.equal(g, torch.zeros_like(g)) for g in optree.tree_leaves(out.grads))


def test_dropout_draws_the_same_masks_in_both_passes():
    shared, heads, batch = make_problem()

    def encode_dropout(p, *b):
        return F.dropout(encode(p, *b), 0.5, training=True)

    step = imtl.mtl_value_and_grad(encode_dropout, HEADS, "hybrid")
    state = start_state("hybrid")
    torch.manual_seed(5)
    big = step(shared, heads, state, *batch)
    after_step = torch.rand(3)
    torch.manual_seed(5)
    out = imtl.accumulate(step)(shared, heads, state, [batch])
    assert_same_result(out, big, rtol=1e-12, atol=1e-14)
    assert torch.equal(torch.rand(3), after_step)  # the generator advanced by one pass


def test_data_parallel_reduce_is_kept():
    shared, heads, batch = make_problem()
    sent = []

    def two_identical_replicas(v):
        sent.append(v.numel())
        return 2 * v

    state = start_state("hybrid")
    step = make_step("hybrid", "general", reduce=two_identical_replicas)
    big = step(shared, heads, state, *batch)
    sent.clear()
    out = imtl.accumulate(step)(shared, heads, state, split(batch, [8, 8, 16]),
                                weights=[1, 1, 2])
    # One reduction of the statistics (T² + T + 1) and one of every gradient, per whole step.
    num_params = sum(p.numel() for p in optree.tree_leaves((shared, heads)))
    assert sent == [T * T + T + 1, num_params]
    assert_same_result(out, big)
    # Two identical replicas: the global Gramian is K / 2, so the norms are 1/√2 of one's.
    alone = make_step("hybrid", "general")(shared, heads, state, *batch)
    torch.testing.assert_close(out.info.grad_norm, alone.info.grad_norm / 2**0.5)
    # The plan carries the replica count the gradients are averaged over (None without a
    # reduce); the field is not named `count`, which would shadow tuple.count.
    assert "count" not in imtl.AccumulationPlan._fields
    acc = imtl.accumulate(step)
    plan = acc.weigh(state, acc.statistics(shared, heads, state, None, *batch))
    assert plan.replicas.dtype == torch.float64 and float(plan.replicas) == 2.0
    plain = imtl.accumulate(make_step("hybrid", "general"))
    assert plain.weigh(state, plain.statistics(shared, heads, state, None, *batch)).replicas is None


def test_float32_keeps_its_dtypes():
    shared, heads, batch = make_problem(dtype=torch.float32)
    step = make_step("hybrid", "per_task")
    state = start_state("hybrid", torch.float32)
    big = step(shared, heads, state, *batch)
    acc = imtl.accumulate(step)
    stats = None
    for b in split(batch, [8, 8, 8, 8]):
        stats = acc.statistics(shared, heads, state, stats, *b)
    assert stats.losses.dtype == torch.float32 and stats.gramian.dtype == torch.float32
    assert stats.weight.dtype == torch.float64
    out = acc(shared, heads, state, split(batch, [8, 8, 8, 8]))
    assert out.grads.shared["l1"]["w"].dtype == torch.float32
    assert_same_result(out, big, rtol=1e-4, atol=1e-6)


def test_the_stages_compile():
    shared, heads, batch = make_problem()
    step = make_step("hybrid", "general")
    acc = imtl.accumulate(step)
    state = start_state("hybrid")
    stats_fn = torch.compile(acc.statistics, backend="eager", fullgraph=True)
    grads_fn = torch.compile(acc.gradients, backend="eager", fullgraph=True)
    weigh_fn = torch.compile(acc.weigh, backend="eager", fullgraph=True)
    finish_fn = torch.compile(acc.finish, backend="eager", fullgraph=True)
    micro = split(batch, [16, 16])
    stats = None
    for b in micro:
        stats = stats_fn(shared, heads, state, stats, *b)
    plan = weigh_fn(state, stats)
    grads = None
    for b in micro:
        grads, _ = grads_fn(shared, heads, plan, grads, *b)
    assert_same_result(finish_fn(plan, grads), step(shared, heads, state, *batch))
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------- errors


def test_errors_of_accumulate():
    with pytest.raises(TypeError, match="accumulate needs the Step returned by imtl_func"
                                        r".mtl_value_and_grad \(the uncompiled one"):
        imtl.accumulate(encode)
    param_step = imtl.value_and_grad(lambda sp, tp, *b: decode(tp, encode(sp, *b), *b))
    with pytest.raises(ValueError, match=r"accumulate works on a feature-level step.*not a sum "
                                         r"of the micro-batches' Gramians"):
        imtl.accumulate(param_step)


def test_errors_of_the_micro_batches_and_weights():
    shared, heads, batch = make_problem()
    acc = imtl.accumulate(make_step("hybrid", "general"))
    state = start_state("hybrid")
    micro = split(batch, [16, 16])
    with pytest.raises(TypeError, match=r"micro_batches must be a list of micro-batches.*not an "
                                        r"iterator, got generator"):
        acc(shared, heads, state, (b for b in micro))
    with pytest.raises(ValueError, match="micro_batches is empty"):
        acc(shared, heads, state, [])
    with pytest.raises(TypeError, match=r"micro_batches\[1\] must be a tuple of the step's batch "
                                        r"arguments, e.g. \(x, y\); got Tensor"):
        acc(shared, heads, state, [micro[0], batch[0]])
    with pytest.raises(ValueError, match=r"weights must hold one weight per micro-batch \(2\), "
                                         "got 3"):
        acc(shared, heads, state, micro, weights=[1, 2, 3])
    with pytest.raises(ValueError, match=r"weights must hold one weight per micro-batch \(2\), "
                                         "got float"):
        acc(shared, heads, state, micro, weights=2.0)
    with pytest.raises(ValueError, match=r"weight must be > 0, got 0\.0"):
        acc(shared, heads, state, micro, weights=[1, 0])
    with pytest.raises(ValueError, match="weight must be finite, got inf"):
        acc.statistics(shared, heads, state, None, *micro[0], weight=float("inf"))
    with pytest.raises(TypeError, match="weight must be a number, got bool"):
        acc.statistics(shared, heads, state, None, *micro[0], weight=True)
    with pytest.raises(ValueError, match=r"weight must be a number > 0 or a real scalar tensor "
                                         r"\(e.g. the micro-batch's size\), got a torch.int64 "
                                         r"tensor of shape \(2,\)"):
        acc.statistics(shared, heads, state, None, *micro[0], weight=torch.tensor([1, 2]))


def test_errors_of_the_stages():
    shared, heads, batch = make_problem()
    acc = imtl.accumulate(make_step("hybrid", "general"))
    state = start_state("hybrid")
    micro = split(batch, [16, 16])
    with pytest.raises(TypeError, match=r"stats must be None \(the first micro-batch\) or the "
                                        "AccumulatedStats returned by the previous call, got "
                                        "dict"):
        acc.statistics(shared, heads, state, {}, *micro[0])
    stats = acc.statistics(shared, heads, state, None, *micro[0])
    four = imtl.accumulate(imtl.mtl_value_and_grad(
        encode, lambda p, z, *b: torch.cat([decode(p, z, *b), decode(p, z, *b)[:1]]), "hybrid"))
    with pytest.raises(ValueError, match="decode: got 4 task losses but the IMTL state holds 3"):
        four.statistics(shared, heads, state, None, *micro[1])
    with pytest.raises(ValueError, match="statistics: this micro-batch has 4 task losses but the "
                                         "statistics hold 3; every micro-batch of one step"):
        four.statistics(shared, heads, start_state_n(4), stats, *micro[1])
    extra = imtl.accumulate(imtl.mtl_value_and_grad(
        encode, lambda p, z, *b: imtl.Losses(decode(p, z, *b), z.sum()), "hybrid"))
    with pytest.raises(ValueError, match="this micro-batch has 3 task losses and an extra loss "
                                         "but the statistics hold 3;"):
        extra.statistics(shared, heads, state, stats, *micro[1])
    with pytest.raises(ValueError, match="weigh needs the statistics of at least one "
                                         "micro-batch"):
        acc.weigh(state, None)
    with pytest.raises(TypeError, match=r"stats must be the AccumulatedStats of acc\.statistics, "
                                        r"got tuple"):
        acc.weigh(state, (1, 2))
    plan = acc.weigh(state, stats)
    with pytest.raises(TypeError, match=r"plan must be the AccumulationPlan returned by "
                                        r"acc\.weigh, got AccumulatedStats"):
        acc.gradients(shared, heads, stats, None, *micro[0])
    with pytest.raises(TypeError, match=r"grads must be None \(the first micro-batch\) or the "
                                        r"Grads returned by the previous call, got dict"):
        acc.gradients(shared, heads, plan, {}, *micro[0])
    with pytest.raises(ValueError, match="gradients: this micro-batch gives 4 losses but the "
                                         "plan was weighed on 3"):
        extra.gradients(shared, heads, plan, None, *micro[0])
    with pytest.raises(TypeError, match=r"plan must be the AccumulationPlan returned by "
                                        r"acc\.weigh, got NoneType"):
        acc.finish(None, None)
    with pytest.raises(ValueError, match="finish needs the summed gradients of pass 2"):
        acc.finish(plan, None)


def start_state_n(n):
    return imtl.preset("hybrid").init(n, dtype=torch.float64)


def test_errors_of_aux_declarations():
    shared, heads, batch = make_problem()
    state = start_state("loss")
    bad_enc = imtl.accumulate(imtl.mtl_value_and_grad(encode, decode, "loss",
                                                      encoder_has_aux=True))
    with pytest.raises(ValueError, match="encode was declared encoder_has_aux=True, so it must "
                                         r"return \(features, aux\)"):
        bad_enc.statistics(shared, heads, state, None, *batch)
    bad_dec = imtl.accumulate(imtl.mtl_value_and_grad(encode, decode, "loss", has_aux=True))
    with pytest.raises(ValueError, match="decode was declared has_aux=True, so it must return "
                                         r"\(losses, aux\)"):
        bad_dec.statistics(shared, heads, state, None, *batch)
