"""IMTL-G weights on 1,000 seeded Gramians of every dtype, pathological ones included.

Each case is a Gramian in float16, bfloat16, float32 or float64 of one of six kinds:

* ``well``: well-conditioned (cond(C) ≤ 20, Σ|α| ≤ 5) Gramians rounded to the dtype;
* ``scale``: the same with the largest entry at 10^e for e over the dtype's whole range
  (near-overflow included), or (half of them) in the subnormal range;
* ``nonfinite``: a NaN or ±inf in one to three entries (diagonal or not);
* ``rankdef``: identical, parallel, opposite or zero gradients, or more tasks than dimensions;
* ``nonpsd``: a negative diagonal entry, a |cosine| above 1, or an indefinite cosine matrix;
* ``illposed``: well-conditioned C, but norms that make ``|Σw| / Σ|w|`` (the inverse of Σ|α|)
  as small as 1e-6: the common projection is nearly unbounded.

Every case must give: no exception, no NaN in α, Σα = 1 (to the dtype's precision) or α = 0.
Well-conditioned cases must give the float64 answer of the unrounded Gramian to the dtype's
precision, non-degenerate results equal projections on the Gramian as given, non-finite and
non-PSD Gramians α = 0 with their flag.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

import imtl_func as imtl

F64 = torch.float64
DTYPES = (torch.float16, torch.bfloat16, torch.float32, F64)
KINDS = ("well", "scale", "nonfinite", "rankdef", "nonpsd", "illposed")
NUM_CASES = 1000
#: Exponent range (base 10) of the largest Gramian entry in ``scale`` cases, per dtype: from deep
#: in the subnormals to just under overflow.
SCALE_RANGE = {torch.float16: (-7.5, 4.8), torch.bfloat16: (-44.0, 38.4),
               torch.float32: (-44.0, 38.4), F64: (-322.0, 308.2)}


class Case(NamedTuple):
    kind: str
    dtype: torch.dtype
    gramian: Tensor  # [T, T] in dtype: the input
    exact: Tensor  # [T, T] float64 Gramian before rounding to dtype (before scaling to 10^e and
    #                adding NaN/inf entries): its float64 answer is the reference
    detail: str  # which sub-kind (for failure messages and per-kind counts)


def _uniform(gen: torch.Generator, low: float, high: float, n: int = 1) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=gen, dtype=F64)


def _randint(gen: torch.Generator, low: int, high: int) -> int:
    """An int in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def reference_alpha(k: Tensor) -> tuple[Tensor, float]:
    """Paper weights ``α ∝ C⁻¹1 / n`` of an invertible float64 Gramian, and cond(C)."""
    n = k.diagonal().sqrt()
    c = k / (n[:, None] * n[None, :])
    w = torch.linalg.solve(c, torch.ones_like(n)) / n
    return w / w.sum(), float(torch.linalg.cond(c))


def _well(gen: torch.Generator) -> Tensor:
    """A float64 Gramian with cond(C) ≤ 20 and Σ|α| ≤ 5; norms 0.1..10."""
    while True:
        t = _randint(gen, 1, 8)
        p = t + _randint(gen, 2, 24)
        g = torch.randn(t, p, generator=gen, dtype=F64)
        g = g + _uniform(gen, 0, 1) * torch.randn(1, p, generator=gen, dtype=F64)
        g = g * 10.0 ** _uniform(gen, -1, 1, t)[:, None]
        k = g @ g.T
        alpha, cond = reference_alpha(k)
        if cond <= 20 and alpha.abs().sum() <= 5:
            return k


def make_case(i: int) -> Case:
    gen = torch.Generator().manual_seed(1000 + i)
    kind = KINDS[i % len(KINDS)]
    dtype = DTYPES[(i // len(KINDS)) % len(DTYPES)]
    detail = kind
    if kind == "well":
        exact = _well(gen)
        given = exact.to(dtype)
    elif kind == "scale":
        info = torch.finfo(dtype)
        subnormal = bool(_randint(gen, 0, 1))
        low, high = ((math.log10(info.tiny * info.eps) + 1, math.log10(info.tiny)) if subnormal
                     else SCALE_RANGE[dtype])
        exact = _well(gen)
        d = 10.0 ** _uniform(gen, -3, 0, exact.shape[0])  # task norms spread over 1e-4..10
        exact = exact * d[:, None] * d[None, :]
        exact = exact / exact.abs().max()
        scale = 10.0 ** _uniform(gen, low, high)
        given = (exact * scale).to(dtype)
        detail = f"{'subnormal' if subnormal else 'scale'} 1e{math.log10(scale):.0f}"
    elif kind == "nonfinite":
        exact = _well(gen)
        given = exact.to(dtype).clone()
        t = given.shape[0]
        for _ in range(_randint(gen, 1, 3)):
            a, b = _randint(gen, 0, t - 1), _randint(gen, 0, t - 1)
            value = (math.nan, math.inf, -math.inf)[_randint(gen, 0, 2)]
            given[a, b] = value
            if _randint(gen, 0, 1):
                given[b, a] = value
        off = "off-diagonal" if bool(given.diagonal().isfinite().all()) else "diagonal"
        detail = f"nonfinite {off}"
    elif kind == "rankdef":
        t = _randint(gen, 2, 8)
        structure = ("identical", "parallel", "opposite", "zero", "wide")[_randint(gen, 0, 4)]
        p = _randint(gen, 1, t - 1) if structure == "wide" else t + _randint(gen, 2, 12)
        g = torch.randn(t, p, generator=gen, dtype=F64) * 10.0 ** _uniform(gen, -1, 1, t)[:, None]
        a, b = _randint(gen, 0, t - 1), _randint(gen, 0, t - 2)
        b = b + (b >= a)  # b != a
        factor = float(10.0 ** _uniform(gen, -1, 1))
        if structure == "identical":
            g[b] = g[a]
        elif structure == "parallel":
            g[b] = factor * g[a]
        elif structure == "opposite":
            g[b] = -factor * g[a]
        elif structure == "zero":
            g[b] = 0
        exact = g @ g.T
        given = exact.to(dtype)
        detail = f"rankdef {structure}"
    elif kind == "illposed":
        while True:  # C with cond ≤ 20 and weights of both signs
            c = _well(gen)
            n = c.diagonal().sqrt()
            c = c / (n[:, None] * n[None, :])
            beta = torch.linalg.solve(c, torch.ones_like(n))
            if (beta < 0).any():
                break
        delta = float(10.0 ** _uniform(gen, -6, -0.5)) * (1 if _randint(gen, 0, 1) else -1)
        n = 10.0 ** _uniform(gen, -1, 1, len(n))
        pos, neg = (beta.clamp_min(0) / n).sum(), (-beta.clamp_max(0) / n).sum()
        # Scale the negative-weight norms so that Σw = delta · Σ|w|.
        n = torch.where(beta < 0, n * neg * (1 + delta) / (pos * (1 - delta)), n)
        exact = c * n[:, None] * n[None, :]
        given = exact.to(dtype)
        detail = f"illposed 1e{math.log10(abs(delta)):.0f}"
    else:  # nonpsd
        structure = ("negative diagonal", "cosine above one", "indefinite")[_randint(gen, 0, 2)]
        if structure == "indefinite":
            while True:
                t = _randint(gen, 3, 8)
                c = _uniform(gen, -1, 1, t * t).reshape(t, t)
                c = (c + c.T) / 2
                c.fill_diagonal_(1.0)
                eig = torch.linalg.eigvalsh(c)
                if eig[0] < -0.05 * eig[-1]:
                    break
            n = 10.0 ** _uniform(gen, -1, 1, t)
            exact = c * n[:, None] * n[None, :]
        else:
            exact = _well(gen)
            t = exact.shape[0]
            if structure == "negative diagonal" or t == 1:
                structure = "negative diagonal"
                a = _randint(gen, 0, t - 1)
                exact[a, a] = -float(_uniform(gen, 0.1, 1)) * exact.diagonal().max()
            else:
                a, b = _randint(gen, 0, t - 1), _randint(gen, 0, t - 2)
                b = b + (b >= a)
                n = exact.diagonal().sqrt()
                sign = 1.0 if _randint(gen, 0, 1) else -1.0
                value = sign * float(1 + _uniform(gen, 0.05, 2)) * n[a] * n[b]
                exact[a, b] = exact[b, a] = value
        given = exact.to(dtype)
        detail = f"nonpsd {structure}"
    return Case(kind, dtype, given, exact, detail)


def effective_eps(k: Tensor) -> float:
    """Relative rounding level of the cosines of a Gramian stored in ``k.dtype``: ``eps`` of the
    dtype, more where diagonal entries are subnormal (their spacing is ``tiny · eps``)."""
    info = torch.finfo(k.dtype)
    low = float(k.double().diagonal().abs().min())
    return info.eps * (1 + info.tiny / low) if low > 0 else math.inf


def _unit(k: Tensor) -> Tensor:
    """``k`` in float64 times the power of two that brings its largest entry into [1, 2): exact,
    even for subnormal ``k`` (two factors, since 2^1074 itself overflows)."""
    k = k.double()
    e = -math.floor(math.log2(float(k.abs().max())))
    return k * 2.0 ** (e // 2) * 2.0 ** (e - e // 2)


def projections(k: Tensor, alpha: Tensor) -> Tensor:
    """``<g, u_t> = (K α)_t / n_t`` on the given Gramian (float64, exactly rescaled by a power of
    two so subnormal Gramians lose nothing), for tasks above the 1e-10 norm cut-off; in units
    of the rescaled Gramian."""
    k = _unit(k)
    n = k.diagonal().clamp_min(0).sqrt()
    active = n > 1e-10 * n.max()
    return (k @ alpha.double())[active] / n[active]


def spread(proj: Tensor, alpha: Tensor, k: Tensor) -> float:
    """Largest difference of two projections relative to the scale of the combined gradient."""
    k = _unit(k)
    n = k.diagonal().clamp_min(0).sqrt()
    scale = float((alpha.double().abs() * n).sum())
    return float(proj.max() - proj.min()) / scale if scale > 0 else 0.0


@functools.cache
def cases() -> tuple[Case, ...]:
    """The 1,000 cases (built once; call under one intra-op thread: tiny matmuls on two busy
    threads are 100 times slower)."""
    return tuple(make_case(i) for i in range(NUM_CASES))


#: Well-conditioned cases: |α − α_ref| ≤ ALPHA_ULPS · cond(C) · eps · Σ|α_ref| (measured ≤ 1.8).
ALPHA_ULPS = 10.0


def _check(case: Case, r: imtl.GWeights) -> list[str]:
    """What is wrong with ``r`` as the answer to ``case`` (empty when nothing is)."""
    bad = []
    alpha = r.alpha.double()
    eps = torch.finfo(case.dtype).eps
    degenerate = bool(r.degenerate)
    if r.alpha.dtype != case.dtype or not torch.isfinite(alpha).all():
        return [f"alpha {r.alpha}"]
    if degenerate != bool((alpha == 0).all()) or (degenerate and r.projection != 0):
        bad.append(f"degenerate={degenerate} but alpha={r.alpha}, projection={r.projection}")
    if not degenerate and abs(float(alpha.sum()) - 1) > 10 * eps * max(1, float(alpha.abs().sum())):
        bad.append(f"sum(alpha) = {float(alpha.sum())}")
    if bool(r.finite) != bool(torch.isfinite(case.gramian).all()):
        bad.append(f"finite={bool(r.finite)}")
    if case.kind in ("nonfinite", "nonpsd") and (bool(r.psd) or not degenerate):
        bad.append(f"invalid Gramian accepted: psd={bool(r.psd)}, alpha={r.alpha}")
    if case.kind == "illposed" and not degenerate:  # right to the dtype's precision, or flagged
        # Rounding Σw by ε (relative to Σ|w|) moves α by ε Σ|α|² (α = w / Σw, Σ|α| = Σ|w| / |Σw|).
        ref, cond = reference_alpha(case.exact)
        size = float(ref.abs().sum())
        err = float((alpha - ref).abs().max())
        bound = ALPHA_ULPS * cond * effective_eps(case.gramian) * size**2 + 1e-6 * size
        if err > bound:
            bad.append(f"alpha {alpha} != float64 answer {ref} (cond {cond:.3g})")
    if case.kind in ("well", "scale"):
        ref, cond = reference_alpha(case.exact)
        eff = effective_eps(case.gramian)
        if cond * eff <= 0.05:  # the entries carry the answer to better than 5 %
            err = float((alpha - ref).abs().max())
            if degenerate or not bool(r.psd):
                bad.append(f"degenerate={degenerate}, psd={bool(r.psd)}; expected {ref}")
            elif err > ALPHA_ULPS * cond * eff * float(ref.abs().sum()):
                bad.append(f"alpha {alpha} != float64 answer {ref} (cond {cond:.3g})")
    if case.kind == "rankdef" and not case.detail.endswith("wide"):
        # "wide" (T > P) cases can sit within the dtype's rounding of consistent: either is right
        expected = bool(imtl.imtl_g_weights(case.exact).degenerate)
        if degenerate != expected:
            bad.append(f"degenerate={degenerate}, float64 says {expected}")
    if case.kind in ("well", "scale", "rankdef", "illposed") and not degenerate:
        s = spread(projections(case.gramian, alpha), alpha, case.gramian)
        if s > 2 * eps + 1e-12:
            bad.append(f"projections differ by {s:.3g}")
    return bad


def test_fuzz_never_raises_never_nan_and_matches_float64(one_thread):
    failures = []
    for i, case in enumerate(cases()):
        r = imtl.imtl_g_weights(case.gramian)  # no input may raise
        failures += [f"case {i} ({case.detail}, {case.dtype}): {msg}" for msg in _check(case, r)]
    assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} failures)"


def test_fuzz_covers_every_kind_and_dtype(one_thread):
    """The counts the figures in the commit message are about (a changed generator shows)."""
    seen = {(c.detail.split(" 1e")[0].split(" ")[0], c.dtype) for c in cases()}
    assert seen == {(k, d) for k in (*KINDS, "subnormal") for d in DTYPES}
    assert sum(c.kind == "well" for c in cases()) == 167


# ---------------------------------------------------------------- counts (python tests/...py)


def tally(fn=imtl.imtl_g_weights) -> dict[tuple[str, str], dict[str, float]]:
    """Failure counts and worst figures per (kind, dtype) of ``fn`` over the 1,000 cases.

    ``flagged``: degenerate results. ``wrong_flag``: well-conditioned cases flagged, invalid
    (non-finite, non-PSD) ones not flagged, rank-deficient ones flagged unlike float64.
    ``alpha_err``: ``max |α − α_ref| / (cond · eps · Σ|α_ref|)`` for well-conditioned cases, the
    relative error ``max |α − α_ref| / max |α_ref|`` of unflagged ill-posed ones. ``spread``:
    largest difference of two projections on the Gramian as given, relative to ``Σ|α_t| n_t``.
    Run ``PYTHONPATH=. python tests/test_weights_fuzz.py`` from the repository root.
    """
    out: dict[tuple[str, str], dict[str, float]] = {}
    for case in cases():
        key = (case.detail.split(" 1e")[0], str(case.dtype).removeprefix("torch."))
        row = out.setdefault(key, {"cases": 0, "raised": 0, "nan_alpha": 0, "bad_sum": 0,
                                   "flagged": 0, "wrong_flag": 0, "alpha_err": 0.0,
                                   "spread": 0.0})
        row["cases"] += 1
        try:
            r = fn(case.gramian)
        except Exception as e:  # counted, not hidden: this is the measurement
            row["raised"] += 1
            row.setdefault(type(e).__name__, 0)
            row[type(e).__name__] += 1
            continue
        alpha = r.alpha.double()
        if not torch.isfinite(alpha).all():
            row["nan_alpha"] += 1
            continue
        eps = torch.finfo(case.dtype).eps
        zero = bool((alpha == 0).all())
        if not zero and abs(float(alpha.sum()) - 1) > 10 * eps * max(1.0, float(alpha.abs().sum())):
            row["bad_sum"] += 1
        degenerate = bool(r.degenerate)
        row["flagged"] += degenerate
        if case.kind in ("well", "scale"):  # "scale" covers the subnormal cases
            ref, cond = reference_alpha(case.exact)
            eff = effective_eps(case.gramian)
            if cond * eff <= 0.05:
                row["wrong_flag"] += degenerate
                if not degenerate:
                    err = float((alpha - ref).abs().max()) / (cond * eff * float(ref.abs().sum()))
                    row["alpha_err"] = max(row["alpha_err"], err)
        elif case.kind in ("nonfinite", "nonpsd"):
            row["wrong_flag"] += not (degenerate and zero)
        elif case.kind == "illposed":  # either flag is right; unflagged ones must be accurate
            if not degenerate:
                ref, cond = reference_alpha(case.exact)
                err = float((alpha - ref).abs().max() / ref.abs().max())
                row["alpha_err"] = max(row["alpha_err"], err)
        else:
            row["wrong_flag"] += degenerate != bool(fn(case.exact).degenerate)
        if case.kind != "nonfinite" and case.kind != "nonpsd" and not degenerate and not zero:
            proj = projections(case.gramian, alpha)
            row["spread"] = max(row["spread"], spread(proj, alpha, case.gramian))
    return out


def _print_tally() -> None:
    torch.set_num_threads(1)
    print(imtl.__file__)
    rows = tally()
    cols = ["cases", "raised", "nan_alpha", "bad_sum", "flagged", "wrong_flag", "alpha_err",
            "spread"]
    print(f"{'kind':28s}{'dtype':10s}" + "".join(f"{c:>11s}" for c in cols) + "  exceptions")
    for (kind, dtype), row in sorted(rows.items()):
        extra = {k: v for k, v in row.items() if k not in cols}
        print(f"{kind:28s}{dtype:10s}" + "".join(
            f"{row[c]:>11.3g}" if isinstance(row[c], float) else f"{row[c]:>11d}" for c in cols)
            + f"  {extra or ''}")
    total = {c: sum(r[c] for r in rows.values()) for c in ("raised", "nan_alpha", "bad_sum",
                                                           "wrong_flag")}
    print("total", total)


if __name__ == "__main__":
    _print_tally()
