"""Argument checks that only the figures need (the general ones are in ``lora_np.validate``).

Same order and errors as ``lora_np.validate``: ``check_x(name, value)``, a TypeError for the
wrong kind of value, a ValueError for the right kind out of range, naming what came.
"""

from __future__ import annotations

import numpy as np

from ..experiments import SweepResult
from ..validate import check_float_array

__all__ = ["check_sweep", "check_same_length", "check_positive_1d"]


def check_sweep(name: str, result) -> SweepResult:
    """``result`` if it is a ``SweepResult`` (what every rank-sweep figure draws)."""
    if not isinstance(result, SweepResult):
        raise TypeError(f"{name} must be a SweepResult (from lora_np.experiments), got "
                        f"{type(result).__name__}")
    return result


def check_same_length(**arrays) -> dict:
    """Each keyword as a 1-D float64 array, all of one length, else a ValueError naming every
    shape. NaN and inf are allowed: a run that diverged is a result to show."""
    out = {k: check_float_array(k, v, finite=False).astype(np.float64, copy=False)
           for k, v in arrays.items()}
    shapes = {k: a.shape for k, a in out.items()}
    if any(a.ndim != 1 for a in out.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"expected 1-D sequences of one length, got shapes {shapes}")
    return out


def check_positive_1d(name: str, values) -> np.ndarray:
    """``values`` as a non-empty 1-D float64 array of finite numbers > 0, in the order given
    (steps h, losses: anything drawn on a log axis)."""
    a = check_float_array(name, values, ndim=1).astype(np.float64, copy=False)
    if np.any(a <= 0):
        raise ValueError(f"{name} must be > 0 (drawn on a log axis), got min {a.min()}")
    return a
