"""Figures of notebook 09 (lora_np.plots.quant): NF4 codes, bits vs error, the error's spectrum,
LoftQ, QLoRA vs LoRA."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from lora_np import analysis
from lora_np import quant as Q
from lora_np.plots import quant

from _plots_helpers import PNG_MAGIC, assert_readable, line


def test_nf4_codes_figure_draws_each_code_and_its_usage(tmp_path):
    x = np.clip(np.random.default_rng(0).standard_normal(5000) / 3, -1, 1)
    codes = {"NF4": Q.NF4, "uniform 4-bit": np.linspace(-1, 1, 16)}
    open_before = plt.get_fignums()
    fig = quant.plot_nf4_codes(codes, x, path=tmp_path / "c.png")
    assert plt.get_fignums() == open_before
    assert_readable(fig)
    ax1, ax2 = fig.axes
    rows = [ln for ln in ax1.get_lines()]
    assert len(rows) == 2
    np.testing.assert_allclose(rows[0].get_xdata(), Q.NF4)
    bars = [p.get_height() for p in ax2.patches]
    assert len(bars) == 32 and sum(bars) == pytest.approx(2.0)        # each code's shares sum to 1
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC


def test_nf4_codes_figure_refuses_a_code_that_is_not_16_ascending_values():
    with pytest.raises(ValueError, match="16 ascending values"):
        quant.plot_nf4_codes({"bad": np.linspace(-1, 1, 8)}, np.zeros(10))


def test_bits_vs_error_figure():
    rows = {"a": [(64, 4.5, 0.09), (32, 5.0, 0.087)], "b": [(64, 4.127, 0.09)]}
    fig = quant.plot_bits_vs_error(rows)
    assert_readable(fig)
    np.testing.assert_allclose(line(fig.axes[0], "a").get_xdata(), [4.5, 5.0])
    np.testing.assert_allclose(line(fig.axes[0], "a").get_ydata(), [0.09, 0.087])
    with pytest.raises(ValueError, match="must be > 0"):
        quant.plot_bits_vs_error({"a": [(64, 4.5, 0.0)]})


def test_error_spectrum_figure_draws_normalised_values_and_energy():
    M = np.random.default_rng(1).standard_normal((20, 12))
    s = analysis.singular_values(M)
    fig = quant.plot_error_spectrum({"E": s})
    assert_readable(fig)
    ax1, ax2 = fig.axes
    np.testing.assert_allclose(line(ax1, "E").get_ydata(), s / s[0])
    np.testing.assert_allclose(line(ax2, "E").get_ydata()[-1], 1.0)
    with pytest.raises(ValueError, match="non-empty dict"):
        quant.plot_error_spectrum({})


def test_loftq_figure_and_qlora_figure(tmp_path):
    fig = quant.plot_loftq({"q": [0.1, 0.08, 0.07]})
    assert_readable(fig)
    np.testing.assert_allclose(line(fig.axes[0], "q").get_ydata(), [1.0, 0.8, 0.7])
    fig = quant.plot_qlora_vs_lora({"LoRA": [1.6, 1.62], "QLoRA": [1.63, 1.64, 1.65]},
                                   {"LoRA": {"frozen": 2000, "state": 500}, "QLoRA": {"frozen": 300, "state": 500}},
                                   path=tmp_path / "q.png")
    assert_readable(fig)
    ax1, ax2 = fig.axes
    assert line(ax1, "QLoRA: 1.640").get_ydata().tolist() == [1.63, 1.64, 1.65]
    heights = sorted(p.get_height() for p in ax2.patches)
    assert heights == [0.3, 0.5, 0.5, 2.0]                                      # kB
    assert (tmp_path / "q.png").exists()
