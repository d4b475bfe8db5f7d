"""Figures of notebook 07 (``lora_np.variants``): rsLoRA's rank scaling, LoRA+, PiSSA, DoRA.
Each function draws result objects of ``lora_np.variants``; the comparisons are drawn at each
method's own learning rate (``lora_np.fair``), and the magnitude/direction changes come from
``variants.weight_decomposition``.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from ..variants import SCALINGS
from .style import COLORS, FULL_FT, teaching_figure

__all__ = ["LOSS_FLOOR", "plot_first_update_size", "plot_rank_scaling", "plot_loraplus",
           "plot_pissa", "plot_dora", "plot_dora_detached", "plot_weight_decomposition"]

#: losses are drawn on a log axis; anything below this is drawn at this value, and a figure
#: that clips a curve says so in its title. Far below every loss notebook 07 reaches, so that
#: no curve there is clipped: a clipped curve would look like a plateau.
LOSS_FLOOR = 1e-12

_MARKERS = ("o", "s", "^", "D", "v")


def _floored(values) -> np.ndarray:
    return np.maximum(np.asarray(values, dtype=float), LOSS_FLOOR)


def _clipped(arrays) -> bool:
    return any(np.nanmin(np.asarray(a, dtype=float)) < LOSS_FLOOR for a in arrays)


def plot_first_update_size(result, path=None) -> Figure:
    """Per-example size of the first update vs rank (log–log), both scalings, with the theory."""
    title = f"First SGD step from $B = 0$ ($\\alpha$ = {result.alpha:g}, $d_{{in}}$ = {result.d_in})"
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
                      label=f"s = {label}: theory $s^2 r \\|x\\|^2 / (3 d_{{in}})$")
        ax.set_xticks(result.ranks, [str(r) for r in result.ranks])
        ax.minorticks_off()
        ax.set_xlabel("rank r")
        ax.set_ylabel("$\\|\\Delta y\\| \\,/\\, (\\eta\\, \\|\\partial L/\\partial y\\|)$")
        # below the axes: inside, the legend hid the lowest dots of r = 2 and r = 4
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=11)
    return fig


def _lr_panel(ax, comparison, names, labels, floor=None) -> None:
    """Validation MSE (first seed) at every learning rate of each method's grid; the rate
    chosen on it is a big star. A diverged rate is left out."""
    for i, (name, label) in enumerate(zip(names, labels)):
        outcome = comparison.fair[name]
        lrs = np.array(list(outcome.grid))
        val = np.array([run.validation for run in outcome.grid.values()])
        ok = np.isfinite(val)
        color = COLORS[i % len(COLORS)]
        ax.loglog(lrs[ok], _floored(val[ok]), marker=_MARKERS[i % len(_MARKERS)], color=color,
                  label=f"{label} (best lr {outcome.lr:.3g})")
        ax.plot([outcome.lr], _floored([outcome.grid[outcome.lr].validation]), "*", color=color,
                markersize=20, markeredgecolor="black", zorder=5)
    if floor is not None and floor > LOSS_FLOOR:
        ax.axhline(floor, color="gray", linestyle=":", linewidth=2, label=f"rank-r floor {floor:.4f}")
    ax.set_xlabel("learning rate (log)")


def plot_rank_scaling(result, path=None) -> Figure:
    """rsLoRA: validation MSE after ``result.step`` steps vs learning rate, one line per rank,
    α/r left and α/√r right; the star is each rank's chosen rate."""
    labels = list(SCALINGS)
    title = (f"Best learning rate per rank (validation MSE after {result.step} Adam "
             f"steps, seed {result.comparison.fair.selection_seed}; ★ = chosen)")
    with teaching_figure(1, len(labels), figsize=(15, 6), path=path, title=title, constrained=True,
                         sharey=True) as (fig, axes):
        for ax, label in zip(axes, labels):
            names = [result.name(label, r) for r in result.ranks]
            _lr_panel(ax, result.comparison, names, [f"r = {r}" for r in result.ranks])
            ax.set_title(f"s = {label}")
            ax.legend(loc="upper center", fontsize=11)
        axes[0].set_ylabel(f"validation MSE after {result.step} steps (log)")
    return fig


def plot_loraplus(ceiling, open_task, path=None) -> Figure:
    """LoRA+: validation MSE vs lr_A for each λ, on a task whose rank-r floor caps the loss
    (left, floor dotted) and on one whose floor is 0 (right)."""
    step = ceiling.config["steps"]
    title = f"LoRA+: each λ at its own learning rate (r = {ceiling.config['r']}, ★ = chosen)"
    with teaching_figure(1, 2, figsize=(15, 6), path=path, title=title, constrained=True) as (fig, axes):
        for ax, comp, what in zip(axes, (ceiling, open_task),
                                  ("full-rank shift: the rank-r floor caps the loss",
                                   "rank-4 shift: floor 0")):
            floor = float(comp.floors[comp.names[0]][0])
            _lr_panel(ax, comp, comp.names, comp.names, floor=floor if floor > 0 else None)
            ax.set_title(what)
            ax.set_ylabel(f"validation MSE after {step} steps (log)")
            ax.legend(loc="upper center", fontsize=11)
        axes[0].set_xlabel("learning rate of A, $\\eta_A$ (log); $\\eta_B = \\lambda\\,\\eta_A$")
        axes[1].set_xlabel("learning rate of A, $\\eta_A$ (log); $\\eta_B = \\lambda\\,\\eta_A$")
    return fig


def plot_pissa(principal, random, path=None) -> Figure:
    """PiSSA vs the default init: validation MSE vs learning rate on the principal-shift and
    the random-shift task (each at the step its rate was chosen for)."""
    names = {"default init": "default init ($B = 0$)", "PiSSA": "PiSSA init"}
    title = f"PiSSA vs default init, each at its own learning rate (r = {principal.config['r']}, ★ = chosen)"
    with teaching_figure(1, 2, figsize=(15, 6), path=path, title=title, constrained=True) as (fig, axes):
        for ax, comp, what in zip(axes, (principal, random),
                                  ("shift along $W_0$'s top directions", "shift in random directions")):
            step = comp.config["steps"]
            _lr_panel(ax, comp, comp.names, [names.get(n, n) for n in comp.names])
            ax.set_title(f"{what}: after {step} steps")
            ax.set_ylabel("validation MSE (log)")
            ax.legend(loc="best", fontsize=11)
    return fig


def plot_dora(random, rescale, path=None) -> Figure:
    """Full FT, LoRA and DoRA (exact, detached), each at its own learning rate: test MSE at the
    checkpoints, mean over seeds (line) and min–max (band), on the two tasks."""
    arrays = [f.test for comp in (random, rescale) for n in comp.names for f in comp.fits(n)]
    note = f"; y floored at {LOSS_FLOOR:g}" if _clipped(arrays) else ""
    title = f"Full FT, LoRA and DoRA at their own learning rates (r = {random.config['r']}{note})"
    with teaching_figure(1, 2, figsize=(15, 6), path=path, title=title, constrained=True,
                         sharey=True) as (fig, axes):
        for ax, comp, what in zip(axes, (random, rescale),
                                  ("full-rank random shift", "rows of $W_0$ rescaled (built for $m$)")):
            for i, name in enumerate(comp.names):
                fits = comp.fits(name)
                steps = fits[0].steps
                test = np.stack([f.test for f in fits])            # (S, K)
                style = dict(FULL_FT) if name == "full FT" else dict(color=COLORS[i % len(COLORS)])
                ax.semilogy(steps, _floored(test.mean(axis=0)), label=f"{name} (lr {comp.lr(name):g})",
                            marker=_MARKERS[i % len(_MARKERS)], markersize=5, **style)
                ax.fill_between(steps, _floored(test.min(axis=0)), _floored(test.max(axis=0)),
                                color=style["color"], alpha=0.15)
            ax.set_title(what)
            ax.set_xlabel("Adam step")
            ax.legend(loc="lower left", fontsize=11)
        axes[0].set_ylabel(f"test MSE (log; mean and range over {len(fits)} seeds)")
    return fig


def plot_dora_detached(traces, path=None) -> Figure:
    """Along DoRA runs (``variants.DoRATrace``; label -> list of traces, one per seed): the
    cosine between the exact and the detached (A, B) gradient (left) and max m/n (right). The
    first seed's line is thick, the others thin."""
    with teaching_figure(1, 2, figsize=(15, 6), path=path, constrained=True,
                         title="DoRA along its own run: exact vs detached gradient (thick: seed 0)") as (fig, axes):
        ax1, ax2 = axes
        for i, (label, runs) in enumerate(traces.items()):
            color = COLORS[i % len(COLORS)]
            for j, tr in enumerate(runs):
                kw = dict(color=color, linewidth=2.4 if j == 0 else 1.0, alpha=1.0 if j == 0 else 0.6,
                          label=label if j == 0 else None)
                ax1.plot(np.arange(len(tr.cos)), tr.cos, **kw)
                ax2.semilogy(np.arange(len(tr.max_ratio)), tr.max_ratio, **kw)
        ax1.axhline(0.0, color="black", linewidth=1)
        ax1.set_title("cos(exact, detached) of the $(A, B)$ gradient")
        ax1.set_ylabel("cosine")
        ax2.set_title("largest $m_i / n_i$,  $n_i = \\|(W + sBA)_i\\|$")
        ax2.set_ylabel("max$_i\\, m_i / n_i$ (log)")
        for ax in axes:
            ax.set_xlabel("Adam step")
            ax.legend(fontsize=11)
    return fig


def plot_weight_decomposition(points, slopes, path=None) -> Figure:
    """Liu et al.'s magnitude/direction plot: ΔD against ΔM at the checkpoints of each method.

    points : task title -> method -> list (one per seed) of ``(dM, dD)`` arrays (from
    ``variants.weight_decomposition``);  slopes : task title -> method -> the slope to print.
    One panel per task; the first seed's points are dots, the other seeds' smaller dots, and
    the least-squares line through the first seed's points is drawn; ``slopes`` label the legend."""
    with teaching_figure(1, len(points), figsize=(15, 6.2), path=path, constrained=True,
                         title="Magnitude vs direction change along training (DoRA paper §2.2)") as (fig, axes):
        for ax, (task, methods) in zip(axes, points.items()):
            for i, (name, runs) in enumerate(methods.items()):
                style = dict(FULL_FT) if name == "full FT" else dict(color=COLORS[i % len(COLORS)])
                color = style["color"]
                for j, (dM, dD) in enumerate(runs):
                    ax.scatter(dM, dD, s=36 if j == 0 else 12, color=color, alpha=0.9 if j == 0 else 0.35,
                               marker=_MARKERS[i % len(_MARKERS)],
                               label=f"{name}: slope {slopes[task][name]:+.2f} (seed 0)" if j == 0 else None)
                dM, dD = runs[0]
                fit = np.polyfit(dM, dD, 1)
                xs = np.linspace(dM.min(), dM.max(), 20)
                ax.plot(xs, np.polyval(fit, xs), color=color, linestyle=style.get("ls", "-"), linewidth=1.8)
            ax.set_title(task)
            ax.set_xlabel("$\\Delta M$ = mean$_i\\, |\\,\\|W_{t,i}\\| - \\|W_{0,i}\\|\\,|$")
            ax.set_ylabel("$\\Delta D$ = mean$_i\\, (1 - \\cos(W_{t,i}, W_{0,i}))$")
            ax.legend(fontsize=11, loc="upper left")
    return fig
