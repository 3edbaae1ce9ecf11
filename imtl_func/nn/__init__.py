"""``imtl_func.nn``: IMTL as a module for ordinary PyTorch loops.

:class:`IMTL` keeps the usage of the original IMTL module (``IMTL(method=..., num_losses=...,
init_loss=...)``, ``imtl(z, losses)``, ``imtl.backward(shared_parameters=..., losses=...)``) on
top of the functional core's pipeline and gate.
"""

from imtl_func.nn._module import IMTL, IMTLOutput

__all__ = ["IMTL", "IMTLOutput"]
