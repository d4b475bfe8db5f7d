"""Figures of a sweep: each function returns a Figure, draws the numbers of the result, saves a PNG."""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from lora_np.experiments import SweepSettings, rank_sweep
from lora_np.plots import (FIGURE_NAMES, plot_delta_spectra, plot_loss_curves, plot_loss_vs_rank,
                           plot_param_counts, plot_subspace_similarity, save_figures)

matplotlib.use("Agg")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result():
    return rank_sweep((1, 2, 4, 8), settings=SweepSettings(steps=40, batch_size=64),
                      n_train=128, n_val=64, n_old=64)


def _line(ax, label):
    for line in ax.get_lines():
        if line.get_label() == label:
            return line
    raise AssertionError(f"no line labelled {label!r}; have {[l.get_label() for l in ax.get_lines()]}")


def _assert_readable(fig):
    assert isinstance(fig, Figure)
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), \
            "every panel needs axis labels and a title"


@pytest.mark.parametrize("fn", [plot_loss_vs_rank, plot_loss_curves, plot_delta_spectra,
                                plot_subspace_similarity, plot_param_counts])
def test_every_figure_is_readable(fn, result):
    open_before = plt.get_fignums()
    fig = fn(result)
    _assert_readable(fig)
    assert plt.get_fignums() == open_before, "figures must not be left open in pyplot"


def test_loss_vs_rank_draws_the_results(result):
    fig = plot_loss_vs_rank(result)
    ax_val, ax_old = fig.axes
    L0 = result.initial_val_loss
    np.testing.assert_allclose(_line(ax_val, "LoRA").get_ydata(),
                               [result.lora[r].final_val_loss / L0 for r in result.ranks])
    assert _line(ax_val, "full fine-tuning").get_ydata()[0] == pytest.approx(result.full.final_val_loss / L0)
    assert list(_line(ax_val, "true rank k = 4").get_xdata()) == [4, 4]
    np.testing.assert_allclose(_line(ax_old, "LoRA").get_ydata(),
                               [result.lora[r].old_task_loss for r in result.ranks])


def test_loss_curves_one_line_per_method(result):
    ax = plot_loss_curves(result, window=1).axes[0]
    for r in result.ranks:
        y = _line(ax, f"LoRA r={r}").get_ydata()
        np.testing.assert_allclose(y, np.array(result.lora[r].loss_history) / result.initial_val_loss)
    assert len(_line(ax, "full fine-tuning").get_ydata()) == len(result.full.loss_history)


def test_spectra_show_r_values_per_rank_and_k_for_the_truth(result):
    ax = plot_delta_spectra(result).axes[0]
    for r in result.ranks:
        assert len(_line(ax, f"LoRA r={r}").get_ydata()) == r
    np.testing.assert_allclose(_line(ax, "true ΔW* (rank 4)").get_ydata(), result.task.singular_values)
    assert len(_line(ax, "full fine-tuning").get_ydata()) == 64
    assert ax.get_yscale() == "log"
    ax = plot_delta_spectra(result, ranks=[2]).axes[0]
    assert [l.get_label() for l in ax.get_lines() if l.get_label().startswith("LoRA")] == ["LoRA r=2"]


def test_subspace_similarity_heatmap_and_baseline(result):
    fig = plot_subspace_similarity(result, r_small=4, r_large=8)
    ax_heat, ax_curve = fig.axes[0], fig.axes[1]
    grid = ax_heat.get_images()[0].get_array()
    assert grid.shape == (4, 4) and np.all((0 <= grid) & (grid <= 1 + 1e-12))
    np.testing.assert_allclose(_line(ax_curve, "random subspaces: i / d_in (d_in = 64)").get_ydata(),
                               np.arange(1, 5) / 64)


def test_param_counts_match_the_results(result):
    ax_params, ax_bytes = plot_param_counts(result).axes
    np.testing.assert_array_equal(_line(ax_params, "LoRA, counted").get_ydata(),
                                  [result.lora[r].trainable_params for r in result.ranks])
    np.testing.assert_array_equal(_line(ax_bytes, "LoRA, measured").get_ydata(),
                                  [result.lora[r].state_bytes for r in result.ranks])


def test_save_figures_writes_every_figure(result, tmp_path):
    paths = save_figures(result, tmp_path / "new folder", prefix="t_")
    assert set(paths) == set(FIGURE_NAMES)
    for key, p in paths.items():
        assert p.name == "t_" + FIGURE_NAMES[key] and p.read_bytes()[:8] == PNG_MAGIC


def test_bad_inputs(result):
    with pytest.raises(TypeError, match="SweepResult"):
        plot_loss_vs_rank({"full": 1})
    with pytest.raises(ValueError, match="shifted layers"):
        plot_delta_spectra(result, layer="fc2")
    with pytest.raises(ValueError, match="not in this sweep"):
        plot_delta_spectra(result, ranks=[16])
    with pytest.raises(ValueError, match="not in this sweep"):
        plot_subspace_similarity(result, r_small=3)


# --------------------------------------------------------------------- notebook 06

from lora_np.analysis import intruder_dimensions  # noqa: E402
from lora_np.plots import plot_intruder_dimensions, plot_when_lora_is_not_enough  # noqa: E402


def test_intruder_figure_draws_the_cosines_and_the_counts(result):
    W0 = result.task.pretrained.fc1.W
    cos = {m.label: intruder_dimensions(W0, W0 + m.delta_weights["fc1"], k=6).max_cosines
           for m in result.methods()}
    open_before = plt.get_fignums()
    fig = plot_intruder_dimensions(cos, 0.5, title="t")
    _assert_readable(fig)
    assert plt.get_fignums() == open_before
    ax_cos, ax_count = fig.axes
    for label, c in cos.items():
        np.testing.assert_array_equal(_line(ax_cos, label).get_ydata(), c)
        counts = _line(ax_count, label).get_ydata()
        grid = _line(ax_count, label).get_xdata()
        i = np.searchsorted(grid, 0.5)                         # the count at ε = 0.5 ...
        assert counts[i] == (c < grid[i]).sum()                # ... is the number below ε
        assert counts[0] == 0 and counts[-1] == (c < 1.0).sum()
    np.testing.assert_array_equal(_line(ax_cos, "ε = 0.5").get_ydata(), [0.5, 0.5])


@pytest.mark.parametrize("cos, eps, match", [
    ({}, 0.5, "non-empty dict"),
    ({"a": [0.1, 0.2], "b": [0.1]}, 0.5, "same length"),
    ({"a": [0.1, 1.5]}, 0.5, r"\[0, 1\]"),
    ({"a": [0.1, 0.2]}, 0.0, "eps"),
])
def test_intruder_figure_bad_input(cos, eps, match):
    with pytest.raises(ValueError, match=match):
        plot_intruder_dimensions(cos, eps)


def test_low_vs_high_rank_figure(result, tmp_path):
    high = rank_sweep((1, 8), true_rank=8, shifted=("fc2",), singular_values=1.0,
                      settings=SweepSettings(steps=20, batch_size=64), n_train=64, n_val=32, n_old=32)
    path = tmp_path / "contrast.png"
    fig = plot_when_lora_is_not_enough(result, high, path=path)
    _assert_readable(fig)
    assert path.read_bytes()[:8] == PNG_MAGIC
    ax_loss, ax_trade = fig.axes
    L0 = result.initial_val_loss
    np.testing.assert_allclose(_line(ax_loss, "ΔW* of rank 4: LoRA").get_ydata(),
                               [result.lora[r].final_val_loss / L0 for r in result.ranks])
    # equal σ: the best rank-r update leaves (k - r)/k of the change
    ey = _line(ax_loss, "ΔW* of rank 8: Eckart–Young Σ_(i>r) σᵢ² / Σ σᵢ²")
    np.testing.assert_allclose(ey.get_ydata()[:8], (8 - np.arange(1, 9)) / 8)
    xs = sorted(float(l.get_xdata()[0]) for l in ax_trade.get_lines())
    assert xs == sorted(m.old_task_loss for m in high.methods())
    with pytest.raises(TypeError, match="SweepResult"):
        plot_when_lora_is_not_enough(result, {"full": 1})
