"""Bytes: checkpoints, the training state a method holds, and the same measured off live arrays.

The *training state* of a method is what training adds to the frozen model: every trainable
parameter, its gradient, and the optimizer's copies (Adam's m and v). The frozen weights are
the same for full fine-tuning and LoRA; ``total_state_bytes`` adds them for the whole picture.
Activations are not counted here (they depend on batch and sequence length, not on the method's
parameter count; ``python -m lora_np.bench`` measures them).
"""

from __future__ import annotations

import numbers
from typing import Iterable

import numpy as np

from ..validate import check_choice, check_int
from .params import lora_param_count

__all__ = ["checkpoint_bytes", "adapter_checkpoint_bytes", "OPTIMIZER_STATE_COPIES",
           "training_state_bytes", "total_state_bytes",
           "measured_training_state_bytes", "measured_total_state_bytes"]


def _check_count(name: str, value) -> int:
    """A whole number >= 0 as a Python int; a float such as ``175e9`` is allowed, because
    published sizes are rounded floats. (validate.check_int refuses floats on purpose.)"""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not np.isfinite(value) or value < 0 or value != int(value):
        raise ValueError(f"{name} must be a finite whole number >= 0, got {value}")
    return int(value)


def checkpoint_bytes(n_params, bytes_per_param: int = 2) -> int:
    """Bytes needed to store ``n_params`` numbers: ``n_params · bytes_per_param``.

    ``bytes_per_param = 2`` is fp16/bf16, the format of the paper's checkpoints. GPT-3 175B:
    ``175e9 · 2 = 350e9`` bytes = 350 GB, Hu et al. 2021 §4.2.

    What gives the paper's "35MB" adapter (§4.2: r = 4, q and v adapted)? In fp16 it is
    ``18,874,368 · 2 = 37,748,736`` bytes = 37.7 MB (decimal) = 36.0 MiB, so "35MB" is a
    loose rounding of the same setting; the quoted reduction "roughly 10,000x" is
    350e9 / 37.7e6 ≈ 9,272. No GPT-3 setting gives exactly 35 MB: every adapter is a multiple
    of ``96 · 2 · 12288 · 2 = 4,718,592`` bytes per unit of ``r · n_targets``
    (7 units = 33.0 MB, 8 units = 37.7 MB). ``tests/test_counting.py`` checks these numbers.

    Parameters
    ----------
    n_params : int or float
        Number of stored parameters, a whole number >= 0.
    bytes_per_param : int
        2 for fp16/bf16, 4 for fp32, 8 for fp64.
    """
    return _check_count("n_params", n_params) * check_int("bytes_per_param", bytes_per_param,
                                                          minimum=1)


def adapter_checkpoint_bytes(config, targets: Iterable[str], r: int) -> int:
    """Bytes of a saved fp16 LoRA adapter: ``checkpoint_bytes(lora_param_count(config, targets,
    r))``, targets such as ``("q_proj", "v_proj")`` (see ``lora_param_count``).

    Only ``A`` and ``B`` are saved; the frozen base model is shared by every task.
    """
    return checkpoint_bytes(lora_param_count(config, targets, r))


#: copies of each trainable parameter held during training, counting the parameter itself:
#: parameter + gradient (+ Adam's first and second moments m and v)
OPTIMIZER_STATE_COPIES = {"sgd": 2, "adam": 4}


def _itemsize(dtype) -> int:
    """Bytes per number of a floating ``dtype``; float16 is allowed here (the paper's models
    are stored in fp16), unlike validate.check_dtype, which admits what lora_np computes in."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a NumPy floating dtype, got {dtype!r}") from None
    if dt.kind != "f":
        raise TypeError(f"dtype must be a floating dtype (float16/32/64), got {dt}")
    return dt.itemsize


def training_state_bytes(n_trainable, optimizer: str = "adam", dtype=np.float64) -> int:
    """Bytes of the per-trainable-parameter training state.

    .. math:: n_{\\text{trainable}} \\cdot \\text{itemsize} \\cdot c, \\quad
              c = \\underbrace{1}_{\\text{param}} + \\underbrace{1}_{\\text{grad}}
                  + \\begin{cases} 2 & \\text{Adam } (m, v) \\\\ 0 & \\text{SGD} \\end{cases}

    The frozen weights are *not* counted here: both methods need them in memory, identically,
    so they cancel when comparing full fine-tuning with LoRA's trainable state. Use
    ``total_state_bytes`` to include them.

    Parameters
    ----------
    n_trainable : int or float
        Number of trainable parameters (whole, >= 0).
    optimizer : {"adam", "sgd"}
        SGD here is plain SGD without momentum (a momentum buffer would add one copy).
    dtype : NumPy floating dtype
        Storage type of params, grads and moments (float64 is this library's default).
    """
    copies = OPTIMIZER_STATE_COPIES[check_choice("optimizer", optimizer, OPTIMIZER_STATE_COPIES)]
    return checkpoint_bytes(n_trainable, _itemsize(dtype)) * copies


def total_state_bytes(n_trainable, n_frozen, optimizer: str = "adam", dtype=np.float64) -> int:
    """Training state including the frozen weights.

    .. math:: \\text{training\\_state\\_bytes}(n_{trainable}) + n_{frozen} \\cdot \\text{itemsize}

    GPT-3 175B in fp16 with Adam: full fine-tuning ``175e9 · 2 · 4 = 1.4e12`` bytes (1.4 TB);
    LoRA q, v, r = 4 ≈ ``175e9 · 2 + 18.9e6 · 2 · 4 ≈ 350.15e9`` bytes. Hu et al. 2021 §4.2
    report 1.2 TB -> 350 GB of VRAM; this simple model (everything in fp16, no activations,
    no mixed-precision master copies) matches the 350 GB but not the 1.2 TB.
    """
    return (training_state_bytes(n_trainable, optimizer, dtype)
            + checkpoint_bytes(n_frozen, _itemsize(dtype)))


# ---------------------------------------------------------------------------------------------
# measured: the same two quantities, read off a live model and optimizer
# ---------------------------------------------------------------------------------------------

def _nbytes_once(groups) -> int:
    """Total bytes of the arrays in ``groups`` (dicts of name -> array), each array counted once
    however many names point at it (a LoRA layer shares its frozen W with the base layer)."""
    arrays = {}
    for group in groups:
        for a in group.values():
            arrays[id(a)] = a
    return int(sum(a.nbytes for a in arrays.values()))


def measured_training_state_bytes(model, optimizer) -> int:
    """What ``training_state_bytes`` predicts, measured from the arrays themselves::

        Σ_trainable p.nbytes + Σ g.nbytes + optimizer.state_bytes()

    (the parameters that train, their gradients, the optimizer's moments — Adam keeps m and v,
    one array each per trainable parameter). Frozen weights are left out, as in the formula.
    ``model``: anything with ``trainable_parameters()`` and ``gradients()``; ``optimizer``:
    anything with ``state_bytes()``.
    """
    params = model.trainable_parameters()
    grads = model.gradients()
    return _nbytes_once([params, {n: grads[n] for n in params}]) + int(optimizer.state_bytes())


def measured_total_state_bytes(model, optimizer) -> int:
    """What ``total_state_bytes`` predicts, measured: ``measured_training_state_bytes`` plus
    every frozen parameter array (each array counted once)."""
    trainable = model.trainable_parameters()
    frozen = {n: p for n, p in model.parameters().items() if n not in trainable}
    shared = {id(p) for p in trainable.values()}
    frozen = {n: p for n, p in frozen.items() if id(p) not in shared}
    return measured_training_state_bytes(model, optimizer) + _nbytes_once([frozen])
