"""lora_np.plots.style (the one way a figure is made, laid out and saved), the plots-only
argument checks, and the package's public names."""

import importlib
import inspect

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.layout_engine import ConstrainedLayoutEngine

import lora_np.plots as plots
from lora_np.plots.checks import check_positive_1d, check_same_length, check_sweep
from lora_np.plots.style import FULL_FT, TEACHING_STYLE, log2_ticks, teaching_figure

from _plots_helpers import PNG_MAGIC

MODULES = ("style", "checks", "sweep", "foundations", "finetuning", "delta_w", "variants", "bench")


@pytest.mark.parametrize("shape, n", [((1, 1), 1), ((1, 3), 3), ((2, 2), 4)])
def test_axes_are_always_a_flat_array(shape, n):
    with teaching_figure(*shape) as (fig, axes):
        pass
    assert axes.shape == (n,) and list(axes) == fig.axes


def test_style_holds_inside_the_block_only():
    before = dict(mpl.rcParams)
    with teaching_figure() as (fig, (ax,)):
        assert mpl.rcParams["font.size"] == TEACHING_STYLE["font.size"]
        (ln,) = ax.plot([0, 1], [0, 1])
    assert ln.get_linewidth() == TEACHING_STYLE["lines.linewidth"]
    assert dict(mpl.rcParams) == before


def test_no_pyplot_figure_is_left_open():
    open_before = plt.get_fignums()
    with teaching_figure(1, 2, title="t"):
        pass
    assert plt.get_fignums() == open_before


def test_saves_a_png_without_version_metadata_and_the_same_bytes_twice(tmp_path):
    paths = [tmp_path / "a" / "b" / "one.png", tmp_path / "two.png"]
    for p in paths:                                    # the first creates its folders
        with teaching_figure(path=p, title="same") as (fig, (ax,)):
            ax.plot([1, 2, 3], [3, 1, 2], **FULL_FT)
    data = [p.read_bytes() for p in paths]
    assert data[0][:8] == PNG_MAGIC
    assert data[0] == data[1], "the same drawing must give the same bytes"
    assert b"Software" not in data[0] and b"Matplotlib version" not in data[0]


def test_nothing_is_saved_when_the_block_raises(tmp_path):
    path = tmp_path / "never.png"
    with pytest.raises(RuntimeError, match="drawing failed"):
        with teaching_figure(path=path):
            raise RuntimeError("drawing failed")
    assert not path.exists()


def test_title_and_layouts():
    with teaching_figure(1, 2, title="above both", constrained=True) as (fig, _):
        pass
    assert fig.get_suptitle() == "above both"
    assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)
    with teaching_figure() as (fig, _):
        pass
    assert fig.get_suptitle() == ""
    assert not isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine)


def test_log2_ticks():
    with teaching_figure() as (fig, (ax,)):
        log2_ticks(ax, [1, 4, 16])
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "4", "16"]


# --------------------------------------------------------------------- checks


def test_check_positive_1d_checks_positivity():
    # the check it replaces was called _check_1d_positive and let 0 and negative numbers through
    np.testing.assert_array_equal(check_positive_1d("hs", [1e-1, 1e-3]), [1e-1, 1e-3])
    for bad in ([1.0, 0.0], [1.0, -1e-3]):
        with pytest.raises(ValueError, match=r"hs must be > 0"):
            check_positive_1d("hs", bad)
    with pytest.raises(ValueError, match="1-D"):
        check_positive_1d("hs", [[1.0]])
    with pytest.raises(ValueError, match="finite"):
        check_positive_1d("hs", [1.0, np.nan])


def test_check_same_length():
    out = check_same_length(a=[1, 2], b=np.array([0.5, np.inf], dtype=np.float32))
    assert all(v.dtype == np.float64 for v in out.values())
    with pytest.raises(ValueError, match=r"one length, got shapes \{'a': \(2,\), 'b': \(1,\)\}"):
        check_same_length(a=[1, 2], b=[1])
    with pytest.raises(ValueError, match="non-empty"):
        check_same_length(a=[], b=[])
    with pytest.raises(TypeError, match="float32/float64"):
        check_same_length(a=["x"], b=[1])


def test_check_sweep():
    with pytest.raises(TypeError, match="low must be a SweepResult .* got dict"):
        check_sweep("low", {})


# --------------------------------------------------------------------- the package


def test_every_public_name_is_importable_from_the_package():
    namespace = {}
    exec("from lora_np.plots import *", namespace)
    assert set(plots.__all__) <= set(namespace)
    assert len(plots.__all__) == len(set(plots.__all__))
    for name in ("save_figures", "plot_bench", "FIGURE_NAMES", "LOSS_FLOOR", "TEACHING_STYLE"):
        assert name in plots.__all__


@pytest.mark.parametrize("module", MODULES)
def test_every_figure_of_every_module_is_exported(module):
    mod = importlib.import_module(f"lora_np.plots.{module}")
    assert module in plots.__doc__, f"the package docstring must list plots/{module}.py"
    for name in mod.__all__:
        if name.startswith("plot_") or name in ("save_figures", "FIGURE_NAMES", "LOSS_FLOOR"):
            assert getattr(plots, name) is getattr(mod, name), name


def test_every_figure_returns_a_figure_and_takes_path():
    for name in plots.__all__:
        fn = getattr(plots, name)
        if name.startswith("plot_"):
            assert "path" in inspect.signature(fn).parameters, name
            assert fn.__doc__, f"{name} needs a docstring"
