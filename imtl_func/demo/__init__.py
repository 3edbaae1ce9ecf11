"""Multi-task training demo on scikit-learn's handwritten digits: equal weighting vs IMTL.

Run it with ``python -m imtl_func.demo`` (needs the ``examples`` extra:
``pip install "imtl_func[examples]"``). It trains the same network, from the same
initialisation and on the same batches, once per method, prints a table of held-out metrics
and writes plots and a JSON of every number to ``--out`` (default ``./demo_out``).

The task set
------------
One shared encoder reads an 8×8 digit (1,797 real scans shipped inside scikit-learn, no
network needed) and four heads read its 32-dimensional feature:

========  ==============================  ================================  ===============
task      target                          loss (raw units)                  held-out metric
========  ==============================  ================================  ===============
class     digit 0–9                       cross-entropy, starts at ≈ 2.3    accuracy ↑
ge5       digit ≥ 5 (binary)              binary cross-entropy, ≈ 0.7       accuracy ↑
ink       total ink, Σ pixels (185–433)   MSE in ink units², ≈ 1,100        RMSE ↓
recon     the 64 pixels, scaled to [0,1]  per-pixel MSE, ≈ 0.18             MSE ↓
========  ==============================  ================================  ===============

Why these four:

* **Loss magnitudes nearly four orders apart.** The raw losses range from ≈ 0.2 (reconstruction)
  to ≈ 1,100 (ink, in the units a user would naturally write). Under equal weighting the sum of
  losses, hence the encoder's gradient, is dominated by the ink regression; IMTL-L's scales
  ``e^{s}`` are meant to undo exactly this, and IMTL-G's weights to undo it in gradient space.
* **Different needs of one small shared feature.** Class and ``≥ 5`` need the digit's
  identity; the ink total is almost unrelated to it (correlation 0.02 with the digit value,
  per-class means 303–330 against a spread of 34) and needs how much was written;
  reconstruction needs every pixel. All four go through one 32-dimensional feature. Measured
  there, the task gradients are close to orthogonal (``cosine.png``; |cos| ≤ 0.11 at
  initialisation), so what makes equal weighting fail here is mainly the magnitude gap, the
  part IMTL is built to remove; the cosines show where the tasks start to pull together or
  apart as training goes on.
* **Four kinds of heads.** Classification (cross-entropy), a binary decision (logistic), a
  scalar regression and a dense 64-output regression: the usual mix of a real multi-task model.
* **Cheap.** The whole comparison runs in well under two minutes on two CPU cores.

The ink head predicts in raw units as ``mean + std · linear(z)``, with the training set's
mean (312) and standard deviation (34) as fixed constants, the usual de-normalising output of
a regression head. Without it a head trained with Adam (whose steps are about ``lr`` per
parameter whatever the gradient's size) would spend the whole run walking its bias to 312 and
its weights to tens. The loss is still the MSE in raw ink units: it starts near the target's
variance (≈ 1,100), and at initialisation its gradient at the shared feature is 2·10³ to
8·10⁴ times larger than the other tasks'.

Protocol: a fixed stratified 80/20 split (``random_state=0``, independent of ``--seed``); the
seed sets the network initialisation and the batch order, identical for every method. Each
method trains with Adam on the gradients the library returns (equal weighting is the library's
``'loss'`` method with frozen scales ``e^{s} = 1``, i.e. the gradient of ``Σ_t ℓ_t``).
The summary column is the multi-task literature's Δm%: the mean over tasks of the relative
change of the held-out metric against equal weighting, signed so that better is positive.

Reproducibility: the run is deterministic on a given machine, but 400 Adam steps amplify
round-off differences enormously (about 10¹⁰ here), and round-off differs between CPUs (SIMD
width of the vectorised kernels, MKL's code path) and thread counts. In float32 that moved the
table visibly (one EW accuracy by 0.55 points, hybrid's Δm% by 0.75). The demo therefore computes
in float64 (:data:`DTYPE`, about the same time: the model is tiny) and on one thread by default.
Then 2 threads and ``MKL_CBWR=COMPATIBLE`` left the default table unchanged, and scalar kernels
(``ATEN_CPU_CAPABILITY=default``) changed the ew, gradient and hybrid rows by at most 1.5·10⁻⁴
(ink RMSE) and 7·10⁻⁴ (Δm%), below the printed precision; the 'loss' run amplifies round-off
more, and its row moved by one held-out image (class accuracy 0.28 points) and 0.02 in ink RMSE.
"""
from imtl_func.demo._cli import main, parse_args
from imtl_func.demo._data import (
    DTYPE,
    METHODS,
    NUM_TASKS,
    TASKS,
    Data,
    TaskSpec,
    batch_order,
    load_data,
)
from imtl_func.demo._model import Heads, build_model, evaluate, task_losses
from imtl_func.demo._report import delta_m, format_table
from imtl_func.demo._train import History, make_step, train

__all__ = [
    "DTYPE",
    "METHODS",
    "NUM_TASKS",
    "TASKS",
    "Data",
    "Heads",
    "History",
    "TaskSpec",
    "batch_order",
    "build_model",
    "delta_m",
    "evaluate",
    "format_table",
    "load_data",
    "main",
    "make_step",
    "parse_args",
    "task_losses",
    "train",
]
