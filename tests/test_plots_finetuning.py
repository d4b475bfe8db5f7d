"""Figures of notebooks 04–05: the rank floor, forgetting vs leak, the budget bars."""

import numpy as np
import pytest
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from lora_np.analysis import tail_energy
from lora_np.plots import plot_budget_bars, plot_forgetting_vs_leak, plot_rank_floor
from lora_np.plots.finetuning import LEAK

from _plots_helpers import PNG_MAGIC, assert_readable, line


def test_rank_floor_figure(tmp_path):
    path = tmp_path / "floor.png"
    r_pred = np.arange(0, 5)
    pred = tail_energy(np.ones(4), relative=True)                  # equal σ: (4 - r) / 4
    fig = plot_rank_floor([1, 2, 4, 8], [0.76, 0.51, 0.001, 0.001], r_pred, pred, 4,
                          oracle_loss=[0.75, 0.5, 0.001, 0.001], full_loss=0.0012, noise_floor=0.001,
                          oracle_range=[[0.73, 0.78], [0.48, 0.54], [0.001, 0.001], [0.001, 0.001]],
                          ylabel="(L − noise²) ÷ (L₀ − noise²)", path=path)
    assert_readable(fig)
    assert path.read_bytes()[:8] == PNG_MAGIC
    (ax,) = fig.axes
    labels = [l.get_label() for l in ax.get_lines()]
    ey = next(l for l in ax.get_lines() if l.get_label().startswith("isotropic model"))
    np.testing.assert_allclose(ey.get_ydata(), [1, 0.75, 0.5, 0.25, 0])
    np.testing.assert_array_equal(line(ax, "LoRA rank r, trained").get_ydata(), [0.76, 0.51, 0.001, 0.001])
    np.testing.assert_array_equal(line(ax, "pretrained W + truncated SVD of ΔW*").get_ydata(),
                                  [0.75, 0.5, 0.001, 0.001])
    np.testing.assert_array_equal(line(ax, "true rank r* = 4").get_xdata(), [4, 4])
    assert "full fine-tuning" in labels and "noise floor" in labels
    assert ax.get_ylabel() == "(L − noise²) ÷ (L₀ − noise²)"
    (bars,) = [c for c in ax.collections if c.get_label().startswith("other best rank-r")]
    segments = bars.get_segments()
    assert [tuple(seg[:, 1]) for seg in segments[:2]] == [(0.73, 0.78), (0.48, 0.54)]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3", "4", "8"]


def test_rank_floor_bad_input():
    r_pred, pred = np.arange(3), np.ones(3)
    with pytest.raises(ValueError, match="one length"):
        plot_rank_floor([1, 2], [0.7], r_pred, pred, 4)
    with pytest.raises(ValueError, match="one length"):
        plot_rank_floor([1, 2], [0.7, 0.5], r_pred, pred, 4, oracle_loss=[0.7])
    with pytest.raises(ValueError, match="one length"):
        plot_rank_floor([1, 2], [0.7, 0.5], r_pred, pred[:2], 4)
    with pytest.raises(ValueError, match="one \\(min, max\\) pair per rank"):
        plot_rank_floor([1, 2], [0.7, 0.5], r_pred, pred, 4, oracle_range=[[0.6, 0.8]])


def test_forgetting_vs_leak_figure(tmp_path):
    path = tmp_path / "forget.png"
    labels, leak, old = ["full FT", "LoRA r=1", "LoRA r=2", "LoRA r=4"], [2e-3, 5.6e-3, 5.8e-3, 3.6e-5], \
        [8e-6, 5.2e-5, 5.3e-5, 3.2e-7]
    fig = plot_forgetting_vs_leak(labels, leak, old, slope=0.009, path=path)
    assert_readable(fig)
    assert path.read_bytes()[:8] == PNG_MAGIC
    (ax,) = fig.axes
    points = {(float(l.get_xdata()[0]), float(l.get_ydata()[0])) for l in ax.get_lines() if len(l.get_xdata()) == 1}
    assert points == set(zip(leak, old))
    assert sorted(t.get_text() for t in ax.texts) == sorted(labels)
    # r=1 and r=2 are close neighbours: the second one's label goes on the left
    sides = {t.get_text(): t.get_ha() for t in ax.texts}
    assert sides["LoRA r=1"] == "left" and sides["LoRA r=2"] == "right"
    ref = line(ax, "old-task loss = 0.009 · " + LEAK)
    np.testing.assert_allclose(ref.get_ydata(), 0.009 * ref.get_xdata())
    # mathtext, not raw "Q_A" / "_F": the label renders as Q with a subscript A
    assert LEAK.startswith("$") and LEAK.endswith("$") and LEAK in ax.get_xlabel()
    assert "Q_A" not in ax.get_xlabel().replace(LEAK, "")


def test_forgetting_vs_leak_bad_input():
    labels, leak, old = ["a", "b"], [1e-3, 2e-3], [1e-5, 2e-5]
    with pytest.raises(ValueError, match="one label per point"):
        plot_forgetting_vs_leak(labels[:1], leak, old)
    with pytest.raises(ValueError, match="leak must be > 0"):
        plot_forgetting_vs_leak(labels, [0.0, 1e-3], old)
    with pytest.raises(ValueError, match="old_loss must be > 0"):
        plot_forgetting_vs_leak(labels, leak, [1e-5, -1e-5])
    with pytest.raises(ValueError, match="one length"):
        plot_forgetting_vs_leak(labels, leak, old[:1])


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
        assert not ax.patches, "dots, not bars: a bar's length on a log axis means nothing"
        dots = {}                                           # y position -> (x, colour)
        for ln in ax.get_lines():
            if ln.get_linestyle() == "None":
                for x, y in zip(ln.get_xdata(), ln.get_ydata()):
                    dots[y] = (x, to_rgba(ln.get_color()))
        top_down = [dots[y] for y in sorted(dots, reverse=True)]          # top row = first config
        np.testing.assert_allclose([x for x, _ in top_down], vals)
        green = [c == to_rgba("C2") for _, c in top_down]
        assert green == [bool(h) for h in {"task 1": [0, 1, 1], "task 2": [0, 0, 1]}[name]]
        assert sorted(t.get_text() for t in ax.texts) == sorted(f"{v:#.3g}" for v in vals)
    # the panels share the y axis; its labels are drawn on the first one, top to bottom
    ticks = sorted(zip(axes[0].get_yticks(), (t.get_text() for t in axes[0].get_yticklabels())), reverse=True)
    assert [label for _, label in ticks] == configs
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {
        "full fine-tuning", "noise floor (noise² / L₀)", "adapts every shifted matrix",
        "does not adapt every shifted matrix"}


def test_budget_bars_minimal_and_bad_input():
    # without full / noise_floor the x range used to fail: min() of a single number
    fig = plot_budget_bars(["a", "b"], {"only task": [0.5, 0.1]})
    assert len(fig.axes) == 1 and not fig.legends
    assert fig.get_suptitle() == "Same parameter budget, different matrices"
    with pytest.raises(ValueError, match="one value per config"):
        plot_budget_bars(["a", "b", "c"], {"task 1": [0.5, 0.5]})
    with pytest.raises(ValueError, match="non-empty dict"):
        plot_budget_bars(["a"], {})
