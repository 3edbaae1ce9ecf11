"""The Aligned-MTL weighting of docs/guides/custom-weighting.md, run through the steps.

Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning",
CVPR 2023): with the task-gradient matrix ``G = U Σ Vᵀ`` (a column per task, rank R), the
aligned gradients are ``Ĝ = σ_min U Vᵀ`` and the update is their sum ``Ĝ 1``. The guide computes
it from the Gramian alone (weights ``α = B 1``, ``B = σ_min V Σ⁻¹ Vᵀ``); these tests check it
against a float64 SVD of the explicit gradients, eagerly and under ``torch.compile``.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import optree
import pytest
import torch
from test_docs_snippets import extract_blocks

import imtl_func as imtl

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guides" / "custom-weighting.md"


def _load_guide() -> types.ModuleType:
    """The guide's block that defines ``aligned_mtl``, run as a module (compile needs one)."""
    blocks = [b for b in extract_blocks(GUIDE.read_text(encoding="utf-8"))
              if "def aligned_mtl(" in b.code]
    assert len(blocks) == 1, "the guide must define aligned_mtl in exactly one python block"
    module = types.ModuleType("custom_weighting_guide")
    module.__file__ = str(GUIDE)
    sys.modules[module.__name__] = module
    exec(compile(blocks[0].code, str(GUIDE), "exec"), module.__dict__)
    return module


guide = _load_guide()


def _reference(jac: torch.Tensor, rtol: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Aligned-MTL from the explicit ``[T, P]`` gradient rows by a float64 SVD.

    Returns the combined gradient ``σ_R Σ_t (U_R Vh_R)[t]``, the weights ``α`` with
    ``αᵀ jac`` = that gradient, and the rank R (singular values above ``rtol · s_max``).
    """
    u, s, vh = torch.linalg.svd(jac.double(), full_matrices=False)
    rank = int((s > rtol * s.max()).sum()) if bool(s.max() > 0) else 0
    if rank == 0:
        zeros = torch.zeros(jac.shape[0], dtype=torch.float64)
        return torch.zeros(jac.shape[1], dtype=torch.float64), zeros, 0
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    orthonormal = u @ vh                         # the rows: task gradients orthonormalised
    combined = s[-1] * orthonormal.sum(0)
    alpha = s[-1] * (u / s) @ u.T @ torch.ones(jac.shape[0], dtype=torch.float64)
    return combined, alpha, rank


# The encoder is the identity on a learnable feature, so the shared gradient IS the combined
# feature gradient; the heads are linear maps of the feature with squared losses.
def _identity_encode(params, targets):
    return params["z"]


def _head(t: int):
    def loss(params, z, targets):
        return ((z @ params[f"w{t}"] - targets[:, t]) ** 2).mean()
    return loss


def _problem(num_tasks: int, batch: int, dim: int, dtype: torch.dtype, *, seed: int = 0,
             copies: dict[int, int] | None = None, zero: tuple[int, ...] = ()):
    """Feature z [batch, dim], one weight vector per task; ``copies[t] = s`` makes task t a copy
    of task s (identical gradient), tasks in ``zero`` get a zero weight (zero gradient)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, dim, generator=g, dtype=dtype)
    w = torch.randn(num_tasks, dim, generator=g, dtype=dtype) * torch.logspace(
        0, 2, num_tasks, dtype=dtype)[:, None]               # gradients of different sizes
    targets = torch.randn(batch, num_tasks, generator=g, dtype=dtype)
    for t, s in (copies or {}).items():
        w[t], targets[:, t] = w[s], targets[:, s]
    for t in zero:  # a zero head and a zero target: loss 0, gradient 0
        w[t] = 0
        targets[:, t] = 0
    task = {f"w{t}": w[t] for t in range(num_tasks)}
    return {"z": z}, task, targets


def _feature_rows(shared, task, targets, num_tasks: int) -> torch.Tensor:
    """``[T, P]`` explicit gradients of each task's loss w.r.t. the feature, T autograd calls."""
    z = shared["z"].detach().double().requires_grad_()
    t64 = {k: v.detach().double() for k, v in task.items()}
    rows = [torch.autograd.grad(_head(t)(t64, z, targets.double()), z)[0].reshape(-1)
            for t in range(num_tasks)]
    return torch.stack(rows)


def _step(num_tasks: int):
    tx = imtl.transform(guide.aligned, scale_rule=None)
    return imtl.mtl_value_and_grad(_identity_encode, [_head(t) for t in range(num_tasks)], tx)


CASES = {
    "full rank": dict(num_tasks=3, batch=8, dim=4),
    "duplicate task": dict(num_tasks=4, batch=8, dim=4, copies={3: 1}),
    "more tasks than dimensions": dict(num_tasks=5, batch=1, dim=3),
    "one zero gradient": dict(num_tasks=3, batch=8, dim=4, zero=(2,)),
}


@pytest.mark.parametrize("case", CASES)
def test_combined_feature_gradient_is_sigma_min_times_sum_of_orthonormalised(case):
    kwargs = CASES[case]
    num_tasks = kwargs["num_tasks"]
    shared, task, targets = _problem(dtype=torch.float64, **kwargs)
    step = _step(num_tasks)
    out = step(shared, task, step.init(num_tasks, dtype=torch.float64), targets)

    jac = _feature_rows(shared, task, targets, num_tasks)
    combined, alpha, rank = _reference(jac)
    expected_rank = {"full rank": 3, "duplicate task": 3, "more tasks than dimensions": 3,
                     "one zero gradient": 2}[case]
    assert rank == expected_rank
    assert bool(out.info.finite)
    assert torch.isfinite(out.info.alpha).all()
    assert int(out.info.stats.rank) == rank
    torch.testing.assert_close(out.grads.shared["z"].reshape(-1), combined, rtol=1e-9,
                               atol=1e-12)
    torch.testing.assert_close(out.info.alpha, alpha, rtol=1e-9, atol=1e-12)
    # the heads get their own, unweighted gradients
    for t in range(num_tasks):
        own = torch.func.grad(_head(t))(task, shared["z"], targets)
        torch.testing.assert_close(out.grads.task[f"w{t}"], own[f"w{t}"])


def test_aligned_gradients_are_orthogonal_with_equal_norms():
    """The defining property: ``Ĝ = G B`` has Gram matrix ``σ_min² I`` (condition number 1),
    and the combined update has the same projection ``σ_min`` on every orthonormalised
    gradient, although the raw gradients are badly conditioned."""
    num_tasks = 4
    shared, task, targets = _problem(num_tasks, batch=16, dim=8, dtype=torch.float64, seed=3)
    jac = _feature_rows(shared, task, targets, num_tasks)      # [T, P]
    assert torch.linalg.cond(jac) > 50
    b, sigma_min, rank = guide.alignment_matrix(jac @ jac.T)
    aligned = b @ jac                                           # rows ĝ_t (B is symmetric)
    s = torch.linalg.svdvals(jac)
    torch.testing.assert_close(sigma_min, s[-1])
    assert int(rank) == num_tasks
    torch.testing.assert_close(aligned @ aligned.T,
                               s[-1] ** 2 * torch.eye(num_tasks, dtype=torch.float64))
    step = _step(num_tasks)
    out = step(shared, task, step.init(num_tasks, dtype=torch.float64), targets)
    update = out.grads.shared["z"].reshape(-1)
    torch.testing.assert_close(aligned @ update / s[-1],
                               s[-1] * torch.ones(num_tasks, dtype=torch.float64))


def test_all_zero_gradients_give_zero_weights():
    shared, task, targets = _problem(3, batch=8, dim=4, dtype=torch.float64, zero=(0, 1, 2))
    step = _step(3)
    out = step(shared, task, step.init(3, dtype=torch.float64), targets)
    assert bool(out.info.finite)
    assert torch.equal(out.info.alpha, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(out.grads.shared["z"], torch.zeros_like(shared["z"]))
    assert int(out.info.stats.rank) == 0


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_step_equals_eager_with_inductor():
    """A real encoder and per-task heads in float32, compiled with the default backend."""
    torch.manual_seed(0)
    num_tasks = 3
    encoder = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh())
    heads = torch.nn.ModuleList(torch.nn.Linear(12, 1) for _ in range(num_tasks))
    x, y = torch.randn(16, 6), torch.randn(16, num_tasks) * torch.tensor([1.0, 30.0, 0.1])

    def encode(params, x, y):
        return torch.func.functional_call(encoder, params, (x,))

    def head(t):
        def loss(params, z, x, y):
            own = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(f"{t}.")}
            pred = torch.func.functional_call(heads[t], own, (z,)).squeeze(-1)
            return ((pred - y[:, t]) ** 2).mean()
        return loss

    step = imtl.mtl_value_and_grad(encode, [head(t) for t in range(num_tasks)],
                                   imtl.transform(guide.aligned, scale_rule=None))
    state = step.init(num_tasks)
    compiled = torch.compile(step, fullgraph=True)
    shared, task = dict(encoder.named_parameters()), dict(heads.named_parameters())
    for i in range(2):  # a second batch reuses the compiled graph
        xb, yb = x + 0.1 * i, y * (1 + i)
        eager, comp = step(shared, task, state, xb, yb), compiled(shared, task, state, xb, yb)
        for a, b in zip(optree.tree_leaves(comp), optree.tree_leaves(eager), strict=True):
            if a.is_floating_point():
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(a, b)
        assert bool(comp.info.finite)
        assert torch.isfinite(comp.info.alpha).all()
        assert int(comp.info.stats.rank) == num_tasks

    # eager agrees with the float64 SVD reference on the feature gradients
    z = encode(shared, x + 0.1, y * 2).detach().double().requires_grad_()
    rows = torch.stack([torch.autograd.grad(
        head(t)({k: v.detach().double() for k, v in task.items()}, z, x, (y * 2).double()),
        z)[0].reshape(-1) for t in range(num_tasks)])
    _, alpha, _ = _reference(rows)
    torch.testing.assert_close(eager.info.alpha, alpha.float(), rtol=1e-3, atol=1e-5)
