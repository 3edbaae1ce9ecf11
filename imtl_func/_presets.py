"""The method names of the paper (and of the original IMTL module) as transforms.

This table is the only place that knows method names: everything else receives a
:class:`~imtl_func.Transform` built from a weighting and a scale rule.

=============  ======================  ====================================================
name           weighting               loss scales
=============  ======================  ====================================================
``'loss'``     :func:`equal`           learned (IMTL-L), default :func:`scale_newton`
``'gradient'`` :func:`imtl_g`          none (IMTL-G)
``'hybrid'``   :func:`imtl_g`          learned (IMTL, the paper's Algorithm 1)
``'equal'``    :func:`equal`           none: plain equal weighting, the baseline
=============  ======================  ====================================================
"""

from __future__ import annotations

from collections.abc import Callable

from imtl_func._imtl_g import imtl_g
from imtl_func._scales import ScaleRule, scale_newton
from imtl_func._transform import Transform, transform
from imtl_func._weighting import Weighting, equal

__all__ = ["METHODS", "preset", "resolve"]

#: name -> (weighting factory taking flip_negative or None, learns scales)
_TABLE: dict[str, tuple[Callable[[bool], Weighting] | None, bool]] = {
    "loss": (None, True),
    "gradient": (lambda flip: imtl_g(flip_negative=flip), False),
    "hybrid": (lambda flip: imtl_g(flip_negative=flip), True),
    "equal": (None, False),
}
METHODS = tuple(_TABLE)


def preset(method: str = "hybrid", *, scale_rule: ScaleRule | None = None,
           flip_negative: bool = False) -> Transform:
    """The transform of a named method.

    Args:
        method: ``'hybrid'`` (IMTL, the paper's Algorithm 1), ``'gradient'`` (IMTL-G),
            ``'loss'`` (IMTL-L) or ``'equal'`` (equal weighting, the baseline).
        scale_rule: how the loss scales move for ``'loss'`` and ``'hybrid'``; default
            :func:`imtl_func.scale_newton`. The other methods have no scales.
        flip_negative: IMTL-G's opt-in (see :func:`imtl_func.imtl_g`), for ``'gradient'`` and
            ``'hybrid'``.

    Returns:
        ``transform(weighting, scale_rule)`` for that method.
    """
    if not isinstance(method, str) or method not in _TABLE:
        raise ValueError(f"method must be one of {METHODS!r} or a Transform "
                         f"(imtl_func.transform(weighting, scale_rule)), got {method!r}")
    make_weighting, learns = _TABLE[method]
    if scale_rule is not None and not learns:
        raise ValueError(f"method={method!r} has no loss scales: scale_rule must be None")
    if flip_negative and make_weighting is None:
        raise ValueError(f"flip_negative applies to IMTL-G ('gradient', 'hybrid'), not "
                         f"method={method!r}")
    weighting = equal() if make_weighting is None else make_weighting(bool(flip_negative))
    rule = (scale_rule if scale_rule is not None else scale_newton()) if learns else None
    return transform(weighting, rule)


def resolve(method: str | Transform, scale_rule: ScaleRule | None = None,
            flip_negative: bool = False) -> Transform:
    """A step's ``method`` argument as a transform: a preset name or a :class:`Transform`."""
    if isinstance(method, Transform):
        if scale_rule is not None or flip_negative:
            raise ValueError("pass scale_rule and flip_negative to imtl_func.preset() or build "
                             "the Transform with them, not next to a Transform")
        return method
    return preset(method, scale_rule=scale_rule, flip_negative=flip_negative)
