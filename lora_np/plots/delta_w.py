"""Figures of notebook 06, what ΔW learns: intruder dimensions (new directions in the tuned W),
and a task whose change has full rank, where LoRA is not enough.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from ..analysis import tail_energy
from ..validate import check_number
from .checks import check_sweep
from .style import COLORS, FULL_FT, log2_ticks, teaching_figure

__all__ = ["plot_intruder_dimensions", "plot_when_lora_is_not_enough"]


def _check_max_cosines(max_cosines) -> dict:
    """label -> (k,) float64 array of |cos| in [0, 1], the same k for every label."""
    if not isinstance(max_cosines, dict) or not max_cosines:
        raise ValueError(f"max_cosines must be a non-empty dict label -> (k,) array, got "
                         f"{type(max_cosines).__name__}")
    curves = {label: np.asarray(c, dtype=np.float64) for label, c in max_cosines.items()}
    shapes = {label: c.shape for label, c in curves.items()}
    if any(c.ndim != 1 or c.size == 0 for c in curves.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"every max_cosines entry must be a 1-D array of the same length k, got {shapes}")
    if any(np.any((c < 0) | (c > 1 + 1e-12)) for c in curves.values()):
        raise ValueError("max_cosines must lie in [0, 1] (they are |cos|)")
    return curves


def _intruder_style(n: int, label: str) -> dict:
    """Full FT as everywhere; the true ΔW* as a wide pale reference drawn underneath; the rest
    by position."""
    if label.startswith("full"):
        return dict(FULL_FT, marker="s", ms=9)
    if "ΔW*" in label:
        return dict(color="0.6", lw=9, alpha=0.6, marker="o", ms=4)
    markers = "os^Dv<>ph*"
    return dict(color=COLORS[n % len(COLORS)], marker=markers[n % len(markers)], ms=9, lw=1.8)


def plot_intruder_dimensions(max_cosines, eps, title=None, path=None) -> Figure:
    """Intruder dimensions (Shuttleworth et al. 2024, arXiv 2410.21228, Definition 1).

    Left: for each method, the best |cos| between the m-th left singular vector of the tuned W
    and any of W₀'s (``analysis.intruder_dimensions(...).max_cosines``), against m; points
    below the dashed line ε are intruders. Right: the number of intruders among those top k
    against the threshold ε (a step curve per method).

    max_cosines : dict label -> (k,) floats in [0, 1], the same k for every label
    eps : the threshold ε in (0, 1] marked on both panels
    """
    curves = _check_max_cosines(max_cosines)
    eps = check_number("eps", eps, positive=True)
    if eps > 1.0:
        raise ValueError(f"eps must be in (0, 1], got eps={eps}")
    k = next(iter(curves.values())).size
    m = np.arange(1, k + 1)
    grid = np.linspace(0.0, 1.0, 201)
    with teaching_figure(1, 2, figsize=(16, 6.2), path=path, title=title) as (fig, (ax1, ax2)):
        for n, (label, c) in enumerate(curves.items()):
            style = _intruder_style(n, label)
            ax1.plot(m, c, label=label, **style)
            # intruder: max |cos| < ε (the definition of analysis.intruder_dimensions)
            ax2.step(grid, [(c < e).sum() for e in grid], where="post", label=label,
                     **{key: v for key, v in style.items() if key not in ("marker", "ms")})
        ax1.axhline(eps, color="C3", ls=":", lw=2.5, label=f"ε = {eps:g}")
        ax1.fill_between([0.5, k + 0.5], 0, eps, color="C3", alpha=0.08)
        ax1.set_xlim(0.5, k + 0.5)
        ax1.set_ylim(0, 1.02)
        ax1.set_xticks(m)
        ax1.set(xlabel="m: m-th singular vector of the tuned W (by σ)",
                ylabel="max |cos| with any singular vector of W₀",
                title="Closest match in W₀ (below ε: intruder)")
        ax1.legend(loc="lower right", fontsize=11)
        ax2.axvline(eps, color="C3", ls=":", lw=2.5, label=f"ε = {eps:g}")
        ax2.set_xlim(0, 1)
        ax2.set_ylim(-0.2, k + 0.5)
        ax2.set(xlabel="threshold ε", ylabel=f"intruders among the top {k}",
                title="Number of intruders vs threshold")
        ax2.legend(loc="upper left", fontsize=11)
    return fig


def _check_checkpoints(checkpoints) -> dict:
    """label -> (forgetting (n,), loss ÷ L₀ (n,)) float64 arrays of the same length n >= 1."""
    if checkpoints is None:
        return {}
    if not isinstance(checkpoints, dict):
        raise TypeError(f"checkpoints must be a dict label -> (forgetting, loss ÷ L₀) arrays, got "
                        f"{type(checkpoints).__name__}")
    out = {}
    for label, pair in checkpoints.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"checkpoints[{label!r}] must be a pair (forgetting, loss ÷ L₀), got {pair!r}")
        x, y = (np.asarray(a, dtype=np.float64) for a in pair)
        if x.ndim != 1 or x.shape != y.shape or x.size == 0:
            raise ValueError(f"checkpoints[{label!r}]: forgetting and loss ÷ L₀ must be 1-D arrays of "
                             f"one length, got shapes {x.shape} and {y.shape}")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x >= 0)):
            raise ValueError(f"checkpoints[{label!r}]: values must be finite and forgetting >= 0")
        out[label] = (x, y)
    return out


def plot_when_lora_is_not_enough(low, high, checkpoints=None, path=None) -> Figure:
    """Two tasks side by side (Biderman et al. 2024, arXiv 2405.09673: LoRA learns less and
    forgets less).

    Left: validation loss ÷ L₀ against LoRA rank for a task whose true change ΔW* has low rank
    (``low``) and one whose ΔW* has high rank (``high``); dots = LoRA, dashed line = full FT of
    the same colour, thin line = the Eckart–Young fraction Σ_{i>r} σᵢ² / Σ σᵢ² of each ΔW*
    (``analysis.tail_energy``: what the best rank-r update leaves when the loss is isotropic
    in ΔW). Right, for ``high``: task B loss ÷ L₀ (learning; lower is better) against task A
    loss (forgetting, log axis), one labelled point per method at the end of its run, and
    optionally full fine-tuning's checkpoints along its run as lines (Biderman et al.'s test:
    do the LoRA end points lie on full fine-tuning's learning–forgetting curve?).

    low, high : SweepResult
    checkpoints : dict label -> (forgetting (n,), loss ÷ L₀ (n,)), optional
        One curve per run, in the order of its steps; points with forgetting 0 (the
        pretrained model at step 0) cannot sit on the log axis and are left out.
    """
    low, high = check_sweep("low", low), check_sweep("high", high)
    curves = _check_checkpoints(checkpoints)
    ranks_all = sorted(set(low.ranks) | set(high.ranks))
    r_line = np.arange(1, max(ranks_all) + 1)
    with teaching_figure(1, 2, figsize=(17, 6.8), path=path) as (fig, (ax1, ax2)):
        for res, color in ((low, "C0"), (high, "C1")):
            k, L0 = res.task.true_rank, res.initial_val_loss
            tail = tail_energy(res.task.singular_values, relative=True)     # [r], r = 0..k; 0 from k on
            name = f"$\\Delta W^\\ast$ of rank {k}"
            ax1.plot(r_line, tail[np.minimum(r_line, tail.size - 1)], "-", color=color, lw=1.5,
                     alpha=0.8, label=f"{name}: Eckart–Young " + r"$\Sigma_{i>r}\,\sigma_i^2\ /\ \Sigma_i\,\sigma_i^2$")
            ax1.plot(res.ranks, [res.lora[r].final_val_loss / L0 for r in res.ranks], "o", color=color,
                     ms=11, label=f"{name}: LoRA")
            ax1.axhline(res.full.final_val_loss / L0, color=color, ls="--", lw=2.2,
                        label=f"{name}: full fine-tuning")
        log2_ticks(ax1, ranks_all)
        ax1.set_ylim(-0.03, 1.08)
        ax1.set(xlabel="LoRA rank $r$", ylabel="validation loss ÷ $L_0$",
                title="Low-rank vs high-rank change")
        ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=11)
        L0 = high.initial_val_loss
        for n, (label, (x, y)) in enumerate(curves.items()):
            keep = x > 0
            ax2.plot(x[keep], y[keep], color=("0.35", "C2", "C4", "C5")[n % 4], lw=2.2,
                     ls=("-", "--", "-.", ":")[n % 4], label=label)
        for label, x, y in ((m.label, m.old_task_loss, m.final_val_loss / L0) for m in high.methods()):
            full = label.startswith("full")           # full FT and LoRA r = full rank overlap
            style = dict(color="black", marker="s") if full else dict(color="C1", marker="o")
            ax2.plot([x], [y], ms=12, ls="none", label="_" + label, **style)
            ax2.annotate(label + (" (end)" if full else ""), (x, y),
                         xytext=(-10, 10) if full else (10, -18), textcoords="offset points",
                         fontsize=13, ha="right" if full else "left")
        ax2.set_xscale("log")
        ax2.set_ylim(-0.03, 1.08)
        ax2.set(xlabel="task A loss (forgetting, MSE; log scale)",
                ylabel="task B loss ÷ $L_0$ (lower = learned more)",
                title=f"Rank-{high.task.true_rank} task: learning vs forgetting")
        if curves:
            ax2.legend(loc="lower left", fontsize=11)
    return fig
