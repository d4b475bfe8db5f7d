"""The benchmark's figure: three panels drawn from BenchRow-like rows."""

from types import SimpleNamespace

import numpy as np
import pytest

from lora_np.plots import plot_bench

from _plots_helpers import PNG_MAGIC, line


def _row(model, d, method, rank, ms, dtype="float32"):
    ratios = dict(time_ratio=None, flop_ratio=None, state_ratio=None, peak_ratio=None, memory_ratio=None)
    if rank is not None:
        ratios = dict(time_ratio=0.9, flop_ratio=0.7, state_ratio=0.3, peak_ratio=1.0, memory_ratio=0.6)
    return SimpleNamespace(model=model, dtype=dtype, d=d, method=method, rank=rank, ms=ms,
                           frac_matmul=0.5, **ratios)


ROWS = [_row(m, d, "full", None, d / 64) for m in ("mlp", "attention") for d in (64, 128)] + \
       [_row(m, d, "LoRA r=8", 8, d / 100) for m in ("mlp", "attention") for d in (64, 128)] + \
       [_row("mlp", 64, "full", None, 5.0, dtype="float64")]


def test_bench_figure_draws_the_rows(tmp_path):
    path = tmp_path / "bench.png"
    fig = plot_bench(ROWS, "float32", path=path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    ax_ms, ax_rate, ax_ratio = fig.axes
    np.testing.assert_allclose(line(ax_ms, "mlp, full").get_ydata(), [1.0, 2.0])
    np.testing.assert_allclose(line(ax_rate, "attention, LoRA r=8").get_ydata(), [50, 50])
    assert ax_ms.get_xscale() == "log" and ax_ms.get_yscale() == "log"
    heights = sorted(round(p.get_height(), 6) for p in ax_ratio.patches)
    assert heights == sorted([0.9, 0.7, 0.3, 1.0, 0.6] * 2)          # 2 LoRA rows at d = 128
    assert "float32" in fig.get_suptitle()


def test_bench_figure_needs_rows_of_its_dtype():
    with pytest.raises(ValueError, match="no rows in dtype 'bfloat16'"):
        plot_bench(ROWS, "bfloat16")
