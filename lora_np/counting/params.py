"""Parameter counts: one matrix, a published Transformer, and the numbers Hu et al. 2021 print.

Notation (lora_np/README.md): ``W`` is (d_out, d_in); ``A`` is (r, d_in); ``B`` is (d_out, r).
Target names are the ones lora_np's modules and ``add_lora`` use (``q_proj`` … ``fc2``), plus
the LLaMA / PEFT names of a gated MLP (``gate_proj``, ``up_proj``, ``down_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, NamedTuple

from ..validate import check_int

__all__ = ["lora_params", "full_params", "ModelConfig", "MODEL_CONFIGS", "ATTENTION_TARGETS",
           "MLP_TARGETS", "GATED_MLP_TARGETS", "block_targets", "target_shape",
           "lora_param_count", "PaperNumber", "PAPER_REPORTED", "PaperRow", "paper_comparison"]


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
    d_in = check_int("d_in", d_in, minimum=1)
    d_out = check_int("d_out", d_out, minimum=1)
    r = check_int("r", r, minimum=1)
    if r > min(d_in, d_out):
        raise ValueError(f"r must be <= min(d_in, d_out) = {min(d_in, d_out)}, got r={r}")
    return r * (d_in + d_out)


def full_params(d_in: int, d_out: int) -> int:
    """Number of entries of a dense (d_out, d_in) weight, what full fine-tuning trains of it.

    .. math:: |W| = d_{out}\\, d_{in}
    """
    return check_int("d_in", d_in, minimum=1) * check_int("d_out", d_out, minimum=1)


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
        Residual width; every attention projection (``q_proj`` … ``o_proj``) is (d_model, d_model).
    n_layers : int
        Transformer blocks; each has the matrices ``block_targets`` names.
    d_ff : int
        MLP hidden width: ``fc1`` is (d_ff, d_model), ``fc2`` is (d_model, d_ff).
    n_params : float
        Total parameter count as the source reports it (a rounded, published number).
    gated_mlp : bool
        True for SwiGLU MLPs (LLaMA): ``gate_proj`` and ``up_proj`` (d_ff, d_model) and
        ``down_proj`` (d_model, d_ff) instead of ``fc1`` and ``fc2``.
    n_heads : int or None
        Attention heads per block (the ``a`` of the activation-memory formula, ``memory``).
    context : int or None
        Longest sequence the model was trained on (the ``s`` of that formula).
    """
    name: str
    d_model: int
    n_layers: int
    d_ff: int
    n_params: float
    gated_mlp: bool = False
    n_heads: int | None = None
    context: int | None = None


MODEL_CONFIGS: dict[str, ModelConfig] = {c.name: c for c in [
    # Brown et al. 2020, Table 2.1 ("GPT-3 175B": n_layers 96, d_model 12288, d_ff = 4 d_model,
    # 96 heads of 128) and §2.1 (context 2048). Used by Hu et al. 2021 Tables 4-7.
    ModelConfig("gpt3-175b", d_model=12288, n_layers=96, d_ff=49152, n_params=175e9,
                n_heads=96, context=2048),
    # Liu et al. 2019 (RoBERTa reuses BERT-base/large shapes, 12 / 16 heads, 512 positions;
    # 125M / 355M). Hu et al. 2021 Table 2.
    ModelConfig("roberta-base", d_model=768, n_layers=12, d_ff=3072, n_params=125e6,
                n_heads=12, context=512),
    ModelConfig("roberta-large", d_model=1024, n_layers=24, d_ff=4096, n_params=355e6,
                n_heads=16, context=512),
    # Radford et al. 2019, Table 2 (GPT-2 medium / large; the paper lists 345M / 762M, the
    # released checkpoints hold 355M / 774M, which we use; their configs: 16 / 20 heads,
    # context 1024). Used by Hu et al. 2021 Table 3.
    ModelConfig("gpt2-medium", d_model=1024, n_layers=24, d_ff=4096, n_params=355e6,
                n_heads=16, context=1024),
    ModelConfig("gpt2-large", d_model=1280, n_layers=36, d_ff=5120, n_params=774e6,
                n_heads=20, context=1024),
    # Touvron et al. 2023 (Llama 2 7B; SwiGLU MLP width 11008; 32 heads; context 4096; "7B" nominal).
    ModelConfig("llama2-7b", d_model=4096, n_layers=32, d_ff=11008, n_params=7e9, gated_mlp=True,
                n_heads=32, context=4096),
]}

#: the adaptable matrices of a Transformer block, by the names lora_np's modules give them
#: (``MultiHeadAttention`` and ``MLP``), and LLaMA's gated MLP by its own (PEFT's) names
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("fc1", "fc2")
GATED_MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


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


def block_targets(config) -> tuple[str, ...]:
    """The adaptable matrix names of one block of ``config``: ``ATTENTION_TARGETS`` then
    ``GATED_MLP_TARGETS`` if ``config.gated_mlp``, else ``MLP_TARGETS``."""
    cfg = _get_config(config)
    return ATTENTION_TARGETS + (GATED_MLP_TARGETS if cfg.gated_mlp else MLP_TARGETS)


def target_shape(config, target: str) -> tuple[int, int]:
    """The (d_out, d_in) shape of one adaptable matrix of a Transformer block.

    ``q_proj k_proj v_proj o_proj`` -> (d_model, d_model); ``fc1``, ``gate_proj``, ``up_proj``
    -> (d_ff, d_model); ``fc2``, ``down_proj`` -> (d_model, d_ff). Which MLP names exist
    depends on ``config.gated_mlp`` (``block_targets``).
    """
    cfg = _get_config(config)
    valid = block_targets(cfg)
    if target not in valid:
        raise ValueError(f"unknown target {target!r} for {cfg.name}; valid targets: {valid}")
    d, f = cfg.d_model, cfg.d_ff
    if target in ("fc1", "gate_proj", "up_proj"):
        return f, d
    if target in ("fc2", "down_proj"):
        return d, f
    return d, d


def _check_targets(targets) -> tuple[str, ...]:
    if isinstance(targets, str):
        raise TypeError(f"targets must be an iterable of names such as ('q_proj', 'v_proj'), "
                        f"got the string {targets!r}")
    try:
        names = tuple(targets)
    except TypeError:
        raise TypeError(f"targets must be an iterable of str, got {type(targets).__name__}") from None
    if not names:
        raise ValueError("targets must name at least one matrix, got an empty iterable")
    if len(set(names)) != len(names):
        raise ValueError(f"targets must not repeat a name, got {names}")
    return names


def lora_param_count(config, targets: Iterable[str], r: int) -> int:
    """Trainable LoRA parameters when ``targets`` of every block of a real model are adapted.

    .. math:: n_{\\text{layers}} \\sum_{t \\in \\text{targets}} r\\,(d_{in}^{(t)} + d_{out}^{(t)})

    e.g. GPT-3 175B, targets ``q_proj`` and ``v_proj``, r = 1:
    ``96 · 2 · 1 · (12288 + 12288) = 4,718,592``, the "4.7M" of Hu et al. 2021, Table 4.
    Only the adapted matrices count: embeddings, layer norms and biases stay frozen, as in
    the paper.

    Parameters
    ----------
    config : ModelConfig or str
        A ``ModelConfig`` or a key of ``MODEL_CONFIGS``.
    targets : iterable of str
        Distinct names from ``block_targets(config)``: ``q_proj``, ``k_proj``, ``v_proj``,
        ``o_proj``, and ``fc1``, ``fc2`` (or ``gate_proj``, ``up_proj``, ``down_proj`` for a
        gated MLP); see ``target_shape``.
    r : int
        Rank, the same for every target.

    Returns
    -------
    int
    """
    cfg = _get_config(config)
    per_block = 0
    for t in _check_targets(targets):
        d_out, d_in = target_shape(cfg, t)
        per_block += lora_params(d_in, d_out, r)
    return cfg.n_layers * per_block


# ---------------------------------------------------------------------------------------------
# the paper's numbers
# ---------------------------------------------------------------------------------------------

class PaperNumber(NamedTuple):
    """A trainable-parameter count as printed in a paper, with where it is printed."""
    value: float
    citation: str


_QV = ("q_proj", "v_proj")
_TABLE5 = "Hu et al. 2021, Table 5 (budget 18M)"

# (config, targets, r) -> what Hu et al. 2021 (arXiv:2106.09685) print. The settings
# (targets, r) are the paper's own (§4.2, Table 5, Appendix D).
PAPER_REPORTED: dict[tuple[str, tuple[str, ...], int], PaperNumber] = {
    ("roberta-base", _QV, 8): PaperNumber(0.3e6, "Hu et al. 2021, Table 2 (0.3M)"),
    ("roberta-large", _QV, 8): PaperNumber(0.8e6, "Hu et al. 2021, Table 2 (0.8M)"),
    ("gpt2-medium", _QV, 4): PaperNumber(0.35e6, "Hu et al. 2021, Table 3 (0.35M)"),
    ("gpt2-large", _QV, 4): PaperNumber(0.77e6, "Hu et al. 2021, Table 3 (0.77M)"),
    ("gpt3-175b", _QV, 1): PaperNumber(4.7e6, "Hu et al. 2021, Table 4 (4.7M)"),
    ("gpt3-175b", _QV, 8): PaperNumber(37.7e6, "Hu et al. 2021, Table 4 (37.7M)"),
    ("gpt3-175b", ("q_proj",), 8): PaperNumber(18e6, _TABLE5),
    ("gpt3-175b", ("q_proj", "k_proj"), 4): PaperNumber(18e6, _TABLE5),
    ("gpt3-175b", _QV, 4): PaperNumber(18e6, _TABLE5),
    ("gpt3-175b", ATTENTION_TARGETS, 2): PaperNumber(18e6, _TABLE5),
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
