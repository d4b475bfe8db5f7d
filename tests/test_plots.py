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
