"""Input validation with messages that say what to fix (internal).

Every check reads only shapes, dtypes and Python values, never tensor contents, so it runs the
same in eager mode and while `torch.compile` traces a step.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from imtl_func._tree import leaves


def num_tasks(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"num_tasks must be a positive int, got {value!r}")
    return value


def chunk_size(value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {value!r}")


def square_matrix(x: Any, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] != x.shape[1] or x.shape[0] < 1:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a [T, T] tensor with T >= 1, got {shape}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor, got dtype {x.dtype}")


def losses(x: Any, expected: int | None, where: str) -> Tensor:
    """Task losses must be a floating [T] tensor (T matching the state when known)."""
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{where}: task losses must be a tensor of shape [T], got {type(x).__name__}; "
            "stack per-task scalars with torch.stack([l1, l2, ...])"
        )
    if x.dim() != 1:
        raise ValueError(
            f"{where}: task losses must have shape [T] (one scalar per task), got "
            f"{tuple(x.shape)}; reduce each task's loss to a scalar (e.g. .mean()) and stack them"
        )
    if not x.is_floating_point():
        raise TypeError(f"{where}: task losses must be floating point, got dtype {x.dtype}")
    if expected is not None and x.shape[0] != expected:
        raise ValueError(
            f"{where}: got {x.shape[0]} task losses but the IMTL state holds {expected} tasks; "
            f"create the state with num_tasks={x.shape[0]}"
        )
    return x


def extra_loss(x: Any, where: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 0 or not x.is_floating_point():
        desc = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{where}: Losses.extra must be a floating scalar tensor, got {desc}")


def params(tree: Any, name: str) -> None:
    """A parameter (or feature) pytree must hold at least one tensor, all real floating point."""
    ls = leaves(tree)
    if not ls:
        raise ValueError(
            f"{name} is empty: pass a pytree (dict, tuple, ...) of at least one tensor")
    for x in ls:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must hold only torch tensors, found {type(x).__name__}; "
                            "convert arrays with torch.as_tensor")
        if not x.is_floating_point():
            raise TypeError(
                f"{name} holds a tensor of dtype {x.dtype}; only real floating-point tensors can "
                "be differentiated here. Pass integer buffers (e.g. num_batches_tracked) through "
                "the batch arguments instead"
            )


def finite_float(value: Any, name: str, *, positive: bool = False, low: float | None = None,
                 high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value >= high:
        raise ValueError(f"{name} must be < {high}, got {value}")
    return value


def per_task_decoders(decode: Any, has_aux: bool) -> tuple[Any, ...] | None:
    """A sequence of per-task loss functions (the fast path), or None for one ``decode``."""
    if callable(decode):
        return None
    if not isinstance(decode, (list, tuple)) or not decode:
        raise TypeError("decode must be a function returning the [T] losses, or a non-empty "
                        f"list of T per-task loss functions, got {type(decode).__name__}")
    for t, fn in enumerate(decode):
        if not callable(fn):
            raise TypeError(f"decode[{t}] must be a function (task_params, features, *batch) "
                            f"-> scalar loss, got {type(fn).__name__}")
    if has_aux:
        raise ValueError("has_aux is not supported with per-task decoders; pass one decode "
                         "function that returns (losses, aux)")
    return tuple(decode)


def scalar_loss(x: Any, task: int) -> Any:
    """A per-task decoder must return a floating scalar tensor."""
    if not isinstance(x, Tensor) or x.dim() != 0 or not x.is_floating_point():
        desc = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"decode[{task}] must return a floating scalar loss, got {desc}; "
                         "reduce the task's loss to one number (e.g. .mean())")
    if torch.is_grad_enabled():  # forward-only evaluations (no_grad) have nothing to check
        differentiable(x, f"decode[{task}]")
    return x


class StateSpec(NamedTuple):
    """The types of the parts of a transform's state, to recognise a foreign state."""

    rule_state: type
    weighting_state: type
    rule: str


_MAKE_STATE = "create it with step.init(num_tasks) (or tx.init(num_tasks)) of this step"


def state(x: Any, spec: StateSpec) -> None:
    """An :class:`IMTLState` made by the same kind of transform, with a floating [T] log-scale."""
    fields = ("log_scale", "rule_state", "weighting_state")
    if not (isinstance(x, tuple) and getattr(x, "_fields", None) == fields):
        raise TypeError(f"state must be the IMTLState returned by init or by the previous step, "
                        f"got {type(x).__name__}; {_MAKE_STATE}")
    s = x[0]  # x.log_scale: the fields are checked above (x is typed a bare tuple here)
    if not isinstance(s, Tensor) or s.dim() != 1 or s.dtype not in (torch.float32,
                                                                    torch.float64):
        desc = f"{s.dtype} tensor of shape {tuple(s.shape)}" if isinstance(s, Tensor) else type(
            s).__name__
        raise ValueError(f"state.log_scale must be a float32 or float64 [T] tensor, got {desc}; "
                         f"{_MAKE_STATE}")
    for part, expected in (("rule_state", spec.rule_state),
                           ("weighting_state", spec.weighting_state)):
        got = type(getattr(x, part))
        if got is not expected:
            raise ValueError(f"state.{part} is a {got.__name__} but this step's transform keeps "
                             f"a {expected.__name__} ({spec.rule if part == 'rule_state' else ''}"
                             f"{'the weighting' if part != 'rule_state' else ''}); the state was "
                             f"made for another transform: {_MAKE_STATE}")


def state_dtype(dtype: Any) -> torch.dtype:
    """The dtype of a new state: float32 or float64 (half precision is promoted to float32)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a real floating dtype for the IMTL state, got {dtype}")
    return torch.promote_types(dtype, torch.float32)


def initial_log_scale(value: Sequence[float] | Tensor, num_tasks: int, dtype: torch.dtype,
                      device: Any) -> Tensor:
    if isinstance(value, Tensor) and (value.is_complex() or not (value.is_floating_point() or
                                                                 value.dtype == torch.int64)):
        raise TypeError(f"log_scale must hold real numbers, got dtype {value.dtype}")
    s = torch.as_tensor(value, dtype=dtype, device=device).detach().clone()
    if s.shape != (num_tasks,):
        raise ValueError(f"log_scale must have {num_tasks} entries (one per task), "
                         f"got shape {tuple(s.shape)}")
    if not torch.isfinite(s).all():
        raise ValueError("log_scale must be finite")
    return s


def same_device(losses: Tensor, log_scale: Tensor) -> None:
    if losses.device != log_scale.device:
        raise ValueError(f"the losses are on {losses.device} but the IMTL state on "
                         f"{log_scale.device}; create the state with "
                         f"step.init(..., device={str(losses.device)!r})")


def gramian_for(x: Any, num_tasks: int, device: torch.device) -> Tensor:
    """The [T, T] Gramian a weighting reads: real floating, T matching the losses, same device."""
    if x is None:
        raise ValueError("this transform's weighting needs the Gramian of the task gradients")
    square_matrix(x, "gramian")
    if x.shape[0] != num_tasks:
        raise ValueError(f"gramian is {tuple(x.shape)} but there are {num_tasks} task losses")
    if x.device != device:
        raise ValueError(f"the Gramian is on {x.device} but the losses on {device}; compute both "
                         "on one device")
    return x.detach()


def differentiable(x: Tensor, where: str) -> None:
    """Losses computed inside ``torch.func.vjp`` must depend on what is differentiated.

    ``requires_grad`` is static metadata there (also under ``torch.compile``): a loss that is
    detached, or built from constants, would give all-zero gradients and train nothing.
    """
    if not x.requires_grad:
        raise ValueError(f"{where} returned losses that do not depend on the parameters or the "
                         "features (a .detach(), .item() or torch.tensor(...) on the way?): "
                         "they would give zero gradients; return the losses as computed")


def real_matrix_dtype(x: Any, name: str) -> None:
    """IMTL is defined for real gradients: a complex Gramian is refused with the reason."""
    if isinstance(x, Tensor) and x.is_complex():
        raise TypeError(f"{name} must be real: IMTL-G is defined for real task gradients, got "
                        f"dtype {x.dtype}; pass the Gramian of the real gradients")


def relative_cutoff(value: Any, name: str) -> float:
    """A relative cut-off given as a Python number in [0, 1) (never a tensor: no value reads)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be None (the default for the Gramian's dtype) or a number "
                        f"in [0, 1), got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value < 1.0:  # NaN fails this too
        raise ValueError(f"{name} must be None (the default for the Gramian's dtype) or a number "
                         f"in [0, 1), got {value}")
    return value


def jacobian_leaf(x: Any, where: str) -> None:
    """A Jacobian leaf must be a real floating tensor (IMTL's gradients are real)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: every Jacobian leaf must be a tensor of shape [T, ...], got "
                        f"{type(x).__name__}")
    if x.is_complex():
        raise TypeError(f"{where}: task gradients must be real (IMTL is not defined for complex "
                        f"gradients), got a Jacobian leaf of dtype {x.dtype}; view complex "
                        "parameters as real ones (torch.view_as_real) before differentiating")
    if not x.is_floating_point():
        raise TypeError(f"{where}: Jacobian leaves must be floating point, got dtype {x.dtype}")

def micro_batch_weight(value: Any) -> Tensor | float:
    """A micro-batch's weight in an accumulated step: a number > 0 or a real scalar tensor."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"weight must be a number > 0 or a real scalar tensor (e.g. the "
                             f"micro-batch's size), got a {value.dtype} tensor of shape "
                             f"{tuple(value.shape)}")
        return value
    return finite_float(value, "weight", positive=True)


def micro_batches(value: Any) -> list[tuple[Any, ...]]:
    """The micro-batches of an accumulated step: a non-empty list (read twice) of tuples."""
    if not isinstance(value, (list, tuple)):
        raise TypeError("micro_batches must be a list of micro-batches (each a tuple of the "
                        "step's batch arguments); it is read twice, so not an iterator, got "
                        f"{type(value).__name__}")
    if not value:
        raise ValueError("micro_batches is empty: pass at least one micro-batch")
    for m, batch in enumerate(value):
        if not isinstance(batch, (list, tuple)):
            raise TypeError(f"micro_batches[{m}] must be a tuple of the step's batch arguments, "
                            f"e.g. (x, y); got {type(batch).__name__} (wrap a single argument "
                            "as (x,))")
    return [tuple(b) for b in value]


def micro_batch_weights(value: Any, count: int) -> list[Any]:
    """One weight per micro-batch (see :func:`micro_batch_weight`)."""
    if isinstance(value, Tensor):
        value = list(value.unbind(0)) if value.dim() == 1 else [value]
    if not isinstance(value, (list, tuple)) or len(value) != count:
        got = len(value) if isinstance(value, (list, tuple)) else type(value).__name__
        raise ValueError(f"weights must hold one weight per micro-batch ({count}), got {got}")
    return [micro_batch_weight(w) for w in value]


def flat_tensors(tree: Any, name: str) -> list[Tensor]:
    """Tensors of a tensor, a mapping or a (nested) iterable of them, in order, without repeats.

    ``[model.parameters()]`` (a list holding a generator) is accepted, as in the original README.
    """
    out: list[Tensor] = []
    seen: set[int] = set()

    def visit(x: Any) -> None:
        if isinstance(x, Tensor):
            if id(x) not in seen:
                seen.add(id(x))
                out.append(x)
        elif isinstance(x, Mapping):
            for v in x.values():
                visit(v)
        elif isinstance(x, Iterable) and not isinstance(x, (str, bytes)):
            for v in x:
                visit(v)
        else:
            raise TypeError(f"{name} must hold only tensors, found {type(x).__name__}")

    visit(tree)
    return out


def loss_items(losses: Sequence[Tensor] | Tensor) -> list[Tensor]:
    """The task losses as a list of one-element floating tensors, with clear errors."""
    if isinstance(losses, Tensor):
        if losses.dim() != 1:
            raise ValueError(f"losses as a tensor must have shape [T], got {tuple(losses.shape)}")
        items = list(losses.unbind(0))
    elif isinstance(losses, Sequence) and not isinstance(losses, (str, bytes)):
        items = list(losses)
    else:
        raise TypeError(f"losses must be a list of scalar tensors, got {type(losses).__name__}")
    if not items:
        raise ValueError("losses is empty: pass one scalar loss per task")
    for i, x in enumerate(items):
        if not isinstance(x, Tensor):
            raise TypeError(f"losses[{i}] must be a scalar tensor, got {type(x).__name__}")
        if x.numel() != 1:
            raise ValueError(f"losses[{i}] must be a scalar, got shape {tuple(x.shape)}; reduce "
                             "each task's loss to one number (e.g. .mean())")
        if not x.is_floating_point():
            raise TypeError(f"losses[{i}] must be floating point, got dtype {x.dtype}")
    return items
