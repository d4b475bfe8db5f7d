"""Figures of notebook 06: intruder dimensions; low-rank vs high-rank change."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from lora_np.analysis import intruder_dimensions, tail_energy
from lora_np.experiments import SweepSettings, rank_sweep
from lora_np.plots import plot_intruder_dimensions, plot_when_lora_is_not_enough

from _plots_helpers import PNG_MAGIC, assert_readable, line

EY = r" $\Sigma_{i>r}\,\sigma_i^2\ /\ \Sigma_i\,\sigma_i^2$"           # the Eckart–Young label's formula


@pytest.fixture(scope="module")
def low():
    return rank_sweep((1, 2, 4, 8), settings=SweepSettings(steps=40, batch_size=64),
                      n_train=128, n_val=64, n_old=64)


@pytest.fixture(scope="module")
def high():
    return rank_sweep((1, 8), true_rank=8, shifted=("fc2",), singular_values=1.0,
                      settings=SweepSettings(steps=20, batch_size=64), n_train=64, n_val=32, n_old=32)


def test_intruder_figure_draws_the_cosines_and_the_counts(low):
    W0 = low.task.pretrained.fc1.W
    cos = {m.label: intruder_dimensions(W0, W0 + m.delta_weights["fc1"], k=6).max_cosines
           for m in low.methods()}
    open_before = plt.get_fignums()
    fig = plot_intruder_dimensions(cos, 0.5, title="t")
    assert_readable(fig)
    assert fig.get_suptitle() == "t"
    assert plt.get_fignums() == open_before
    ax_cos, ax_count = fig.axes
    for label, c in cos.items():
        np.testing.assert_array_equal(line(ax_cos, label).get_ydata(), c)
        counts = line(ax_count, label).get_ydata()
        grid = line(ax_count, label).get_xdata()
        i = np.searchsorted(grid, 0.5)                         # the count at ε = 0.5 ...
        assert counts[i] == (c < grid[i]).sum()                # ... is the number below ε
        assert counts[0] == 0 and counts[-1] == (c < 1.0).sum()
    np.testing.assert_array_equal(line(ax_cos, "ε = 0.5").get_ydata(), [0.5, 0.5])


def test_intruder_count_agrees_with_analysis(low):
    W0 = low.task.pretrained.fc1.W
    W = W0 + low.lora[1].delta_weights["fc1"]
    res = intruder_dimensions(W0, W, k=6, eps=0.5)
    ax_count = plot_intruder_dimensions({"LoRA r=1": res.max_cosines}, 0.5).axes[1]
    ln = line(ax_count, "LoRA r=1")
    assert ln.get_ydata()[np.searchsorted(ln.get_xdata(), 0.5)] == res.n_intruders


@pytest.mark.parametrize("cos, eps, err, match", [
    ({}, 0.5, ValueError, "non-empty dict"),
    ({"a": [0.1, 0.2], "b": [0.1]}, 0.5, ValueError, "same length"),
    ({"a": [0.1, 1.5]}, 0.5, ValueError, r"\[0, 1\]"),
    ({"a": [0.1, 0.2]}, 0.0, ValueError, "eps"),
    ({"a": [0.1, 0.2]}, 1.5, ValueError, r"eps must be in \(0, 1\]"),
    ({"a": [0.1, 0.2]}, "0.5", TypeError, "eps"),
])
def test_intruder_figure_bad_input(cos, eps, err, match):
    with pytest.raises(err, match=match):
        plot_intruder_dimensions(cos, eps)


def test_low_vs_high_rank_figure(low, high, tmp_path):
    path = tmp_path / "contrast.png"
    fig = plot_when_lora_is_not_enough(low, high, path=path)
    assert_readable(fig)
    assert path.read_bytes()[:8] == PNG_MAGIC
    ax_loss, ax_trade = fig.axes
    L0 = low.initial_val_loss
    np.testing.assert_allclose(line(ax_loss, r"$\Delta W^\ast$ of rank 4: LoRA").get_ydata(),
                               [low.lora[r].final_val_loss / L0 for r in low.ranks])
    # equal σ: the best rank-r update leaves (k - r)/k of the change, and nothing from r = k on
    ey = line(ax_loss, r"$\Delta W^\ast$ of rank 8: Eckart–Young" + EY)
    np.testing.assert_allclose(ey.get_ydata()[:8], (8 - np.arange(1, 9)) / 8)
    ey = line(ax_loss, r"$\Delta W^\ast$ of rank 4: Eckart–Young" + EY)
    tail = tail_energy(low.task.singular_values, relative=True)
    np.testing.assert_allclose(ey.get_ydata(), np.concatenate([tail[1:], np.zeros(8 - 4)]))
    xs = sorted(float(l.get_xdata()[0]) for l in ax_trade.get_lines())
    assert xs == sorted(m.old_task_loss for m in high.methods())
    with pytest.raises(TypeError, match="high must be a SweepResult"):
        plot_when_lora_is_not_enough(low, {"full": 1})


def test_low_vs_high_rank_figure_draws_full_ft_checkpoints(low, high):
    # the checkpoints of a run: step 0 (forgetting 0, off the log axis) is left out
    forgetting, learned = np.array([0.0, 1e-3, 1e-2, 0.2]), np.array([1.0, 0.8, 0.5, 0.01])
    fig = plot_when_lora_is_not_enough(low, high, checkpoints={"full FT, lr 3e-3": (forgetting, learned)})
    assert_readable(fig)
    ax_trade = fig.axes[1]
    ln = line(ax_trade, "full FT, lr 3e-3")
    np.testing.assert_array_equal(ln.get_xdata(), forgetting[1:])
    np.testing.assert_array_equal(ln.get_ydata(), learned[1:])
    assert [t.get_text() for t in ax_trade.get_legend().get_texts()] == ["full FT, lr 3e-3"]
    # every label is mathtext or plain text: no raw underscores or carets left for a projector
    for t in [*fig.axes[0].get_legend().get_texts(), *(a.xaxis.label for a in fig.axes),
              *(a.yaxis.label for a in fig.axes)]:
        text = t.get_text()
        assert "_(" not in text and ("_" not in text or text.count("$") >= 2), text


@pytest.mark.parametrize("checkpoints, err, match", [
    ([1, 2], TypeError, "checkpoints must be a dict"),
    ({"a": (np.ones(3),)}, ValueError, "must be a pair"),
    ({"a": (np.ones(3), np.ones(2))}, ValueError, "one length"),
    ({"a": (-np.ones(2), np.ones(2))}, ValueError, "forgetting >= 0"),
])
def test_low_vs_high_rank_figure_bad_checkpoints(low, high, checkpoints, err, match):
    with pytest.raises(err, match=match):
        plot_when_lora_is_not_enough(low, high, checkpoints=checkpoints)
