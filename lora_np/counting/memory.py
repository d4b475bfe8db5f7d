"""Bytes: checkpoints, the training state a method holds, and the same measured off live arrays.

The *training state* of a method is what training adds to the frozen model: every trainable
parameter, its gradient, and the optimizer's copies (Adam's m and v). The frozen weights are
the same for full fine-tuning and LoRA; ``total_state_bytes`` adds them for the whole picture.
Activations, which depend on batch and sequence length rather than on the method's parameter
count, have their own model below (``activation_parts``, ``korthikanti_activation_bytes``,
after Korthikanti et al. 2022) and their own measurement (``measured_activation_bytes``);
``training_memory`` adds every term: weights, gradients, optimizer moments, master copies and
activations, under a stated precision recipe (``PRECISION_RECIPES``).

Sources: Hu et al. 2021, arXiv 2106.09685, §4.2 (GPT-3 175B, 1.2 TB -> 350 GB of VRAM);
Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
arXiv 2205.05198, §4.1 (activation bytes per layer); Rajbhandari et al. 2020, "ZeRO", arXiv
1910.02054, §3.1 (16 bytes per parameter for mixed-precision Adam); Micikevicius et al. 2018,
"Mixed Precision Training", arXiv 1710.03740 (fp16 weights and gradients, fp32 master copy).
"""

from __future__ import annotations

import numbers
from typing import Iterable, NamedTuple

import numpy as np

from ..validate import check_bool, check_choice, check_int
from .params import lora_param_count

__all__ = ["checkpoint_bytes", "adapter_checkpoint_bytes", "OPTIMIZER_STATE_COPIES",
           "training_state_bytes", "total_state_bytes",
           "measured_training_state_bytes", "measured_total_state_bytes",
           "BytesPerParam", "PRECISION_RECIPES", "TrainingMemory", "training_memory",
           "ActivationPart", "activation_parts", "activation_bytes", "RECOMPUTE",
           "korthikanti_activation_bytes", "measured_activation_bytes"]


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


# ---------------------------------------------------------------------------------------------
# the whole of training memory: weights, gradients, optimizer, master copies, activations
# ---------------------------------------------------------------------------------------------

class BytesPerParam(NamedTuple):
    """Bytes a precision recipe holds per parameter.

    ``weights`` for *every* parameter (frozen or trainable: the forward reads them all);
    ``gradients``, ``optimizer`` (all of Adam's moments together) and ``master`` (an fp32 copy
    the optimizer updates) for each *trainable* parameter only.
    """
    weights: int
    gradients: int
    optimizer: int
    master: int


#: what each recipe keeps, per parameter (see ``BytesPerParam``):
#:
#: * ``"fp16-adam"`` — everything in 16 bits: weights, gradients and Adam's m and v (2 + 2 + 4);
#:   the simple model ``total_state_bytes`` uses (8 bytes per trainable parameter);
#: * ``"mixed-adam"`` — mixed precision (Micikevicius et al. 2018): fp16 weights and gradients,
#:   an fp32 master copy and fp32 m, v (2 + 2 + 4 + 8 = 16 bytes, ZeRO's "16Ψ", Rajbhandari et
#:   al. 2020 §3.1);
#: * ``"fp32-adam"`` — everything in 32 bits (4 + 4 + 8 = 16 bytes), lora_np's float32 runs.
PRECISION_RECIPES: dict[str, BytesPerParam] = {
    "fp16-adam": BytesPerParam(weights=2, gradients=2, optimizer=4, master=0),
    "mixed-adam": BytesPerParam(weights=2, gradients=2, optimizer=8, master=4),
    "fp32-adam": BytesPerParam(weights=4, gradients=4, optimizer=8, master=0),
}


class TrainingMemory(NamedTuple):
    """Bytes of one training run's memory, by term (``training_memory``)."""
    weights: int        # every parameter the forward reads: frozen + trainable
    gradients: int      # one per trainable parameter
    optimizer: int      # Adam's m and v, per trainable parameter
    master: int         # fp32 master copies of the trainable parameters (mixed precision)
    activations: int    # what the forward keeps for the backward (given, see activation_bytes)

    @property
    def state(self) -> int:
        """Everything but the activations: what depends on the parameter counts."""
        return self.weights + self.gradients + self.optimizer + self.master

    @property
    def total(self) -> int:
        return self.state + self.activations


def training_memory(n_frozen, n_trainable, recipe: str = "fp16-adam",
                    activation_bytes: int = 0) -> TrainingMemory:
    """Every term of training memory, under the precision ``recipe`` (``PRECISION_RECIPES``).

    .. math::
        \\text{weights} = (n_{frozen} + n_{trainable})\\,b_w, \\quad
        \\text{gradients} = n_{trainable}\\,b_g, \\quad
        \\text{optimizer} = n_{trainable}\\,b_o, \\quad
        \\text{master} = n_{trainable}\\,b_m

    plus ``activation_bytes`` as given (they depend on batch, sequence length and what is
    recomputed, not on which parameters train: ``korthikanti_activation_bytes``).

    Full fine-tuning: ``n_frozen = 0``, ``n_trainable = N``. LoRA: ``n_frozen = N``, ``n_trainable``
    = the adapter (``lora_param_count``). GPT-3 175B, ``"fp16-adam"``, no activations: full
    fine-tuning ``175e9 · (2 + 2 + 4) = 1.4e12`` bytes; LoRA (q, v, r = 4) ``≈ 350.15e9``. The
    ratio is at most ``(b_w + b_g + b_o + b_m) / b_w`` (4 here, 8 with mixed precision) however
    small the adapter, because the frozen weights stay in memory.
    """
    n_frozen = _check_count("n_frozen", n_frozen)
    n_trainable = _check_count("n_trainable", n_trainable)
    b = PRECISION_RECIPES[check_choice("recipe", recipe, PRECISION_RECIPES)]
    activation_bytes = _check_count("activation_bytes", activation_bytes)
    return TrainingMemory(weights=(n_frozen + n_trainable) * b.weights,
                          gradients=n_trainable * b.gradients, optimizer=n_trainable * b.optimizer,
                          master=n_trainable * b.master, activations=activation_bytes)


class ActivationPart(NamedTuple):
    """One tensor a Transformer layer's forward keeps for its backward (Korthikanti et al. 2022
    §4.1). ``values`` numbers, stored at the activation precision — or, for a dropout mask
    (``is_mask``), one byte each."""
    block: str          # "attention", "mlp" or "layernorm"
    name: str
    values: int
    is_mask: bool = False


def activation_parts(seq_len: int, batch: int, d_model: int, n_heads: int,
                     dropout: bool = True) -> tuple[ActivationPart, ...]:
    """The tensors one Transformer layer keeps for backward, with s = ``seq_len``, b = ``batch``,
    h = ``d_model``, a = ``n_heads`` (Korthikanti et al. 2022, arXiv 2205.05198, §4.1):

    =========  ======================================  ===========
    block      tensor                                   numbers
    =========  ======================================  ===========
    attention  input of the Q, K, V projections         s b h
               Q and K (for the scores' backward)       2 s b h
               softmax output                           a s² b
               softmax dropout mask                     a s² b (bytes)
               dropout output (multiplies V)            a s² b
               V                                        s b h
               input of the output projection           s b h
               attention dropout mask                   s b h (bytes)
    mlp        input of the first linear                s b h
               GELU input                               4 s b h
               input of the second linear               4 s b h
               MLP dropout mask                         s b h (bytes)
    layernorm  inputs of the two LayerNorms             2 s b h
    =========  ======================================  ===========

    In 16 bits that is ``s b h (34 + 5 a s / h)`` bytes (``korthikanti_activation_bytes``).
    Assumptions, the paper's: no tensor or sequence parallelism, no recomputation, a 4h MLP,
    dropout after the softmax and after each of the two blocks, masks of one byte per entry.
    ``dropout=False`` drops the masks and the dropout output (the softmax output multiplies V
    itself): ``16 s b h + a s² b`` numbers, what a layer without dropout (lora_np's) must keep.
    """
    s, b, h, a = (check_int(n, v, minimum=1) for n, v in
                  (("seq_len", seq_len), ("batch", batch), ("d_model", d_model), ("n_heads", n_heads)))
    dropout = check_bool("dropout", dropout)
    sbh, ass = s * b * h, a * s * s * b
    parts = [ActivationPart("attention", "Q, K, V input", sbh),
             ActivationPart("attention", "Q and K", 2 * sbh),
             ActivationPart("attention", "softmax output", ass)]
    if dropout:
        parts += [ActivationPart("attention", "softmax dropout mask", ass, True),
                  ActivationPart("attention", "dropout output", ass)]
    parts += [ActivationPart("attention", "V", sbh),
              ActivationPart("attention", "output projection input", sbh)]
    if dropout:
        parts.append(ActivationPart("attention", "attention dropout mask", sbh, True))
    parts += [ActivationPart("mlp", "first linear input", sbh),
              ActivationPart("mlp", "GELU input", 4 * sbh),
              ActivationPart("mlp", "second linear input", 4 * sbh)]
    if dropout:
        parts.append(ActivationPart("mlp", "MLP dropout mask", sbh, True))
    parts.append(ActivationPart("layernorm", "LayerNorm inputs", 2 * sbh))
    return tuple(parts)


def activation_bytes(parts: Iterable[ActivationPart], bytes_per_value: int = 2) -> int:
    """Bytes of ``parts``: ``values · bytes_per_value`` for a tensor, ``values`` for a mask."""
    bpv = check_int("bytes_per_value", bytes_per_value, minimum=1)
    total = 0
    for p in parts:
        if not isinstance(p, ActivationPart):
            raise TypeError(f"parts must hold ActivationPart, got {type(p).__name__}")
        total += p.values * (1 if p.is_mask else bpv)
    return total


#: what the backward recomputes instead of storing (Korthikanti et al. 2022, Table 2):
#: "none" keeps every part; "selective" recomputes the attention core (the a·s² terms);
#: "full" keeps only each layer's input and recomputes the layer
RECOMPUTE = ("none", "selective", "full")


def korthikanti_activation_bytes(seq_len: int, batch: int, d_model: int, n_heads: int,
                                 n_layers: int = 1, recompute: str = "none") -> int:
    """Activation bytes of ``n_layers`` Transformer layers in 16 bits (Korthikanti et al. 2022,
    arXiv 2205.05198, eq. 1 and Table 2), s = ``seq_len``, b = ``batch``, h = ``d_model``,
    a = ``n_heads``, per layer:

    .. math::
        \\text{none: } s b h \\left(34 + 5 \\frac{a s}{h}\\right), \\qquad
        \\text{selective: } 34\\, s b h, \\qquad \\text{full: } 2\\, s b h

    The "none" row is the sum of ``activation_parts`` (with dropout) at 2 bytes a number.
    Embeddings, the final LayerNorm and the output layer are left out, as in the paper's
    per-layer formula. GPT-3 175B (s = 2048, h = 12288, a = 96), one sequence:
    2048 · 12288 · (34 + 80) = 2.87e9 bytes per layer, 275e9 bytes for 96 layers.
    """
    s, b, h, a = (check_int(n, v, minimum=1) for n, v in
                  (("seq_len", seq_len), ("batch", batch), ("d_model", d_model), ("n_heads", n_heads)))
    n_layers = check_int("n_layers", n_layers, minimum=1)
    recompute = check_choice("recompute", recompute, RECOMPUTE)
    sbh = s * b * h
    per_layer = {"none": 34 * sbh + 5 * a * s * s * b, "selective": 34 * sbh, "full": 2 * sbh}[recompute]
    return n_layers * per_layer


def _owner(a: np.ndarray):
    """(key, bytes) of the memory ``a`` keeps alive: the array that owns its buffer (a view's
    base, followed to the end) and that array's size. A view whose chain ends in an array that
    does not own its data (``np.lib.stride_tricks.sliding_window_view``, whose ``nbytes`` counts
    every overlapping window as if it were a copy) counts as itself, once."""
    root = a
    while isinstance(root.base, np.ndarray):
        root = root.base
    if root.flags.owndata:
        return id(root), root.nbytes
    return id(a), a.nbytes


def _arrays_in(obj):
    """Every ndarray inside a cache: NamedTuples, tuples, lists and dicts, walked recursively."""
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _arrays_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _arrays_in(item)


def measured_activation_bytes(model) -> dict[str, int]:
    """What a training-mode forward left for the backward, measured: module path -> bytes of the
    arrays its pending cache holds (lora_np/README.md, "the forward/backward contract").

    Each buffer counts once (a view counts as the array that owns its memory, attributed to the
    first module, in ``named_modules`` order, whose cache holds it), and the model's parameters
    are left out (a cache refers to W to compute dX = G W; W is not an activation). Modules
    with nothing pending are left out. ``model``: anything with ``named_modules()`` and
    ``parameters()`` whose modules keep their pending cache in ``_cache`` (lora_np's ``Module``).
    Call it after ``model(x)`` in training mode and before ``backward``.
    """
    if not hasattr(model, "named_modules") or not hasattr(model, "parameters"):
        raise TypeError(f"model must have named_modules() and parameters(), got {type(model).__name__}")
    seen = {_owner(p)[0] for p in model.parameters().values()}
    out = {}
    for path, m in model.named_modules():
        cache = vars(m).get("_cache")
        if cache is None:
            continue
        total = 0
        for a in _arrays_in(cache):
            key, nbytes = _owner(a)
            if key in seen:
                continue
            seen.add(key)
            total += nbytes
        if total:
            out[path] = total
    return out
