"""Figures of a rank sweep (``lora_np.experiments``): full fine-tuning against LoRA at every
rank, on one task whose true change ΔW* has rank r* (``k`` here). ``python -m lora_np`` calls
``save_figures``; notebooks 04–06 draw the same figures one at a time.
"""

from __future__ import annotations

import pathlib

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure

from ..analysis import random_subspace_baseline, row_space_basis, singular_values, subspace_similarity_grid
from ..counting import training_state_bytes
from ..experiments import SweepResult, least_squares_overfit, lora_formula_params, lora_free_parameters
from .checks import check_sweep
from .style import FULL_FT, log2_ticks, teaching_figure

__all__ = ["FIGURE_NAMES", "save_figures", "plot_loss_vs_rank", "plot_loss_curves", "least_squares_prediction",
           "plot_delta_spectra", "plot_subspace_similarity", "plot_param_counts"]

#: file name of each figure that ``save_figures`` writes
FIGURE_NAMES = {
    "loss_vs_rank": "sweep_loss_vs_rank.png",
    "loss_curves": "sweep_loss_curves.png",
    "delta_spectra": "sweep_delta_spectra.png",
    "subspace_similarity": "sweep_subspace_similarity.png",
    "param_counts": "sweep_param_counts.png",
}


def _rank_colors(ranks) -> dict:
    cmap = mpl.colormaps["viridis"]
    n = max(len(ranks) - 1, 1)
    return {r: cmap(0.9 * i / n) for i, r in enumerate(ranks)}


def _rank_axis(ax, ranks, k) -> None:
    """Rank on a log₂ axis with plain tick labels, and the true rank r* (``k``) as a dotted red line."""
    log2_ticks(ax, ranks)
    ax.axvline(k, color="C3", ls=":", lw=2, label=f"true rank r* = {k}")


def _layer(result: SweepResult, layer) -> str:
    names = list(result.task.delta_true)
    if layer is None:
        return names[0]
    if layer not in names:
        raise ValueError(f"layer must be one of the shifted layers {names}, got {layer!r}")
    return layer


# --------------------------------------------------------------------------- losses


def plot_loss_vs_rank(result: SweepResult, path=None, noise_panel: bool = False) -> Figure:
    """Left: task B validation loss ÷ L₀ after fine-tuning, against LoRA rank (log–log), with
    full fine-tuning as a dashed line, the noise floor (noise² ÷ L₀) dotted and the true rank k
    marked. Right: task A loss (forgetting) against rank, full FT dashed.

    ``noise_panel=True`` adds a middle panel: the same validation losses ÷ noise² on a linear
    axis, for the ranks r ≥ k and full FT only — near the noise floor, where the left panel's
    log axis (three decades) puts LoRA r = k (1.004·noise²) and full FT (1.145·noise²) on top
    of each other.
    """
    res = check_sweep("result", result)
    ranks, k, L0 = res.ranks, res.task.true_rank, res.initial_val_loss
    val = [res.lora[r].final_val_loss / L0 for r in ranks]
    old = [res.lora[r].old_task_loss for r in ranks]
    n = 3 if noise_panel else 2
    with teaching_figure(1, n, figsize=(7.5 * n, 5.8), path=path) as (fig, axes):
        ax1, ax2 = axes[0], axes[-1]
        ax1.plot(ranks, val, "o-", color="C0", ms=9, label="LoRA")
        ax1.axhline(res.full.final_val_loss / L0, label="full fine-tuning", **FULL_FT)
        ax1.axhline(res.task.noise_floor / L0, color="gray", ls=":", lw=2,
                    label="noise floor (noise² / L₀)")
        ax1.set_yscale("log")
        _rank_axis(ax1, ranks, k)
        ax1.set(xlabel="LoRA rank r", ylabel="validation loss ÷ L₀",
                title=f"Task B: loss after fine-tuning (L₀ = {L0:.3g})")
        ax1.legend(loc="center right")
        if noise_panel:
            _noise_panel(axes[1], res)
        ax2.plot(ranks, old, "o-", color="C1", ms=9, label="LoRA")
        ax2.axhline(res.full.old_task_loss, label="full fine-tuning", **FULL_FT)
        ax2.set_yscale("log")
        _rank_axis(ax2, ranks, k)
        ax2.set(xlabel="LoRA rank r", ylabel="task A loss (MSE; 0 before fine-tuning)",
                title="Task A: forgetting")
        ax2.legend(loc="best")              # the points move with the task; let matplotlib avoid them
    return fig


def least_squares_prediction(res: SweepResult) -> dict:
    """Textbook least squares' validation loss ÷ noise², 1 + p/n (``least_squares_overfit``),
    for full FT (p = its trainable parameters) and each LoRA rank (p = Σ over its layers of
    ``lora_free_parameters``), n = the number of training targets: ``{"full": …, r: …}``
    (p capped at n: a model with p ≥ n fits the noise exactly, 1 + p/n = 2)."""
    task = res.task
    n = task.y_train.size
    out = {"full": least_squares_overfit(min(res.full.trainable_params, n), n)[1]}
    for r, m in res.lora.items():
        p = sum(lora_free_parameters(task.layer(task.pretrained, t).d_in, task.layer(task.pretrained, t).d_out, r)
                for t in m.targets)
        out[r] = least_squares_overfit(min(p, n), n)[1]
    return out


def _noise_panel(ax, res: SweepResult) -> None:
    """Validation loss ÷ noise² for r ≥ k and full FT, linear axis, the noise floor at 1, and
    textbook least squares' 1 + p/n beside them."""
    k, nf = res.task.true_rank, res.task.noise_floor
    high = [r for r in res.ranks if r >= k]
    val = [res.lora[r].final_val_loss / nf for r in high]
    full = res.full.final_val_loss / nf
    pred = least_squares_prediction(res)
    ax.plot(high, val, "o-", color="C0", ms=9, label=f"LoRA, r ≥ {k}")
    ax.plot(high, [pred[r] for r in high], "D", color="C0", mfc="none", mew=2, ms=10,
            label="least squares: 1 + p/n")
    ax.axhline(full, label=f"full fine-tuning ({full:.3f})", **FULL_FT)
    ax.axhline(pred["full"], color="black", ls=(0, (1, 2)), lw=1.8,
               label=f"full FT, least squares ({pred['full']:.3f})")
    ax.axhline(1.0, color="gray", ls=":", lw=2, label="noise floor (1)")
    if high:
        log2_ticks(ax, high)
    top = max([full, pred["full"], *val, *(pred[r] for r in high)])
    ax.set_ylim(1 - 0.15 * (top - 1), top + 0.35 * (top - 1))
    ax.set(xlabel="LoRA rank r", ylabel="validation loss ÷ noise²",
           title="Task B, near the noise floor")
    ax.legend(loc="center left", fontsize=11)


def _smooth(values, window: int) -> np.ndarray:
    """Running mean over ``window`` steps (shorter at the start)."""
    v = np.asarray(values, dtype=np.float64)
    c = np.cumsum(np.concatenate([[0.0], v]))
    i = np.arange(1, v.size + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


#: line styles that tell neighbouring ranks apart where their colours are close
_RANK_STYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2)), (0, (1, 1)))
_RANK_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot_loss_curves(result: SweepResult, window: int = 10, path=None, late_window: int = 50,
                     late_from: float = 0.25) -> Figure:
    """Left: training loss ÷ L₀ against step for full FT (black, dashed) and every LoRA rank
    (colour, line style and marker = rank), each a running mean over ``window`` steps of the
    per-step mini-batch loss; the noise floor dotted. Right: the end of the same runs, from
    ``late_from`` of the steps on, ÷ noise² on a linear axis (running mean over
    ``late_window`` steps), for full FT and the ranks r ≥ k — where the left panel's log axis
    draws them as one line: the more parameters, the further the training loss falls below the
    noise floor (fitted noise)."""
    res = check_sweep("result", result)
    L0, ranks, k, nf = res.initial_val_loss, res.ranks, res.task.true_rank, res.task.noise_floor
    colors = _rank_colors(ranks)
    style = {r: dict(color=colors[r], ls=_RANK_STYLES[i % len(_RANK_STYLES)],
                     marker=_RANK_MARKERS[i % len(_RANK_MARKERS)], ms=7)
             for i, r in enumerate(ranks)}
    with teaching_figure(1, 2, figsize=(18, 6.4), path=path,
                         gridspec_kw=dict(width_ratios=(1.25, 1))) as (fig, (ax, ax2)):
        for r in ranks:
            h = res.lora[r].loss_history
            every = max(len(h) // 12, 1)
            ax.plot(np.arange(1, len(h) + 1), _smooth(h, window) / L0, label=f"LoRA r={r}",
                    markevery=(every * (ranks.index(r) + 1) // (len(ranks) + 1), every), **style[r])
        h = res.full.loss_history
        ax.plot(np.arange(1, len(h) + 1), _smooth(h, window) / L0, label="full fine-tuning", **FULL_FT)
        ax.axhline(nf / L0, color="gray", ls=":", lw=2, label="noise floor")
        ax.set_yscale("log")
        ax.set(xlabel="training step", ylabel="training loss ÷ L₀",
               title=f"Loss curves (true rank r* = {k}; running mean of {window} steps)")
        ax.legend(loc="center right", ncol=2)        # ranks below k plateau above it, the rest below
        n_steps = len(res.full.loss_history)
        start = int(late_from * n_steps)
        for r in [r for r in ranks if r >= k]:
            h = np.asarray(res.lora[r].loss_history)
            y = _smooth(h, late_window)[start:] / nf
            x = np.arange(start + 1, len(h) + 1)
            every = max(len(x) // 8, 1)
            ax2.plot(x, y, label=f"LoRA r={r}", markevery=(every * ranks.index(r) // len(ranks), every),
                     **style[r])
        y = _smooth(res.full.loss_history, late_window)[start:] / nf
        ax2.plot(np.arange(start + 1, n_steps + 1), y, label="full fine-tuning", **FULL_FT)
        ax2.axhline(1.0, color="gray", ls=":", lw=2, label="noise floor")
        ax2.set(xlabel="training step", ylabel="training loss ÷ noise²",
                title=f"The end, r ≥ {k} (running mean of {late_window} steps)")
        ax2.legend(loc="upper right", ncol=2)
    return fig


# --------------------------------------------------------------------------- ΔW


def plot_delta_spectra(result: SweepResult, layer: str | None = None, ranks=None, path=None) -> Figure:
    """Singular values σᵢ of ΔW (log scale) against index i for the true ΔW*, full FT and LoRA
    at ``ranks`` (default: all), in one shifted ``layer`` (default: the first).

    A LoRA ΔW = s·B A has rank ≤ r, so only its first r values are drawn (the rest are zero up
    to rounding); ΔW* has k non-zero values.
    """
    res = check_sweep("result", result)
    name = _layer(res, layer)
    ranks = res.ranks if ranks is None else list(ranks)
    missing = [r for r in ranks if r not in res.lora]
    if missing:
        raise ValueError(f"ranks {missing} are not in this sweep (it has {res.ranks})")
    k = res.task.true_rank
    colors = _rank_colors(res.ranks)
    with teaching_figure(figsize=(11, 6.2), path=path) as (fig, (ax,)):
        for r in ranks:                   # sigma: singular values (s is LoRA's scale, lora_np/README.md)
            sigma = singular_values(res.lora[r].delta_weights[name])[:r]
            ax.plot(np.arange(1, sigma.size + 1), sigma, "o-", ms=5, lw=1.6, color=colors[r], label=f"LoRA r={r}")
        sigma = singular_values(res.full.delta_weights[name])
        ax.plot(np.arange(1, sigma.size + 1), sigma, marker="s", ms=6, label="full fine-tuning", **FULL_FT)
        sigma_true = singular_values(res.task.delta_true[name])[:k]
        ax.plot(np.arange(1, k + 1), sigma_true, "*", color="C3", ms=20, label=f"true ΔW* (rank {k})", zorder=5)
        ax.axvline(k + 0.5, color="C3", ls=":", lw=2)
        ax.set_yscale("log")
        log2_ticks(ax, [2 ** e for e in range(int(np.log2(sigma.size)) + 1)])
        ax.set(xlabel="index i (log scale)", ylabel="singular value σᵢ of ΔW",
               title=f"Spectrum of the learned update ΔW of {name}")
        ax.legend(loc="lower left", ncol=2)
    return fig


def plot_subspace_similarity(result: SweepResult, r_small: int = 8, r_large: int | None = None,
                             layer: str | None = None, path=None) -> Figure:
    """Hu et al. 2021 (arXiv 2106.09685) §7.2, Fig. 3, on this task.

    Left: the heatmap φ(A_{r_small}, A_{r_large}, i, j) = ‖U_iᵀ U_j‖²_F / min(i, j), where U are
    the right singular vectors (row spaces) of the two LoRA runs' A (r, d_in) factors, for
    i, j ≤ r_small (r_large defaults to the largest rank of the sweep). Like the zoomed panels
    of Hu et al.'s Fig. 3: with d_in = 64 the full j ≤ 64 range would be the whole input
    space, where φ = 1 says nothing (the random baseline max(i, j)/d_in is 1 there too).
    Right: φ at i = j against i, for the same pair of A's, for each learned ΔW against the
    true ΔW* (row spaces, in input space), and the random baseline E φ = i / d_in.
    """
    res = check_sweep("result", result)
    name = _layer(res, layer)
    r_large = max(res.ranks) if r_large is None else r_large
    for r in (r_small, r_large):
        if r not in res.lora:
            raise ValueError(f"rank {r} is not in this sweep (it has {res.ranks})")
    if name not in res.lora[r_small].lora_factors:
        raise ValueError(f"LoRA did not adapt layer {name!r} (targets {res.lora[r_small].targets})")
    k = res.task.true_rank
    A1 = res.lora[r_small].lora_factors[name][0]
    A2 = res.lora[r_large].lora_factors[name][0]
    d_in = A1.shape[1]
    grid = subspace_similarity_grid(row_space_basis(A1), row_space_basis(A2))   # (r_small, r_large)
    n = min(r_small, r_large)
    zoom = grid[:, :n]                                                           # (r_small, n)
    V_true = row_space_basis(res.task.delta_true[name], k)
    i = np.arange(1, n + 1)

    def phi_vs_true(dW):                                           # φ(i, i), i = 1..n
        return np.diag(subspace_similarity_grid(row_space_basis(dW, n), V_true))[:n]

    curves = {
        f"A of r={r_small} vs A of r={r_large}": np.diag(grid)[:n],
        "full-FT ΔW vs true ΔW*": phi_vs_true(res.full.delta_weights[name]),
        f"LoRA r={r_large} ΔW vs true ΔW*": phi_vs_true(res.lora[r_large].delta_weights[name]),
    }
    with teaching_figure(1, 2, figsize=(19, 6.2), path=path) as (fig, (ax1, ax2)):
        im = ax1.imshow(zoom, vmin=0, vmax=1, cmap="magma", aspect="auto", origin="lower",
                        extent=(0.5, zoom.shape[1] + 0.5, 0.5, zoom.shape[0] + 0.5))
        for (a, b), v in np.ndenumerate(zoom):
            ax1.text(b + 1, a + 1, f"{v:.2f}", ha="center", va="center", fontsize=10,
                     color="black" if v > 0.6 else "white")
        ax1.set_xticks(range(1, zoom.shape[1] + 1))
        ax1.set_yticks(range(1, zoom.shape[0] + 1))
        ax1.grid(False)
        fig.colorbar(im, ax=ax1)
        ax1.set(xlabel=f"j (directions of A, r = {r_large})", ylabel=f"i (directions of A, r = {r_small})",
                title=f"φ(i, j) between A's row spaces ({name})")
        for label, c, marker in zip(curves, ("C0", "black", "C2"), ("o", "s", "^")):
            # φ against ΔW* is only defined up to i = k (ΔW* has k directions): past k it is
            # ‖·‖²_F / min(i, k), so the curve stays flat; draw it only up to k
            upto = n if "ΔW*" not in label else min(n, k)
            ax2.plot(i[:upto], curves[label][:upto], marker + "-", color=c, ms=8, label=label)
        ax2.plot(i, [random_subspace_baseline(int(a), int(a), d_in) for a in i], color="gray", ls="--",
                 lw=2, label=r"random subspaces: $i/d_{\mathrm{in}}$" + rf" ($d_{{\mathrm{{in}}}}$ = {d_in})")
        ax2.axvline(k, color="C3", ls=":", lw=2, label=f"true rank r* = {k}")
        ax2.set_ylim(0, 1.05)
        ax2.set(xlabel="i = j (number of top directions compared)", ylabel="φ(i, i)",
                title="Shared top directions vs chance")
        ax2.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=12)
    return fig


# --------------------------------------------------------------------------- counts


def plot_param_counts(result: SweepResult, path=None) -> Figure:
    """Left: trainable parameters against rank — measured (dots), the formula
    Σ r·(d_in + d_out) (line) and full FT (dashed). Right: training state in bytes
    (trainable parameters + gradients + Adam's m and v) — measured from the arrays (dots), the
    formula ``counting.training_state_bytes`` (line), full FT measured (dashed)."""
    res = check_sweep("result", result)
    ranks, k = res.ranks, res.task.true_rank
    targets = res.lora[ranks[0]].targets
    dtype = next(iter(res.task.pretrained.parameters().values())).dtype
    r_line = np.arange(1, max(ranks) + 1)
    formula = [lora_formula_params(res.task, int(r), targets) for r in r_line]
    with teaching_figure(1, 2, figsize=(15, 5.8), path=path) as (fig, (ax1, ax2)):
        ax1.plot(r_line, formula, color="C0", label=f"Σ r·(d_in + d_out) = {formula[0]} r")
        ax1.plot(ranks, [res.lora[r].trainable_params for r in ranks], "o", color="C0", ms=10,
                 label="LoRA, counted")
        n_full = res.full.trainable_params
        ax1.axhline(n_full, label=f"full fine-tuning ({n_full:,})", **FULL_FT)
        ax1.set(xlabel="LoRA rank r", ylabel="trainable parameters", title="Trainable parameters",
                yscale="log")
        _rank_axis(ax1, ranks, k)
        ax1.legend(loc="lower right")
        ax2.plot(r_line, [training_state_bytes(n, "adam", dtype) for n in formula], color="C1",
                 label="formula: 4 × params × itemsize")
        ax2.plot(ranks, [res.lora[r].state_bytes for r in ranks], "o", color="C1", ms=10,
                 label="LoRA, measured")
        ax2.axhline(res.full.state_bytes, label=f"full fine-tuning ({res.full.state_bytes:,} B)", **FULL_FT)
        ax2.set(xlabel="LoRA rank r", ylabel="bytes", yscale="log",
                title="Training state: params + grads + Adam m, v")
        _rank_axis(ax2, ranks, k)
        ax2.legend(loc="lower right")
    return fig


# --------------------------------------------------------------------------- all of them


def save_figures(result: SweepResult, out_dir="figures", prefix: str = "") -> dict:
    """Draw every figure of ``result`` and save it in ``out_dir`` as ``prefix + FIGURE_NAMES[...]``.
    Returns ``{figure name: path}``."""
    res = check_sweep("result", result)
    out = pathlib.Path(out_dir)
    paths = {key: out / (prefix + fname) for key, fname in FIGURE_NAMES.items()}
    plot_loss_vs_rank(res, path=paths["loss_vs_rank"], noise_panel=True)
    plot_loss_curves(res, path=paths["loss_curves"])
    plot_delta_spectra(res, path=paths["delta_spectra"])
    r_small = 8 if 8 in res.lora else res.ranks[len(res.ranks) // 2]
    plot_subspace_similarity(res, r_small=min(r_small, max(res.ranks)), path=paths["subspace_similarity"])
    plot_param_counts(res, path=paths["param_counts"])
    return paths
