"""IMTL-G weights: golden values, degenerate Gramians and the facts of DESIGN.md §1."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import assume, given, settings
from reference import paper_alpha

import imtl_func as imtl
from imtl_func._imtl_g import default_rtol

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


# ---------------------------------------------------------------- every dtype, every Gramian

HALF = (torch.float16, torch.bfloat16)
DTYPES = (*HALF, torch.float32, F64)
GOLDEN = torch.tensor([[18.0, -22.0], [-22.0, 38.0]], dtype=F64)  # J Jᵀ of test_golden_two_tasks
GOLDEN_ALPHA = torch.tensor([0.59233, 0.40767], dtype=F64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 2, 5, 16])
def test_identity_gramian_in_every_dtype(dtype, t):
    """Orthogonal unit gradients: equal weights. A bfloat16 cut-off of 30·T·eps (1.17 at T = 5)
    used to call this degenerate."""
    r = imtl.imtl_g_weights(torch.eye(t, dtype=dtype))
    assert not r.degenerate and r.psd and r.finite
    torch.testing.assert_close(r.alpha, torch.full((t,), 1 / t, dtype=dtype))  # dtype's rtol


@pytest.mark.parametrize("dtype", DTYPES)
def test_golden_gramian_in_every_dtype(dtype):
    r = imtl.imtl_g_weights(GOLDEN.to(dtype))
    assert not r.degenerate
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(r.alpha.double(), GOLDEN_ALPHA, atol=max(eps, 1e-5), rtol=0)


def test_default_rtol():
    eps = {d: torch.finfo(d).eps for d in DTYPES}
    assert default_rtol(F64, 2) == 60 * eps[F64]
    assert default_rtol(torch.float32, 2) == 60 * eps[torch.float32]
    assert default_rtol(torch.float32, 1) == default_rtol(torch.float32, 2)
    # Half precision: √T ulps of the dtype, the rounding of the stored cosines.
    assert default_rtol(torch.bfloat16, 5) == pytest.approx(math.sqrt(5) * 2**-7)  # 0.035
    assert default_rtol(torch.float16, 16) == pytest.approx(4 * 2**-10)
    assert default_rtol(torch.bfloat16, 10_000) == 0.1  # capped well below 1
    with pytest.raises(ValueError, match="num_tasks must be a positive int, got 0"):
        default_rtol(F64, 0)
    with pytest.raises(TypeError, match=r"dtype must be a floating torch\.dtype, got torch\.int32"):
        default_rtol(torch.int32, 2)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_parallel_and_opposite_gradients(dtype):
    """The cut-off still drops the rounding noise of exactly parallel or opposite gradients."""
    g = torch.tensor([[1.0, 2.0, 3.0], [0.3, -1.0, 0.5]], dtype=F64)
    eps = torch.finfo(dtype).eps
    for factor in (3.0, 0.7, -3.0, -0.7):
        j = torch.cat([g, factor * g[:1]])
        r64 = imtl.imtl_g_weights(j @ j.T)
        r = imtl.imtl_g_weights((j @ j.T).to(dtype))
        assert r.psd and bool(r.degenerate) == bool(r64.degenerate) == (factor < 0)
        torch.testing.assert_close(r.alpha.double(), r64.alpha, atol=4 * eps, rtol=0)
        if factor > 0:  # g_1 and g_3 = factor · g_1 get weights in proportion factor : 1
            torch.testing.assert_close(r64.alpha[0], factor * r64.alpha[2])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["off-diagonal", "diagonal", "everywhere"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_non_finite_gramian_gives_zero_weights_and_a_flag(bad, where, dtype):
    """Used to raise torch.linalg.LinAlgError (NaN or inf off the diagonal)."""
    k = GOLDEN.to(dtype).clone()
    if where == "off-diagonal":
        k[0, 1] = bad
    elif where == "diagonal":
        k[1, 1] = bad
    else:
        k.fill_(bad)
    r = imtl.imtl_g_weights(k)
    assert not r.finite and not r.psd and r.degenerate
    assert torch.equal(r.alpha, torch.zeros(2, dtype=dtype)) and r.projection == 0
    assert torch.isnan(r.cosine).all()  # unknown, not 0
    if where == "off-diagonal":  # the norms are still read from the diagonal
        torch.testing.assert_close(r.norm.double(), GOLDEN.diagonal().sqrt(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("power", [-1069, -1060, -1040, -1000, -600, 0, 600, 1000, 1018])
def test_scale_from_subnormal_to_overflow(power):
    """2^power · K is exact in float64 (subnormal below 2^-1022); α is unchanged and c scales by
    √(2^power). Subnormal products n_i n_j used to bend the cosines, and K + Kᵀ to overflow."""
    unit = imtl.imtl_g_weights(GOLDEN)
    half = power // 2
    k = GOLDEN * 2.0**half * 2.0 ** (power - half)  # two factors: 2^±1069 itself overflows
    assert torch.equal(k * 2.0**-half * 2.0 ** (half - power), GOLDEN)  # exact
    r = imtl.imtl_g_weights(k)
    assert not r.degenerate and r.psd
    torch.testing.assert_close(r.alpha, unit.alpha, rtol=4e-16, atol=0)
    torch.testing.assert_close(r.projection, unit.projection * 2.0 ** (power / 2), rtol=4e-16,
                               atol=0)
    torch.testing.assert_close(r.cosine, unit.cosine, rtol=4e-16, atol=0)


def test_subnormal_gramian_of_three_tasks_has_equal_projections():
    """A float64 Gramian at 1e-315: the projections (K α)_t / n_t on the Gramian as given are
    equal to float64 precision (they differed by 1e-4 relative before the rescaling)."""
    j = torch.tensor([[-1.1, -1.8, 0.8], [-0.6, -0.6, 0.3], [-1.2, -0.4, -0.1]], dtype=F64)
    unit = j @ j.T
    k = unit * 1e-315  # rounded to subnormals: a slightly different Gramian
    r = imtl.imtl_g_weights(k)
    assert not r.degenerate
    exact = k * 2.0**537 * 2.0**537  # exact rescaling of the Gramian as given
    proj = exact @ r.alpha / exact.diagonal().sqrt()
    assert (proj.max() - proj.min()) / proj.abs().max() < 1e-13
    torch.testing.assert_close(r.alpha, paper_alpha(j), rtol=1e-4, atol=0)  # input rounding


@pytest.mark.parametrize(("k", "why"), [
    ([[1.0, 0.0], [0.0, -0.5]], "negative diagonal"),
    ([[1.0, 1.5], [1.5, 1.0]], "cosine 1.5"),
    ([[4.0, -2.1], [-2.1, 1.0]], "cosine -1.05"),
    ([[0.0, 1.0], [1.0, 1.0]], "inner product with a zero gradient"),
    ([[1.0, 0.9, 0.9], [0.9, 1.0, -0.9], [0.9, -0.9, 1.0]], "indefinite, |cosines| < 1"),
    ([[-1.0]], "one negative task"),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_not_positive_semidefinite_is_flagged(k, why, dtype):
    """Each of these used to give weights (e.g. [0, 1] for the zero-gradient one)."""
    r = imtl.imtl_g_weights(torch.tensor(k, dtype=dtype))
    assert r.finite and not r.psd and r.degenerate, why
    assert torch.equal(r.alpha, torch.zeros(len(k), dtype=dtype)) and r.projection == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_rounding_beyond_cauchy_schwarz_is_tolerated(dtype):
    """Parallel gradients whose rounded Gramian says cos = 1 + 1 ulp are a Gramian."""
    eps = torch.finfo(dtype).eps
    k = torch.tensor([[1.0, 2 * (1 + eps)], [2 * (1 + eps), 4.0]], dtype=dtype)
    r = imtl.imtl_g_weights(k)
    assert r.psd and not r.degenerate
    torch.testing.assert_close(r.alpha.double(), torch.tensor([2 / 3, 1 / 3], dtype=F64),
                               atol=2 * eps, rtol=0)
    # A zero gradient whose diagonal came out at -1e-20 (e.g. K = A - B) is a zero gradient.
    r = imtl.imtl_g_weights(torch.tensor([[1.0, 0.0], [0.0, -1e-20]], dtype=F64))
    assert r.psd and torch.equal(r.alpha, torch.tensor([1.0, 0.0], dtype=F64))


def test_float32_gramian_of_long_parallel_gradients_is_a_gramian():
    """Accumulating a million products in float32 moves cos past 1 by ~12 ulps: still PSD."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(10**6, generator=gen)
    for factor in (3.0, 1 / 3, 1.1):
        r = imtl.imtl_g_weights(imtl.gramian(torch.stack([g, factor * g])))
        assert r.psd and not r.degenerate
        torch.testing.assert_close(
            r.alpha.double(), torch.tensor([factor, 1], dtype=F64) / (1 + factor), rtol=1e-5,
            atol=0)


def _nearly_unbounded(delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gramian with cond(C) = 12 and Σw = delta · Σ|w|, and its weights (Σ|α| = 1/delta)."""
    c = torch.tensor([[1.0, 0.6, 0.6], [0.6, 1.0, 0.0], [0.6, 0.0, 1.0]], dtype=F64)
    beta = torch.linalg.solve(c, torch.ones(3, dtype=F64))  # (-5/7, 10/7, 10/7)
    n = torch.tensor([-beta[0] * (1 + delta) / (2 * beta[1] * (1 - delta)), 1.0, 1.0],
                     dtype=F64)
    w = beta / n
    return c * n[:, None] * n[None, :], w / w.sum()


@pytest.mark.parametrize(("dtype", "delta", "degenerate"), [
    (torch.float16, 1e-2, True), (torch.bfloat16, 1e-1, True), (torch.float16, 1e-1, False),
    (torch.float32, 1e-4, False), (F64, 1e-6, False),
])
def test_projection_unbounded_within_rounding_is_degenerate(dtype, delta, degenerate):
    """|Σw| below twice its rounding error: not even the sign of c is known, so α = 0.
    (A float16 Gramian with |Σw| / Σ|w| = 1e-2 used to give α 8 % off, unflagged.)"""
    k, alpha = _nearly_unbounded(delta)
    r = imtl.imtl_g_weights(k.to(dtype))
    assert r.psd and bool(r.degenerate) == degenerate
    if not degenerate:  # relative error ~ 12 · eps / delta
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(r.alpha.double(), alpha, rtol=0,
                                   atol=100 * eps / delta * alpha.abs().max())


# ---------------------------------------------------------------- argument errors


@pytest.mark.parametrize(("rtol", "error", "message"), [
    (-1, ValueError, r"rtol must be None \(the default for the Gramian's dtype\) or a number in "
                     r"\[0, 1\), got -1.0"),
    (1.0, ValueError, r"got 1.0"),
    (math.nan, ValueError, r"in \[0, 1\), got nan"),
    (math.inf, ValueError, r"in \[0, 1\), got inf"),
    ("1e-6", TypeError, r"rtol must be None \(the default for the Gramian's dtype\) or a number "
                        r"in \[0, 1\), got str"),
    (True, TypeError, "got bool"),
    (torch.tensor(1e-6), TypeError, "got Tensor"),
])
def test_rtol_errors(rtol, error, message):
    with pytest.raises(error, match=message):
        imtl.imtl_g_weights(torch.eye(2), rtol=rtol)


def test_rtol_accepts_python_numbers():
    for rtol in (0, 0.0, 1e-3, 0.5):
        assert not imtl.imtl_g_weights(torch.eye(3), rtol=rtol).degenerate


def test_complex_gramian_is_refused():
    with pytest.raises(TypeError, match=r"gramian must be real: IMTL-G is defined for real task "
                                        r"gradients, got dtype torch.complex64"):
        imtl.imtl_g_weights(torch.eye(2, dtype=torch.complex64))


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


# ---------------------------------------------------------------- torch.compile


def test_compiled_weights_match_eager_on_every_kind_of_gramian():
    """One graph (fullgraph=True, Inductor) for finite, non-finite, subnormal, huge and
    non-PSD float64 Gramians of one shape: the same weights and flags as eager."""
    torch._dynamo.reset()
    compiled = torch.compile(imtl.imtl_g_weights, fullgraph=True)
    j = torch.tensor([[-1.1, -1.8, 0.8], [-0.6, -0.6, 0.3], [-1.2, -0.4, -0.1]], dtype=F64)
    unit = j @ j.T
    nan_off = unit.clone()
    nan_off[0, 2] = math.nan
    inf_diag = unit.clone()
    inf_diag[1, 1] = math.inf
    cases = [unit, unit * 1e-315, unit * 2.0**1020, nan_off, inf_diag,
             torch.tensor([[1.0, 0.9, 0.9], [0.9, 1.0, -0.9], [0.9, -0.9, 1.0]], dtype=F64),
             torch.zeros(3, 3, dtype=F64)]
    try:
        for k in cases:
            e, c = imtl.imtl_g_weights(k), compiled(k)
            for name, x, y in zip(e._fields, e, c, strict=True):
                torch.testing.assert_close(y, x, rtol=1e-12, atol=0, equal_nan=True, msg=name)
        assert compiled(cases[1]).psd and not compiled(cases[3]).finite
    finally:
        torch._dynamo.reset()
