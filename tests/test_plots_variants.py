"""Figures of notebook 07 (lora_np.plots.variants), drawn from small runs of lora_np.variants."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from lora_np import variants as V
from lora_np.plots import variants as PV

from _plots_helpers import PNG_MAGIC


SMALL = dict(d=8, n=16, seeds=(0, 1))


@pytest.fixture(scope="module")
def dora_pair():
    kw = dict(lrs=(1e-2, 5e-2), steps=10, checkpoint_every=5, report_steps=(5,), **SMALL)
    return V.dora_compare(shift="random", **kw), V.dora_compare(shift="rescale", **kw)


def _labelled(fig, n_axes):
    assert len(fig.axes) == n_axes
    assert fig.axes[0].get_ylabel(), "the first panel needs a y label (the others may share it)"
    for ax in fig.axes:
        assert ax.get_xlabel(), "every panel needs an x label"


def test_every_figure_draws_and_saves(tmp_path, dora_pair):
    before = plt.get_fignums()
    rs = V.rank_scaling_sweep(ranks=(2, 4), lrs=(1e-2, 1e-1), steps=3, **SMALL)
    lp = [V.loraplus_compare(ratios=(1, 4), lrs=(1e-2, 1e-1), r=4, shift_rank=k, steps=5, **SMALL)
          for k in (None, 2)]
    pissa = [V.pissa_compare(shift=s, lrs=(1e-2, 1e-1), steps=5, **SMALL) for s in ("principal", "random")]
    task = V.make_task(d=8, n=16, shift="rescale", shift_scale=0.3)
    traces = {"lr 1e-2": [V.dora_trace(task, r=2, lr=1e-2, steps=5, rng=s) for s in (0, 1)]}
    dr, dd = dora_pair
    points = {"t": {name: [V.weight_decomposition(f.weights[0], f.weights[1:]) for f in dr.fits(name)]
                    for name in ("full FT", "LoRA")}}
    slopes = {"t": {name: V.decomposition_slope(*runs[0]) for name, runs in points["t"].items()}}
    figs = {
        "first": (PV.plot_first_update_size(V.first_update_size(ranks=(1, 4), n_examples=4, d=16)), 1),
        "rank": (PV.plot_rank_scaling(rs), 2),
        "plus": (PV.plot_loraplus(*lp), 2),
        "pissa": (PV.plot_pissa(*pissa), 2),
        "dora": (PV.plot_dora(dr, dd, path=tmp_path / "sub" / "dora.png"), 2),
        "trace": (PV.plot_dora_detached(traces), 2),
        "wd": (PV.plot_weight_decomposition(points, slopes), 1),
    }
    for name, (fig, n) in figs.items():
        _labelled(fig, n)
    assert plt.get_fignums() == before                      # nothing left open in pyplot
    png = tmp_path / "sub" / "dora.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000


def test_lr_panels_draw_the_grid_and_mark_the_chosen_rate():
    rs = V.rank_scaling_sweep(ranks=(2, 4), lrs=(1e-2, 3e-2, 1e-1), steps=3, **SMALL)
    fig = PV.plot_rank_scaling(rs)
    ax = fig.axes[0]
    line = next(l for l in ax.get_lines() if l.get_label().startswith("r = 2"))
    np.testing.assert_array_equal(line.get_xdata(), rs.lrs)
    np.testing.assert_allclose(line.get_ydata(), np.maximum(rs.lr_curve("α/r", 2), PV.LOSS_FLOOR))
    stars = [l for l in ax.get_lines() if l.get_marker() == "*"]
    assert len(stars) == 2 and stars[0].get_xdata()[0] == rs.best_lr("α/r")[0, 0]


def test_dora_figure_says_when_it_clips_a_curve(dora_pair):
    dr, dd = dora_pair
    assert "floored" not in PV.plot_dora(dr, dd)._suptitle.get_text()
    low = V.Fit(train_loss=np.ones(11), steps=np.array([0, 5, 10]), val=np.ones(3),
                test=np.array([1.0, 1e-3, PV.LOSS_FLOOR / 10]), weights=np.ones((3, 8, 8)), diverged=False)
    run = dr.fair["LoRA"].runs[0]
    kept, run.details = run.details, low
    try:
        assert f"floored at {PV.LOSS_FLOOR:g}" in PV.plot_dora(dr, dd)._suptitle.get_text()
    finally:
        run.details = kept
