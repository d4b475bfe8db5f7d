"""Figures of the real-text experiment (lora_np.plots.text), drawn from made-up inputs: each
returns a readable Figure, draws exactly the numbers it is given, saves a PNG, and refuses
inputs it cannot draw."""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest

from lora_np.analysis import energy_rank, subspace_similarity_grid, row_space_basis
from lora_np.fair import Spread
from lora_np.plots import (TEXT_FIGURE_NAMES, plot_learning_forgetting, plot_text_delta_spectra,
                           plot_text_loss_vs_rank, plot_text_subspace_similarity, save_text_figures)

from _plots_helpers import PNG_MAGIC, assert_readable, line

matplotlib.use("Agg")

RANKS = (1, 2, 4, 8)


def _lora():
    return {r: {"kjv": Spread(2.0 - 0.1 * i, 1.95 - 0.1 * i, 2.02 - 0.1 * i, 3), "austen": 1.5 + 0.05 * i}
            for i, r in enumerate(RANKS)}


FULL = {"kjv": Spread(1.5, 1.45, 1.52, 3), "austen": Spread(1.9, 1.88, 1.93, 3)}
PRE = {"kjv": 2.4, "austen": 1.4}
CURVE = [(0, 2.4, 1.4), (10, 2.0, 1.6), (20, 1.7, 1.8), (30, 1.5, 1.9)]


def _deltas(rng):
    d = 24
    full = rng.standard_normal((d, d)) * np.exp(-np.arange(d) / 6)
    lora = rng.standard_normal((d, 2)) @ rng.standard_normal((2, d))
    rand = rng.standard_normal((d, d))
    return {"layer.a": {"full FT": full, "LoRA r=2": lora, "random reference": rand},
            "layer.b": {"full FT": full.T @ full[:, :8], "random reference": rng.standard_normal((d, 8))}}


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _figures(rng):
    A8 = rng.standard_normal((4, 20))
    A64 = np.vstack([A8 * 10, rng.standard_normal((12, 20))])
    return [
        lambda p: plot_text_loss_vs_rank(_lora(), FULL, PRE, path=p),
        lambda p: plot_learning_forgetting(CURVE, _lora(), PRE, placements={"q, v": FULL}, full=FULL, path=p),
        lambda p: plot_text_delta_spectra(_deltas(rng), path=p),
        lambda p: plot_text_subspace_similarity({"q": A8}, {"q": A64}, path=p),
    ]


@pytest.mark.parametrize("k", range(4))
def test_every_figure_is_readable_and_saved(k, rng, tmp_path):
    open_before = plt.get_fignums()
    path = tmp_path / "sub" / "fig.png"
    fig = _figures(rng)[k](path)
    assert_readable(fig)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert plt.get_fignums() == open_before, "figures must not be left open in pyplot"


def test_loss_vs_rank_draws_means_ranges_full_ft_and_the_pretrained_model():
    ax_kjv, ax_aus = plot_text_loss_vs_rank(_lora(), FULL, PRE).axes
    cont = ax_kjv.containers[0]
    np.testing.assert_allclose(np.asarray(cont.lines[0].get_ydata(), float), [2.0, 1.9, 1.8, 1.7])
    np.testing.assert_allclose(np.asarray(cont.lines[0].get_xdata(), float), RANKS)
    segs = cont.lines[2][0].get_segments()                    # the range: low to high at each rank
    np.testing.assert_allclose([s[0][1] for s in segs], [1.95, 1.85, 1.75, 1.65])
    np.testing.assert_allclose([s[1][1] for s in segs], [2.02, 1.92, 1.82, 1.72])
    assert line(ax_kjv, "full fine-tuning").get_ydata()[0] == 1.5
    assert line(ax_kjv, "pretrained (before fine-tuning)").get_ydata()[0] == 2.4
    np.testing.assert_allclose(np.asarray(ax_aus.containers[0].lines[0].get_ydata(), float), [1.5, 1.55, 1.6, 1.65])
    assert line(ax_aus, "full fine-tuning").get_ydata()[0] == 1.9


def test_the_plane_draws_full_ft_as_a_curve_and_lora_as_points():
    (ax,) = plot_learning_forgetting(CURVE, _lora(), PRE, placements={"MLP": FULL}).axes
    curve = line(ax, "full fine-tuning, checkpoints along its run")
    np.testing.assert_allclose(curve.get_xdata(), [2.4, 2.0, 1.7, 1.5])
    np.testing.assert_allclose(curve.get_ydata(), [1.4, 1.6, 1.8, 1.9])
    assert [t.get_text() for t in ax.texts] == ["10", "20", "30"]
    labels = [c.get_label() for c in ax.containers]
    assert labels == [f"LoRA r={r}" for r in RANKS] + ["MLP"]
    point = ax.containers[1].lines[0]
    assert (point.get_xdata()[0], point.get_ydata()[0]) == (1.9, 1.55)
    star = line(ax, "pretrained")
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (2.4, 1.4)
    assert "KJV" in ax.get_xlabel() and "Austen" in ax.get_ylabel()


def test_spectra_annotate_energy_and_effective_rank(rng):
    deltas = _deltas(rng)
    ax_a, ax_b = plot_text_delta_spectra(deltas, energy=0.9).axes
    full = next(l for l in ax_a.get_lines() if l.get_label().startswith("full FT"))
    k = energy_rank(deltas["layer.a"]["full FT"], 0.9)
    assert f"90 % of energy in {k}, erank" in full.get_label()
    lora = next(l for l in ax_a.get_lines() if l.get_label().startswith("LoRA r=2"))
    assert len(lora.get_ydata()) == 2                             # round-off beyond rank 2 not drawn
    assert len(ax_b.get_lines()) == 2 and ax_b.get_title() == "ΔW of layer.b"


def test_subspace_similarity_draws_the_grid(rng):
    A8, A64 = rng.standard_normal((3, 20)), rng.standard_normal((7, 20))
    fig = plot_text_subspace_similarity({"q": A8, "v": A8}, {"q": A64, "v": A64 + 1})
    heat_q = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(heat_q, subspace_similarity_grid(row_space_basis(A8), row_space_basis(A64)))
    last = [a for a in fig.axes if a.get_title() == "Shared top directions vs chance"][0]
    np.testing.assert_allclose(line(last, "q").get_ydata(), np.diag(heat_q))
    np.testing.assert_allclose(line(last, "random: i / d_in (d_in = 20)").get_ydata(), [1 / 20, 2 / 20, 3 / 20])


@pytest.mark.parametrize("call, error, match", [
    (lambda: plot_text_loss_vs_rank({}, FULL, PRE), ValueError, "non-empty dict rank"),
    (lambda: plot_text_loss_vs_rank({0: FULL}, FULL, PRE), ValueError, "ranks must be ints >= 1"),
    (lambda: plot_text_loss_vs_rank(_lora(), {"kjv": 1.0}, PRE), ValueError, "'austen'"),
    (lambda: plot_text_loss_vs_rank(_lora(), {"kjv": (1.0, 1.2, 1.3), "austen": 1.0}, PRE), ValueError,
     "low <= mean <= high"),
    (lambda: plot_text_loss_vs_rank(_lora(), {"kjv": "1", "austen": 1.0}, PRE), TypeError, "Spread"),
    (lambda: plot_learning_forgetting([(0, 1.0, 1.0)], _lora(), PRE), ValueError, "at least two"),
    (lambda: plot_learning_forgetting([(5, 1, 1), (2, 1, 1)], _lora(), PRE), ValueError, "increase"),
    (lambda: plot_text_delta_spectra({"a": {"x": np.zeros((3, 3))}}), ValueError, "all zeros"),
    (lambda: plot_text_delta_spectra({"a": {"x": np.ones((3, 3)), "y": np.ones((3, 2))}}), ValueError, "one shape"),
    (lambda: plot_text_delta_spectra({"a": {"x": np.eye(3)}}, energy=1.5), ValueError, "energy"),
    (lambda: plot_text_subspace_similarity({"q": np.ones((4, 5))}, {"v": np.ones((8, 5))}), ValueError, "same layers"),
    (lambda: plot_text_subspace_similarity({"q": np.ones((8, 5))}, {"q": np.ones((4, 5))}), ValueError,
     "r_small <= r_large"),
    (lambda: save_text_figures({"not": "a result"}), TypeError, "TextResult"),
])
def test_inputs_it_cannot_draw_are_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_figure_names():
    assert sorted(TEXT_FIGURE_NAMES.values()) == ["text_delta_spectra.png", "text_learning_forgetting.png",
                                                  "text_loss_vs_rank.png", "text_subspace_similarity.png"]
