"""Figures of notebooks 04–05, full fine-tuning against LoRA: the Eckart–Young floor below the
true rank, forgetting against the part of ΔW that the old task's inputs see, and the
fixed-parameter-budget comparison of Hu et al. 2021, Table 5, in miniature (one dot per
configuration).
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from .checks import check_positive_1d, check_same_length
from .style import FULL_FT, teaching_figure

__all__ = ["plot_rank_floor", "plot_forgetting_vs_leak", "plot_budget_bars", "LEAK"]

#: ‖ΔW Q_A‖²_F in mathtext: the part of ΔW that task A's inputs see (notebook 04, section 8)
LEAK = r"$\|\Delta W\, Q_A\|_F^{\,2}$"


def plot_rank_floor(ranks, lora_loss, predicted_ranks, predicted, k, oracle_loss=None,
                    full_loss=None, noise_floor=None, title=None, path=None, oracle_range=None,
                    ylabel="validation loss ÷ L₀") -> Figure:
    """Loss after fine-tuning against LoRA rank r (linear axes), next to what an isotropic
    quadratic model of the loss predicts for the best rank-r update (the Eckart–Young tail) —
    a model's prediction, not a bound on the loss.

    ranks, lora_loss : (m,) LoRA ranks and their final validation loss (dots), in the units of
        ``ylabel`` (e.g. ÷ L₀, or the excess (L − noise²) ÷ (L₀ − noise²))
    predicted_ranks, predicted : (p,) ranks and the predicted value at each, e.g.
        Σ_{i>r} σᵢ² / Σ σᵢ² of ΔW* (``analysis.tail_energy(..., relative=True)``; line)
    k : the true rank (dotted vertical line)
    oracle_loss : optional (m,) loss of the model given the truncated SVD [ΔW*]_r directly
        (squares)
    oracle_range : optional (m, 2) min and max loss over other best rank-r approximations of
        ΔW* (when σ_r = σ_{r+1} the truncation is not unique); drawn as a capped vertical bar
        just left of each rank, and the squares of ``oracle_loss`` then just right of it
    full_loss, noise_floor : optional horizontal lines
    """
    a = check_same_length(ranks=ranks, lora_loss=lora_loss)
    p = check_same_length(predicted_ranks=predicted_ranks, predicted=predicted)
    if oracle_loss is not None:
        oracle_loss = check_same_length(ranks=ranks, oracle_loss=oracle_loss)["oracle_loss"]
    if oracle_range is not None:
        oracle_range = np.asarray(oracle_range, dtype=np.float64)
        if oracle_range.shape != (a["ranks"].size, 2):
            raise ValueError(f"oracle_range must be one (min, max) pair per rank, shape "
                             f"({a['ranks'].size}, 2), got {oracle_range.shape}")
    with teaching_figure(figsize=(11, 6.2), path=path) as (fig, (ax,)):
        ax.plot(p["predicted_ranks"], p["predicted"], "-", color="C0", lw=2.5,
                label=r"isotropic model: $\sum_{i>r}\sigma_i^2 \,/\, \sum_i\sigma_i^2$ of ΔW*")
        if oracle_range is not None:           # a bar with caps, just left of each rank
            x = a["ranks"] - 0.14
            ax.vlines(x, oracle_range[:, 0], oracle_range[:, 1], color="C2", lw=3,
                      label="other best rank-r approximations of ΔW* (min–max)")
            for col in (0, 1):
                ax.plot(x, oracle_range[:, col], "_", color="C2", ms=16, mew=3)
        if oracle_loss is not None:
            ax.plot(a["ranks"] + (0.14 if oracle_range is not None else 0.0), oracle_loss, "s", color="C2",
                    ms=11, mfc="none", mew=2.5, label="pretrained W + truncated SVD of ΔW*")
        ax.plot(a["ranks"], a["lora_loss"], "o", color="C1", ms=10, label="LoRA rank r, trained")
        if full_loss is not None:
            ax.axhline(full_loss, label="full fine-tuning", **FULL_FT)
        if noise_floor is not None:
            ax.axhline(noise_floor, color="gray", ls=":", lw=2, label="noise floor")
        ax.axvline(k, color="C3", ls=":", lw=2, label=f"true rank r* = {k}")
        ax.set_ylim(-0.03, 1.05)
        ax.set_xticks(np.unique(np.concatenate([a["ranks"], p["predicted_ranks"]])).astype(int))
        ax.set(xlabel="LoRA rank r", ylabel=ylabel,
               title=title or "Below the true rank: the Eckart–Young prediction")
        ax.legend(loc="upper right")
    return fig


def _label_points(ax, labels, xs, ys) -> None:
    """Draw and label each point, left to right; a label goes on the point's left when a
    neighbour's label already sits on the right (log–log axes: closeness in decades)."""
    placed = []                                    # (log x, log y) of points labelled on the right
    for lab, x, y in sorted(zip(labels, xs, ys), key=lambda t: t[1]):
        full = lab.startswith("full")
        ax.plot(x, y, "s" if full else "o", ms=12 if full else 10,
                color="black" if full else "C1", zorder=3)
        pt = (np.log10(x), np.log10(y))
        if any(abs(pt[0] - q[0]) < 0.3 and abs(pt[1] - q[1]) < 0.15 for q in placed):
            ax.annotate(lab, (x, y), xytext=(-10, 0), textcoords="offset points", fontsize=13,
                        ha="right", va="center")
        else:
            placed.append(pt)
            ax.annotate(lab, (x, y), xytext=(10, 0), textcoords="offset points", fontsize=13,
                        va="center")


def plot_forgetting_vs_leak(labels, leak, old_loss, slope=None, title=None, path=None) -> Figure:
    """Old-task loss against ‖ΔW Q_A‖²_F (how much of ΔW acts on task A's inputs), log–log,
    one labelled point per method.

    labels : (m,) str;  leak, old_loss : (m,) floats > 0 (log axes)
    slope : optional c; draws the line old_loss = c · leak (dashed grey)
    """
    v = check_same_length(leak=check_positive_1d("leak", leak),
                          old_loss=check_positive_1d("old_loss", old_loss))
    if len(labels) != v["leak"].size:
        raise ValueError(f"need one label per point, got {len(labels)} labels and {v['leak'].size} points")
    with teaching_figure(figsize=(11, 6.5), path=path) as (fig, (ax,)):
        if slope is not None:
            x = np.geomspace(v["leak"].min() / 2, v["leak"].max() * 2, 50)
            ax.plot(x, slope * x, color="gray", ls="--", lw=2,
                    label=f"old-task loss = {slope:.2g} · " + LEAK)
        _label_points(ax, labels, v["leak"], v["old_loss"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(xlabel=LEAK + "  (the part of ΔW that task A's inputs see)",
               ylabel="task A loss after fine-tuning (MSE)",
               title=title or "Forgetting follows the part of ΔW inside task A's inputs")
        if slope is not None:
            ax.legend(loc="upper left")
    return fig


def plot_budget_bars(configs, losses, full=None, noise_floor=None, highlight=None, budget=None,
                     path=None) -> Figure:
    """Hu et al. 2021 (arXiv 2106.09685) Table 5 in miniature: one row per LoRA configuration
    (same parameter budget), its final validation loss ÷ L₀ as a dot on a log axis, the value
    printed beside it; one panel per task. Dots, not bars: a bar's length on a log axis starts
    at an arbitrary left edge and means nothing, a dot's position is the value.

    configs : (m,) str labels, e.g. "{q,v} r=4"
    losses : dict task title -> (m,) loss ÷ L₀, one per config
    full : optional dict task title -> full fine-tuning's loss ÷ L₀ (dashed line)
    noise_floor : optional dict task title -> noise² / L₀ (dotted line)
    highlight : optional dict task title -> (m,) bools; True rows (e.g. "adapts every matrix
        the task shifts") are drawn in a second colour and shape
    budget : optional int, the trainable-parameter budget, for the title

    Each panel holds one line (markers only) per colour, labelled ``"adapts every shifted
    matrix"`` (C2, squares) and ``"does not adapt every shifted matrix"`` (C0, circles), or
    ``"LoRA"`` without ``highlight``.
    """
    configs = list(configs)
    if not isinstance(losses, dict) or not losses:
        raise ValueError("losses must be a non-empty dict task title -> one loss per config")
    for name, vals in losses.items():
        if np.asarray(vals).shape != (len(configs),):
            raise ValueError(f"losses[{name!r}] must have one value per config ({len(configs)}), "
                             f"got shape {np.asarray(vals).shape}")
    n = len(losses)
    y = np.arange(len(configs))[::-1]
    title = "Same parameter budget, different matrices" + \
        (f" ({budget:,} trainable parameters each)" if budget else "")
    groups = (("does not adapt every shifted matrix", "C0", "o", False),
              ("adapts every shifted matrix", "C2", "s", True))
    with teaching_figure(1, n, figsize=(8.2 * n, 7.2), path=path, title=title, constrained=True,
                         sharey=True) as (fig, axes):
        handles = {}
        for ax, (name, vals) in zip(axes, losses.items()):
            vals = np.asarray(vals, dtype=np.float64)
            hl = np.zeros(len(configs), bool) if highlight is None else np.asarray(highlight[name], bool)
            for yi in y:                                   # a faint guide line per row
                ax.axhline(yi, color="0.85", lw=1, zorder=0)
            for label, color, marker, flag in groups:
                sel = hl == flag
                if sel.any():
                    ln, = ax.plot(vals[sel], y[sel], marker, color=color, ms=13, ls="none",
                                  label=label if highlight is not None else "LoRA", zorder=3)
                    if highlight is not None:
                        handles[label] = ln
            for yi, v in zip(y, vals):
                ax.annotate(f"{v:#.3g}", (v, yi), xytext=(12, 0), textcoords="offset points",
                            va="center", fontsize=13,
                            bbox=dict(facecolor="white", edgecolor="none", pad=1, alpha=0.85))
            if full is not None:
                handles["full fine-tuning"] = ax.axvline(full[name], **FULL_FT)
            if noise_floor is not None:
                handles["noise floor (noise² / L₀)"] = ax.axvline(noise_floor[name], color="gray", ls=":",
                                                                  lw=2)
            ax.set_xscale("log")
            ax.set_xlim(min([vals.min(), *(d[name] for d in (full, noise_floor) if d)]) / 2.5, 6)
            ax.set_ylim(y.min() - 0.6, y.max() + 0.6)
            ax.set_yticks(y, configs)
            ax.grid(axis="y", visible=False)
            ax.set(xlabel="validation loss ÷ L₀ (log scale)", title=name)
        axes[0].set_ylabel("LoRA targets, rank")
        if handles:
            order = [k for k in ("full fine-tuning", "noise floor (noise² / L₀)", "adapts every shifted matrix",
                                 "does not adapt every shifted matrix") if k in handles]
            fig.legend([handles[k] for k in order], order, loc="outside lower center",
                       ncol=min(len(order), 4), fontsize=13)
    return fig
