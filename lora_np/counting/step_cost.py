"""What one training step costs, as written-down models: FLOPs and training-state bytes.

One *step* is ``zero_grad``, forward, MSE loss, backward and an ``Adam`` step — what every
training loop in lora_np does and what ``python -m lora_np.bench`` times. The models are pure
functions of the shapes, so tests assert them exactly; the benchmark prints them next to what
it measures.

FLOP convention: one FLOP = one add, multiply, divide, compare, sqrt, tanh or exp on one
element. A transcendental (tanh, exp, sqrt) costs far more than a multiply-add on real
hardware; it is still counted as 1, so the elementwise part is *under*-counted relative to the
GEMMs, never over-counted. A GEMM (m, k) @ (k, n) is 2·m·k·n. Sums over rows count 1 per
element summed.
"""

from __future__ import annotations

import numpy as np

from ..validate import check_choice, check_int
from .memory import total_state_bytes
from .params import MLP_TARGETS

__all__ = ["ADAM_FLOPS_PER_PARAM", "GELU_FORWARD_FLOPS", "GELU_BACKWARD_FLOPS", "MSE_FLOPS",
           "SOFTMAX_FORWARD_FLOPS", "SOFTMAX_BACKWARD_FLOPS", "BENCH_BLOCKS", "BENCH_LORA_TARGETS",
           "BENCH_INPUT_LAYERS", "input_grad_flops", "adam_flops", "linear_forward_flops", "lora_forward_flops", "linear_step_flops", "lora_linear_step_flops", "mlp_step_flops",
           "attention_step_flops", "state_bytes_model"]

#: Adam per trainable number: m ← β₁m + (1−β₁)g (3), v ← β₂v + (1−β₂)g² (4), √v (1),
#: ·1/√(1−β₂ᵗ) (1), +ε (1), m/denominator (1), ·lr/(1−β₁ᵗ) (1), θ −= (1); plus 1 for
#: accumulating the step's gradient into the gradient buffer (``grad += dθ``).
ADAM_FLOPS_PER_PARAM = 14
#: GELU forward per element: x³ (2), ·0.044715 (1), +x (1), ·√(2/π) (1), tanh (1), 1+t (1),
#: ½x (1), product (1)
GELU_FORWARD_FLOPS = 9
#: GELU backward per element: x² (1), ·3·0.044715 (1), +1 (1), ·√(2/π) (1), t² (1), 1−t² (1),
#: ½x (1), two products (2), ½(1+t) (2), sum (1), ·dy (1)
GELU_BACKWARD_FLOPS = 13
#: MSE per element: pred − target (1), square (1), sum (1), ·2/M for the gradient (1)
MSE_FLOPS = 4
#: softmax forward per score: row max (1), subtract (1), exp (1), row sum (1), divide (1);
#: plus the 1/√d_head scaling of the score (1)
SOFTMAX_FORWARD_FLOPS = 6
#: softmax backward per score: dP ⊙ P (1), row sum (1), subtract (1), ·P (1)
SOFTMAX_BACKWARD_FLOPS = 4

#: the two benchmarked blocks and how many Linear layers each has:
#: ``MLP(d, d, d)`` (fc1, fc2) and ``MultiHeadAttention(d, n_heads)`` (q, k, v, o projections)
BENCH_BLOCKS = {"mlp": 2, "attention": 4}
#: the layers LoRA adapts in each benchmarked block: the MLP's two layers; attention's q and v,
#: as Hu et al. 2021 §7.1 / Table 5 recommend
BENCH_LORA_TARGETS = {"mlp": MLP_TARGETS, "attention": ("q_proj", "v_proj")}


def _sizes(**sizes) -> None:
    for name, value in sizes.items():
        check_int(name, value, minimum=1)


def adam_flops(n_trainable: int) -> int:
    """FLOPs of one Adam step (with the gradient accumulation) over ``n_trainable`` numbers:
    ``ADAM_FLOPS_PER_PARAM · n_trainable``."""
    return ADAM_FLOPS_PER_PARAM * int(n_trainable)


def linear_forward_flops(N: int, d_in: int, d_out: int, bias: bool = True) -> int:
    """FLOPs of an inference forward of a ``Linear``, ``Y = X Wᵀ + b`` on N rows:
    ``2·N·d_in·d_out`` (+ ``N·d_out`` for the bias). A merged LoRA layer (W ← W + s·B A) costs
    exactly this: merging adds no FLOPs to inference."""
    _sizes(N=N, d_in=d_in, d_out=d_out)
    return 2 * N * d_in * d_out + (N * d_out if bias else 0)


def lora_forward_flops(N: int, d_in: int, d_out: int, r: int, bias: bool = True) -> int:
    """FLOPs of an inference forward of an *unmerged* ``LoRALinear`` on N rows::

        X Wᵀ + b                   2·N·d_in·d_out (+ N·d_out)    linear_forward_flops
        H = X Aᵀ,  s·H             2·N·r·d_in + N·r
        (sH) Bᵀ, add to Y          2·N·r·d_out + N·d_out

    so the branch adds ``2·N·r·(d_in + d_out) + N·r + N·d_out`` to the base layer's FLOPs, the
    same forward ``lora_linear_step_flops`` counts inside a training step. Relative to the base
    layer that is ≈ ``r (d_in + d_out) / (d_in d_out)`` (= 2r/d for a square layer).
    """
    _sizes(r=r)
    return linear_forward_flops(N, d_in, d_out, bias) + 2 * N * r * (d_in + d_out) + N * r + N * d_out


def linear_step_flops(N: int, d_in: int, d_out: int, trainable: bool = True) -> int:
    """FLOPs of a ``Linear`` (with bias) in one training step, Adam included.

    ::

        forward   Y = X Wᵀ + b               2·N·d_in·d_out + N·d_out
        backward  dX = G W                   2·N·d_in·d_out
                  dW = Gᵀ X, db = Σ_rows G   2·N·d_in·d_out + N·d_out     (trainable only)
        Adam      on W and b                 ADAM_FLOPS_PER_PARAM·(d_in·d_out + d_out)  (trainable)

    A frozen layer skips the ``dW`` GEMM, ``db`` and Adam: 4·N·d_in·d_out + N·d_out. ``dX`` is
    always counted: the block's input gradient is what a deeper network needs.
    """
    flops = linear_forward_flops(N, d_in, d_out) + 2 * N * d_in * d_out
    if trainable:
        flops += 2 * N * d_in * d_out + N * d_out + adam_flops(d_in * d_out + d_out)
    return flops


def lora_linear_step_flops(N: int, d_in: int, d_out: int, r: int) -> int:
    """FLOPs of a ``LoRALinear`` (frozen W, b; trainable A, B) in one training step.

    ::

        forward   X Wᵀ + b                   2·N·d_in·d_out + N·d_out
                  H = X Aᵀ,  s·H             2·N·r·d_in + N·r
                  (sH) Bᵀ, add to Y          2·N·r·d_out + N·d_out
        backward  G B,  s·(G B)              2·N·r·d_out + N·r
                  dB = s (Gᵀ H)              2·N·r·d_out + r·d_out
                  dA = (s G B)ᵀ X            2·N·r·d_in
                  dX = G W + (s G B) A       2·N·d_in·d_out + 2·N·r·d_in + N·d_in
        Adam      on A and B                 ADAM_FLOPS_PER_PARAM·r·(d_in + d_out)

    In total ``4·N·d_in·d_out`` (the frozen path: one forward and one ``dX`` GEMM, *no* ``dW``)
    plus ``6·N·r·(d_in + d_out)`` for the low-rank branch, plus O(N·(d_in + d_out) + r·d_out).
    ``B @ A`` is never formed.
    """
    forward = lora_forward_flops(N, d_in, d_out, r)
    backward = 4 * N * r * d_out + N * r + r * d_out + 4 * N * r * d_in + 2 * N * d_in * d_out + N * d_in
    return forward + backward + adam_flops(r * (d_in + d_out))


#: the layers of each benchmarked block that read the block's input (their dX is the block's
#: input gradient, which a step that asks for none — ``train_step`` — skips)
BENCH_INPUT_LAYERS = {"mlp": ("fc1",), "attention": ("q_proj", "k_proj", "v_proj")}


def input_grad_flops(block: str, N: int, d: int, r: int | None = None) -> int:
    """FLOPs of a benchmarked block's input gradient, which ``backward(dout,
    need_input_grad=False)`` (what ``train_step`` calls) does not compute: the ``dX = G W``
    GEMM (2·N·d²) of every layer in ``BENCH_INPUT_LAYERS`` — with LoRA also its branch's
    ``(s G B) A`` (2·N·r·d) and the sum (N·d) — plus, for attention, the 2·N·d of
    ``dX = dX_q + dX_k + dX_v``."""
    _sizes(N=N, d=d)
    flops = 0
    for name in BENCH_INPUT_LAYERS[block]:
        flops += 2 * N * d * d
        if r is not None and name in BENCH_LORA_TARGETS[block]:
            flops += 2 * N * r * d + N * d
    return flops + (2 * N * d if block == "attention" else 0)


def _block_layers_flops(block: str, N: int, d: int, r: int | None) -> int:
    """FLOPs of the (d, d) Linear layers of a benchmarked block: all trainable (``r=None``),
    or LoRA at rank r on ``BENCH_LORA_TARGETS[block]`` and the other layers frozen."""
    n_linear = BENCH_BLOCKS[block]
    if r is None:
        return n_linear * linear_step_flops(N, d, d, trainable=True)
    n_lora = len(BENCH_LORA_TARGETS[block])
    return (n_lora * lora_linear_step_flops(N, d, d, r)
            + (n_linear - n_lora) * linear_step_flops(N, d, d, trainable=False))


def mlp_step_flops(N: int, d: int, r: int | None = None) -> int:
    """FLOPs of one training step of ``MLP(d, d, d, activation="gelu")`` on N rows.

    ``fc1`` and ``fc2`` (``linear_step_flops``, or ``lora_linear_step_flops`` at rank ``r``
    when ``r`` is given), GELU forward and backward on the (N, d) hidden layer and the MSE loss
    on the (N, d) output::

        full:  2·(6·N·d² + 2·N·d + 14·(d² + d)) + 22·N·d + 4·N·d      ≈ 12·N·d²
        LoRA:  2·(4·N·d² + 12·N·r·d + ...)   + 22·N·d + 4·N·d      ≈  8·N·d² + 24·N·r·d

    so at large d the LoRA/full ratio tends to ``2/3 + 2r/d`` (the ``dW`` GEMMs are gone).
    """
    _sizes(N=N, d=d)
    layers = _block_layers_flops("mlp", N, d, r)
    return layers + (GELU_FORWARD_FLOPS + GELU_BACKWARD_FLOPS) * N * d + MSE_FLOPS * N * d


def attention_step_flops(batch: int, T: int, d: int, n_heads: int, r: int | None = None) -> int:
    """FLOPs of one training step of ``MultiHeadAttention(d, n_heads)`` on (batch, T, d).

    With N = batch·T rows and S = batch·H·T² scores (H = n_heads)::

        projections   q, k, v, o: each a Linear (full) — with LoRA at rank r, q and v are
                      LoRALinear and k, o are frozen Linear (no dW, no Adam)
        core forward  q kᵀ: 2·batch·T²·d,  softmax: 6·S,  P v: 2·batch·T²·d
        core backward dP = dO vᵀ, dV = Pᵀ dO, dq = dS k, dk = dSᵀ q: 4 × 2·batch·T²·d,
                      softmax backward 4·S, 1/√d_head on dq and dk 2·N·d
        input grad    dX = dX_q + dX_k + dX_v: 2·N·d
        loss          MSE on (batch, T, d): 4·N·d

    The core (12·batch·T²·d) is the same for full fine-tuning and LoRA.
    """
    _sizes(batch=batch, T=T, d=d, n_heads=n_heads)
    if d % n_heads:
        raise ValueError(f"d must be divisible by n_heads, got d={d}, n_heads={n_heads}")
    N, S = batch * T, batch * n_heads * T * T
    proj = _block_layers_flops("attention", N, d, r)
    core = 12 * batch * T * T * d + (SOFTMAX_FORWARD_FLOPS + SOFTMAX_BACKWARD_FLOPS) * S + 2 * N * d
    return proj + core + 2 * N * d + MSE_FLOPS * N * d


def state_bytes_model(model: str, d: int, r: int | None = None, dtype=np.float64) -> int:
    """Training-state bytes of a benchmarked block (``BENCH_BLOCKS``): every parameter once,
    plus gradient and Adam moments m, v of each *trainable* one (``total_state_bytes``)::

        full:  itemsize · 4 · P                       P = n_linear · (d² + d)
        LoRA:  itemsize · (P + 4 · n_adapted · 2·r·d)

    with n_adapted = ``len(BENCH_LORA_TARGETS[model])``; each adapted layer adds A (r, d) and
    B (d, r), and the dense W, b of every layer stay as frozen parameters.
    """
    n_linear = BENCH_BLOCKS[check_choice("model", model, BENCH_BLOCKS)]
    _sizes(d=d)
    dense = n_linear * (d * d + d)                     # W and b of every Linear
    if r is None:
        return total_state_bytes(dense, 0, "adam", dtype)
    _sizes(r=r)
    n_lora = len(BENCH_LORA_TARGETS[model]) * r * 2 * d
    return total_state_bytes(n_lora, dense, "adam", dtype)
