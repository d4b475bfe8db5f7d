"""Tests for lora_np.bench: what it builds and times agrees with the FLOP and byte models of
lora_np.counting, dtype preservation, the memory behaviour of a training step, and the command
(where it writes, what it refuses). Nothing here asserts a wall-clock time."""

import os
import pathlib
import platform
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from lora_np import Linear, LoRALinear
from lora_np.counting.memory import _arrays_in     # every ndarray inside a (nested) cache
from lora_np import bench, machine
from lora_np.bench import BenchConfig, build, train_step
from lora_np.counting import (attention_step_flops, input_grad_flops, measured_total_state_bytes,
                              mlp_step_flops)

ROOT = pathlib.Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# a configuration uses the FLOP and byte models of lora_np.counting (tested there)
# ---------------------------------------------------------------------------------------------

def test_config_flops_match_the_model_functions():
    # train_step asks for no input gradient, so the timed step's model leaves it out
    assert BenchConfig("mlp", 64, "float32", 8, 128).flops() == (mlp_step_flops(128, 64, 8)
                                                                 - input_grad_flops("mlp", 128, 64, 8))
    c = BenchConfig("attention", 128, "float64", None, 128)
    assert (c.batch, c.n_heads) == (2, 2)
    assert c.flops() == attention_step_flops(2, 64, 128, 2) - input_grad_flops("attention", 128, 128)


# ---------------------------------------------------------------------------------------------
# byte model vs the arrays a built model really holds
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["mlp", "attention"])
@pytest.mark.parametrize("rank", [None, 1, 8])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_state_bytes_model_is_exact(model, rank, dtype):
    c = BenchConfig(model, 64, dtype, rank, 64)
    m, opt, x, target = build(c)
    train_step(m, opt, x, target)
    assert measured_total_state_bytes(m, opt) == c.state_bytes_model()


# ---------------------------------------------------------------------------------------------
# dtype in = dtype out, through a whole training step
# ---------------------------------------------------------------------------------------------

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


def test_build_adapts_the_bench_lora_targets():
    m, _, _, _ = build(BenchConfig("attention", 64, "float32", 2, 64))
    assert sorted(n for n in m.trainable_parameters()) == ["q_proj.A", "q_proj.B",
                                                           "v_proj.A", "v_proj.B"]


SMALL = ["--widths", "64", "--ranks", "4", "--dtypes", "float32", "--repeats", "1", "--rows", "64",
         "--allocator", "default"]


def test_main_writes_table_and_plot(tmp_path, capsys):
    rows = bench.main(SMALL + ["--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert "cores" in captured.out and "LoRA r=4" in captured.out
    assert f"wrote {tmp_path / 'bench_results.md'}" in captured.out
    assert "bench: 100%" in captured.err                        # the progress bar, on stderr
    assert [(r.model, r.method) for r in rows] == [("mlp", "full"), ("mlp", "LoRA r=4"),
                                                   ("attention", "full"), ("attention", "LoRA r=4")]
    lora = rows[1]
    assert lora.flop_ratio == pytest.approx(BenchConfig("mlp", 64, "float32", 4, 64).flops()
                                            / BenchConfig("mlp", 64, "float32", None, 64).flops())
    assert lora.state_ratio == pytest.approx(lora.state_ratio_model)
    md = (tmp_path / "bench_results.md").read_text()
    assert "| block |" in md and "os.cpu_count()" in md
    assert (tmp_path / "bench_float32.png").stat().st_size > 10_000


@pytest.fixture
def figures(tmp_path, monkeypatch):
    """bench's figures/ and figures/scratch/ moved into tmp_path, so no test touches the repo."""
    monkeypatch.setattr(bench, "FIGURES_DIR", tmp_path / "figures")
    monkeypatch.setattr(bench, "SCRATCH_DIR", tmp_path / "figures" / "scratch")
    return tmp_path / "figures"


@pytest.mark.parametrize("argv, committed", [
    ([], True), (["--allocator", "keep"], True), (["--no-files"], True),
    (["--widths", "64,128,256,512,1024"], True),          # the defaults, spelt out
    (["--quick"], False), (["--allocator", "default"], False), (["--widths", "64"], False),
    (["--ranks", "8"], False), (["--dtypes", "float32"], False), (["--models", "mlp"], False),
    (["--rows", "128"], False), (["--repeats", "3"], False),
])
def test_only_the_default_run_writes_the_committed_folder(figures, argv, committed):
    args = bench.parse_args(argv)
    assert args.committed is committed
    assert bench.output_dir(args) == (figures if committed else figures / "scratch")
    assert bench.output_dir(bench.parse_args(argv + ["--out", "elsewhere"])) == pathlib.Path("elsewhere")


def test_a_non_default_run_writes_to_scratch_and_says_so(figures, capsys):
    bench.main(SMALL)
    out = capsys.readouterr().out
    assert sorted(p.name for p in (figures / "scratch").iterdir()) == ["bench_float32.png",
                                                                        "bench_results.md"]
    assert sorted(p.name for p in figures.iterdir()) == ["scratch"]     # nothing committed touched
    assert f"wrote {figures / 'scratch' / 'bench_results.md'}" in out
    assert "not the default run" in out


def test_the_committed_folder_is_the_repositorys_figures():
    assert bench.FIGURES_DIR == ROOT / "figures"
    assert bench.SCRATCH_DIR == ROOT / "figures" / "scratch"
    assert "/figures/scratch/" in (ROOT / ".gitignore").read_text().split()


def test_importing_bench_needs_no_matplotlib():
    code = "import sys, lora_np.bench; assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_allocator_keep_removes_the_page_faults_of_each_step():
    """A count, not a time: with glibc's defaults every MLP step at d = 256 (arrays of 512 KiB,
    above the mmap threshold) page-faults its arrays back in; with --allocator keep, none.
    Run in a subprocess so that this test process keeps its own allocator settings."""
    faults = {}
    env = {k: v for k, v in os.environ.items() if k not in machine.MALLOC_ENV}
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
    return bench.BenchRow(model=model, dtype="float32", d=1024, method="x", rank=rank,
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
    assert "rate LoRA 80%, full 80% of matmul (both ≥ 80%)" in text
    assert "off the byte model by 0.00% (≤ 5%)" in text


def test_target_summary_is_empty_without_rows_at_the_target_setting():
    full = _row("mlp", None, ms=100.0, flops=int(8e9), state=400, state_model=400)
    lora = _row("mlp", 4, ms=75.0, flops=int(6e9), state=100, state_model=100)
    bench._fill_ratios([full, lora])
    assert bench.target_summary([full, lora]) == ""


def test_interleaved_timings_times_each_function_in_bursts():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
        return fn

    medians, faults = bench._interleaved_timings([make("a"), make("b")], repeats=4, min_seconds=0.0)
    assert len(medians) == len(faults) == 2 and all(m >= 0 for m in medians)
    # 1 sizing call + 2 rounds of (1 untimed + BURST - 1 = 2 timed) calls each
    assert bench.BURST == 3 and calls == {"a": 7, "b": 7}


# ---------------------------------------------------------------------------------------------
# --vs-torch: PyTorch is optional; without it the command says how to install it
# ---------------------------------------------------------------------------------------------

def test_vs_torch_without_torch_says_how_to_install_it(monkeypatch, capsys, figures):
    monkeypatch.setattr(bench, "_import_torch", lambda: None)
    assert bench.main(["--vs-torch"]) is None
    out = capsys.readouterr().out
    assert "PyTorch is not installed" in out and "pip install torch" in out
    assert not figures.exists()                                      # nothing written


def test_vs_torch_is_not_the_committed_run():
    assert bench.parse_args(["--vs-torch"]).committed is False


@pytest.mark.parametrize("case", bench.torch_cases(), ids=lambda c: c.label)
def test_vs_torch_numpy_models_step_in_float32(case):
    small = bench.TorchCase(case.kind, case.d if case.kind != "mlp" else 16, 64, case.rank)
    model, opt, x, target, loss_fn = bench.build_numpy_case(small)
    loss = train_step(model, opt, x, target, loss_fn)
    assert np.isfinite(loss) and all(p.dtype == np.float32 for p in model.parameters().values())
    assert (case.rank is None) == (not any(n.endswith(".A") for n in model.trainable_parameters()))


def test_vs_torch_table_has_every_goal_row():
    labels = [c.label for c in bench.torch_cases()]
    assert len(labels) == 10 and len(set(labels)) == 10
    rows = [bench.TorchRow(label, 2.0, 4.0) for label in labels]
    table = bench.format_torch_table(rows)
    assert table.count("0.50×") == 10 and "lora_np / PyTorch" in table


def test_vs_torch_times_both_sides_when_torch_is_installed():
    torch = pytest.importorskip("torch")
    case = bench.TorchCase("mlp", 16, 64, 8)
    step = bench.build_torch_case(case, torch)
    assert np.isfinite(step())
    rows = bench.run_vs_torch([case], repeats=2)
    assert len(rows) == 1 and rows[0].numpy_ms > 0 and rows[0].torch_ms > 0
