"""Figures of notebooks 04–05, full fine-tuning against LoRA: the Eckart–Young floor below the
true rank, forgetting against the part of ΔW that the old task's inputs see, and the
fixed-parameter-budget bars of Hu et al. 2021, Table 5, in miniature.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .checks import check_positive_1d, check_same_length
from .style import FULL_FT, teaching_figure

__all__ = ["plot_rank_floor", "plot_forgetting_vs_leak", "plot_budget_bars"]


def plot_rank_floor(ranks, lora_loss, predicted_ranks, predicted, k, oracle_loss=None,
                    full_loss=None, noise_floor=None, title=None, path=None) -> Figure:
    """Loss after fine-tuning ÷ L₀ against LoRA rank r (linear axes), next to the
    Eckart–Young prediction for the best rank-r update.

    ranks, lora_loss : (m,) LoRA ranks and their final validation loss ÷ L₀ (dots)
    predicted_ranks, predicted : (p,) ranks and the predicted floor ÷ L₀ at each, e.g.
        Σ_{i>r} σᵢ² / Σ σᵢ² of ΔW* (``analysis.tail_energy(..., relative=True)``; line)
    k : the true rank (dotted vertical line)
    oracle_loss : optional (m,) loss ÷ L₀ of the model given the best rank-r approximation of
        ΔW* directly (squares)
    full_loss, noise_floor : optional horizontal lines (÷ L₀)
    """
    a = check_same_length(ranks=ranks, lora_loss=lora_loss)
    p = check_same_length(predicted_ranks=predicted_ranks, predicted=predicted)
    if oracle_loss is not None:
        oracle_loss = check_same_length(ranks=ranks, oracle_loss=oracle_loss)["oracle_loss"]
    with teaching_figure(figsize=(11, 6.2), path=path) as (fig, (ax,)):
        ax.plot(p["predicted_ranks"], p["predicted"], "-", color="C0", lw=2.5,
                label=r"Eckart–Young: $\sum_{i>r}\sigma_i^2 \,/\, \sum_i\sigma_i^2$ of ΔW*")
        if oracle_loss is not None:
            ax.plot(a["ranks"], oracle_loss, "s", color="C2", ms=13, mfc="none", mew=2.5,
                    label="pretrained W + best rank-r approx. of ΔW*")
        ax.plot(a["ranks"], a["lora_loss"], "o", color="C1", ms=10, label="LoRA rank r, trained")
        if full_loss is not None:
            ax.axhline(full_loss, label="full fine-tuning", **FULL_FT)
        if noise_floor is not None:
            ax.axhline(noise_floor, color="gray", ls=":", lw=2, label="noise floor (noise² / L₀)")
        ax.axvline(k, color="C3", ls=":", lw=2, label=f"true rank k = {k}")
        ax.set_ylim(-0.03, 1.05)
        ax.set_xticks(np.unique(np.concatenate([a["ranks"], p["predicted_ranks"]])).astype(int))
        ax.set(xlabel="LoRA rank r", ylabel="validation loss ÷ L₀",
               title=title or "Below the true rank: the Eckart–Young floor")
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
                    label=f"old-task loss = {slope:.2g} · ‖ΔW Q_A‖²")
        _label_points(ax, labels, v["leak"], v["old_loss"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(xlabel="‖ΔW Q_A‖²_F  (part of ΔW that task A's inputs see)",
               ylabel="task A loss after fine-tuning (MSE)",
               title=title or "Forgetting follows the part of ΔW inside task A's inputs")
        if slope is not None:
            ax.legend(loc="upper left")
    return fig


def plot_budget_bars(configs, losses, full=None, noise_floor=None, highlight=None, budget=None,
                     path=None) -> Figure:
    """Hu et al. 2021 (arXiv 2106.09685) Table 5 in miniature: one horizontal bar per LoRA
    configuration (same parameter budget), final validation loss ÷ L₀ on a log axis; one panel
    per task.

    configs : (m,) str labels, e.g. "{q,v} r=4"
    losses : dict task title -> (m,) loss ÷ L₀, one per config
    full : optional dict task title -> full fine-tuning's loss ÷ L₀ (dashed line)
    noise_floor : optional dict task title -> noise² / L₀ (dotted line)
    highlight : optional dict task title -> (m,) bools; True bars (e.g. "adapts every matrix
        the task shifts") are drawn in a second colour
    budget : optional int, the trainable-parameter budget, for the title
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
    with teaching_figure(1, n, figsize=(8.2 * n, 7.2), path=path, title=title, constrained=True,
                         sharey=True) as (fig, axes):
        handles = {}
        for ax, (name, vals) in zip(axes, losses.items()):
            vals = np.asarray(vals, dtype=np.float64)
            hl = np.zeros(len(configs), bool) if highlight is None else np.asarray(highlight[name], bool)
            ax.barh(y, vals, color=np.where(hl, "C2", "C0"), height=0.7)
            for yi, v in zip(y, vals):
                ax.text(v * 1.15, yi, f"{v:#.3g}", va="center", fontsize=13,
                        bbox=dict(facecolor="white", edgecolor="none", pad=1, alpha=0.85))
            if full is not None:
                handles["full fine-tuning"] = ax.axvline(full[name], **FULL_FT)
            if noise_floor is not None:
                handles["noise floor (noise² / L₀)"] = ax.axvline(noise_floor[name], color="gray", ls=":",
                                                                  lw=2)
            ax.set_xscale("log")
            ax.set_xlim(min([vals.min(), *(d[name] for d in (full, noise_floor) if d)]) / 2.5, 6)
            ax.set_yticks(y, configs)
            ax.grid(axis="y", visible=False)
            ax.set(xlabel="validation loss ÷ L₀ (log scale)", title=name)
            if hl.any():
                handles["adapts every shifted matrix"] = Patch(color="C2")
        if highlight is not None:
            handles["does not adapt every shifted matrix"] = Patch(color="C0")
        axes[0].set_ylabel("LoRA targets, rank")
        if handles:
            fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                       ncol=min(len(handles), 4), fontsize=13)
    return fig
