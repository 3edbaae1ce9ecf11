"""imtl_func: Impartial Multi-Task Learning (Liu et al., ICLR 2021) as pure torch.func transforms.

* :func:`mtl_value_and_grad`, :func:`value_and_grad`: one-call steps (feature / parameter level);
  ``step.init(num_tasks)`` makes their state.
* :func:`preset` (``'hybrid'``, ``'gradient'``, ``'loss'``, ``'equal'``) and :func:`transform`
  (a :class:`Weighting` and a :class:`ScaleRule`): the ``(init, update)`` transform.
* Weightings :func:`imtl_g`, :func:`equal`, or your own with :func:`weighting`; scale rules
  :func:`scale_newton`, :func:`scale_adam`, :func:`scale_sgd`, :func:`scale_frozen`.
* Building blocks: :func:`task_jacobian`, :func:`gramian`, :func:`imtl_g_weights`,
  :func:`scale_losses`, :func:`scale_grad`.
* :func:`apply_updates`: hand a step's result to a ``torch.optim`` optimizer (skipping the
  step when it was not finite); :func:`write_grads`: the same without the step, for a
  framework's own ``opt.step()``; :func:`amp_scale`: float16 loss scaling with ``GradScaler``.
* :func:`accumulate`: exact gradient accumulation (the step of one big batch from micro-batches).
* :mod:`imtl_func.nn`: a stateful ``nn.Module`` for ordinary PyTorch loops;
  :mod:`imtl_func.distributed`: data parallelism.
"""

from imtl_func import distributed, nn
from imtl_func._accumulate import Accumulator, accumulate
from imtl_func._gramian import gramian
from imtl_func._imtl_g import GWeights, IMTLGStats, imtl_g, imtl_g_weights
from imtl_func._jacobian import task_jacobian
from imtl_func._micro_batches import AccumulatedStats, AccumulationPlan
from imtl_func._optim import amp_scale, apply_updates, write_grads
from imtl_func._pipeline import Grads, Losses, StepResult
from imtl_func._presets import preset
from imtl_func._scales import (
    AdamState,
    EmptyState,
    NewtonState,
    ScaleRule,
    scale_adam,
    scale_frozen,
    scale_grad,
    scale_losses,
    scale_newton,
    scale_sgd,
)
from imtl_func._steps import Step, mtl_value_and_grad, value_and_grad
from imtl_func._transform import IMTLState, Info, NonFinite, TaskWeights, Transform, transform
from imtl_func._version import __version__ as __version__
from imtl_func._weighting import EmptyStats, Weighting, equal, weighting

__all__ = [
    "AccumulatedStats",
    "AccumulationPlan",
    "Accumulator",
    "AdamState",
    "EmptyState",
    "EmptyStats",
    "GWeights",
    "Grads",
    "IMTLGStats",
    "IMTLState",
    "Info",
    "Losses",
    "NewtonState",
    "NonFinite",
    "ScaleRule",
    "Step",
    "StepResult",
    "TaskWeights",
    "Transform",
    "Weighting",
    "accumulate",
    "amp_scale",
    "apply_updates",
    "distributed",
    "equal",
    "gramian",
    "imtl_g",
    "imtl_g_weights",
    "mtl_value_and_grad",
    "nn",
    "preset",
    "scale_adam",
    "scale_frozen",
    "scale_grad",
    "scale_losses",
    "scale_newton",
    "scale_sgd",
    "task_jacobian",
    "transform",
    "value_and_grad",
    "weighting",
    "write_grads",
]
