"""Figures of notebooks 01–03: images, Eckart–Young, counts, heat maps, spectra, gradient checks."""

from types import SimpleNamespace

import numpy as np
import pytest

from lora_np.analysis import tail_energy
from lora_np.plots import (plot_eckart_young, plot_fd_error_vs_h, plot_gradcheck_errors, plot_heatmaps,
                           plot_images, plot_param_count_comparison, plot_scale_vs_rank,
                           plot_softmax_jacobian, plot_spectra)

from _plots_helpers import PNG_MAGIC, assert_readable, line


def test_images_in_a_grid(tmp_path):
    imgs = [np.full((4, 5), v) for v in range(3)]
    fig = plot_images(imgs, ["a", "b", "c"], suptitle="three", ncols=2, path=tmp_path / "im.png")
    assert (tmp_path / "im.png").read_bytes()[:8] == PNG_MAGIC
    assert len(fig.axes) == 4 and fig.get_suptitle() == "three"
    assert [ax.get_title() for ax in fig.axes] == ["a", "b", "c", ""]
    assert [len(ax.get_images()) for ax in fig.axes] == [1, 1, 1, 0]
    assert fig.axes[2].get_images()[0].get_clim() == (0.0, 0.0)     # the first image's range
    with pytest.raises(ValueError, match="one title per image"):
        plot_images(imgs, ["a"])
    with pytest.raises(ValueError, match="one title per image"):
        plot_images([], [])


def test_eckart_young_uses_the_tail_energy():
    sigma = np.array([4.0, 3.0])                   # ‖M‖_F = 5: errors 1, 3/5, 0
    fig = plot_eckart_young(sigma, [1, 2], [0.6, 0.0], name="M")
    assert_readable(fig)
    ax_s, ax_err = fig.axes
    pred = line(ax_err, r"Eckart–Young: $\sqrt{\sum_{i>r}\sigma_i^2}\ /\ \Vert M\Vert_F$")
    np.testing.assert_array_equal(pred.get_xdata(), [1, 2])          # r = 1 … p: a plain log axis
    np.testing.assert_allclose(pred.get_ydata(), [0.6, 0.0])
    np.testing.assert_array_equal(pred.get_ydata(), np.sqrt(tail_energy(sigma, relative=True))[1:])
    assert ax_err.get_xscale() == "log"
    np.testing.assert_array_equal(ax_s.get_lines()[0].get_ydata(), sigma)
    assert "M" in ax_s.get_title()


@pytest.mark.parametrize("sigma, match", [([1.0, 0.0], "> 0"), ([1.0, -0.5], "> 0"), ([[1.0]], "1-D")])
def test_eckart_young_refuses_a_spectrum_it_cannot_draw(sigma, match):
    # zero or negative σ used to pass the check named "_check_1d_positive" unnoticed
    with pytest.raises(ValueError, match=match):
        plot_eckart_young(sigma, [1], [0.5])


def test_eckart_young_refuses_rank_zero_on_its_log_axis():
    with pytest.raises(ValueError, match=">= 1"):
        plot_eckart_young([2.0, 1.0], [0, 1], [1.0, 0.5])


def test_eckart_young_one_error_per_rank():
    with pytest.raises(ValueError, match="one length"):
        plot_eckart_young([2.0, 1.0], [1, 2], [0.5])


def test_param_count_comparison():
    ranks = [1, 2, 4]
    fig = plot_param_count_comparison(ranks, {"64×64": [128, 256, 512]}, {"64×64": 4096})
    assert_readable(fig)
    (ax,) = fig.axes
    np.testing.assert_array_equal(line(ax, "LoRA, 64×64").get_ydata(), [128, 256, 512])
    assert any(t.get_text() == "full fine-tuning, 64×64" for t in ax.texts)
    with pytest.raises(ValueError, match="same labels"):
        plot_param_count_comparison(ranks, {"a": [1, 2, 3]}, {"b": 9})


def test_scale_vs_rank():
    fig = plot_scale_vs_rank([1, 4], {"α/r": [1.0, 0.25], "α/√r": [1.0, 0.5]}, "size", "t")
    assert_readable(fig)
    np.testing.assert_array_equal(line(fig.axes[0], "α/√r").get_ydata(), [1.0, 0.5])


def test_heatmaps(tmp_path):
    M = np.array([[1.0, -2.0], [0.5, 0.0]])
    fig = plot_heatmaps({"M": M, "zero": np.zeros((2, 3))}, suptitle="two", path=tmp_path / "h.png")
    heat = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in heat] == ["M", "zero"]
    assert heat[0].get_images()[0].get_clim() == (-2.0, 2.0)         # symmetric colour range
    assert heat[1].get_images()[0].get_clim() == (-1.0, 1.0)         # an all-zero matrix
    with pytest.raises(ValueError, match="at least one matrix"):
        plot_heatmaps({})


def test_heatmaps_bad_matrix_is_refused_before_drawing(tmp_path):
    path = tmp_path / "h.png"
    with pytest.raises(ValueError, match=r"2-D, got shapes \{'v': \(3,\)\}"):
        plot_heatmaps({"ok": np.eye(2), "v": np.ones(3)}, path=path)
    assert not path.exists()


def test_softmax_jacobian():
    p = np.array([0.5, 0.3, 0.2])
    J = np.diag(p) - np.outer(p, p)
    fig = plot_softmax_jacobian(p, J)
    assert_readable(fig)
    ax_p, ax_J, ax_c = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [b.get_height() for b in ax_p.patches] == pytest.approx(p)
    # only the diagonal is written out, two decimals, so that a projector can show it
    assert [t.get_text() for t in ax_J.texts] == [f"{J[i, i]:.2f}" for i in range(3)]
    assert [t.get_position() for t in ax_J.texts] == [(i, i) for i in range(3)]
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    curve = line(ax_c, "$p(1-p)$")
    assert curve.get_xdata()[np.argmax(curve.get_ydata())] == pytest.approx(0.5)   # peaks at ½
    np.testing.assert_allclose(line(ax_c, "this row's $p_i$").get_ydata(), np.diag(J))
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        plot_softmax_jacobian(p, J[:2])


def test_spectra_draw_zeros_at_the_floor():
    fig = plot_spectra({"rank 1": [2.0, 0.0, 0.0]}, "t", floor=1e-17)
    assert_readable(fig)
    np.testing.assert_array_equal(line(fig.axes[0], "rank 1").get_ydata(), [2.0, 1e-17, 1e-17])


def test_fd_error_vs_h():
    hs = np.logspace(-1, -9, 5)
    fig = plot_fd_error_vs_h(hs, {"float64": hs ** 2, "exact": np.zeros(5)}, {"h²": hs ** 2})
    assert_readable(fig)
    (ax,) = fig.axes
    np.testing.assert_array_equal(line(ax, "float64").get_xdata(), hs)   # in the order given
    np.testing.assert_array_equal(line(ax, "exact").get_ydata(), np.full(5, 1e-17))
    assert line(ax, "h²").get_linestyle() == ":"
    assert "exact" in ax.get_ylabel()                 # an error relative to the exact value
    assert plot_fd_error_vs_h(hs, {"e": hs}, ylabel="other").axes[0].get_ylabel() == "other"


@pytest.mark.parametrize("hs", [[1e-1, 0.0], [1e-1, -1e-3]])
def test_fd_error_vs_h_needs_positive_steps(hs):
    # "_check_1d_positive" let h <= 0 through to a log axis
    with pytest.raises(ValueError, match="hs must be > 0"):
        plot_fd_error_vs_h(hs, {"e": [1e-3, 1e-4]})


def test_gradcheck_errors_marks_structural_zeros():
    def row(err, zero=False):
        return SimpleNamespace(rel_error=err, structural_zero=zero)
    results = [("Linear", [row(1e-9), row(2e-10)]), ("Attention", [row(3e-9), row(0.0, zero=True)])]
    fig = plot_gradcheck_errors(results, 1e-6)
    (ax,) = fig.axes
    assert ax.get_xlabel() and ax.get_title()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["Linear", "Attention"]
    dots = [l for l in ax.get_lines() if l.get_marker() == "o" and len(l.get_xdata())]
    crosses = [l for l in ax.get_lines() if l.get_marker() == "x" and len(l.get_xdata())]
    assert [list(l.get_ydata()) for l in dots] == [[0, 0], [1]]
    assert len(crosses) == 1 and list(crosses[0].get_xdata()) == [1e-16]   # 0 drawn at 1e-16, on row 1
    assert list(crosses[0].get_ydata()) == [1]
    # the crosses are absolute errors: the x label must not call everything relative
    assert "absolute" in ax.get_xlabel() and "relative" in ax.get_xlabel()
    assert any("absolute" in t.get_text() for t in fig.legends[0].get_texts())


def test_gradcheck_errors_without_structural_zeros_says_relative():
    rows = [SimpleNamespace(rel_error=1e-9, structural_zero=False)]
    fig = plot_gradcheck_errors([("Linear", rows)], 1e-7)
    (ax,) = fig.axes
    assert "relative" in ax.get_xlabel() and "absolute" not in ax.get_xlabel()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        r"relative error $\Vert a-n\Vert\,/\,(\Vert a\Vert+\Vert n\Vert)$"]
