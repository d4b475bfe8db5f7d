"""Argument checks, one function per kind of check, used by every module of lora_np.

Every check has the same argument order, ``check_x(name, value, ...)``: ``name`` is what the
error message calls the argument (``"r"``, ``"lr_multipliers['B']"``), ``value`` is what came.
Each returns the value in its canonical form (a Python int, a float, a NumPy dtype, an array)
or raises

* ``TypeError``  when the value is of the wrong kind (a float where an int belongs, a string
  where a number belongs), and
* ``ValueError`` when it is of the right kind but out of range,

with a message that names the argument, what was expected and what came. The checks never
modify their input. A leaf module: NumPy only.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["check_int", "check_number", "check_bool", "check_choice", "check_dtype",
           "check_probability", "check_float_array", "check_descending_positive"]


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as a Python int with ``minimum <= value <= maximum`` (either bound optional).
    A bool is not an int here (``r=True`` is a mistake, not rank 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {name}={value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {name}={value}")
    return value


def check_number(name: str, value, *, positive: bool = False, nonnegative: bool = False) -> float:
    """``value`` as a finite Python float; ``positive=True`` also requires > 0,
    ``nonnegative=True`` >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if positive and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {name}={value}")
    if nonnegative and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {name}={value}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {name}={value}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` as a Python bool; only True/False (or NumPy's bools) are accepted."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_choice(name: str, value, choices):
    """``value`` if it is one of ``choices``, else a ValueError listing them."""
    choices = tuple(choices)
    try:
        ok = value in choices
    except TypeError:                       # an unhashable value in a set/dict of choices
        ok = False
    if not ok:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_dtype(name: str, dtype) -> np.dtype:
    """``dtype`` as a NumPy dtype, float32 or float64 (the two lora_np computes in)."""
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from e
    if dt not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    return dt


def check_probability(name: str, value) -> float:
    """``value`` as a float in [0, 1) — a dropout probability (1 would drop everything)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
    return float(value)


def check_float_array(name: str, value, ndim: int | None = None, finite: bool = True) -> np.ndarray:
    """``value`` as a non-empty float32/float64 array (integers are promoted to float64), with
    ``ndim`` dimensions if given and only finite entries if ``finite``. Never a modified copy."""
    arr = np.asarray(value)
    if arr.dtype.kind in "iub":
        arr = arr.astype(np.float64)
    elif arr.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be a real float32/float64 array, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must be a non-empty array, got shape {arr.shape}")
    if finite and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got NaN or inf")
    return arr


def check_descending_positive(name: str, values, n: int | None = None) -> np.ndarray:
    """``values`` as a 1-D float64 array of finite numbers > 0, sorted descending (a spectrum
    σ₁ ≥ σ₂ ≥ …), of length ``n`` if given. Returns a new array."""
    s = np.asarray(values, dtype=np.float64)
    if s.ndim != 1 or s.size == 0 or (n is not None and s.size != n):
        want = f"{n} numbers" if n is not None else "a non-empty 1-D sequence of numbers"
        raise ValueError(f"{name} must be {want}, got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        shown = s.tolist() if s.size <= 8 else f"min {s.min()}"
        raise ValueError(f"{name} must be finite and > 0, got {shown}")
    return np.sort(s)[::-1].copy()
