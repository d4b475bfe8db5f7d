"""Parameter and memory accounting for LoRA: the arithmetic behind "10,000x fewer parameters".

A leaf module: it imports only NumPy and the standard library, never other ``lora_np`` files.
Models are handled by duck typing (``parameters()`` / ``trainable_parameters()`` returning
dicts of dotted name -> ndarray), so any object with that API can be counted.

Notation (DESIGN.md): ``W`` is (d_out, d_in); ``A`` is (r, d_in); ``B`` is (d_out, r);
``ΔW = scale · B @ A`` is (d_out, d_in).

Sources for the numbers in this file
------------------------------------
* Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685
  (Tables 2-5 and §4.2).
* Brown et al. 2020, "Language Models are Few-Shot Learners", arXiv:2005.14165, Table 2.1.
* Liu et al. 2019, "RoBERTa", arXiv:1907.11692 (architecture = BERT-base/large, Devlin et al. 2019).
* Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2), Table 2.
* Touvron et al. 2023, "Llama 2", arXiv:2307.09288 (7B: d_model 4096, 32 layers, 32 heads,
  SwiGLU MLP of width 11008, vocabulary 32000).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Iterable, NamedTuple

import numpy as np

__all__ = [
    "lora_params", "full_params",
    "ParamCount", "ParamRow", "count_parameters", "parameter_table", "format_parameter_table",
    "ModelConfig", "MODEL_CONFIGS", "ATTENTION_TARGETS", "MLP_TARGETS", "target_shape",
    "lora_param_count", "PaperNumber", "PAPER_REPORTED", "PaperRow", "paper_comparison",
    "checkpoint_bytes", "adapter_checkpoint_bytes",
    "OPTIMIZER_STATE_COPIES", "training_state_bytes", "state_ratio", "total_state_bytes",
    "measured_training_state_bytes", "measured_total_state_bytes",
]


# ---------------------------------------------------------------------------------------------
# input checks (shared)
# ---------------------------------------------------------------------------------------------

def _check_int(value, name: str, minimum: int = 0) -> int:
    """Return ``value`` as a Python int, or raise TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# one matrix
# ---------------------------------------------------------------------------------------------

def lora_params(d_in: int, d_out: int, r: int) -> int:
    """Number of trainable parameters LoRA adds to one (d_out, d_in) weight matrix.

    .. math:: |A| + |B| = r \\cdot d_{in} + d_{out} \\cdot r = r (d_{in} + d_{out})

    with ``A`` of shape (r, d_in) and ``B`` of shape (d_out, r). Compare ``full_params``:
    ``d_in · d_out``. For a square d×d matrix the ratio is ``2r / d``.

    Parameters
    ----------
    d_in, d_out : int
        Input and output width of the adapted matrix, both >= 1.
    r : int
        LoRA rank, ``1 <= r <= min(d_in, d_out)`` (a larger r cannot raise the rank of
        ``B @ A`` and would cost more than the full matrix's worth of directions).

    Returns
    -------
    int
    """
    d_in = _check_int(d_in, "d_in", 1)
    d_out = _check_int(d_out, "d_out", 1)
    r = _check_int(r, "r", 1)
    if r > min(d_in, d_out):
        raise ValueError(f"r must be <= min(d_in, d_out) = {min(d_in, d_out)}, got r={r}")
    return r * (d_in + d_out)


def full_params(d_in: int, d_out: int, bias: bool = False) -> int:
    """Number of parameters of a dense (d_out, d_in) weight, plus ``d_out`` if ``bias``.

    .. math:: |W| + |b| = d_{out} d_{in} + [\\text{bias}]\\, d_{out}

    Parameters
    ----------
    d_in, d_out : int
        Both >= 1.
    bias : bool
        Count the bias vector ``b`` of shape (d_out,).

    Returns
    -------
    int
    """
    d_in = _check_int(d_in, "d_in", 1)
    d_out = _check_int(d_out, "d_out", 1)
    if not isinstance(bias, (bool, np.bool_)):
        raise TypeError(f"bias must be a bool, got {type(bias).__name__} {bias!r}")
    return d_in * d_out + (d_out if bias else 0)


# ---------------------------------------------------------------------------------------------
# a model (duck typed)
# ---------------------------------------------------------------------------------------------

class ParamCount(NamedTuple):
    """Scalar counts of a model's parameters; ``total = trainable + frozen``."""
    trainable: int
    frozen: int
    total: int


class ParamRow(NamedTuple):
    """One row of ``parameter_table``: a layer (dotted prefix) and its element counts."""
    layer: str
    trainable: int
    frozen: int


def _param_dicts(model) -> tuple[dict, dict]:
    """Fetch and check ``model.parameters()`` and ``model.trainable_parameters()``."""
    for method in ("parameters", "trainable_parameters"):
        if not callable(getattr(model, method, None)):
            raise TypeError(f"model must have a {method}() method returning a dict of dotted "
                            f"name -> ndarray, got {type(model).__name__} without it")
    params, trainable = model.parameters(), model.trainable_parameters()
    for label, d in (("parameters()", params), ("trainable_parameters()", trainable)):
        if not isinstance(d, dict):
            raise TypeError(f"model.{label} must return a dict, got {type(d).__name__}")
        for name, value in d.items():
            if not isinstance(name, str) or not isinstance(value, np.ndarray):
                raise TypeError(f"model.{label} must map str -> np.ndarray, got "
                                f"{type(name).__name__} -> {type(value).__name__} for {name!r}")
    extra = sorted(set(trainable) - set(params))
    if extra:
        raise ValueError(f"trainable_parameters() must be a subset of parameters(); "
                         f"these names are only in the former: {extra}")
    return params, trainable


def count_parameters(model) -> ParamCount:
    """Count trainable, frozen and total scalar parameters of a model.

    .. math:: \\text{trainable} = \\sum_{p \\in T} |p|, \\quad
              \\text{frozen} = \\sum_{p \\in P \\setminus T} |p|

    where ``P = model.parameters()`` and ``T = model.trainable_parameters()`` (dicts of dotted
    name -> ndarray, ``T ⊆ P``) and ``|p|`` is the number of elements of array ``p``.

    Parameters
    ----------
    model : object
        Anything with ``parameters()`` and ``trainable_parameters()`` as above.

    Returns
    -------
    ParamCount
        ``(trainable, frozen, total)`` as Python ints.
    """
    params, trainable = _param_dicts(model)
    n_train = sum(int(p.size) for name, p in params.items() if name in trainable)
    n_frozen = sum(int(p.size) for name, p in params.items() if name not in trainable)
    return ParamCount(n_train, n_frozen, n_train + n_frozen)


def parameter_table(model) -> list[ParamRow]:
    """Per-layer parameter counts: one ``ParamRow(layer, trainable, frozen)`` per layer.

    A parameter ``"blocks.0.attn.q_proj.A"`` belongs to layer ``"blocks.0.attn.q_proj"`` (its
    dotted name without the last component); a name without a dot belongs to layer ``""``
    (the model itself). Rows come in the order layers first appear in ``model.parameters()``.

    Parameters
    ----------
    model : object
        Anything with ``parameters()`` and ``trainable_parameters()`` (see ``count_parameters``).

    Returns
    -------
    list of ParamRow
        The column sums equal ``count_parameters(model)``.
    """
    params, trainable = _param_dicts(model)
    rows: dict[str, list[int]] = {}
    for name, p in params.items():
        layer = name.rsplit(".", 1)[0] if "." in name else ""
        counts = rows.setdefault(layer, [0, 0])
        counts[0 if name in trainable else 1] += int(p.size)
    return [ParamRow(layer, t, f) for layer, (t, f) in rows.items()]


def format_parameter_table(rows: Iterable) -> str:
    """Render ``parameter_table`` rows as an aligned plain-text table with a total line.

    Columns: layer (left-aligned; ``""`` shown as ``(model)``), trainable and frozen
    (right-aligned, thousands separators). The last line gives the totals and the trainable
    fraction ``trainable / (trainable + frozen)`` in percent.

    Parameters
    ----------
    rows : iterable of (layer: str, trainable: int, frozen: int)
        Usually the output of ``parameter_table``.

    Returns
    -------
    str
        Lines joined by ``"\\n"``, no trailing newline.
    """
    checked = []
    for i, row in enumerate(rows):
        if not isinstance(row, tuple) or len(row) != 3 or not isinstance(row[0], str):
            raise TypeError(f"row {i} must be a (layer: str, trainable: int, frozen: int) "
                            f"tuple, got {row!r}")
        checked.append((row[0] or "(model)", _check_int(row[1], f"row {i} trainable"),
                        _check_int(row[2], f"row {i} frozen")))
    n_train = sum(r[1] for r in checked)
    n_frozen = sum(r[2] for r in checked)
    pct = 100.0 * n_train / (n_train + n_frozen) if n_train + n_frozen else 0.0
    body = [(layer, f"{t:,}", f"{f:,}") for layer, t, f in checked]
    total = ("total", f"{n_train:,}", f"{n_frozen:,}")
    header = ("layer", "trainable", "frozen")
    w = [max(len(r[c]) for r in [header, total, *body]) for c in range(3)]

    def line(r):
        return f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}"

    rule = "-" * (w[0] + w[1] + w[2] + 4)
    return "\n".join([line(header), rule, *map(line, body), rule,
                      line(total) + f"  ({pct:.2f}% trainable)"])


# ---------------------------------------------------------------------------------------------
# real model configurations
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelConfig:
    """Shape of a published Transformer, enough to count LoRA parameters.

    Attributes
    ----------
    name : str
    d_model : int
        Residual width; every attention projection W_q, W_k, W_v, W_o is (d_model, d_model).
    n_layers, n_heads : int
    d_ff : int
        MLP hidden width: "up" is (d_ff, d_model), "down" is (d_model, d_ff).
    vocab_size : int
    n_params : float
        Total parameter count as the source reports it (a rounded, published number).
    gated_mlp : bool
        True for SwiGLU MLPs (LLaMA) which have a third matrix "gate" of shape (d_ff, d_model).
    """
    name: str
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    vocab_size: int
    n_params: float
    gated_mlp: bool = False


MODEL_CONFIGS: dict[str, ModelConfig] = {c.name: c for c in [
    # Brown et al. 2020, Table 2.1 ("GPT-3 175B": n_layers 96, d_model 12288, n_heads 96,
    # d_ff = 4 d_model); vocabulary = GPT-2's BPE, 50257. Used by Hu et al. 2021 Tables 4-7.
    ModelConfig("gpt3-175b", 12288, 96, 96, 49152, 50257, 175e9),
    # Liu et al. 2019 (RoBERTa reuses BERT-base/large shapes; vocab 50265 BPE; 125M / 355M).
    # Used by Hu et al. 2021 Table 2.
    ModelConfig("roberta-base", 768, 12, 12, 3072, 50265, 125e6),
    ModelConfig("roberta-large", 1024, 24, 16, 4096, 50265, 355e6),
    # Radford et al. 2019, Table 2 (GPT-2 medium / large; the paper lists 345M / 762M, the
    # released checkpoints hold 355M / 774M, which we use). Used by Hu et al. 2021 Table 3.
    ModelConfig("gpt2-medium", 1024, 24, 16, 4096, 50257, 355e6),
    ModelConfig("gpt2-large", 1280, 36, 20, 5120, 50257, 774e6),
    # Touvron et al. 2023 (Llama 2 7B; SwiGLU MLP width 11008; "7B" nominal).
    ModelConfig("llama2-7b", 4096, 32, 32, 11008, 32000, 7e9, gated_mlp=True),
]}

ATTENTION_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("up", "down", "gate")


def _get_config(config) -> ModelConfig:
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, str):
        if config not in MODEL_CONFIGS:
            raise ValueError(f"unknown model config {config!r}; valid names: "
                             f"{sorted(MODEL_CONFIGS)}")
        return MODEL_CONFIGS[config]
    raise TypeError(f"config must be a ModelConfig or one of {sorted(MODEL_CONFIGS)}, "
                    f"got {type(config).__name__}")


def target_shape(config, target: str) -> tuple[int, int]:
    """The (d_out, d_in) shape of one adaptable matrix of a Transformer block.

    ``"q" "k" "v" "o"`` -> (d_model, d_model); ``"up"`` and ``"gate"`` -> (d_ff, d_model);
    ``"down"`` -> (d_model, d_ff). ``"gate"`` exists only when ``config.gated_mlp``.

    Parameters
    ----------
    config : ModelConfig or str
    target : str

    Returns
    -------
    (d_out, d_in) : tuple of int
    """
    cfg = _get_config(config)
    valid = ATTENTION_TARGETS + (MLP_TARGETS if cfg.gated_mlp else MLP_TARGETS[:2])
    if target not in valid:
        raise ValueError(f"unknown target {target!r} for {cfg.name}; valid targets: {valid}")
    d, f = cfg.d_model, cfg.d_ff
    return {"up": (f, d), "gate": (f, d), "down": (d, f)}.get(target, (d, d))


def _check_targets(targets) -> tuple[str, ...]:
    if isinstance(targets, str):
        raise TypeError(f"targets must be an iterable of names such as ('q', 'v'), "
                        f"got the string {targets!r}")
    try:
        names = tuple(targets)
    except TypeError:
        raise TypeError(f"targets must be an iterable of str, got {type(targets).__name__}")
    if not names:
        raise ValueError("targets must name at least one matrix, got an empty iterable")
    if len(set(names)) != len(names):
        raise ValueError(f"targets must not repeat a name, got {names}")
    return names


def lora_param_count(config, targets: Iterable[str], r: int) -> int:
    """Trainable LoRA parameters when ``targets`` of every block of a real model are adapted.

    .. math:: n_{\\text{layers}} \\sum_{t \\in \\text{targets}} r\\,(d_{in}^{(t)} + d_{out}^{(t)})

    e.g. GPT-3 175B, targets q and v, r = 1: ``96 · 2 · 1 · (12288 + 12288) = 4,718,592``, the
    "4.7M" of Hu et al. 2021, Table 4. Only the adapted matrices count: embeddings, layer
    norms and biases stay frozen, as in the paper.

    Parameters
    ----------
    config : ModelConfig or str
        A ``ModelConfig`` or a key of ``MODEL_CONFIGS``.
    targets : iterable of str
        Distinct names from ``ATTENTION_TARGETS`` ("q", "k", "v", "o") and ``MLP_TARGETS``
        ("up", "down", and "gate" for gated MLPs); see ``target_shape``.
    r : int
        Rank, the same for every target.

    Returns
    -------
    int
    """
    cfg = _get_config(config)
    names = _check_targets(targets)
    per_block = 0
    for t in names:
        d_out, d_in = target_shape(cfg, t)
        per_block += lora_params(d_in, d_out, r)
    return cfg.n_layers * per_block


class PaperNumber(NamedTuple):
    """A trainable-parameter count as printed in a paper, with where it is printed."""
    value: float
    citation: str


# (config, targets, r) -> what Hu et al. 2021 (arXiv:2106.09685) print. The settings
# (targets, r) are the paper's own (§4.2, Table 5, Appendix D).
PAPER_REPORTED: dict[tuple[str, tuple[str, ...], int], PaperNumber] = {
    ("roberta-base", ("q", "v"), 8): PaperNumber(0.3e6, "Hu et al. 2021, Table 2 (0.3M)"),
    ("roberta-large", ("q", "v"), 8): PaperNumber(0.8e6, "Hu et al. 2021, Table 2 (0.8M)"),
    ("gpt2-medium", ("q", "v"), 4): PaperNumber(0.35e6, "Hu et al. 2021, Table 3 (0.35M)"),
    ("gpt2-large", ("q", "v"), 4): PaperNumber(0.77e6, "Hu et al. 2021, Table 3 (0.77M)"),
    ("gpt3-175b", ("q", "v"), 1): PaperNumber(4.7e6, "Hu et al. 2021, Table 4 (4.7M)"),
    ("gpt3-175b", ("q", "v"), 8): PaperNumber(37.7e6, "Hu et al. 2021, Table 4 (37.7M)"),
    ("gpt3-175b", ("q",), 8): PaperNumber(18e6, "Hu et al. 2021, Table 5 (budget 18M)"),
    ("gpt3-175b", ("q", "k"), 4): PaperNumber(18e6, "Hu et al. 2021, Table 5 (budget 18M)"),
    ("gpt3-175b", ("q", "v"), 4): PaperNumber(18e6, "Hu et al. 2021, Table 5 (budget 18M)"),
    ("gpt3-175b", ("q", "k", "v", "o"), 2): PaperNumber(18e6,
                                                        "Hu et al. 2021, Table 5 (budget 18M)"),
}


class PaperRow(NamedTuple):
    """``formula`` = ``lora_param_count``; ``ratio = formula / paper``."""
    config: str
    targets: tuple[str, ...]
    r: int
    formula: int
    paper: float
    ratio: float
    citation: str


def paper_comparison() -> list[PaperRow]:
    """Our formula next to every number in ``PAPER_REPORTED``; nothing is adjusted.

    ``ratio = formula / paper``. The paper rounds (18.87M is printed as "18M", a budget), and
    one pair does not match its rounding: GPT-2 with q, v at r = 4 gives 393,216 (medium) and
    737,280 (large), printed in Table 3 as 0.35M and 0.77M (ratios ≈ 1.12 and ≈ 0.96).
    No integer ``r · n_targets`` makes ``n_layers · r · n_targets · 2 · d_model`` round to
    0.35M or 0.77M (medium: unit 49,152, so 7 units = 0.344M and 8 = 0.393M; large: unit
    92,160, so 8 units = 0.737M and 9 = 0.829M). The printed numbers come from something
    other than this formula; we show the gap instead of hiding it.

    Returns
    -------
    list of PaperRow
        One row per entry of ``PAPER_REPORTED``, in its order.
    """
    rows = []
    for (name, targets, r), reported in PAPER_REPORTED.items():
        n = lora_param_count(name, targets, r)
        rows.append(PaperRow(name, targets, r, n, reported.value, n / reported.value,
                             reported.citation))
    return rows


# ---------------------------------------------------------------------------------------------
# bytes: checkpoints and training state
# ---------------------------------------------------------------------------------------------

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
        Number of stored parameters, >= 0 (a float such as ``175e9`` is allowed because
        published sizes are rounded; it must be a whole number).
    bytes_per_param : int
        2 for fp16/bf16, 4 for fp32, 8 for fp64.

    Returns
    -------
    int
    """
    if isinstance(n_params, bool) or not isinstance(n_params, numbers.Real):
        raise TypeError(f"n_params must be a number, got {type(n_params).__name__}")
    if not np.isfinite(n_params) or n_params < 0 or n_params != int(n_params):
        raise ValueError(f"n_params must be a finite whole number >= 0, got {n_params}")
    return int(n_params) * _check_int(bytes_per_param, "bytes_per_param", 1)


def adapter_checkpoint_bytes(config, targets: Iterable[str], r: int,
                             bytes_per_param: int = 2) -> int:
    """Bytes of a saved LoRA adapter: ``checkpoint_bytes(lora_param_count(config, targets, r))``.

    Only ``A`` and ``B`` are saved; the frozen base model is shared by every task.

    Parameters
    ----------
    config, targets, r : see ``lora_param_count``
    bytes_per_param : int

    Returns
    -------
    int
    """
    return checkpoint_bytes(lora_param_count(config, targets, r), bytes_per_param)


# copies of each trainable parameter held during training, counting the parameter itself:
# parameter + gradient (+ Adam's first and second moments m and v).
OPTIMIZER_STATE_COPIES = {"sgd": 2, "adam": 4}


def _itemsize(dtype) -> int:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be a NumPy floating dtype, got {dtype!r}")
    if dt.kind != "f":
        raise TypeError(f"dtype must be a floating dtype (float16/32/64), got {dt}")
    return dt.itemsize


def _check_optimizer(optimizer) -> int:
    if optimizer not in OPTIMIZER_STATE_COPIES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATE_COPIES)}, "
                         f"got {optimizer!r}")
    return OPTIMIZER_STATE_COPIES[optimizer]


def training_state_bytes(n_trainable, optimizer: str = "adam", dtype=np.float64) -> int:
    """Bytes of the per-trainable-parameter training state.

    .. math:: n_{\\text{trainable}} \\cdot \\text{itemsize} \\cdot c, \\quad
              c = \\underbrace{1}_{\\text{param}} + \\underbrace{1}_{\\text{grad}}
                  + \\begin{cases} 2 & \\text{Adam } (m, v) \\\\ 0 & \\text{SGD} \\end{cases}

    The frozen weights are *not* counted here: both methods need them in memory, identically,
    so they cancel when comparing full fine-tuning with LoRA's trainable state. Use
    ``total_state_bytes`` to include them. Activations are not counted either (they depend on
    batch and sequence length, not on the method's parameter count).

    Parameters
    ----------
    n_trainable : int or float
        Number of trainable parameters (whole, >= 0).
    optimizer : {"adam", "sgd"}
        SGD here is plain SGD without momentum (a momentum buffer would add one copy).
    dtype : NumPy floating dtype
        Storage type of params, grads and moments (float64 is this library's default).

    Returns
    -------
    int
    """
    copies = _check_optimizer(optimizer)
    return checkpoint_bytes(n_trainable, _itemsize(dtype)) * copies


def state_ratio(n_full, n_lora, optimizer: str = "adam") -> float:
    """How many times more trainable state full fine-tuning holds than LoRA.

    .. math:: \\frac{\\text{training\\_state\\_bytes}(n_{full})}
                    {\\text{training\\_state\\_bytes}(n_{lora})} = \\frac{n_{full}}{n_{lora}}

    The itemsize and the optimizer's copy count are the same on both sides and cancel, so the
    ratio is just the parameter ratio — the point of showing it. For the whole memory picture
    (frozen weights included) compare ``total_state_bytes``.

    Parameters
    ----------
    n_full, n_lora : int or float
        Trainable parameter counts; ``n_lora >= 1``.
    optimizer : {"adam", "sgd"}

    Returns
    -------
    float
    """
    lora = training_state_bytes(n_lora, optimizer)
    if lora == 0:
        raise ValueError("n_lora must be >= 1, got 0 (the ratio would divide by zero)")
    return training_state_bytes(n_full, optimizer) / lora


def total_state_bytes(n_trainable, n_frozen, optimizer: str = "adam", dtype=np.float64) -> int:
    """Training state including the frozen weights.

    .. math:: \\text{training\\_state\\_bytes}(n_{trainable}) + n_{frozen} \\cdot \\text{itemsize}

    GPT-3 175B in fp16 with Adam: full fine-tuning ``175e9 · 2 · 4 = 1.4e12`` bytes (1.4 TB);
    LoRA q, v, r = 4 ≈ ``175e9 · 2 + 18.9e6 · 2 · 4 ≈ 350.15e9`` bytes. Hu et al. 2021 §4.2
    report 1.2 TB -> 350 GB of VRAM; this simple model (everything in fp16, no activations,
    no mixed-precision master copies) matches the 350 GB but not the 1.2 TB.

    Parameters
    ----------
    n_trainable, n_frozen : int or float
        Whole numbers >= 0.
    optimizer : {"adam", "sgd"}
    dtype : NumPy floating dtype

    Returns
    -------
    int
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
