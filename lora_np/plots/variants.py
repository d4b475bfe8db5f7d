"""Figures of notebook 07 (``lora_np.variants``): rsLoRA's rank scaling, LoRA+, PiSSA, DoRA.
Each function draws one result object of ``lora_np.variants``.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from .style import COLORS, teaching_figure

__all__ = ["LOSS_FLOOR", "plot_first_update_size", "plot_rank_scaling", "plot_loraplus",
           "plot_pissa", "plot_dora"]

#: losses are drawn on a log axis; anything below this is drawn at this value, and a figure
#: that clips a curve says so in its title. Far below every loss notebook 07 reaches, so that
#: no curve there is clipped: a clipped curve would look like a plateau.
LOSS_FLOOR = 1e-8


def _loss_curve(ax, losses, **kw) -> None:
    ax.semilogy(np.arange(len(losses)), np.maximum(losses, LOSS_FLOOR), **kw)


def _floor_line(ax, value, color, label=None) -> None:
    """The rank-r floor as a dotted line, unless it is below what the axis shows."""
    if value > LOSS_FLOOR:
        ax.axhline(value, color=color, linestyle=":", linewidth=1.8, label=label)


def plot_first_update_size(result, path=None) -> Figure:
    """Per-example size of the first update vs rank (log–log), both scalings, with the theory."""
    title = f"First SGD step from B = 0 (α = {result.alpha:g}, d_in = {result.d_in})"
    with teaching_figure(figsize=(9.5, 6), path=path, title=title, constrained=True) as (fig, (ax,)):
        rng = np.random.default_rng(0)                        # jitter only, for visibility
        for color, (label, sizes) in zip(COLORS, result.sizes.items()):
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
        # below the axes: inside, the legend hid the lowest dots of r = 2 and r = 4
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=11)
    return fig


def plot_rank_scaling(result, path=None) -> Figure:
    """Loss curves for each rank: left α/r, right α/√r; dotted lines are rank-r floors."""
    c = result.config
    title = f"Rank sweep, same α = {c['alpha']:g} and lr = {c['lr']:g}"
    with teaching_figure(1, len(result.curves), figsize=(14, 5.8), path=path, title=title,
                         constrained=True, sharey=True) as (fig, axes):
        for ax, (label, curves) in zip(axes, result.curves.items()):
            for color, r, losses, floor in zip(COLORS, result.ranks, curves, result.floors):
                _loss_curve(ax, losses, color=color, label=f"r = {r}")
                _floor_line(ax, floor, color)
            ax.set_title(f"s = {label}")
            ax.set_xlabel("Adam step")
        axes[0].set_ylabel("training MSE (log)")
        axes[0].legend(title="dotted: rank-r floor", loc="lower left")
    return fig


def plot_loraplus(result, curve_lr=1e-3, step=25, path=None) -> Figure:
    """Left: loss curves at lr_A = ``curve_lr`` for each λ. Right: loss at ``step`` vs lr_A."""
    j = int(np.argmin(np.abs(np.log(result.lrs / curve_lr))))
    title = f"LoRA+: B learns λ times faster than A (r = {result.config.get('r')})"
    with teaching_figure(1, 2, figsize=(14, 5.8), path=path, title=title,
                         constrained=True) as (fig, (ax1, ax2)):
        table = result.loss_at(step)
        for color, lam, curves, row in zip(COLORS, result.ratios, result.curves, table):
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
    return fig


def _curve_panels(result, titles, path, suptitle, names=None) -> Figure:
    """One panel per task of a ``variants.CurvesResult``: a loss curve per method, and the
    method's rank-r floor (dotted, same colour) where it has one."""
    with teaching_figure(1, len(result.curves), figsize=(14, 5.8), path=path, title=suptitle,
                         constrained=True, sharey=True) as (fig, axes):
        for ax, (task, curves) in zip(axes, result.curves.items()):
            for i, (label, losses) in enumerate(curves.items()):
                color, name = COLORS[i], (names or {}).get(label, label)
                _loss_curve(ax, losses, color=color, label=name)
                if label in result.floors[task]:
                    _floor_line(ax, result.floors[task][label], color, label=f"{name}: rank-r floor")
            ax.set_title(titles.get(task, task))
            ax.set_xlabel("Adam step")
            ax.legend(loc="lower left")
        axes[0].set_ylabel("training MSE (log)")
    return fig


def plot_pissa(result, path=None) -> Figure:
    """PiSSA vs default init on the principal-shift and random-shift tasks."""
    titles = {"principal": "shift along W₀'s top directions", "random": "shift in random directions"}
    names = {"kaiming": "default init (B = 0)", "pissa": "PiSSA init"}
    clipped = any(np.nanmin(v) < LOSS_FLOOR for curves in result.curves.values() for v in curves.values())
    note = f"; y floored at {LOSS_FLOOR:g}" if clipped else ""
    title = f"PiSSA vs default init (r = {result.config['r']}, same α and lr{note})"
    return _curve_panels(result, titles, path, title, names=names)


def plot_dora(result, path=None) -> Figure:
    """LoRA vs DoRA (exact and detached) on the random-shift and row-rescale tasks."""
    titles = {"random": "full-rank random shift", "rescale": "rows of W₀ rescaled"}
    return _curve_panels(result, titles, path, f"LoRA vs DoRA (r = {result.config['r']}, same α and lr)")
