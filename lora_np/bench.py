"""``python -m lora_np.bench``: what one training step costs, full fine-tuning vs LoRA.

One *step* is what every training loop in lora_np does::

    model.zero_grad();  Y = model(X);  L, G = mse_loss(Y, target);  model.backward(G);  opt.step()

with ``Adam``. It is timed for the MLP block (``d → d → d``, N rows) and the multi-head
attention block (batch × T tokens, width d), fully fine-tuned and with LoRA at several ranks,
and every row is compared with two written-down models:

* a **FLOP model** (``mlp_step_flops``, ``attention_step_flops``): every GEMM, elementwise op
  and Adam update of the step, counted from the formulas in ``lora_np.functional``;
* a **byte model** (``state_bytes_model``): parameters + gradients + Adam moments.

The models are pure functions of the shapes, so tests assert them exactly; wall-clock times are
only printed. Each row reports median ms/step, FLOPs, achieved GFLOP/s, that as a fraction of a
plain ``numpy.matmul`` of a comparable shape timed in the same run, the training-state bytes
measured from the arrays, the memory the step allocates (tracemalloc), and the LoRA/full ratios
next to the ratios the models predict.

    python -m lora_np.bench            # widths 64..1024, ranks 1, 8, 64, float32 and float64
    python -m lora_np.bench --quick    # a few seconds: widths 128 and 1024, rank 8, float32
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import glob
import os
import sys
import time
import tracemalloc

try:                                    # Unix only: page-fault counts of this process
    import resource
except ImportError:                     # pragma: no cover - Windows
    resource = None
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import functional as F
from .counting import total_state_bytes
from .lora import add_lora
from .modules import MLP, MultiHeadAttention
from .optim import Adam
from .plots import plot_bench

__all__ = ["linear_step_flops", "lora_linear_step_flops", "mlp_step_flops",
           "attention_step_flops", "adam_flops", "state_bytes_model", "measured_state_bytes",
           "BenchConfig", "BenchRow", "build", "train_step", "run_group", "run", "configs", "format_table",
           "markdown_table", "main",
           "ADAM_FLOPS_PER_PARAM", "GELU_FORWARD_FLOPS", "GELU_BACKWARD_FLOPS", "MSE_FLOPS",
           "SOFTMAX_FORWARD_FLOPS", "SOFTMAX_BACKWARD_FLOPS", "ATTENTION_TARGETS", "MLP_TARGETS"]

# ------------------------------------------------------------------------------ FLOP model
#
# One FLOP = one add, multiply, divide, compare, sqrt, tanh or exp on one element. A
# transcendental (tanh, exp, sqrt) costs far more than a multiply-add on real hardware; it is
# still counted as 1, so the elementwise part is *under*-counted relative to the GEMMs, never
# over-counted. A GEMM (m, k) @ (k, n) is 2·m·k·n. Sums over rows count 1 per element summed.

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

#: the layers LoRA adapts in each benchmarked block (attention: q and v, as Hu et al. 2021
#: §7.1 / Table 5 recommend; MLP: both layers)
ATTENTION_TARGETS = ("q_proj", "v_proj")
MLP_TARGETS = ("fc1", "fc2")


def _check_sizes(**sizes) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def adam_flops(n_trainable: int) -> int:
    """FLOPs of one Adam step (with the gradient accumulation) over ``n_trainable`` numbers:
    ``ADAM_FLOPS_PER_PARAM · n_trainable``."""
    return ADAM_FLOPS_PER_PARAM * int(n_trainable)


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
    _check_sizes(N=N, d_in=d_in, d_out=d_out)
    flops = 2 * N * d_in * d_out + N * d_out + 2 * N * d_in * d_out
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
    _check_sizes(N=N, d_in=d_in, d_out=d_out, r=r)
    frozen = 4 * N * d_in * d_out + N * d_out
    branch = 6 * N * r * (d_in + d_out) + 2 * N * r + N * d_out + N * d_in + r * d_out
    return frozen + branch + adam_flops(r * (d_in + d_out))


def mlp_step_flops(N: int, d: int, r: int | None = None) -> int:
    """FLOPs of one training step of ``MLP(d, d, d, activation="gelu")`` on N rows.

    ``fc1`` and ``fc2`` (``linear_step_flops``, or ``lora_linear_step_flops`` at rank ``r``
    when ``r`` is given), GELU forward and backward on the (N, d) hidden layer and the MSE loss
    on the (N, d) output::

        full:  2·(6·N·d² + 2·N·d + 14·(d² + d)) + 22·N·d + 4·N·d      ≈ 12·N·d²
        LoRA:  2·(4·N·d² + 12·N·r·d + ...)   + 22·N·d + 4·N·d      ≈  8·N·d² + 24·N·r·d

    so at large d the LoRA/full ratio tends to ``2/3 + 2r/d`` (the ``dW`` GEMMs are gone).
    """
    _check_sizes(N=N, d=d)
    if r is None:
        layers = 2 * linear_step_flops(N, d, d, trainable=True)
    else:
        layers = 2 * lora_linear_step_flops(N, d, d, r)
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
    _check_sizes(batch=batch, T=T, d=d, n_heads=n_heads)
    if d % n_heads:
        raise ValueError(f"d must be divisible by n_heads, got d={d}, n_heads={n_heads}")
    N, S = batch * T, batch * n_heads * T * T
    if r is None:
        proj = 4 * linear_step_flops(N, d, d, trainable=True)
    else:
        proj = (len(ATTENTION_TARGETS) * lora_linear_step_flops(N, d, d, r)
                + (4 - len(ATTENTION_TARGETS)) * linear_step_flops(N, d, d, trainable=False))
    core = 12 * batch * T * T * d + (SOFTMAX_FORWARD_FLOPS + SOFTMAX_BACKWARD_FLOPS) * S + 2 * N * d
    return proj + core + 2 * N * d + MSE_FLOPS * N * d


# ------------------------------------------------------------------------------ byte model


def _block_param_counts(model: str, d: int, r: int | None) -> tuple[int, int]:
    """(trainable, frozen) number counts of the benchmarked block."""
    n_linear = {"mlp": 2, "attention": 4}[model]
    dense = n_linear * (d * d + d)                     # W and b of every Linear
    if r is None:
        return dense, 0
    n_lora = len(MLP_TARGETS if model == "mlp" else ATTENTION_TARGETS)
    return n_lora * r * 2 * d, dense                   # A (r, d) and B (d, r) per adapted layer


def state_bytes_model(model: str, d: int, r: int | None = None, dtype=np.float64) -> int:
    """Training-state bytes of the benchmarked block: every parameter once, plus gradient and
    Adam moments m, v of each *trainable* one (``counting.total_state_bytes``)::

        full:  itemsize · 4 · P                       P = n_linear · (d² + d)
        LoRA:  itemsize · (P + 4 · n_adapted · 2·r·d)

    (MLP: 2 Linear layers, both adapted; attention: 4, LoRA on q and v.)
    """
    if model not in ("mlp", "attention"):
        raise ValueError(f"model must be 'mlp' or 'attention', got {model!r}")
    _check_sizes(d=d)
    if r is not None:
        _check_sizes(r=r)
    n_trainable, n_frozen = _block_param_counts(model, d, r)
    return total_state_bytes(n_trainable, n_frozen, "adam", dtype)


def measured_state_bytes(model, opt: Adam) -> int:
    """Bytes actually held by ``model``'s parameters, gradients and ``opt``'s moments (each
    array counted once, however many names point at it)."""
    arrays = {}
    for group in (model.parameters(), model.gradients(), opt.m, opt.v):
        for a in group.values():
            arrays[id(a)] = a
    return int(sum(a.nbytes for a in arrays.values()))


# --------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class BenchConfig:
    """One benchmarked setting. ``rank=None`` is full fine-tuning."""
    model: str            # "mlp" or "attention"
    d: int                # width
    dtype: str            # "float32" or "float64"
    rank: int | None
    rows: int             # N = rows of X (MLP) or batch·T tokens (attention)
    T: int = 64           # tokens per sequence (attention)

    @property
    def method(self) -> str:
        return "full" if self.rank is None else f"LoRA r={self.rank}"

    @property
    def n_heads(self) -> int:
        return max(1, self.d // 64)                    # d_head = 64, as in GPT-2

    @property
    def batch(self) -> int:
        return self.rows // self.T

    def flops(self) -> int:
        if self.model == "mlp":
            return mlp_step_flops(self.rows, self.d, self.rank)
        return attention_step_flops(self.batch, self.T, self.d, self.n_heads, self.rank)

    def state_bytes_model(self) -> int:
        return state_bytes_model(self.model, self.d, self.rank, np.dtype(self.dtype))


@dataclass
class BenchRow:
    """One line of the results table (times in ms, memory in bytes)."""
    model: str
    dtype: str
    d: int
    method: str
    rank: int | None
    rows: int
    ms: float                 # median ms per step
    flops: int                # FLOP model of the step
    gflops: float             # flops / median time
    matmul_gflops: float      # plain np.matmul (rows, d) @ (d, d) in the same dtype, same run
    state_bytes: int          # measured: params + grads + Adam moments
    state_bytes_model: int
    activation_bytes: int     # allocated by forward + loss and still held when backward starts
    peak_bytes: int           # highest allocation above the step's start, whole step
    faults_per_step: float = 0.0   # minor page faults per timed step (memory the allocator
                                   # had given back to the kernel, touched again)
    # LoRA / full ratios (None on full rows)
    time_ratio: float | None = None
    flop_ratio: float | None = None
    state_ratio: float | None = None
    state_ratio_model: float | None = None
    activation_ratio: float | None = None
    peak_ratio: float | None = None
    memory_ratio: float | None = None      # (state + peak) LoRA / full: all the step needs

    @property
    def frac_matmul(self) -> float:
        return self.gflops / self.matmul_gflops

    @property
    def time_vs_model(self) -> float | None:
        """(t_LoRA / t_full) / (FLOPs_LoRA / FLOPs_full); 1.0 = exactly as the FLOP model predicts."""
        return None if self.time_ratio is None else self.time_ratio / self.flop_ratio


def build(config: BenchConfig, seed: int = 0):
    """Model, optimizer, input and target of ``config``, all in ``config.dtype``."""
    dtype = np.dtype(config.dtype)
    rng = np.random.default_rng(seed)
    d = config.d
    if config.model == "mlp":
        model = MLP(d, d, d, activation="gelu", rng=rng, dtype=dtype)
        shape, targets = (config.rows, d), MLP_TARGETS
    elif config.model == "attention":
        if config.rows % config.T:
            raise ValueError(f"rows must be a multiple of T={config.T}, got {config.rows}")
        model = MultiHeadAttention(d, config.n_heads, rng=rng, dtype=dtype)
        shape, targets = (config.batch, config.T, d), ATTENTION_TARGETS
    else:
        raise ValueError(f"model must be 'mlp' or 'attention', got {config.model!r}")
    if config.rank is not None:
        add_lora(model, targets, r=config.rank, alpha=2 * config.rank, rng=rng)
    x = rng.standard_normal(shape).astype(dtype)
    target = rng.standard_normal(shape).astype(dtype)
    return model, Adam(model, lr=1e-3), x, target


def train_step(model, opt, x, target) -> float:
    """One training step: zero grads, forward, MSE loss, backward, Adam step. Returns the loss."""
    model.zero_grad()
    loss, dy = F.mse_loss(model(x), target)
    model.backward(dy)
    opt.step()
    return loss


def _median_seconds(fn, repeats: int, min_seconds: float = 0.2, max_repeats: int = 300) -> float:
    """Median wall time of ``fn()`` over at least ``repeats`` calls (more for fast calls, so
    that about ``min_seconds`` is measured), after one warm-up call."""
    return _interleaved_medians([fn], repeats, min_seconds, max_repeats)[0]


def _interleaved_medians(fns, repeats: int, min_seconds: float = 0.2, max_repeats: int = 300,
                         burst: int = 3):
    """Median wall time of each ``fn`` in ``fns`` (see ``_interleaved_timings``)."""
    return _interleaved_timings(fns, repeats, min_seconds, max_repeats, burst)[0]


def _interleaved_timings(fns, repeats: int, min_seconds: float = 0.2, max_repeats: int = 300,
                         burst: int = 3):
    """(median wall time, minor page faults per call) of each ``fn`` in ``fns``, timed in
    rounds: every round runs each fn ``burst`` times in a row, the first call untimed.
    Round-robin, so a slow drift of the machine's load hits all of them alike and their
    *ratios* stay fair; in bursts, so every timed call runs right after a call of the same fn,
    with its weights and buffers warm in the caches, as in a training loop (strict alternation
    would time each step cold). At least ``repeats`` timed calls each, more (up to
    ``max_repeats``) when fast."""
    t0 = time.perf_counter()
    for fn in fns:
        fn()
    one_call = (time.perf_counter() - t0) / len(fns)
    n = max(repeats, min(max_repeats, int(min_seconds / max(one_call, 1e-9))))
    timed = max(1, burst - 1)
    times = [[] for _ in fns]
    faults = [0] * len(fns)
    gc.collect()
    for _ in range(-(-n // timed)):
        for i, (fn, ts) in enumerate(zip(fns, times)):
            fn()
            f0 = _minor_faults()
            for _ in range(timed):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            faults[i] += _minor_faults() - f0
    return ([float(np.median(ts)) for ts in times],
            [f / len(ts) for f, ts in zip(faults, times)])


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing). A minor
    fault is the kernel handing a page back to memory the allocator had returned to it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def _matmul_fn(rows: int, d: int, dtype):
    """A plain ``np.matmul`` (rows, d) @ (d, d) in ``dtype`` (the reference rate)."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((rows, d)).astype(dtype)
    b = rng.standard_normal((d, d)).astype(dtype)
    out = np.empty((rows, d), dtype=dtype)
    return lambda: np.matmul(a, b, out=out)


def matmul_gflops(rows: int, d: int, dtype, repeats: int = 10) -> float:
    """GFLOP/s of a plain ``np.matmul`` (rows, d) @ (d, d) in ``dtype`` on this machine now."""
    return 2 * rows * d * d / _median_seconds(_matmul_fn(rows, d, dtype), repeats) / 1e9


def _memory_of_step(model, opt, x, target) -> tuple[int, int]:
    """(activation bytes, peak bytes) of one step, from tracemalloc (NumPy reports its data
    buffers to it). Both are measured above what was allocated when the step began:
    activation = still held after forward + loss (the caches, Y and G), peak = the most held at
    any moment of the whole step (caches + gradients + temporaries)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        model.zero_grad()
        loss, dy = F.mse_loss(model(x), target)
        held = tracemalloc.get_traced_memory()[0] - base
        model.backward(dy)
        del dy
        opt.step()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return held, peak


def run_group(group: list[BenchConfig], repeats: int) -> list[BenchRow]:
    """Time the configurations of one (block, dtype, width) together with the reference matmul,
    interleaved (see ``_interleaved_medians``), then measure their memory one at a time."""
    c0 = group[0]
    built = [build(c) for c in group]
    steps = [lambda m=m, o=o, x=x, t=t: train_step(m, o, x, t) for m, o, x, t in built]
    (*seconds, matmul_s), faults = _interleaved_timings(
        steps + [_matmul_fn(c0.rows, c0.d, np.dtype(c0.dtype))], repeats)
    matmul_rate = 2 * c0.rows * c0.d * c0.d / matmul_s / 1e9
    rows = []
    for c, (model, opt, x, target), s, f in zip(group, built, seconds, faults):
        held, peak = _memory_of_step(model, opt, x, target)
        flops = c.flops()
        rows.append(BenchRow(model=c.model, dtype=c.dtype, d=c.d, method=c.method, rank=c.rank,
                             rows=c.rows, ms=s * 1e3, flops=flops, gflops=flops / s / 1e9,
                             matmul_gflops=matmul_rate, state_bytes=measured_state_bytes(model, opt),
                             state_bytes_model=c.state_bytes_model(),
                             activation_bytes=held, peak_bytes=peak, faults_per_step=f))
    return rows


def _fill_ratios(rows: list[BenchRow]) -> None:
    full = {(r.model, r.dtype, r.d): r for r in rows if r.rank is None}
    for r in rows:
        f = full.get((r.model, r.dtype, r.d))
        if r.rank is None or f is None:
            continue
        r.time_ratio = r.ms / f.ms
        r.flop_ratio = r.flops / f.flops
        r.state_ratio = r.state_bytes / f.state_bytes
        r.state_ratio_model = r.state_bytes_model / f.state_bytes_model
        r.activation_ratio = r.activation_bytes / max(f.activation_bytes, 1)
        r.peak_ratio = r.peak_bytes / max(f.peak_bytes, 1)
        r.memory_ratio = (r.state_bytes + r.peak_bytes) / (f.state_bytes + f.peak_bytes)


def configs(models, widths, ranks, dtypes, rows: int, T: int = 64) -> list[list[BenchConfig]]:
    """Groups of configurations, one group per (block, dtype, width): full fine-tuning and
    LoRA at each rank r <= d/2."""
    out = []
    for model in models:
        for dtype in dtypes:
            for d in widths:
                out.append([BenchConfig(model, d, dtype, None, rows, T)]
                           + [BenchConfig(model, d, dtype, r, rows, T) for r in ranks if r <= d // 2])
    return out


def run(models=("mlp", "attention"), widths=(64, 128, 256, 512, 1024), ranks=(1, 8, 64),
        dtypes=("float32", "float64"), rows: int = 512, T: int = 64, repeats: int = 10,
        progress=None) -> list[BenchRow]:
    """Run every configuration; returns the rows with their LoRA/full ratios filled in."""
    results = []
    for group in configs(models, widths, ranks, dtypes, rows, T):
        results += run_group(group, repeats)
        if progress:
            progress(results[-len(group):])
    _fill_ratios(results)
    return results


# ---------------------------------------------------------------------------------- output


def machine_info() -> dict:
    """Cores, BLAS and its thread count (None if it cannot be asked), NumPy version."""
    info = {"cpu_count": os.cpu_count(), "numpy": np.__version__, "blas": "unknown",
            "blas_threads": None}
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["blas"] = f"{deps.get('name', '?')} {deps.get('version', '')}".strip()
    except Exception:                                       # pragma: no cover - old NumPy
        pass
    libdir = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    for lib in glob.glob(str(libdir / "*openblas*.so*")):
        try:
            handle = ctypes.CDLL(lib)
        except OSError:                                     # pragma: no cover
            continue
        for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                     "openblas_get_num_threads"):
            if hasattr(handle, name):
                info["blas_threads"] = int(getattr(handle, name)())
                break
    return info


def _cpu_jiffies():
    """(busy, total) CPU ticks of the whole machine from /proc/stat, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)       # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


class MachineLoad:
    """How much of the machine *other* processes used while the benchmark ran: the whole
    machine's busy CPU time (/proc/stat) minus this process's own (os.times, all threads),
    as a fraction of all cores' time. ~0 means the timings are clean; on a shared machine a
    2-thread BLAS slows down far more than the share suggests."""

    def __init__(self):
        self.start, self.own0 = _cpu_jiffies(), os.times()

    def others_fraction(self) -> float | None:
        end, own1 = _cpu_jiffies(), os.times()
        if self.start is None or end is None:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy, total = end[0] - self.start[0], end[1] - self.start[1]
        own = (own1.user + own1.system - self.own0.user - self.own0.system) * tick
        return max(0.0, (busy - own) / total) if total > 0 else None


def _fmt_ratio(x, digits=3):
    return "" if x is None else f"{x:.{digits}f}"


_COLUMNS = ("block", "dtype", "d", "method", "ms/step", "GFLOP", "GFLOP/s", "% matmul",
            "state MiB", "act MiB", "peak MiB", "t/t_full", "FLOP model", "t ratio/model",
            "state/full", "byte model", "peak/full", "state+peak/full", "faults/step")


def _cells(r: BenchRow) -> list[str]:
    mib = 2.0 ** 20
    return [r.model, r.dtype, str(r.d), r.method, f"{r.ms:.3f}", f"{r.flops / 1e9:.4f}",
            f"{r.gflops:.1f}", f"{100 * r.frac_matmul:.0f}%", f"{r.state_bytes / mib:.3f}",
            f"{r.activation_bytes / mib:.2f}", f"{r.peak_bytes / mib:.2f}",
            _fmt_ratio(r.time_ratio), _fmt_ratio(r.flop_ratio), _fmt_ratio(r.time_vs_model, 2),
            _fmt_ratio(r.state_ratio, 4), _fmt_ratio(r.state_ratio_model, 4),
            _fmt_ratio(r.peak_ratio), _fmt_ratio(r.memory_ratio), f"{r.faults_per_step:.0f}"]


def format_table(rows: list[BenchRow]) -> str:
    """The results as an aligned plain-text table."""
    cells = [list(_COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c[i].rjust(widths[i]) for i in range(len(widths))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[BenchRow]) -> str:
    """The results as a GitHub markdown table."""
    out = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    out += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(out)


#: glibc settings that keep freed memory in the process instead of returning it to the kernel
#: (which then page-faults it back in on the next step); read once, when Python starts
MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3           # glibc's mallopt parameter numbers
KEEP_LIMIT = 1 << 30                                     # 1 GiB


def _malloc_env() -> str:
    """The ``MALLOC_*`` settings of ``MALLOC_ENV`` found in the environment, or ""."""
    return ", ".join(f"{k}={os.environ[k]}" for k in MALLOC_ENV if k in os.environ)


def keep_freed_memory(limit: int = KEEP_LIMIT) -> str:
    """Ask glibc's allocator to keep freed memory in this process; return what was done.

    By default glibc gives every large array (above its mmap threshold: 128 KiB at start,
    raised as such arrays are freed, to 32 MiB at most) its own ``mmap`` and returns it to the
    kernel when NumPy frees it, and trims the heap top; the next training step asks for
    the same sizes again and the kernel hands the pages back one page fault at a time
    (~5,000–7,000 faults, 15–30 ms of a 90 ms step at d = 1024). A training loop does not want
    that: PyTorch keeps freed GPU memory in its caching allocator, and Intel's CPU tuning guide
    recommends jemalloc/tcmalloc for the same reason. ``mallopt(M_TRIM_THRESHOLD)`` and
    ``mallopt(M_MMAP_THRESHOLD)`` with ``limit`` make glibc reuse freed memory instead, for
    this process only (the ``python -m lora_np.bench`` process; importing ``lora_np`` never
    does this). ``MALLOC_*`` variables already set in the environment are left to rule.
    """
    if _malloc_env():
        return _malloc_env() + " (from the environment)"
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_TRIM_THRESHOLD, limit) == 1 and libc.mallopt(_M_MMAP_THRESHOLD, limit) == 1
    except (OSError, AttributeError, TypeError):       # not glibc (macOS, musl, Windows)
        ok = False
    if not ok:
        return "defaults (mallopt not available on this C library)"
    return f"keeps freed memory (mallopt trim and mmap thresholds {limit >> 20} MiB)"


def _header(info: dict, rows: int, T: int, repeats: int, malloc: str = "defaults") -> str:
    return (f"machine: {info['cpu_count']} cores (os.cpu_count()), BLAS {info['blas']} with "
            f"{info['blas_threads']} threads, NumPy {info['numpy']}, allocator {malloc}\n"
            f"step = zero_grad + forward + MSE loss + backward + Adam; MLP d→d→d on N={rows} rows, "
            f"attention on {rows // T}×{T} tokens (d_head 64); median of ≥{repeats} timed steps, "
            f"run in bursts (a warm-up step of the same model first), round-robin over the methods\n"
            f"% matmul = achieved GFLOP/s over np.matmul ({rows}, d) @ (d, d) in the same dtype, "
            f"same run; t ratio/model = (t_LoRA/t_full) / (FLOPs_LoRA/FLOPs_full)")


def target_summary(rows: list[BenchRow], d: int = 1024, dtype: str = "float32", rank: int = 8) -> str:
    """The issue's targets, checked on the rows at width ``d``, ``dtype``, rank ``rank``:
    LoRA time ratio ≤ 1.1 × the FLOP model's ratio, step rate ≥ 70% of the plain matmul rate,
    training-state bytes LoRA/full within 5% of the byte model."""
    lines = []
    for r in rows:
        if r.d != d or r.dtype != dtype or r.rank != rank or r.time_ratio is None:
            continue
        full = next(f for f in rows if (f.model, f.dtype, f.d, f.rank) == (r.model, r.dtype, r.d, None))
        state_err = abs(r.state_ratio / r.state_ratio_model - 1)
        checks = [f"t ratio/model {r.time_vs_model:.2f} ({'≤' if r.time_vs_model <= 1.1 else '>'} 1.1)",
                  f"rate LoRA {100 * r.frac_matmul:.0f}%, full {100 * full.frac_matmul:.0f}% of matmul "
                  f"({'both ≥' if min(r.frac_matmul, full.frac_matmul) >= 0.7 else 'not both ≥'} 70%)",
                  f"state ratio off the byte model by {100 * state_err:.2f}% "
                  f"({'≤' if state_err <= 0.05 else '>'} 5%)"]
        lines.append(f"targets, {r.model} d={d} {dtype} r={rank}: " + "; ".join(checks))
    return "\n".join(lines)




def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _str_list(choices):
    def parse(text):
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {choices}, got {text!r}")
        return values
    return parse


def main(argv=None) -> list[BenchRow]:
    p = argparse.ArgumentParser(prog="python -m lora_np.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=_int_list, default=[64, 128, 256, 512, 1024])
    p.add_argument("--ranks", type=_int_list, default=[1, 8, 64])
    p.add_argument("--dtypes", type=_str_list(("float32", "float64")), default=["float32", "float64"])
    p.add_argument("--models", type=_str_list(("mlp", "attention")), default=["mlp", "attention"])
    p.add_argument("--rows", type=int, default=512, help="N rows (MLP) = batch·T tokens (attention)")
    p.add_argument("--repeats", type=int, default=10, help="minimum timed steps per row")
    p.add_argument("--quick", action="store_true",
                   help="widths 128,1024, rank 8, float32, 5 repeats (a few seconds)")
    p.add_argument("--out-dir", default="figures", help="where bench_results.md and the plot go")
    p.add_argument("--no-files", action="store_true", help="print only")
    p.add_argument("--allocator", choices=("keep", "default"), default="keep",
                   help="keep: glibc keeps freed arrays for the next step, as a training loop "
                        "would (see keep_freed_memory); default: glibc's defaults, which "
                        "page-fault large arrays back in every step")
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.ranks, args.dtypes, args.repeats = [128, 1024], [8], ["float32"], 5
    T = 64
    if args.rows < T or args.rows % T:
        p.error(f"--rows must be a multiple of T={T}, got {args.rows}")

    info = machine_info()
    malloc = keep_freed_memory() if args.allocator == "keep" else (_malloc_env() or "defaults")
    header = _header(info, args.rows, T, args.repeats, malloc)
    print(header, flush=True)
    load = MachineLoad()
    t0 = time.perf_counter()
    rows = run(args.models, args.widths, args.ranks, args.dtypes, args.rows, T, args.repeats,
               progress=lambda group: print("  " + ", ".join(
                   f"{r.model} {r.dtype} d={r.d} {r.method}: {r.ms:.3f} ms" for r in group),
                   file=sys.stderr, flush=True))
    elapsed = time.perf_counter() - t0
    others = load.others_fraction()
    footer = (f"bench ran in {elapsed:.1f} s; other processes used "
              + ("an unknown share" if others is None else f"{100 * others:.0f}%")
              + " of the machine's CPU time meanwhile"
              + (" — timings are disturbed, rerun on a quiet machine" if others and others > 0.1 else ""))
    summary = target_summary(rows)
    print(format_table(rows))
    print(summary + "\n" + footer if summary else footer)
    if not args.no_files:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        md = out / "bench_results.md"
        md.write_text(f"<!-- written by python -m lora_np.bench {' '.join(argv or sys.argv[1:])} -->\n\n"
                      + header.replace("\n", "  \n") + "\n\n" + markdown_table(rows) + "\n\n"
                      + (summary.replace("\n", "  \n") + "  \n" if summary else "") + footer + "\n",
                      encoding="utf-8")
        written = [md]
        for dtype in args.dtypes:
            png = out / f"bench_{dtype}.png"
            plot_bench(rows, dtype, path=png)
            written.append(png)
        print("wrote " + ", ".join(str(w) for w in written))
    return rows


if __name__ == "__main__":
    main()
