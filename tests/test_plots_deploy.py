"""Notebook 10's figures: the round-trip error and the terms of training memory."""

import numpy as np
import pytest

from lora_np import counting
from lora_np.deploy import RoundTrips
from lora_np.plots import deploy as deploy_plots

from _plots_helpers import PNG_MAGIC, assert_readable, line


def test_round_trips_figure_draws_errors_and_ulps(tmp_path):
    rt = RoundTrips(errors=np.array([1.0, 1.0, 1.0]), ulp=4.0, changed=np.array([3, 0, 0]))
    walk = RoundTrips(errors=np.array([1.0, 1.5, 2.0]), ulp=4.0, changed=np.array([3, 3, 3]))
    fig = deploy_plots.plot_round_trips({"one": rt, "new": walk}, path=tmp_path / "rt.png")
    assert (tmp_path / "rt.png").read_bytes()[:8] == PNG_MAGIC
    assert_readable(fig)
    ax1, ax2 = fig.axes
    np.testing.assert_allclose(line(ax1, "new").get_ydata(), [1.0, 1.5, 2.0])
    np.testing.assert_allclose(line(ax2, "new").get_ydata(), [0.25, 0.375, 0.5])
    assert ax1.get_yscale() == "log" and ax2.get_xscale() == "log"
    with pytest.raises(TypeError, match="RoundTrips"):
        deploy_plots.plot_round_trips({"x": [1, 2]})
    with pytest.raises(ValueError, match="non-empty"):
        deploy_plots.plot_round_trips({})


def test_training_memory_figure_stacks_the_terms(tmp_path):
    rows = {"full": counting.training_memory(0, 10, "mixed-adam"),
            "lora": counting.training_memory(10, 1, "fp16-adam", activation_bytes=5)}
    fig = deploy_plots.plot_training_memory(rows, path=tmp_path / "m.png", unit=1, unit_name="B",
                                            marks={"paper": 100})
    assert (tmp_path / "m.png").read_bytes()[:8] == PNG_MAGIC
    assert_readable(fig)
    (ax,) = fig.axes
    widths = sorted(round(p.get_width(), 6) for p in ax.patches if p.get_width() > 0)
    assert widths == sorted([20, 20, 80, 40, 22, 2, 4, 5])         # one segment per non-zero term
    assert any(t.get_text() == "160 B" for t in ax.texts) and any(t.get_text() == "paper" for t in ax.texts)
    with pytest.raises(TypeError, match="TrainingMemory"):
        deploy_plots.plot_training_memory({"x": 3})
