"""IMTL-G weights: golden values, degenerate Gramians and the facts of DESIGN.md §1."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import assume, given, settings
from reference import paper_alpha

import imtl_func as imtl

F64 = torch.float64
SETTINGS = settings(max_examples=100, deadline=None)


def weights(g: torch.Tensor) -> imtl.GWeights:
    return imtl.imtl_g_weights(imtl.gramian(g))


# ---------------------------------------------------------------- golden values and edge cases


def test_golden_two_tasks():
    j = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]], dtype=F64)
    r = weights(j)
    torch.testing.assert_close(r.alpha, torch.tensor([0.5923, 0.4077], dtype=F64), atol=5e-5,
                               rtol=0)
    torch.testing.assert_close(r.alpha @ j, torch.tensor([0.0767, 1.0, 1.0], dtype=F64),
                               atol=5e-5, rtol=0)
    assert not r.degenerate


def test_opposite_scaled_gradients_give_zero_not_minus_five():
    g1 = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    j = torch.stack([g1, -2 * g1])
    r = weights(j)
    assert r.degenerate
    assert torch.equal(r.alpha, torch.zeros(2, dtype=F64))
    assert torch.equal(r.alpha @ j, torch.zeros(3, dtype=F64))
    # The pseudo-inverse form K⁺n / 1ᵀK⁺n that this replaces gives -5 g1:
    k = j @ j.T
    n = k.diagonal().sqrt()
    pinv_w = torch.linalg.pinv(k) @ n
    torch.testing.assert_close((pinv_w / pinv_w.sum()) @ j, -5 * g1)


def test_identical_gradients_split_equally():
    g = torch.tensor([0.3, -1.0, 2.0], dtype=F64)
    r = weights(torch.stack([g, g, g]))
    torch.testing.assert_close(r.alpha, torch.full((3,), 1 / 3, dtype=F64))
    assert not r.degenerate


def test_zero_gradient_gets_zero_weight_and_the_rest_are_balanced():
    j = torch.tensor([[-4.0, 1.0, 1.0], [0.0, 0.0, 0.0], [6.0, 1.0, 1.0]], dtype=F64)
    r = weights(j)
    torch.testing.assert_close(r.alpha, torch.tensor([0.5923, 0.0, 0.4077], dtype=F64),
                               atol=5e-5, rtol=0)
    assert r.alpha[1] == 0
    assert torch.equal(r.cosine[1], torch.zeros(3, dtype=F64))


def test_all_zero_gradients():
    r = weights(torch.zeros(3, 4, dtype=F64))
    assert r.degenerate
    assert torch.equal(r.alpha, torch.zeros(3, dtype=F64))
    assert r.projection == 0


def test_single_task():
    r = weights(torch.tensor([[3.0, 4.0]], dtype=F64))
    assert torch.equal(r.alpha, torch.ones(1, dtype=F64))
    torch.testing.assert_close(r.projection, torch.tensor(5.0, dtype=F64))


def test_negative_weights_are_not_clipped():
    j = torch.tensor([[-1.1, -1.8, 0.8], [-0.6, -0.6, 0.3], [-1.2, -0.4, -0.1]], dtype=F64)
    r = weights(j)
    torch.testing.assert_close(r.alpha, torch.tensor([-0.8661, 2.5015, -0.6354], dtype=F64),
                               atol=5e-5, rtol=0)
    torch.testing.assert_close(r.alpha, paper_alpha(j))


def test_never_carries_a_graph():
    j = torch.randn(3, 5, dtype=F64, requires_grad=True)
    k = imtl.gramian(j)
    assert k.requires_grad
    r = imtl.imtl_g_weights(k)
    assert not any(x.requires_grad for x in r)


def test_gramian_of_a_pytree_is_the_sum_of_leaf_gramians():
    torch.manual_seed(0)
    tree = {"a": torch.randn(4, 2, 3), "b": (torch.randn(4, 5), torch.randn(4, 1, 1, 2))}
    flat = torch.cat([tree["a"].reshape(4, -1), tree["b"][0], tree["b"][1].reshape(4, -1)], 1)
    k = imtl.gramian(tree)
    assert k.dtype == torch.float32  # the dtype records the rounding level of the entries
    torch.testing.assert_close(k.double(), flat.double() @ flat.double().T)
    assert imtl.gramian(tree["b"][0].to(torch.bfloat16)).dtype == torch.float32
    assert imtl.gramian({"a": tree["a"].double(), "b": tree["b"]}).dtype == F64


def test_more_tasks_than_dimensions():
    """Five gradients in the plane: no nonzero vector has equal projections in general."""
    torch.manual_seed(3)
    r = weights(torch.randn(5, 2, dtype=F64))
    assert r.degenerate and torch.equal(r.alpha, torch.zeros(5, dtype=F64))
    assert torch.isfinite(r.alpha).all()


# ---------------------------------------------------------------- property tests


def _matrix(draw, t, p, dtype):
    # Hypothesis draws the seed (and shrinks it); a list of t*p floats is far slower to generate.
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    return torch.randn(t, p, generator=gen, dtype=dtype)


@st.composite
def gradient_sets(draw, dtype=F64, allow_degenerate=True, near_parallel=True):
    """[T, P] gradient matrices, T in 1..16, with the structures that break naive formulas."""
    t = draw(st.integers(1, 16))
    p = draw(st.integers(1, 24)) if allow_degenerate else draw(st.integers(t, t + 12))
    g = _matrix(draw, t, p, F64)
    if not allow_degenerate:
        assume(g.norm(dim=1).min() > 0.05 and torch.linalg.matrix_rank(g) == t)
    if allow_degenerate and t >= 2:
        kinds = ["plain", "identical", "opposite", "zero"] + ["parallel"] * near_parallel
        kind = draw(st.sampled_from(kinds))
        i, j = draw(st.integers(0, t - 1)), draw(st.integers(0, t - 1))
        if kind == "identical":
            g[j] = g[i]
        elif kind == "opposite":
            g[j] = -draw(st.floats(0.1, 10)) * g[i]
        elif kind == "zero":
            g[j] = 0
        elif kind == "parallel":
            g[j] = g[i] * draw(st.floats(0.1, 10)) + 1e-6 * _matrix(draw, 1, p, F64)[0]
    # Norms 1e-6..1e6; where the brief's 1e-10 relative cut-off would drop a task, the paper's
    # formula and ours differ by design, so the non-degenerate sets stay within 1e-4..1e4.
    span = 6 if allow_degenerate else 4
    norms = torch.tensor([10.0 ** draw(st.floats(-span, span)) for _ in range(t)], dtype=F64)
    return (g * norms[:, None]).to(dtype)


def _projections(g: torch.Tensor, r: imtl.GWeights):
    g = g.double()
    combined = r.alpha.double() @ g
    norms = g.norm(dim=1)
    active = norms > 1e-10 * norms.max()
    proj = (g[active] @ combined) / norms[active]
    return proj, active


@SETTINGS
@given(gradient_sets(), st.sampled_from([F64, torch.float32]))
def test_never_nan_and_weights_sum_to_one(g, dtype):
    r = weights(g.to(dtype))
    assert all(torch.isfinite(x).all() for x in (r.alpha, r.projection, r.norm, r.cosine))
    if r.degenerate:
        assert torch.equal(r.alpha, torch.zeros_like(r.alpha)) and r.projection == 0
    else:
        # Each weight is rounded to the dtype: the sum is 1 up to eps · Σ|α|.
        tol = 10 * torch.finfo(dtype).eps * max(1.0, r.alpha.double().abs().sum().item())
        assert abs(r.alpha.double().sum().item() - 1) < tol


@SETTINGS
@given(gradient_sets())
def test_equal_projections(g):
    """<g, u_t> is the same c for every task with a direction (relative to the weights' size)."""
    r = weights(g)
    assume(not r.degenerate)
    proj, active = _projections(g, r)
    scale = (r.alpha.abs() * r.norm).sum()
    assert (proj - r.projection).abs().max() <= 1e-6 * scale
    # Tasks without a direction get no weight.
    assert torch.equal(r.alpha[~active], torch.zeros_like(r.alpha[~active]))


@SETTINGS
@given(gradient_sets(allow_degenerate=False))
def test_agrees_with_the_paper_closed_form(g):
    t = g.shape[0]
    if t > 1:
        units = g / g.norm(dim=1, keepdim=True)
        du = (g[0] - g[1:]) @ (units[0] - units[1:]).T
        assume(torch.linalg.cond(du) < 1e6)
        assume(torch.linalg.cond(units @ units.T) < 1e6)
    r = weights(g)
    assert not r.degenerate
    torch.testing.assert_close(r.alpha, paper_alpha(g), rtol=1e-6, atol=1e-8)


def _well_conditioned(g, bound=1e4):
    units = g / g.norm(dim=1, keepdim=True)
    return torch.linalg.cond(units @ units.T) < bound


@SETTINGS
@given(gradient_sets(near_parallel=False), st.floats(-13, 13))
def test_global_scale_leaves_alpha_unchanged(g, log10k):
    r = weights(g)
    s = weights(g * 10.0**log10k)
    assert bool(r.degenerate) == bool(s.degenerate)
    torch.testing.assert_close(s.alpha, r.alpha, rtol=1e-7, atol=1e-9 * r.alpha.abs().max())


@SETTINGS
@given(gradient_sets(near_parallel=False), st.randoms(use_true_random=False))
def test_permuting_tasks_permutes_alpha(g, rnd):
    perm = list(range(g.shape[0]))
    rnd.shuffle(perm)
    r, s = weights(g), weights(g[perm])
    assert bool(r.degenerate) == bool(s.degenerate)
    torch.testing.assert_close(s.alpha, r.alpha[perm], rtol=1e-7, atol=1e-9 * r.alpha.abs().max())


@SETTINGS
@given(gradient_sets(allow_degenerate=False), st.data())
def test_rescaling_one_task(g, data):
    """Scaling g_t by k_t > 0 gives alpha'_t ∝ alpha_t / k_t; the direction of g is kept when
    every alpha_t > 0."""
    assume(_well_conditioned(g))
    k = torch.tensor([10.0 ** data.draw(st.floats(-3, 3)) for _ in range(g.shape[0])], dtype=F64)
    norms = (g * k[:, None]).norm(dim=1)
    assume(norms.min() > 1e-9 * norms.max())  # no task falls under the 1e-10 cut-off
    r, s = weights(g), weights(g * k[:, None])
    assume(not r.degenerate)
    expected = (r.alpha / k) / (r.alpha / k).sum()
    torch.testing.assert_close(s.alpha, expected, rtol=1e-6, atol=1e-9)
    if (r.alpha > 0).all():
        d0 = r.alpha @ g
        d1 = s.alpha @ (g * k[:, None])
        cos = d0 @ d1 / (d0.norm() * d1.norm())
        assert cos > 1 - 1e-9


@SETTINGS
@given(gradient_sets(allow_degenerate=False))
def test_float32_inputs_match_float64(g):
    assume(_well_conditioned(g, 1e3))  # float32 rounding (1e-7) times cond stays under 1e-3
    r64 = weights(g)
    r32 = weights(g.float())
    assert r32.alpha.dtype == torch.float32
    assert bool(r32.degenerate) == bool(r64.degenerate)
    torch.testing.assert_close(r32.alpha.double(), r64.alpha, rtol=1e-3,
                               atol=1e-4 * r64.alpha.abs().max())


@pytest.mark.parametrize("t", [1, 2, 7, 16])
def test_t_from_one_to_sixteen_in_float32_gramian(t):
    """A float32 Gramian (e.g. from a user) gives float32 weights that still sum to one."""
    torch.manual_seed(t)
    g = torch.randn(t, 40)
    r = imtl.imtl_g_weights(g @ g.T)
    assert r.alpha.dtype == torch.float32
    assert math.isclose(r.alpha.sum().item(), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize(("leaf", "message"), [
    (torch.ones(2, 3, dtype=torch.complex64),
     r"gramian: task gradients must be real \(IMTL is not defined for complex gradients\), got "
     r"a Jacobian leaf of dtype torch.complex64; view complex parameters as real ones"),
    (torch.ones(2, 3, dtype=torch.int64),
     "gramian: Jacobian leaves must be floating point, got dtype torch.int64"),
    (torch.ones(2, 3, dtype=torch.bool), "got dtype torch.bool"),
    (1.5, r"gramian: every Jacobian leaf must be a tensor of shape \[T, ...\], got float"),
])
def test_gramian_refuses_complex_integer_and_non_tensor_leaves(leaf, message):
    """A complex Jacobian used to give J Jᵀ without conjugation (a negative diagonal)."""
    with pytest.raises(TypeError, match=message):
        imtl.gramian({"w": torch.ones(2, 3), "b": leaf})
