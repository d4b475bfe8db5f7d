"""Figures of a rank sweep: each function returns a Figure, draws the numbers of the result,
saves a PNG."""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest

from lora_np.analysis import singular_values
from lora_np.counting import training_state_bytes
from lora_np.experiments import SweepSettings, rank_sweep
from lora_np.plots import (FIGURE_NAMES, plot_delta_spectra, plot_loss_curves, plot_loss_vs_rank,
                           plot_param_counts, plot_subspace_similarity, save_figures)
from lora_np.plots.sweep import least_squares_prediction

from _plots_helpers import PNG_MAGIC, assert_readable, line

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def result():
    return rank_sweep((1, 2, 4, 8), settings=SweepSettings(steps=40, batch_size=64),
                      n_train=128, n_val=64, n_old=64)


@pytest.mark.parametrize("fn", [plot_loss_vs_rank, plot_loss_curves, plot_delta_spectra,
                                plot_subspace_similarity, plot_param_counts])
def test_every_figure_is_readable(fn, result):
    open_before = plt.get_fignums()
    fig = fn(result)
    assert_readable(fig)
    assert plt.get_fignums() == open_before, "figures must not be left open in pyplot"


def test_loss_vs_rank_draws_the_results(result):
    fig = plot_loss_vs_rank(result)
    ax_val, ax_old = fig.axes
    assert_readable(plot_loss_vs_rank(result, noise_panel=True))
    L0 = result.initial_val_loss
    np.testing.assert_allclose(line(ax_val, "LoRA").get_ydata(),
                               [result.lora[r].final_val_loss / L0 for r in result.ranks])
    assert line(ax_val, "full fine-tuning").get_ydata()[0] == pytest.approx(result.full.final_val_loss / L0)
    assert list(line(ax_val, "true rank r* = 4").get_xdata()) == [4, 4]
    np.testing.assert_allclose(line(ax_old, "LoRA").get_ydata(),
                               [result.lora[r].old_task_loss for r in result.ranks])


def test_loss_vs_rank_noise_panel_shows_the_floor_in_units_of_noise(result):
    """The middle panel: r ≥ k and full FT ÷ noise² on a linear axis, beside 1 + p/n."""
    ax_val, ax_noise, ax_old = plot_loss_vs_rank(result, noise_panel=True).axes
    nf, k = result.task.noise_floor, result.task.true_rank
    high = [r for r in result.ranks if r >= k]
    lora = line(ax_noise, f"LoRA, r ≥ {k}")
    assert list(lora.get_xdata()) == high
    np.testing.assert_allclose(lora.get_ydata(), [result.lora[r].final_val_loss / nf for r in high])
    full = result.full.final_val_loss / nf
    assert line(ax_noise, f"full fine-tuning ({full:.3f})").get_ydata()[0] == pytest.approx(full)
    assert ax_noise.get_yscale() == "linear"
    n = result.task.y_train.size                               # 128 rows x 64 outputs
    pred = least_squares_prediction(result)
    assert pred["full"] == pytest.approx(1 + min(result.full.trainable_params, n) / n)
    assert pred[8] == pytest.approx(1 + 8 * (64 + 64 - 8) / n)          # r(d_in + d_out − r)
    np.testing.assert_allclose(line(ax_noise, "least squares: 1 + p/n").get_ydata(), [pred[r] for r in high])
    np.testing.assert_allclose(line(ax_old, "LoRA").get_ydata(), [result.lora[r].old_task_loss for r in result.ranks])


def test_loss_curves_one_line_per_method(result):
    ax = plot_loss_curves(result, window=1).axes[0]
    for r in result.ranks:
        y = line(ax, f"LoRA r={r}").get_ydata()
        np.testing.assert_allclose(y, np.array(result.lora[r].loss_history) / result.initial_val_loss)
    assert len(line(ax, "full fine-tuning").get_ydata()) == len(result.full.loss_history)
    # neighbouring ranks differ in line style and marker, not only in a close colour
    styles = {(line(ax, f"LoRA r={r}").get_linestyle(), line(ax, f"LoRA r={r}").get_marker()) for r in result.ranks}
    assert len(styles) == len(result.ranks)


def test_loss_curves_late_panel_in_units_of_noise(result):
    """The right panel: the end of the runs with r ≥ k and full FT, ÷ noise², linear axis."""
    _, ax2 = plot_loss_curves(result, late_window=5, late_from=0.5).axes
    nf, k, n = result.task.noise_floor, result.task.true_rank, len(result.full.loss_history)
    labels = [l.get_label() for l in ax2.get_lines()]
    assert [f"LoRA r={r}" for r in result.ranks if r >= k] == [x for x in labels if x.startswith("LoRA")]
    y = line(ax2, "full fine-tuning").get_ydata()
    h = np.asarray(result.full.loss_history)
    assert len(y) == n - n // 2 and y[-1] == pytest.approx(h[-5:].mean() / nf)
    assert ax2.get_yscale() == "linear" and line(ax2, "noise floor").get_ydata()[0] == 1.0


def test_loss_curves_running_mean(result):
    h = np.asarray(result.full.loss_history) / result.initial_val_loss
    y = line(plot_loss_curves(result, window=3).axes[0], "full fine-tuning").get_ydata()
    np.testing.assert_allclose(y[:3], [h[0], h[:2].mean(), h[:3].mean()])
    np.testing.assert_allclose(y[3:], np.convolve(h, np.ones(3) / 3, mode="valid")[1:])


def test_spectra_show_r_values_per_rank_and_k_for_the_truth(result):
    ax = plot_delta_spectra(result).axes[0]
    for r in result.ranks:
        y = line(ax, f"LoRA r={r}").get_ydata()
        np.testing.assert_array_equal(y, singular_values(result.lora[r].delta_weights["fc1"])[:r])
    np.testing.assert_allclose(line(ax, "true ΔW* (rank 4)").get_ydata(), result.task.singular_values)
    assert len(line(ax, "full fine-tuning").get_ydata()) == 64
    assert ax.get_yscale() == "log"
    ax = plot_delta_spectra(result, ranks=[2]).axes[0]
    assert [l.get_label() for l in ax.get_lines() if l.get_label().startswith("LoRA")] == ["LoRA r=2"]


def test_subspace_similarity_heatmap_and_baseline(result):
    fig = plot_subspace_similarity(result, r_small=4, r_large=8)
    ax_heat, ax_curve = fig.axes[0], fig.axes[1]
    grid = ax_heat.get_images()[0].get_array()
    assert grid.shape == (4, 4) and np.all((0 <= grid) & (grid <= 1 + 1e-12))
    np.testing.assert_allclose(line(ax_curve, r"random subspaces: $i/d_{\mathrm{in}}$ ($d_{\mathrm{in}}$ = 64)").get_ydata(),
                               np.arange(1, 5) / 64)
    # the curves against ΔW* stop at the true rank k = 4; the A-vs-A curve runs to min(r_small, r_large)
    assert len(line(ax_curve, "full-FT ΔW vs true ΔW*").get_ydata()) == 4
    np.testing.assert_allclose(line(ax_curve, "A of r=4 vs A of r=8").get_ydata(), np.diag(grid))


def test_param_counts_match_the_results(result):
    ax_params, ax_bytes = plot_param_counts(result).axes
    np.testing.assert_array_equal(line(ax_params, "LoRA, counted").get_ydata(),
                                  [result.lora[r].trainable_params for r in result.ranks])
    np.testing.assert_array_equal(line(ax_bytes, "LoRA, measured").get_ydata(),
                                  [result.lora[r].state_bytes for r in result.ranks])
    formula = line(ax_params, "Σ r·(d_in + d_out) = 128 r")         # fc1 is 64 x 64
    np.testing.assert_array_equal(formula.get_ydata(), 128 * np.arange(1, 9))
    np.testing.assert_array_equal(line(ax_bytes, "formula: 4 × params × itemsize").get_ydata(),
                                  [training_state_bytes(int(n), "adam", np.float64) for n in formula.get_ydata()])


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
    with pytest.raises(TypeError, match="SweepResult"):
        save_figures(None)
