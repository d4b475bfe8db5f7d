"""``python -m lora_np.bench``: what one training step costs, full fine-tuning vs LoRA.

One *step* is what every training loop in lora_np does::

    model.zero_grad();  Y = model(X);  L, G = mse_loss(Y, target);  model.backward(G);  opt.step()

with ``Adam``. It is timed for the MLP block (``d → d → d``, N rows) and the multi-head
attention block (batch × T tokens, width d), fully fine-tuned and with LoRA at several ranks
(on the layers ``counting.BENCH_LORA_TARGETS`` names), and every row is set against two
written-down models from ``lora_np.counting``:

* the **FLOP model** (``mlp_step_flops``, ``attention_step_flops``): every GEMM, elementwise
  op and Adam update of the step, counted from the formulas in ``lora_np.functional``;
* the **byte model** (``state_bytes_model``): parameters + gradients + Adam moments.

Each row reports median ms/step, FLOPs, achieved GFLOP/s, that as a fraction of a plain
``numpy.matmul`` of a comparable shape timed in the same run, the training-state bytes measured
from the arrays, the memory the step allocates (tracemalloc), and the LoRA/full ratios next to
the ratios the models predict. The conditions of the run (cores, BLAS threads, allocator, how
busy the machine was) come from ``lora_np.machine``.

    python -m lora_np.bench            # widths 64..1024, ranks 1, 8, 64, float32 and float64
    python -m lora_np.bench --quick    # widths 128 and 1024, rank 8, float32
    python -m lora_np.bench --vs-torch # the same steps in PyTorch too (if installed): ratios

``train_step`` asks for no input gradient (``backward(dY, need_input_grad=False)``), so the
FLOP model of a timed step leaves out ``counting.input_grad_flops``.

``--vs-torch`` times models of the sizes the notebooks use (``torch_cases``: the MLP
``d → 4d → d`` at d = 64, 256, 1024, three causal pre-LN transformer blocks, the real-text
language model; full training and LoRA r = 8) in lora_np and in PyTorch, written as a PyTorch
user would, in the same run, interleaved, float32, 2 threads each, and prints
lora_np / PyTorch step-time ratios. Without PyTorch it says how to install it and exits 0.

Only the default run rewrites the committed ``figures/bench_results.md`` and
``figures/bench_*.png``; every other run writes to ``figures/scratch/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import functional as F
from .counting import (BENCH_LORA_TARGETS, attention_step_flops, input_grad_flops,
                       measured_total_state_bytes, mlp_step_flops, state_bytes_model)
from .lora import add_lora
from .machine import MachineLoad, allocator_setting, machine_info, minor_faults
from .modules import MLP, Module, ModuleList, MultiHeadAttention, TransformerBlock
from .optim import Adam
from .train import train_step

__all__ = ["BenchConfig", "BenchRow", "build", "run_group", "run", "configs",
           "format_table", "markdown_table", "target_summary", "parse_args", "output_dir", "main",
           "SEQUENCE_LENGTH", "FIGURES_DIR", "SCRATCH_DIR"]

SEQUENCE_LENGTH = 64          # T, tokens per attention sequence
D_HEAD = 64                   # width of one attention head, as in GPT-2
#: where the default run writes (the committed results) and where every other run writes
FIGURES_DIR = Path(__file__).resolve().parent.parent / "figures"
SCRATCH_DIR = FIGURES_DIR / "scratch"

# ---------------------------------------------------------------------------- what is timed


@dataclass(frozen=True)
class BenchConfig:
    """One benchmarked setting. ``rank=None`` is full fine-tuning."""
    model: str            # "mlp" or "attention"
    d: int                # width
    dtype: str            # "float32" or "float64"
    rank: int | None
    rows: int             # N = rows of X (MLP) or batch·T tokens (attention)

    @property
    def method(self) -> str:
        return "full" if self.rank is None else f"LoRA r={self.rank}"

    @property
    def n_heads(self) -> int:
        return max(1, self.d // D_HEAD)

    @property
    def batch(self) -> int:
        return self.rows // SEQUENCE_LENGTH

    def flops(self) -> int:
        """The FLOP model of the timed step: ``train_step`` asks for no input gradient, so the
        block's ``input_grad_flops`` are not part of it."""
        if self.model == "mlp":
            total = mlp_step_flops(self.rows, self.d, self.rank)
        else:
            total = attention_step_flops(self.batch, SEQUENCE_LENGTH, self.d, self.n_heads, self.rank)
        return total - input_grad_flops(self.model, self.rows, self.d, self.rank)

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
    ms: float                 # median ms per step
    flops: int                # FLOP model of the step
    gflops: float             # flops / median time
    matmul_gflops: float      # plain np.matmul (rows, d) @ (d, d) in the same dtype, same run
    state_bytes: int          # measured: params + grads + Adam moments, each array once
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
    peak_ratio: float | None = None
    memory_ratio: float | None = None      # (state + peak) LoRA / full: all the step needs

    @property
    def frac_matmul(self) -> float:
        return self.gflops / self.matmul_gflops

    @property
    def time_vs_model(self) -> float | None:
        """(t_LoRA / t_full) / (FLOPs_LoRA / FLOPs_full); 1.0 = exactly as the FLOP model predicts."""
        return None if self.time_ratio is None else self.time_ratio / self.flop_ratio


def build(config: BenchConfig):
    """Model, optimizer, input and target of ``config``, all in ``config.dtype`` (seed 0)."""
    dtype = np.dtype(config.dtype)
    rng = np.random.default_rng(0)
    d = config.d
    if config.model == "mlp":
        model = MLP(d, d, d, activation="gelu", rng=rng, dtype=dtype)
        shape = (config.rows, d)
    elif config.model == "attention":
        if config.rows % SEQUENCE_LENGTH:
            raise ValueError(f"rows must be a multiple of T={SEQUENCE_LENGTH}, got {config.rows}")
        model = MultiHeadAttention(d, config.n_heads, rng=rng, dtype=dtype)
        shape = (config.batch, SEQUENCE_LENGTH, d)
    else:
        raise ValueError(f"model must be 'mlp' or 'attention', got {config.model!r}")
    if config.rank is not None:
        add_lora(model, BENCH_LORA_TARGETS[config.model], r=config.rank, alpha=2 * config.rank,
                 rng=rng)
    x = rng.standard_normal(shape).astype(dtype)
    target = rng.standard_normal(shape).astype(dtype)
    return model, Adam(model, lr=1e-3), x, target


# ------------------------------------------------------------------------------ the timing loop

BURST = 3                 # calls of one fn in a row: 1 untimed, then BURST - 1 timed
MAX_REPEATS = 300         # timed calls per fn at most, however fast it is


def _interleaved_timings(fns, repeats: int, min_seconds: float = 0.2):
    """(median wall time, minor page faults per call) of each ``fn`` in ``fns``, timed in
    rounds: every round runs each fn ``BURST`` times in a row, the first call untimed.
    Round-robin, so a slow drift of the machine's load hits all of them alike and their
    *ratios* stay fair; in bursts, so every timed call runs right after a call of the same fn,
    with its weights and buffers warm in the caches, as in a training loop (strict alternation
    would time each step cold). At least ``repeats`` timed calls each, more (up to
    ``MAX_REPEATS``) when fast, so that about ``min_seconds`` of each is measured."""
    t0 = time.perf_counter()
    for fn in fns:
        fn()
    one_call = (time.perf_counter() - t0) / len(fns)
    n = max(repeats, min(MAX_REPEATS, int(min_seconds / max(one_call, 1e-9))))
    timed = BURST - 1
    times = [[] for _ in fns]
    faults = [0] * len(fns)
    gc.collect()
    for _ in range(-(-n // timed)):
        for i, (fn, ts) in enumerate(zip(fns, times)):
            fn()
            f0 = minor_faults()
            for _ in range(timed):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            faults[i] += minor_faults() - f0
    return ([float(np.median(ts)) for ts in times],
            [f / len(ts) for f, ts in zip(faults, times)])


def _matmul_fn(rows: int, d: int, dtype):
    """A plain ``np.matmul`` (rows, d) @ (d, d) in ``dtype`` (the reference rate)."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((rows, d)).astype(dtype)
    b = rng.standard_normal((d, d)).astype(dtype)
    out = np.empty((rows, d), dtype=dtype)
    return lambda: np.matmul(a, b, out=out)


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
    interleaved (see ``_interleaved_timings``), then measure their memory one at a time."""
    c0 = group[0]
    built = [build(c) for c in group]
    steps = [lambda m=m, o=o, x=x, t=t: train_step(m, o, x, t) for m, o, x, t in built]
    (*seconds, matmul_s), faults = _interleaved_timings(
        steps + [_matmul_fn(c0.rows, c0.d, np.dtype(c0.dtype))], repeats)
    matmul_rate = 2 * c0.rows * c0.d * c0.d / matmul_s / 1e9
    rows = []
    for c, (model, opt, x, target), s, f in zip(group, built, seconds, faults[:-1]):
        held, peak = _memory_of_step(model, opt, x, target)
        flops = c.flops()
        rows.append(BenchRow(model=c.model, dtype=c.dtype, d=c.d, method=c.method, rank=c.rank,
                             ms=s * 1e3, flops=flops, gflops=flops / s / 1e9,
                             matmul_gflops=matmul_rate,
                             state_bytes=measured_total_state_bytes(model, opt),
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
        r.peak_ratio = r.peak_bytes / max(f.peak_bytes, 1)
        r.memory_ratio = (r.state_bytes + r.peak_bytes) / (f.state_bytes + f.peak_bytes)


def configs(models, widths, ranks, dtypes, rows: int) -> list[list[BenchConfig]]:
    """Groups of configurations, one group per (block, dtype, width): full fine-tuning and
    LoRA at each rank r <= d/2."""
    out = []
    for model in models:
        for dtype in dtypes:
            for d in widths:
                out.append([BenchConfig(model, d, dtype, None, rows)]
                           + [BenchConfig(model, d, dtype, r, rows) for r in ranks if r <= d // 2])
    return out


def run(models=("mlp", "attention"), widths=(64, 128, 256, 512, 1024), ranks=(1, 8, 64),
        dtypes=("float32", "float64"), rows: int = 512, repeats: int = 10,
        progress=None) -> list[BenchRow]:
    """Run every configuration; returns the rows with their LoRA/full ratios filled in.
    ``progress``, if given, is called with each group's rows as soon as they are measured."""
    results = []
    for group in configs(models, widths, ranks, dtypes, rows):
        results += run_group(group, repeats)
        if progress:
            progress(results[-len(group):])
    _fill_ratios(results)
    return results


# ---------------------------------------------------------------------------------- output


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


def _header(info: dict, rows: int, repeats: int, malloc: str) -> str:
    T = SEQUENCE_LENGTH
    return (f"machine: {info['cpu_count']} cores (os.cpu_count()), BLAS {info['blas']} with "
            f"{info['blas_threads']} threads, NumPy {info['numpy']}, allocator {malloc}\n"
            f"step = zero_grad + forward + MSE loss + backward + Adam; MLP d→d→d on N={rows} rows, "
            f"attention on {rows // T}×{T} tokens (d_head {D_HEAD}); median of ≥{repeats} timed "
            f"steps, run in bursts (a warm-up step of the same model first), round-robin over the "
            f"methods\n"
            f"% matmul = achieved GFLOP/s over np.matmul ({rows}, d) @ (d, d) in the same dtype, "
            f"same run; t ratio/model = (t_LoRA/t_full) / (FLOPs_LoRA/FLOPs_full)")


#: where the three targets below are checked (width, dtype, LoRA rank), and the targets: LoRA's
#: time ratio at most 1.1 × the FLOP model's, both steps at >= 80 % of the matmul rate, the
#: measured state ratio within 5 % of the byte model's
TARGET_SETTING = (1024, "float32", 8)
MAX_TIME_VS_MODEL, MIN_FRAC_MATMUL, MAX_STATE_ERROR = 1.1, 0.8, 0.05


def target_summary(rows: list[BenchRow]) -> str:
    """One line per block measured at ``TARGET_SETTING``: how LoRA's step time compares with
    the FLOP model, how close both steps come to the plain matmul rate, and how far the
    measured training state is from the byte model — each against its target. "" if no row
    was measured at that setting."""
    d, dtype, rank = TARGET_SETTING
    lines = []
    for r in rows:
        if (r.d, r.dtype, r.rank) != (d, dtype, rank) or r.time_ratio is None:
            continue
        full = next(f for f in rows if (f.model, f.dtype, f.d, f.rank) == (r.model, r.dtype, r.d, None))
        state_err = abs(r.state_ratio / r.state_ratio_model - 1)
        both = min(r.frac_matmul, full.frac_matmul) >= MIN_FRAC_MATMUL
        checks = [f"t ratio/model {r.time_vs_model:.2f} "
                  f"({'≤' if r.time_vs_model <= MAX_TIME_VS_MODEL else '>'} {MAX_TIME_VS_MODEL})",
                  f"rate LoRA {100 * r.frac_matmul:.0f}%, full {100 * full.frac_matmul:.0f}% of matmul "
                  f"({'both ≥' if both else 'not both ≥'} {100 * MIN_FRAC_MATMUL:.0f}%)",
                  f"state ratio off the byte model by {100 * state_err:.2f}% "
                  f"({'≤' if state_err <= MAX_STATE_ERROR else '>'} {100 * MAX_STATE_ERROR:.0f}%)"]
        lines.append(f"targets, {r.model} d={d} {dtype} r={rank}: " + "; ".join(checks))
    return "\n".join(lines)


def _footer(elapsed: float, others: float | None) -> str:
    return (f"bench ran in {elapsed:.1f} s; other processes used "
            + ("an unknown share" if others is None else f"{100 * others:.0f}%")
            + " of the machine's CPU time meanwhile"
            + (" — timings are disturbed, rerun on a quiet machine" if others and others > 0.1 else ""))


def _write_results(out: Path, rows, dtypes, header: str, notes: str, argv) -> list[Path]:
    """bench_results.md (``header``, the markdown table, ``notes``) and one plot per dtype."""
    from .plots import plot_bench               # here, so that importing bench needs no matplotlib
    out.mkdir(parents=True, exist_ok=True)
    md = out / "bench_results.md"
    md.write_text(f"<!-- written by python -m lora_np.bench {' '.join(argv)} -->\n\n"
                  + header.replace("\n", "  \n") + "\n\n" + markdown_table(rows) + "\n\n"
                  + notes.replace("\n", "  \n") + "\n", encoding="utf-8")
    written = [md]
    for dtype in dtypes:
        written.append(out / f"bench_{dtype}.png")
        plot_bench(rows, dtype, path=written[-1])
    return written


# ------------------------------------------------------------------------------ vs PyTorch
#
# ``--vs-torch``: the same models, in lora_np and in PyTorch, timed in the same run, interleaved,
# float32, 2 threads each (OpenBLAS's and ``torch.set_num_threads``). PyTorch is not a
# requirement: without it the comparison says how to install it and is skipped.

TORCH_THREADS = 2
TORCH_INSTALL = "pip install torch  (a CPU wheel is enough: pip install torch --index-url https://download.pytorch.org/whl/cpu)"
#: LoRA's targets in the compared models (rank 8, α = 16)
VS_TORCH_RANK = 8
VS_TORCH_MLP_TARGETS = ("fc1", "fc2")
VS_TORCH_STACK_TARGETS = ("q_proj", "v_proj", "fc1", "fc2")


@dataclass(frozen=True)
class TorchCase:
    """One compared model: ``kind`` "mlp" (``MLP(d, 4d, d)`` on ``rows`` rows), "stack" (3 causal
    pre-LN ``TransformerBlock``s, d 96, 4 heads, MLP 384, ``rows`` = batch·64 tokens) or "lm" (the
    real-text ``LanguageModel`` of ``lora_np.pretrain``, batches of 32 windows of 64 characters,
    cross-entropy); ``rank=None`` is full training, else LoRA on the case's targets."""
    kind: str
    d: int
    rows: int
    rank: int | None

    @property
    def label(self) -> str:
        method = "full" if self.rank is None else f"LoRA r={self.rank}"
        if self.kind == "mlp":
            return f"MLP d→4d→d, {self.rows} rows, d = {self.d}, {method}"
        if self.kind == "stack":
            return f"3 causal pre-LN blocks, d {self.d}, {self.rows // SEQUENCE_LENGTH}×{SEQUENCE_LENGTH} tokens, {method}"
        return f"language model (vocab 81, d {self.d}, 3 blocks), {self.rows // SEQUENCE_LENGTH}×{SEQUENCE_LENGTH} tokens, {method}"


def torch_cases() -> list[TorchCase]:
    """The rows of the comparison table (the sizes the notebooks use)."""
    out = []
    for d, rows in ((64, 64), (256, 256), (1024, 512)):
        out += [TorchCase("mlp", d, rows, None), TorchCase("mlp", d, rows, VS_TORCH_RANK)]
    out += [TorchCase("stack", 96, 32 * SEQUENCE_LENGTH, None), TorchCase("stack", 96, 32 * SEQUENCE_LENGTH, VS_TORCH_RANK)]
    out += [TorchCase("lm", 96, 32 * SEQUENCE_LENGTH, None), TorchCase("lm", 96, 32 * SEQUENCE_LENGTH, VS_TORCH_RANK)]
    return out


class _Stack(Module):
    """``n`` causal pre-LN ``TransformerBlock``s in a row (the compared transformer stack)."""

    def __init__(self, d, n_heads, d_hidden, n, rng, dtype):
        super().__init__()
        self.dtype = np.dtype(dtype)
        self.blocks = ModuleList([TransformerBlock(d, n_heads, d_hidden, causal=True, rng=rng, dtype=dtype)
                                  for _ in range(n)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x

    def backward(self, dout):
        blocks = list(self.blocks)
        for block in reversed(blocks[1:]):
            dout = block.backward(dout)
        return blocks[0].backward(dout, need_input_grad=self._input_grad_needed())


def _lm_vocab() -> int:
    return 81


def build_numpy_case(case: TorchCase):
    """(model, optimizer, x, target, loss_fn) of ``case`` in lora_np, float32, seed 0."""
    dtype = np.float32
    rng = np.random.default_rng(0)
    if case.kind == "mlp":
        model = MLP(case.d, 4 * case.d, case.d, activation="gelu", rng=rng, dtype=dtype)
        targets, shape = VS_TORCH_MLP_TARGETS, (case.rows, case.d)
    elif case.kind == "stack":
        model = _Stack(case.d, 4, 4 * case.d, 3, rng, dtype)
        targets, shape = VS_TORCH_STACK_TARGETS, (case.rows // SEQUENCE_LENGTH, SEQUENCE_LENGTH, case.d)
    else:
        from .text import LanguageModel            # the real-text model of lora_np.pretrain
        model = LanguageModel(_lm_vocab(), d_model=case.d, n_heads=4, n_layers=3, d_hidden=4 * case.d,
                              context=SEQUENCE_LENGTH, rng=rng, dtype=dtype)
        targets = VS_TORCH_STACK_TARGETS
    if case.rank is not None:
        add_lora(model, targets, r=case.rank, alpha=2 * case.rank, rng=rng)
    if case.kind == "lm":
        shape = (case.rows // SEQUENCE_LENGTH, SEQUENCE_LENGTH)
        x = rng.integers(0, _lm_vocab(), size=shape)
        target = rng.integers(0, _lm_vocab(), size=shape)
        return model, Adam(model, lr=1e-3), x, target, F.cross_entropy_loss
    x = rng.standard_normal(shape).astype(dtype)
    target = rng.standard_normal(shape).astype(dtype)
    return model, Adam(model, lr=1e-3), x, target, F.mse_loss


def build_torch_case(case: TorchCase, torch):
    """A step function of ``case`` in PyTorch, written as a PyTorch user would: ``nn.Linear``,
    ``nn.LayerNorm``, ``F.gelu(approximate="tanh")``, ``F.scaled_dot_product_attention``, a
    LoRA wrapper with a frozen base, ``torch.optim.Adam``; float32, seed 0."""
    nn, tF = torch.nn, torch.nn.functional
    torch.manual_seed(0)

    class LoRA(nn.Module):
        def __init__(self, base, r):
            super().__init__()
            self.base, self.s = base, 2.0
            base.requires_grad_(False)
            self.A = nn.Parameter(torch.randn(r, base.in_features) / base.in_features ** 0.5)
            self.B = nn.Parameter(torch.zeros(base.out_features, r))

        def forward(self, x):
            return self.base(x) + (x @ self.A.T * self.s) @ self.B.T

    class Block(nn.Module):
        def __init__(self, d, h, dh):
            super().__init__()
            self.h = h
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
            self.fc1, self.fc2 = nn.Linear(d, dh), nn.Linear(dh, d)

        def forward(self, x):
            Bsz, T, C = x.shape
            a = self.ln1(x)
            q, k, v = (p(a).view(Bsz, T, self.h, C // self.h).transpose(1, 2)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
            att = tF.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o_proj(att.transpose(1, 2).reshape(Bsz, T, C))
            return x + self.fc2(tF.gelu(self.fc1(self.ln2(x)), approximate="tanh"))

    class MLPt(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            return self.fc2(tF.gelu(self.fc1(x), approximate="tanh"))

    class LM(nn.Module):
        def __init__(self, V, d):
            super().__init__()
            self.tok_emb, self.pos_emb = nn.Embedding(V, d), nn.Embedding(SEQUENCE_LENGTH, d)
            self.blocks = nn.Sequential(*(Block(d, 4, 4 * d) for _ in range(3)))
            self.ln_f, self.head = nn.LayerNorm(d), nn.Linear(d, V)

        def forward(self, idx):
            x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1]))
            return self.head(self.ln_f(self.blocks(x)))

    if case.kind == "mlp":
        model, targets = MLPt(case.d), VS_TORCH_MLP_TARGETS
        x, target = torch.randn(case.rows, case.d), torch.randn(case.rows, case.d)
    elif case.kind == "stack":
        model, targets = nn.Sequential(*(Block(case.d, 4, 4 * case.d) for _ in range(3))), VS_TORCH_STACK_TARGETS
        shape = (case.rows // SEQUENCE_LENGTH, SEQUENCE_LENGTH, case.d)
        x, target = torch.randn(*shape), torch.randn(*shape)
    else:
        model, targets = LM(_lm_vocab(), case.d), VS_TORCH_STACK_TARGETS
        shape = (case.rows // SEQUENCE_LENGTH, SEQUENCE_LENGTH)
        x, target = torch.randint(0, _lm_vocab(), shape), torch.randint(0, _lm_vocab(), shape)
    if case.rank is not None:
        model.requires_grad_(False)
        for _, m in list(model.named_modules()):
            for name, child in list(m.named_children()):
                if name in targets and isinstance(child, nn.Linear):
                    setattr(m, name, LoRA(child, case.rank))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if case.kind == "lm":
        def loss_of(out):
            return tF.cross_entropy(out.reshape(-1, out.shape[-1]), target.reshape(-1))
    else:
        def loss_of(out):
            return tF.mse_loss(out, target)

    def step():
        opt.zero_grad()
        loss = loss_of(model(x))
        loss.backward()
        opt.step()
        return loss.item()
    return step


def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


@dataclass
class TorchRow:
    """One line of the comparison: median ms per step of each, and their ratio."""
    label: str
    numpy_ms: float
    torch_ms: float

    @property
    def ratio(self) -> float:
        return self.numpy_ms / self.torch_ms


def run_vs_torch(cases=None, repeats: int = 15, progress=None) -> list[TorchRow] | None:
    """Each case's step in lora_np and in PyTorch, timed together (``_interleaved_timings``:
    round-robin bursts, median), float32, ``TORCH_THREADS`` threads for PyTorch; None when
    PyTorch is not installed."""
    torch = _import_torch()
    if torch is None:
        return None
    torch.set_num_threads(TORCH_THREADS)
    rows = []
    for case in torch_cases() if cases is None else cases:
        model, opt, x, target, loss_fn = build_numpy_case(case)
        np_step = (lambda m=model, o=opt, x=x, t=target, f=loss_fn: train_step(m, o, x, t, f))
        (np_s, torch_s), _ = _interleaved_timings([np_step, build_torch_case(case, torch)], repeats)
        rows.append(TorchRow(case.label, np_s * 1e3, torch_s * 1e3))
        if progress:
            progress(rows[-1])
    return rows


def format_torch_table(rows: list[TorchRow]) -> str:
    """The comparison as a markdown table: the ratio first (what the goal is about)."""
    out = ["| model | lora_np / PyTorch step time | lora_np ms | PyTorch ms |", "| --- | --- | --- | --- |"]
    out += [f"| {r.label} | {r.ratio:.2f}× | {r.numpy_ms:.2f} | {r.torch_ms:.2f} |" for r in rows]
    return "\n".join(out)


def vs_torch_main(args) -> list[TorchRow] | None:
    """``--vs-torch``: print the comparison (and write it to the output folder), or, without
    PyTorch, say how to install it."""
    if _import_torch() is None:
        print(f"--vs-torch: PyTorch is not installed, so the comparison is skipped. To run it: {TORCH_INSTALL}")
        return None
    torch = _import_torch()
    malloc = allocator_setting(args.allocator)
    info = machine_info()
    header = (f"lora_np vs PyTorch {torch.__version__}, float32, same run, interleaved; NumPy {info['numpy']} "
              f"with BLAS {info['blas']} ({info['blas_threads']} threads), torch.set_num_threads({TORCH_THREADS}); "
              f"allocator {malloc}; step = zero_grad + forward + loss + backward + Adam; median of ≥{args.repeats} steps")
    print(header, flush=True)
    load, t0 = MachineLoad(), time.perf_counter()
    rows = run_vs_torch(repeats=args.repeats,
                        progress=lambda r: print(f"  {r.label}: {r.ratio:.2f}×", file=sys.stderr, flush=True))
    table = format_torch_table(rows)
    footer = _footer(time.perf_counter() - t0, load.others_fraction())
    print(table)
    print(footer)
    if not args.no_files:
        out = Path(args.out) if args.out is not None else SCRATCH_DIR
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_vs_torch.md").write_text(header + "\n\n" + table + "\n\n" + footer + "\n", encoding="utf-8")
        print(f"wrote {out / 'bench_vs_torch.md'}")
    return rows


# ------------------------------------------------------------------------------- the command

#: the options that change what is measured: a run with all of them at their defaults is the
#: one whose results are committed in figures/
_MEASUREMENT_OPTIONS = ("widths", "ranks", "dtypes", "models", "rows", "repeats", "quick", "allocator",
                        "vs_torch")


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_np.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=_int_list, default=[64, 128, 256, 512, 1024],
                   help="comma-separated widths d (default 64,128,256,512,1024)")
    p.add_argument("--ranks", type=_int_list, default=[1, 8, 64],
                   help="comma-separated LoRA ranks, each run where r <= d/2 (default 1,8,64)")
    p.add_argument("--dtypes", type=_str_list(("float32", "float64")), default=["float32", "float64"],
                   help="float32, float64 or both (default both)")
    p.add_argument("--models", type=_str_list(("mlp", "attention")), default=["mlp", "attention"],
                   help="mlp, attention or both (default both)")
    p.add_argument("--rows", type=int, default=512, help="N rows (MLP) = batch·T tokens (attention)")
    p.add_argument("--repeats", type=int, default=10, help="minimum timed steps per row")
    p.add_argument("--quick", action="store_true", help="widths 128,1024, rank 8, float32, 5 repeats")
    p.add_argument("--out", default=None,
                   help="folder for bench_results.md and the plots (default: figures/ for the "
                        "default run, whose results are committed; figures/scratch/ for any other)")
    p.add_argument("--no-files", action="store_true", help="print only")
    p.add_argument("--allocator", choices=("keep", "default"), default="keep",
                   help="keep: glibc keeps freed arrays for the next step, as a training loop "
                        "would (see lora_np.machine.keep_freed_memory); default: glibc's "
                        "defaults, which page-fault large arrays back in every step")
    p.add_argument("--vs-torch", action="store_true",
                   help="time the same models in PyTorch too (if installed), in the same run, "
                        "float32, 2 threads each, and print lora_np / PyTorch step-time ratios")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The command line as a Namespace, ``--quick`` expanded; ``.committed`` is True when every
    option that changes what is measured is at its default (the run behind figures/)."""
    p = _parser()
    args = p.parse_args(argv)
    args.committed = all(getattr(args, k) == p.get_default(k) for k in _MEASUREMENT_OPTIONS)
    if args.quick:
        args.widths, args.ranks, args.dtypes, args.repeats = [128, 1024], [8], ["float32"], 5
    if args.rows < SEQUENCE_LENGTH or args.rows % SEQUENCE_LENGTH:
        p.error(f"--rows must be a multiple of T={SEQUENCE_LENGTH}, got {args.rows}")
    return args


def output_dir(args: argparse.Namespace) -> Path:
    """``--out`` if given; else ``FIGURES_DIR`` for the default run and ``SCRATCH_DIR`` for any
    other, so that only the run that produced the committed files rewrites them."""
    if args.out is not None:
        return Path(args.out)
    return FIGURES_DIR if args.committed else SCRATCH_DIR


def _progress_bar(groups):
    """A tqdm bar on stderr that advances by the FLOP model's FLOPs of each measured group:
    the wide groups, which take most of the time, move it most, and the ETA is the FLOPs left
    at the average rate so far (``smoothing=0``)."""
    total = sum(c.flops() for group in groups for c in group)
    return tqdm(total=total, file=sys.stderr, smoothing=0, desc="bench",
                bar_format="{desc}: {percentage:3.0f}%|{bar:20}| [{elapsed}<{remaining}]{postfix}")


def main(argv=None) -> list[BenchRow]:
    args = parse_args(argv)
    if args.vs_torch:
        return vs_torch_main(args)
    malloc = allocator_setting(args.allocator)
    header = _header(machine_info(), args.rows, args.repeats, malloc)
    print(header, flush=True)
    groups = configs(args.models, args.widths, args.ranks, args.dtypes, args.rows)
    load, t0 = MachineLoad(), time.perf_counter()
    with _progress_bar(groups) as bar:
        def progress(group_rows):
            bar.update(sum(r.flops for r in group_rows))
            r0 = group_rows[0]
            bar.set_postfix_str(f"last: {r0.model} {r0.dtype} d={r0.d}: "
                                + ", ".join(f"{r.method} {r.ms:.1f} ms" for r in group_rows))
        rows = run(args.models, args.widths, args.ranks, args.dtypes, args.rows, args.repeats,
                   progress=progress)
    summary = target_summary(rows)
    notes = (summary + "\n" if summary else "") + _footer(time.perf_counter() - t0,
                                                          load.others_fraction())
    print(format_table(rows))
    print(notes)
    if not args.no_files:
        out = output_dir(args)
        written = _write_results(out, rows, args.dtypes, header, notes,
                                 sys.argv[1:] if argv is None else argv)
        note = "" if out != SCRATCH_DIR else (" (not the default run, so figures/ keeps the "
                                              "committed results of `python -m lora_np.bench`)")
        print("wrote " + ", ".join(str(w) for w in written) + note)
    return rows


if __name__ == "__main__":
    main()
