"""Figures of notebook 07 (LoRA variants); to be folded into ``lora_np.plots``.

Each function takes a result object from ``lora_np.variants``, draws one figure with fonts
large enough to project (``plots_teaching.TEACHING_STYLE``), returns the matplotlib ``Figure``
and, when ``path`` is given, saves it there as a PNG. The figures only show numbers the
experiments computed.
"""

from __future__ import annotations

import pathlib

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .plots_teaching import TEACHING_STYLE

__all__ = ["plot_first_update_size", "plot_rank_scaling", "plot_loraplus", "plot_pissa", "plot_dora"]

#: losses are drawn on a log axis; anything below this is drawn at this value
LOSS_FLOOR = 1e-6
_COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _figure(ncols=1, figsize=(9, 5.5), **kw):
    # not tracked by pyplot (shown once, never leaked); constrained layout leaves room for titles
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False, **kw)[0]


def _finish(fig, path, title=None):
    if title:
        fig.suptitle(title, fontsize=17)
    if path is not None:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=TEACHING_STYLE["savefig.dpi"], bbox_inches="tight",
                    metadata={"Software": None})
    return fig


def _loss_curve(ax, losses, **kw):
    steps = np.arange(len(losses))
    ax.semilogy(steps, np.maximum(losses, LOSS_FLOOR), **kw)


def _floor_line(ax, value, color, label=None):
    if value > LOSS_FLOOR:
        ax.axhline(value, color=color, linestyle=":", linewidth=1.8, label=label)


def plot_first_update_size(result, path=None):
    """Per-example size of the first update vs rank (log–log), both scalings, with the theory."""
    with plt.rc_context(TEACHING_STYLE):
        fig, (ax,) = _figure(figsize=(9.5, 6))
        rng = np.random.default_rng(0)                        # jitter only, for visibility
        for color, (label, sizes) in zip(_COLORS, result.sizes.items()):
            jitter = np.exp(0.08 * rng.standard_normal(sizes.shape))
            ax.scatter((result.ranks[:, None] * jitter).ravel(), sizes.ravel(), s=10, alpha=0.25,
                       color=color)
            slope = round(result.slope(label), 2) + 0.0            # + 0.0: no "-0.00"
            ax.loglog(result.ranks, result.mean(label), "o-", color=color,
                      label=f"s = {label}: mean over examples (slope {slope:.2f})")
            ax.loglog(result.ranks, result.predicted[label], "--", color=color, linewidth=1.6,
                      label=f"s = {label}: theory s²·r·‖x‖²/(3 d_in)")
        ax.set_xticks(result.ranks, [str(r) for r in result.ranks])
        ax.minorticks_off()
        ax.set_xlabel("rank r")
        ax.set_ylabel("‖Δy‖ / (η ‖∂L/∂y‖)  (output change per unit step)")
        ax.legend(loc="lower left")
        title = f"First SGD step from B = 0 (α = {result.alpha:g}, d_in = {result.d_in})"
        return _finish(fig, path, title=title)


def plot_rank_scaling(result, path=None):
    """Loss curves for each rank: left α/r, right α/√r; dotted lines are rank-r floors."""
    with plt.rc_context(TEACHING_STYLE):
        fig, axes = _figure(ncols=len(result.curves), figsize=(14, 5.8), sharey=True)
        for ax, (label, curves) in zip(axes, result.curves.items()):
            for color, r, losses, floor in zip(_COLORS, result.ranks, curves, result.floors):
                _loss_curve(ax, losses, color=color, label=f"r = {r}")
                _floor_line(ax, floor, color)
            ax.set_title(f"s = {label}")
            ax.set_xlabel("Adam step")
        axes[0].set_ylabel("training MSE (log)")
        axes[0].legend(title="dotted: rank-r floor", loc="lower left")
        c = result.config
        return _finish(fig, path, title=f"Rank sweep, same α = {c['alpha']:g} and lr = {c['lr']:g}")


def plot_loraplus(result, curve_lr=1e-3, step=25, path=None):
    """Left: loss curves at lr_A = ``curve_lr`` for each λ. Right: loss at ``step`` vs lr_A."""
    j = int(np.argmin(np.abs(np.log(result.lrs / curve_lr))))
    with plt.rc_context(TEACHING_STYLE):
        fig, (ax1, ax2) = _figure(ncols=2, figsize=(14, 5.8))
        table = result.loss_at(step)
        for color, lam, curves, row in zip(_COLORS, result.ratios, result.curves, table):
            _loss_curve(ax1, curves[j], color=color, label=f"λ = {lam:g}")
            ok = np.isfinite(row)
            ax2.loglog(result.lrs[ok], row[ok], "o-", color=color, label=f"λ = {lam:g}")
        ax1.set_title(f"lr_A = {result.lrs[j]:g}, lr_B = λ·lr_A")
        ax1.set_xlabel("Adam step")
        ax1.set_ylabel("training MSE (log)")
        ax1.legend()
        ax2.set_title(f"loss after {step} steps")
        ax2.set_xlabel("lr_A (log)")
        ax2.set_ylabel("training MSE (log)")
        ax2.legend()
        r = result.config.get("r")
        return _finish(fig, path, title=f"LoRA+: B learns λ times faster than A (r = {r})")


def _curve_panels(result, titles, path, suptitle, names=None):
    with plt.rc_context(TEACHING_STYLE):
        fig, axes = _figure(ncols=len(result.curves), figsize=(14, 5.8), sharey=True)
        for ax, (task, curves) in zip(axes, result.curves.items()):
            for i, (label, losses) in enumerate(curves.items()):
                color, name = _COLORS[i], (names or {}).get(label, label)
                _loss_curve(ax, losses, color=color, label=name)
                if label in result.floors[task]:
                    _floor_line(ax, result.floors[task][label], color, label=f"{name}: rank-r floor")
            ax.set_title(titles.get(task, task))
            ax.set_xlabel("Adam step")
            ax.legend(loc="lower left")
        axes[0].set_ylabel("training MSE (log)")
        return _finish(fig, path, title=suptitle)


def plot_pissa(result, path=None):
    """PiSSA vs default init on the principal-shift and random-shift tasks."""
    titles = {"principal": "shift along W₀'s top directions", "random": "shift in random directions"}
    c = result.config
    names = {"kaiming": "default init (B = 0)", "pissa": "PiSSA init"}
    return _curve_panels(result, titles, path,
                         f"PiSSA vs default init (r = {c['r']}, same α and lr; y floored at {LOSS_FLOOR:g})",
                         names=names)


def plot_dora(result, path=None):
    """LoRA vs DoRA (exact and detached) on the random-shift and row-rescale tasks."""
    titles = {"random": "full-rank random shift", "rescale": "rows of W₀ rescaled"}
    c = result.config
    return _curve_panels(result, titles, path, f"LoRA vs DoRA (r = {c['r']}, same α and lr)")
