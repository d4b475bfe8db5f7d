"""Tests for lora_np.bench: the FLOP and byte models, dtype preservation and the memory
behaviour of a training step. Nothing here asserts a wall-clock time."""

import os
import pathlib
import platform
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from lora_np import Linear, LoRALinear
from lora_np import bench
from lora_np.bench import (ADAM_FLOPS_PER_PARAM, BenchConfig, adam_flops, attention_step_flops,
                           build, linear_step_flops, lora_linear_step_flops, measured_state_bytes,
                           mlp_step_flops, state_bytes_model, train_step)

ROOT = pathlib.Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# FLOP model: hand counts for tiny shapes
# ---------------------------------------------------------------------------------------------

def test_linear_step_flops_by_hand():
    # N=2, d_in=3, d_out=4: a GEMM is 2·2·3·4 = 48
    forward = 48 + 2 * 4                     # X Wᵀ + b
    dX = 48
    dW_db = 48 + 2 * 4                       # Gᵀ X and Σ_rows G
    adam = ADAM_FLOPS_PER_PARAM * (12 + 4)   # W and b
    assert linear_step_flops(2, 3, 4, trainable=True) == forward + dX + dW_db + adam
    assert linear_step_flops(2, 3, 4, trainable=False) == forward + dX


def test_lora_linear_step_flops_by_hand():
    N, d_in, d_out, r = 2, 3, 4, 1
    frozen = (2 * N * d_in * d_out + N * d_out) + 2 * N * d_in * d_out     # forward, dX = G W
    forward_branch = 2 * N * r * d_in + N * r + 2 * N * r * d_out + N * d_out   # H, sH, (sH)Bᵀ, add
    backward_branch = (2 * N * r * d_out + N * r          # G B, s·(G B)
                       + 2 * N * r * d_out + r * d_out    # dB = s (Gᵀ H)
                       + 2 * N * r * d_in                 # dA = (sGB)ᵀ X
                       + 2 * N * r * d_in + N * d_in)     # (sGB) A, added to dX
    adam = ADAM_FLOPS_PER_PARAM * r * (d_in + d_out)
    expected = frozen + forward_branch + backward_branch + adam
    assert expected == 104 + 106 + 98
    assert lora_linear_step_flops(N, d_in, d_out, r) == expected


def test_lora_skips_exactly_the_dW_gemm_and_adds_the_branch():
    N, d, r = 64, 32, 4
    full, lora = linear_step_flops(N, d, d), lora_linear_step_flops(N, d, d, r)
    frozen = linear_step_flops(N, d, d, trainable=False)
    # full − frozen = the dW GEMM, db and Adam on W, b
    assert full - frozen == 2 * N * d * d + N * d + adam_flops(d * d + d)
    # LoRA − frozen = the branch (6·N·r·(d_in+d_out) GEMM FLOPs + O(N·(r + d))) and Adam on A, B
    assert lora - frozen == 6 * N * r * 2 * d + 2 * N * r + 2 * N * d + r * d + adam_flops(2 * r * d)


def test_mlp_step_flops_by_hand():
    N, d = 2, 4
    per_linear = (64 + 8) + 64 + (64 + 8) + ADAM_FLOPS_PER_PARAM * 20
    elementwise = (bench.GELU_FORWARD_FLOPS + bench.GELU_BACKWARD_FLOPS + bench.MSE_FLOPS) * N * d
    assert mlp_step_flops(N, d) == 2 * per_linear + elementwise
    assert mlp_step_flops(N, d, r=2) == 2 * lora_linear_step_flops(N, d, d, 2) + elementwise


def test_mlp_flop_ratio_tends_to_two_thirds_plus_2r_over_d():
    # at large N and d the GEMMs dominate: LoRA/full → (4 + 12 r/d) / 6 = 2/3 + 2r/d
    N, d, r = 10**6, 8192, 8
    ratio = mlp_step_flops(N, d, r) / mlp_step_flops(N, d)
    assert ratio == pytest.approx(2 / 3 + 2 * r / d, rel=2e-3)


def test_attention_step_flops_by_hand():
    batch, T, d, H = 2, 3, 4, 2
    N, S = batch * T, batch * H * T * T
    core = (12 * batch * T * T * d
            + (bench.SOFTMAX_FORWARD_FLOPS + bench.SOFTMAX_BACKWARD_FLOPS) * S + 2 * N * d)
    rest = 2 * N * d + bench.MSE_FLOPS * N * d          # dX_q + dX_k + dX_v, loss
    assert attention_step_flops(batch, T, d, H) == 4 * linear_step_flops(N, d, d) + core + rest
    lora = (2 * lora_linear_step_flops(N, d, d, 1)              # q_proj, v_proj
            + 2 * linear_step_flops(N, d, d, trainable=False))  # k_proj, o_proj frozen
    assert attention_step_flops(batch, T, d, H, r=1) == lora + core + rest


def test_attention_core_flops_do_not_depend_on_rank():
    def projections(r):
        return (2 * lora_linear_step_flops(512, 256, 256, r)
                + 2 * linear_step_flops(512, 256, 256, trainable=False))
    cores = {attention_step_flops(8, 64, 256, 4, r) - projections(r) for r in (1, 8, 64)}
    assert len(cores) == 1


@pytest.mark.parametrize("fn, args, exc", [
    (linear_step_flops, (0, 3, 4), ValueError),
    (lora_linear_step_flops, (2, 3, 4, 0), ValueError),
    (mlp_step_flops, (2.0, 4), TypeError),
    (attention_step_flops, (2, 3, 5, 2), ValueError),       # d not divisible by heads
    (attention_step_flops, (2, 3, 4, True), TypeError),
])
def test_flop_models_reject_bad_sizes(fn, args, exc):
    with pytest.raises(exc):
        fn(*args)


def test_config_flops_match_the_model_functions():
    assert BenchConfig("mlp", 64, "float32", 8, 128).flops() == mlp_step_flops(128, 64, 8)
    c = BenchConfig("attention", 128, "float64", None, 128)
    assert (c.batch, c.n_heads) == (2, 2)
    assert c.flops() == attention_step_flops(2, 64, 128, 2)


# ---------------------------------------------------------------------------------------------
# byte model vs the arrays a built model really holds
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["mlp", "attention"])
@pytest.mark.parametrize("rank", [None, 1, 8])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_state_bytes_model_is_exact(model, rank, dtype):
    c = BenchConfig(model, 64, dtype, rank, 64)
    m, opt, _, _ = build(c)
    assert measured_state_bytes(m, opt) == c.state_bytes_model()


def test_state_bytes_model_by_hand():
    d, r = 16, 2
    P = 2 * (d * d + d)                                   # MLP: two Linear layers
    assert state_bytes_model("mlp", d, None, np.float32) == 4 * 4 * P
    assert state_bytes_model("mlp", d, r, np.float64) == 8 * (P + 4 * 2 * (r * d + d * r))
    with pytest.raises(ValueError):
        state_bytes_model("transformer", d)


def test_measured_state_bytes_counts_shared_arrays_once():
    c = BenchConfig("mlp", 32, "float64", 4, 64)
    m, opt, _, _ = build(c)
    before = measured_state_bytes(m, opt)
    opt.m["extra_alias"] = opt.m[next(iter(opt.m))]       # a second name for the same array
    assert measured_state_bytes(m, opt) == before


# ---------------------------------------------------------------------------------------------
# dtype in = dtype out, through a whole training step
# ---------------------------------------------------------------------------------------------

def _arrays_in(obj):
    """Every ndarray inside nested tuples (NamedTuple caches) / lists."""
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _arrays_in(item)


@pytest.mark.parametrize("model", ["mlp", "attention"])
@pytest.mark.parametrize("rank", [None, 4])
def test_float32_stays_float32_through_a_step(model, rank):
    c = BenchConfig(model, 64, "float32", rank, 128)
    m, opt, x, target = build(c)
    train_step(m, opt, x, target)
    y = m(x)                                              # forward only: caches are now filled
    assert y.dtype == np.float32
    cached = [a for _, mod in m.named_modules() for a in _arrays_in(mod.__dict__.get("_cache"))]
    assert cached, "expected forward to leave caches"
    assert {a.dtype for a in cached if a.dtype.kind == "f"} == {np.dtype(np.float32)}
    dx = m.backward(np.ones_like(y))
    assert dx.dtype == np.float32
    opt.step()
    for group in (m.parameters(), m.gradients(), opt.m, opt.v):
        bad = {k: a.dtype for k, a in group.items() if a.dtype != np.float32}
        assert not bad, f"promoted to another dtype: {bad}"


# ---------------------------------------------------------------------------------------------
# memory: LoRA never forms a (d_out, d_in) array, frozen layers keep no input
# ---------------------------------------------------------------------------------------------

def _peak_bytes(fn):
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        out = fn()
        return tracemalloc.get_traced_memory()[1] - base, out
    finally:
        tracemalloc.stop()


def test_lora_forward_and_backward_never_allocate_a_dense_weight():
    # N=4 rows, d=256: a dense (d_out, d_in) array (ΔW = B A or dW) would be 512 KiB;
    # everything LoRA needs is O(N·d + r·d) = a few KiB
    d, N, r = 256, 4, 2
    rng = np.random.default_rng(0)
    layer = LoRALinear(Linear(d, d, rng=rng), r=r, alpha=4, rng=rng)
    layer.B[...] = rng.standard_normal(layer.B.shape)
    x, dy = rng.standard_normal((N, d)), rng.standard_normal((N, d))
    dense = d * d * 8
    fwd, _ = _peak_bytes(lambda: layer(x))
    bwd, _ = _peak_bytes(lambda: layer.backward(dy))
    assert fwd < dense / 8, f"LoRA forward allocated {fwd} bytes (a dense weight is {dense})"
    assert bwd < dense / 8, f"LoRA backward allocated {bwd} bytes (a dense weight is {dense})"


def test_frozen_linear_backward_skips_dW():
    d, N = 256, 4
    rng = np.random.default_rng(0)
    layer = Linear(d, d, rng=rng).freeze()
    x, dy = rng.standard_normal((N, d)), rng.standard_normal((N, d))
    layer(x)
    bwd, dx = _peak_bytes(lambda: layer.backward(dy))
    assert bwd < d * d * 8 / 8
    np.testing.assert_allclose(dx, dy @ layer.W)


def test_lora_with_dropout_caches_the_dropped_input_not_x():
    # with W frozen, backward needs X̃ = X ⊙ mask (for dA) but never X itself
    rng = np.random.default_rng(0)
    layer = LoRALinear(Linear(16, 8, rng=rng), r=2, alpha=4, dropout=0.5, rng=rng)
    x = rng.standard_normal((4, 16))
    layer(x)
    cache = layer.__dict__["_cache"][1]
    assert cache.x is None and cache.xd is not None and cache.dropout_mask is not None
    dx = layer.backward(np.ones((4, 8)))
    assert dx.shape == x.shape


def _step_memory(model, rank, d=256, rows=128):
    m, opt, x, target = build(BenchConfig(model, d, "float64", rank, rows))
    return bench._memory_of_step(m, opt, x, target)


def test_lora_step_peak_memory_is_lower_than_full():
    # full fine-tuning allocates d×d arrays (dW, Adam's scratch); with d = 512 ≫ N = 64 rows
    # they outweigh the N×d activations, which LoRA and full fine-tuning share
    for model in ("mlp", "attention"):
        _, full_peak = _step_memory(model, None, d=512, rows=64)
        _, lora_peak = _step_memory(model, 8, d=512, rows=64)
        assert full_peak >= 512 * 512 * 8, (model, full_peak)
        assert lora_peak < 0.8 * full_peak, (model, lora_peak, full_peak)


def test_lora_attention_keeps_fewer_activations():
    # LoRA on q, v: o_proj is frozen, so its input (the merged heads, N×d) is not cached;
    # q_proj and v_proj cache H = X Aᵀ (N×r) each instead
    N, d, r = 128, 256, 8
    full_act, _ = _step_memory("attention", None)
    lora_act, _ = _step_memory("attention", r)
    saved = N * d * 8 - 2 * N * r * 8
    assert full_act - lora_act >= saved - 1024, (full_act, lora_act, saved)


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------

def test_configs_skip_ranks_above_half_the_width():
    groups = bench.configs(["mlp"], [16], [1, 8, 64], ["float32"], rows=64)
    assert [c.method for c in groups[0]] == ["full", "LoRA r=1", "LoRA r=8"]


def test_main_writes_table_and_plot(tmp_path, capsys):
    rows = bench.main(["--widths", "64", "--ranks", "4", "--dtypes", "float32", "--repeats", "1",
                       "--rows", "64", "--out-dir", str(tmp_path), "--allocator", "default"])
    out = capsys.readouterr().out
    assert "cores" in out and "LoRA r=4" in out
    assert [(r.model, r.method) for r in rows] == [("mlp", "full"), ("mlp", "LoRA r=4"),
                                                   ("attention", "full"), ("attention", "LoRA r=4")]
    lora = rows[1]
    assert lora.flop_ratio == pytest.approx(mlp_step_flops(64, 64, 4) / mlp_step_flops(64, 64))
    assert lora.state_ratio == pytest.approx(lora.state_ratio_model)
    md = (tmp_path / "bench_results.md").read_text()
    assert "| block |" in md and "os.cpu_count()" in md
    assert (tmp_path / "bench_float32.png").stat().st_size > 10_000


def test_keep_freed_memory_leaves_an_explicit_environment_alone(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "123")
    assert bench.keep_freed_memory() == "MALLOC_TRIM_THRESHOLD_=123 (from the environment)"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_allocator_keep_removes_the_page_faults_of_each_step():
    """A count, not a time: with glibc's defaults every MLP step at d = 256 (arrays of 512 KiB,
    above the mmap threshold) page-faults its arrays back in; with --allocator keep, none.
    Run in a subprocess so that this test process keeps its own allocator settings."""
    faults = {}
    env = {k: v for k, v in os.environ.items() if k not in bench.MALLOC_ENV}
    for mode in ("keep", "default"):
        out = subprocess.run([sys.executable, "-m", "lora_np.bench", "--widths", "256", "--ranks", "8",
                              "--dtypes", "float32", "--models", "mlp", "--repeats", "3", "--no-files",
                              "--allocator", mode], capture_output=True, text=True, env=env,
                             cwd=ROOT, check=True).stdout
        rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["mlp"]]
        assert len(rows) == 2, out
        faults[mode] = [float(r[-1]) for r in rows]
        assert ("keeps freed memory" in out) == (mode == "keep")
    assert faults["keep"] == [0, 0]
    assert min(faults["default"]) > 100


@pytest.mark.parametrize("argv", [["--widths", "0"], ["--dtypes", "float16"], ["--rows", "100"],
                                  ["--models", "cnn"], ["--allocator", "jemalloc"]])
def test_main_rejects_bad_options(argv):
    with pytest.raises(SystemExit):
        bench.main(argv + ["--no-files"])


def _row(model, rank, ms, flops, state, state_model, matmul=100.0):
    return bench.BenchRow(model=model, dtype="float32", d=1024, method="x", rank=rank, rows=512,
                          ms=ms, flops=flops, gflops=flops / ms / 1e6, matmul_gflops=matmul,
                          state_bytes=state, state_bytes_model=state_model, activation_bytes=1,
                          peak_bytes=1)


def test_target_summary_checks_the_three_targets():
    full = _row("mlp", None, ms=100.0, flops=int(8e9), state=400, state_model=400)
    lora = _row("mlp", 8, ms=75.0, flops=int(6e9), state=100, state_model=100)
    bench._fill_ratios([full, lora])
    assert lora.time_vs_model == pytest.approx(1.0)           # 0.75 / 0.75
    text = bench.target_summary([full, lora])
    assert "t ratio/model 1.00 (≤ 1.1)" in text
    assert "rate LoRA 80%, full 80% of matmul (both ≥ 70%)" in text
    assert "off the byte model by 0.00% (≤ 5%)" in text


def test_interleaved_medians_times_each_function_in_bursts():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
        return fn

    meds = bench._interleaved_medians([make("a"), make("b")], repeats=4, min_seconds=0.0, burst=3)
    assert len(meds) == 2 and all(m >= 0 for m in meds)
    # 1 sizing call + 2 rounds of (1 untimed + 2 timed) calls each
    assert calls == {"a": 7, "b": 7}


def test_machine_load_is_a_fraction_or_unknown():
    frac = bench.MachineLoad().others_fraction()
    assert frac is None or 0.0 <= frac <= 1.0
