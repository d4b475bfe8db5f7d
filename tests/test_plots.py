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


# --------------------------------------------------------------------- notebooks 04-05

from matplotlib.colors import to_rgba  # noqa: E402

from lora_np.plots import plot_budget_bars, plot_forgetting_vs_leak, plot_rank_floor  # noqa: E402


def test_rank_floor_figure(tmp_path):
    path = tmp_path / "floor.png"
    r_pred = np.arange(0, 9)
    pred = np.clip((4 - r_pred) / 4, 0, None)
    fig = plot_rank_floor([1, 2, 4, 8], [0.76, 0.51, 0.001, 0.001], r_pred, pred, 4,
                          oracle_loss=[0.75, 0.5, 0.001, 0.001], full_loss=0.0012, noise_floor=0.001,
                          path=path)
    _assert_readable(fig)
    assert path.read_bytes()[:8] == PNG_MAGIC
    (ax,) = fig.axes
    labels = [l.get_label() for l in ax.get_lines()]
    ey = next(l for l in ax.get_lines() if l.get_label().startswith("Eckart–Young"))
    np.testing.assert_array_equal(ey.get_ydata(), pred)
    np.testing.assert_array_equal(_line(ax, "LoRA rank r, trained").get_ydata(), [0.76, 0.51, 0.001, 0.001])
    np.testing.assert_array_equal(_line(ax, "true rank k = 4").get_xdata(), [4, 4])
    assert "full fine-tuning" in labels and "noise floor (noise² / L₀)" in labels
    with pytest.raises(ValueError, match="one length"):
        plot_rank_floor([1, 2], [0.7], r_pred, pred, 4)
    with pytest.raises(ValueError, match="one length"):
        plot_rank_floor([1, 2], [0.7, 0.5], r_pred, pred, 4, oracle_loss=[0.7])


def test_forgetting_vs_leak_figure(tmp_path):
    path = tmp_path / "forget.png"
    labels, leak, old = ["full FT", "LoRA r=1", "LoRA r=2", "LoRA r=4"], [2e-3, 5.6e-3, 5.8e-3, 3.6e-5], \
        [8e-6, 5.2e-5, 5.3e-5, 3.2e-7]
    fig = plot_forgetting_vs_leak(labels, leak, old, slope=0.009, path=path)
    _assert_readable(fig)
    assert path.read_bytes()[:8] == PNG_MAGIC
    (ax,) = fig.axes
    points = {(float(l.get_xdata()[0]), float(l.get_ydata()[0])) for l in ax.get_lines() if len(l.get_xdata()) == 1}
    assert points == set(zip(leak, old))
    assert sorted(t.get_text() for t in ax.texts) == sorted(labels)
    ref = _line(ax, "old-task loss = 0.009 · ‖ΔW Q_A‖²")
    np.testing.assert_allclose(ref.get_ydata(), 0.009 * ref.get_xdata())
    with pytest.raises(ValueError, match="one label per point"):
        plot_forgetting_vs_leak(labels[:2], leak, old)
    with pytest.raises(ValueError, match="> 0"):
        plot_forgetting_vs_leak(labels, [0.0, 1, 1, 1], old)


def test_budget_bars_figure(tmp_path):
    path = tmp_path / "budget.png"
    configs = ["{q} r=8", "{q,v} r=4", "{q,k,v,o} r=2"]
    losses = {"task 1": [0.66, 0.001, 0.4], "task 2": [0.98, 0.76, 0.39]}
    fig = plot_budget_bars(configs, losses, full={"task 1": 0.0012, "task 2": 0.0013},
                           noise_floor={"task 1": 0.001, "task 2": 0.001},
                           highlight={"task 1": [False, True, True], "task 2": [False, False, True]},
                           budget=1024, path=path)
    assert isinstance(fig, Figure) and path.read_bytes()[:8] == PNG_MAGIC
    assert "1,024" in fig.get_suptitle()
    axes = fig.axes
    assert axes[0].get_ylabel() and [a.get_title() for a in axes] == ["task 1", "task 2"]
    for ax, (name, vals) in zip(axes, losses.items()):
        assert ax.get_xlabel() and ax.get_xscale() == "log"
        bars = sorted(ax.patches, key=lambda p: -p.get_y())            # top bar = first config
        np.testing.assert_allclose([b.get_width() for b in bars], vals)
        green = [b.get_facecolor() == to_rgba("C2") for b in bars]
        assert green == [bool(h) for h in {"task 1": [0, 1, 1], "task 2": [0, 0, 1]}[name]]
    # the panels share the y axis; its labels are drawn on the first one, top to bottom
    ticks = sorted(zip(axes[0].get_yticks(), (t.get_text() for t in axes[0].get_yticklabels())), reverse=True)
    assert [label for _, label in ticks] == configs
    with pytest.raises(ValueError, match="one value per config"):
        plot_budget_bars(configs, {"task 1": [0.5, 0.5]})
    with pytest.raises(ValueError, match="non-empty dict"):
        plot_budget_bars(configs, {})
