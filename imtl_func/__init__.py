"""imtl_func: Impartial Multi-Task Learning (Liu et al., ICLR 2021) as pure torch.func transforms.

* :func:`mtl_value_and_grad`, :func:`value_and_grad`: one-call steps (feature / parameter level).
* :func:`transform`, :func:`init`: the optax-style IMTL transform and its state.
* :func:`task_jacobian`, :func:`gramian`, :func:`imtl_g_weights`, :func:`scale_losses`,
  :func:`scale_grad`: the building blocks.
* :mod:`imtl_func.nn`: a stateful ``nn.Module`` for ordinary PyTorch loops.
"""

from imtl_func import nn
from imtl_func._gramian import gramian
from imtl_func._imtl_g import GWeights, default_rtol, imtl_g_weights
from imtl_func._jacobian import pullback_rows, task_jacobian
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
from imtl_func._steps import Grads, Losses, StepResult, mtl_value_and_grad, value_and_grad
from imtl_func._transform import IMTLState, Info, Transform, Weights, init, transform

__version__ = "0.1.0"

__all__ = [
    "AdamState",
    "EmptyState",
    "GWeights",
    "Grads",
    "IMTLState",
    "Info",
    "Losses",
    "NewtonState",
    "ScaleRule",
    "StepResult",
    "Transform",
    "Weights",
    "default_rtol",
    "gramian",
    "imtl_g_weights",
    "init",
    "mtl_value_and_grad",
    "nn",
    "pullback_rows",
    "scale_adam",
    "scale_frozen",
    "scale_grad",
    "scale_losses",
    "scale_newton",
    "scale_sgd",
    "task_jacobian",
    "transform",
    "value_and_grad",
]
