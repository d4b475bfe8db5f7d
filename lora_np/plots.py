"""Every figure of lora_np: each function draws one figure from numbers the library computed,
returns the matplotlib ``Figure`` and, given ``path``, saves it there as a PNG.

Figures are made with ``matplotlib.figure.Figure`` directly, not through pyplot, so nothing
stays open after a script or test (no ``plt.close`` needed) and a notebook shows each figure
once, as the returned value. They are sized and styled to be read on a projector
(``TEACHING_STYLE``) and saved without a version string, so rerunning writes the same bytes.
Nothing here computes the math a notebook teaches: the figures only show it.

Sections, in the order a reader meets them:

* rank sweep (``lora_np.experiments``; ``python -m lora_np`` calls ``save_figures``);
* notebooks 01–03: images, Eckart–Young, counts, heat maps, spectra, gradient-check errors;
* notebooks 04–05: the Eckart–Young floor vs trained LoRA, forgetting vs the leak of ΔW into
  the old task's inputs, the fixed-budget bars of Hu et al. Table 5 in miniature;
* notebook 06: intruder dimensions, and a full-rank change where LoRA is not enough;
* notebook 07 (``lora_np.variants``): rsLoRA, LoRA+, PiSSA, DoRA;
* the benchmark (``python -m lora_np.bench``).
"""

from __future__ import annotations

import os
import pathlib

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure

from .analysis import random_subspace_baseline, row_space_basis, singular_values, subspace_similarity_grid
from .counting import training_state_bytes
from .experiments import SweepResult, lora_formula_params

__all__ = ["TEACHING_STYLE", "FIGURE_NAMES", "save_figures",
           # rank sweep
           "plot_loss_vs_rank", "plot_loss_curves", "plot_delta_spectra", "plot_subspace_similarity",
           "plot_param_counts",
           # notebooks 01-03
           "plot_images", "plot_eckart_young", "plot_param_count_comparison", "plot_scale_vs_rank",
           "plot_heatmaps", "plot_softmax_jacobian", "plot_spectra", "plot_fd_error_vs_h",
           "plot_gradcheck_errors",
           # notebooks 04-05
           "plot_rank_floor", "plot_forgetting_vs_leak", "plot_budget_bars",
           # notebook 06
           "plot_intruder_dimensions", "plot_when_lora_is_not_enough",
           # notebook 07
           "plot_first_update_size", "plot_rank_scaling", "plot_loraplus", "plot_pissa", "plot_dora",
           # benchmark
           "plot_bench"]

#: rc settings for figures that are read on a projector: big fonts, thick lines
TEACHING_STYLE = {
    "font.size": 14, "axes.titlesize": 16, "axes.labelsize": 15, "xtick.labelsize": 13,
    "ytick.labelsize": 13, "legend.fontsize": 12, "lines.linewidth": 2.2, "lines.markersize": 7,
    "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 100, "savefig.dpi": 110,
}

#: file name of each figure that ``save_figures`` writes
FIGURE_NAMES = {
    "loss_vs_rank": "sweep_loss_vs_rank.png",
    "loss_curves": "sweep_loss_curves.png",
    "delta_spectra": "sweep_delta_spectra.png",
    "subspace_similarity": "sweep_subspace_similarity.png",
    "param_counts": "sweep_param_counts.png",
}

#: losses are drawn on a log axis; anything below this is drawn at this value (notebook 07),
#: and a figure that clips a curve says so in its title. Low enough that no loss notebook 07
#: prints (its smallest is 1.7e-7) is clipped: a clipped curve would look like a plateau.
LOSS_FLOOR = 1e-8
_COLORS = mpl.rcParams["axes.prop_cycle"].by_key()["color"]


# --------------------------------------------------------------------------- shared helpers


def _figure(nrows=1, ncols=1, figsize=(9, 5.5), **kw):
    """A Figure that pyplot does not track, and its axes (``Figure.subplots`` arguments)."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kw)


def _constrained_row(ncols=1, figsize=(9, 5.5), **kw):
    """A Figure with constrained layout (room for a suptitle) and a 1-D array of ``ncols`` axes."""
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False, **kw)[0]


def _save(fig, path, dpi=None):
    """Save ``fig`` to ``path`` (creating the folder) if a path is given; return ``fig``.
    No "Software" metadata: the PNG's bytes do not depend on the matplotlib version."""
    if path is not None:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi or TEACHING_STYLE["savefig.dpi"], bbox_inches="tight",
                    metadata={"Software": None})
    return fig


def _tight_save(fig, path):
    """Lay out with ``tight_layout``, then ``_save``."""
    fig.tight_layout()
    return _save(fig, path)


def _save_titled(fig, path, title=None):
    """Add a figure title (for constrained-layout figures), then ``_save``."""
    if title:
        fig.suptitle(title, fontsize=17)
    return _save(fig, path)


def _suptitle(fig, text):
    """Lay out the axes, leaving room at the top for a figure title if there is one."""
    if text:
        fig.suptitle(text, fontsize=17)
        fig.tight_layout(rect=(0, 0, 1, 0.93))
    else:
        fig.tight_layout()


# --------------------------------------------------------------------------- rank sweep


_FULL = dict(color="black", ls="--", lw=2.2)


def _check(result):
    if not isinstance(result, SweepResult):
        raise TypeError(f"expected a SweepResult (from lora_np.experiments), got {type(result).__name__}")
    return result


def _rank_colors(ranks):
    cmap = mpl.colormaps["viridis"]
    n = max(len(ranks) - 1, 1)
    return {r: cmap(0.9 * i / n) for i, r in enumerate(ranks)}


def _rank_axis(ax, ranks, k):
    """Rank on a log₂ axis with plain tick labels, and the true rank k as a dotted red line."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.minorticks_off()
    ax.axvline(k, color="C3", ls=":", lw=2, label=f"true rank k = {k}")


def _layer(result, layer):
    names = list(result.task.delta_true)
    if layer is None:
        return names[0]
    if layer not in names:
        raise ValueError(f"layer must be one of the shifted layers {names}, got {layer!r}")
    return layer


# --------------------------------------------------------------------------- losses


def plot_loss_vs_rank(result: SweepResult, path=None) -> Figure:
    """Left: task B validation loss ÷ L₀ after fine-tuning, against LoRA rank (log–log), with
    full fine-tuning as a dashed line, the noise floor (noise² ÷ L₀) dotted and the true rank k
    marked. Right: task A loss (forgetting) against rank, full FT dashed."""
    res = _check(result)
    ranks, k, L0 = res.ranks, res.task.true_rank, res.initial_val_loss
    val = [res.lora[r].final_val_loss / L0 for r in ranks]
    old = [res.lora[r].old_task_loss for r in ranks]
    with mpl.rc_context(TEACHING_STYLE):
        fig, (ax1, ax2) = _figure(1, 2, figsize=(15, 5.8))
        ax1.plot(ranks, val, "o-", color="C0", ms=9, label="LoRA")
        ax1.axhline(res.full.final_val_loss / L0, label="full fine-tuning", **_FULL)
        ax1.axhline(res.task.noise_floor / L0, color="gray", ls=":", lw=2, label="noise floor (noise² / L₀)")
        ax1.set_yscale("log")
        _rank_axis(ax1, ranks, k)
        ax1.set(xlabel="LoRA rank r", ylabel="validation loss ÷ L₀",
                title=f"Task B: loss after fine-tuning (L₀ = {L0:.3g})")
        ax1.legend(loc="center right")
        ax2.plot(ranks, old, "o-", color="C1", ms=9, label="LoRA")
        ax2.axhline(res.full.old_task_loss, label="full fine-tuning", **_FULL)
        ax2.set_yscale("log")
        _rank_axis(ax2, ranks, k)
        ax2.set(xlabel="LoRA rank r", ylabel="task A loss (MSE; 0 before fine-tuning)",
                title="Task A: forgetting")
        ax2.legend(loc="best")              # the points move with the task; let matplotlib avoid them
    return _tight_save(fig, path)


def _smooth(values, window):
    """Running mean over ``window`` steps (shorter at the start)."""
    v = np.asarray(values, dtype=np.float64)
    c = np.cumsum(np.concatenate([[0.0], v]))
    i = np.arange(1, v.size + 1)
    lo = np.maximum(i - window, 0)
    return (c[i] - c[lo]) / (i - lo)


def plot_loss_curves(result: SweepResult, window: int = 10, path=None) -> Figure:
    """Training loss ÷ L₀ against step for full FT (black, dashed) and every LoRA rank
    (colour = rank), each a running mean over ``window`` steps of the per-step mini-batch
    loss; the noise floor dotted."""
    res = _check(result)
    L0, ranks = res.initial_val_loss, res.ranks
    colors = _rank_colors(ranks)
    with mpl.rc_context(TEACHING_STYLE):
        fig, ax = _figure(figsize=(11, 6.2))
        for r in ranks:
            h = res.lora[r].loss_history
            ax.plot(np.arange(1, len(h) + 1), _smooth(h, window) / L0, color=colors[r], label=f"LoRA r={r}")
        h = res.full.loss_history
        ax.plot(np.arange(1, len(h) + 1), _smooth(h, window) / L0, label="full fine-tuning", **_FULL)
        ax.axhline(res.task.noise_floor / L0, color="gray", ls=":", lw=2, label="noise floor")
        ax.set_yscale("log")
        ax.set(xlabel="training step", ylabel="training loss ÷ L₀",
               title=f"Loss curves (true rank k = {res.task.true_rank}; running mean of {window} steps)")
        ax.legend(loc="center right", ncol=2)        # ranks below k plateau above it, the rest below
    return _tight_save(fig, path)


# --------------------------------------------------------------------------- ΔW


def plot_delta_spectra(result: SweepResult, layer: str | None = None, ranks=None, path=None) -> Figure:
    """Singular values σᵢ of ΔW (log scale) against index i for the true ΔW*, full FT and LoRA
    at ``ranks`` (default: all), in one shifted ``layer`` (default: the first).

    A LoRA ΔW = s·B A has rank ≤ r, so only its first r values are drawn (the rest are zero up
    to rounding); ΔW* has k non-zero values.
    """
    res = _check(result)
    name = _layer(res, layer)
    ranks = res.ranks if ranks is None else list(ranks)
    missing = [r for r in ranks if r not in res.lora]
    if missing:
        raise ValueError(f"ranks {missing} are not in this sweep (it has {res.ranks})")
    k = res.task.true_rank
    colors = _rank_colors(res.ranks)
    with mpl.rc_context(TEACHING_STYLE):
        fig, ax = _figure(figsize=(11, 6.2))
        for r in ranks:
            s = singular_values(res.lora[r].delta_weights[name])[:r]
            ax.plot(np.arange(1, s.size + 1), s, "o-", ms=5, lw=1.6, color=colors[r], label=f"LoRA r={r}")
        s = singular_values(res.full.delta_weights[name])
        ax.plot(np.arange(1, s.size + 1), s, marker="s", ms=6, label="full fine-tuning", **_FULL)
        s_true = singular_values(res.task.delta_true[name])[:k]
        ax.plot(np.arange(1, k + 1), s_true, "*", color="C3", ms=20, label=f"true ΔW* (rank {k})", zorder=5)
        ax.axvline(k + 0.5, color="C3", ls=":", lw=2)
        ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ticks = [2 ** e for e in range(int(np.log2(s.size)) + 1)]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set(xlabel="index i (log scale)", ylabel=f"singular value σᵢ of ΔW",
               title=f"Spectrum of the learned update ΔW of {name}")
        ax.legend(loc="lower left", ncol=2)
    return _tight_save(fig, path)


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
    res = _check(result)
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
    U1, U2 = row_space_basis(A1), row_space_basis(A2)
    grid = subspace_similarity_grid(U1, U2)                        # (r_small, r_large)
    m = min(r_small, r_large)
    zoom = grid[:, :m]                                             # (r_small, m)
    V_true = row_space_basis(res.task.delta_true[name], k)
    n = min(r_small, r_large)
    i = np.arange(1, n + 1)
    def phi_vs_true(dW):                                           # φ(i, i), i = 1..n
        return np.diag(subspace_similarity_grid(row_space_basis(dW, n), V_true))[:n]

    curves = {
        f"A of r={r_small} vs A of r={r_large}": np.diag(grid)[:n],
        "full-FT ΔW vs true ΔW*": phi_vs_true(res.full.delta_weights[name]),
        f"LoRA r={r_large} ΔW vs true ΔW*": phi_vs_true(res.lora[r_large].delta_weights[name]),
    }
    # φ against ΔW* is only defined up to i = k (ΔW* has k directions): past k it is
    # ‖·‖²_F / min(i, k), so the curve stays flat; draw it only up to k
    with mpl.rc_context(TEACHING_STYLE):
        fig, (ax1, ax2) = _figure(1, 2, figsize=(19, 6.2))
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
            y = curves[label]
            upto = n if "ΔW*" not in label else min(n, k)
            ax2.plot(i[:upto], y[:upto], marker + "-", color=c, ms=8, label=label)
        ax2.plot(i, [random_subspace_baseline(int(a), int(a), d_in) for a in i], color="gray", ls="--",
                 lw=2, label=f"random subspaces: i / d_in (d_in = {d_in})")
        ax2.axvline(k, color="C3", ls=":", lw=2, label=f"true rank k = {k}")
        ax2.set_ylim(0, 1.05)
        ax2.set(xlabel="i = j (number of top directions compared)", ylabel="φ(i, i)",
                title="Shared top directions vs chance")
        ax2.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=12)
    return _tight_save(fig, path)


# --------------------------------------------------------------------------- counts


def plot_param_counts(result: SweepResult, path=None) -> Figure:
    """Left: trainable parameters against rank — measured (dots), the formula
    Σ r·(d_in + d_out) (line) and full FT (dashed). Right: training state in bytes
    (trainable parameters + gradients + Adam's m and v) — measured from the arrays (dots), the
    formula ``counting.training_state_bytes`` (line), full FT measured (dashed)."""
    res = _check(result)
    ranks, k = res.ranks, res.task.true_rank
    targets = res.lora[ranks[0]].targets
    dtype = next(iter(res.task.pretrained.parameters().values())).dtype
    r_line = np.arange(1, max(ranks) + 1)
    formula = [lora_formula_params(res.task, int(r), targets) for r in r_line]
    with mpl.rc_context(TEACHING_STYLE):
        fig, (ax1, ax2) = _figure(1, 2, figsize=(15, 5.8))
        per_rank = formula[0]
        ax1.plot(r_line, formula, color="C0", label=f"Σ r·(d_in + d_out) = {per_rank} r")
        ax1.plot(ranks, [res.lora[r].trainable_params for r in ranks], "o", color="C0", ms=10,
                 label="LoRA, counted")
        n_full = res.full.trainable_params
        ax1.axhline(n_full, label=f"full fine-tuning ({n_full:,})", **_FULL)
        ax1.set(xlabel="LoRA rank r", ylabel="trainable parameters", title="Trainable parameters",
                yscale="log")
        _rank_axis(ax1, ranks, k)
        ax1.legend(loc="lower right")
        ax2.plot(r_line, [training_state_bytes(n, "adam", dtype) for n in formula], color="C1",
                 label="formula: 4 × params × itemsize")
        ax2.plot(ranks, [res.lora[r].state_bytes for r in ranks], "o", color="C1", ms=10,
                 label="LoRA, measured")
        ax2.axhline(res.full.state_bytes, label=f"full fine-tuning ({res.full.state_bytes:,} B)", **_FULL)
        ax2.set(xlabel="LoRA rank r", ylabel="bytes", yscale="log",
                title="Training state: params + grads + Adam m, v")
        _rank_axis(ax2, ranks, k)
        ax2.legend(loc="lower right")
    return _tight_save(fig, path)


# --------------------------------------------------------------------------- all of them


def save_figures(result: SweepResult, out_dir="figures", prefix: str = "") -> dict:
    """Draw every figure of ``result`` and save it in ``out_dir`` as ``prefix + FIGURE_NAMES[...]``.
    Returns ``{figure name: path}``."""
    res = _check(result)
    out = pathlib.Path(out_dir)
    paths = {key: out / (prefix + fname) for key, fname in FIGURE_NAMES.items()}
    plot_loss_vs_rank(res, path=paths["loss_vs_rank"])
    plot_loss_curves(res, path=paths["loss_curves"])
    plot_delta_spectra(res, path=paths["delta_spectra"])
    r_small = 8 if 8 in res.lora else res.ranks[len(res.ranks) // 2]
    plot_subspace_similarity(res, r_small=min(r_small, max(res.ranks)), path=paths["subspace_similarity"])
    plot_param_counts(res, path=paths["param_counts"])
    return paths


# --------------------------------------------------------------------- notebooks 01-03


def _check_1d_positive(name, values):
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {a.shape}")
    return a


# --------------------------------------------------------------------- notebook 01


def plot_images(images, titles, suptitle=None, ncols=None, path=None):
    """A row (or grid) of grayscale images, e.g. rank-r approximations of a photograph.

    images : sequence of (h, w) arrays (same colour range, shown with vmin/vmax of the first)
    titles : one string per image
    """
    images = [np.asarray(im) for im in images]
    if len(images) != len(titles) or not images:
        raise ValueError(f"need one title per image, got {len(images)} images and {len(titles)} titles")
    ncols = ncols or len(images)
    nrows = -(-len(images) // ncols)
    vmin, vmax = float(images[0].min()), float(images[0].max())
    with mpl.rc_context(TEACHING_STYLE):
        fig, axes = _figure(nrows, ncols, figsize=(3.6 * ncols, 4.6 * nrows + 0.8),
                                 squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, im, title in zip(axes.flat, images, titles):
            ax.imshow(im, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(title, fontsize=13)
        _suptitle(fig, suptitle)
    return _save(fig, path)


def plot_eckart_young(sigma, ranks, measured, name="the matrix", path=None):
    """Left: singular values σ_i of a matrix M (log scale). Right: the relative error of the
    best rank-r approximation, ‖M − M_r‖_F / ‖M‖_F, as predicted by Eckart–Young,
    √(Σ_{i>r} σ_i²) / √(Σ σ_i²) (line), and as measured (dots, one per entry of ``ranks``).

    sigma : (p,) singular values, descending;  ranks : (m,) ints;  measured : (m,) errors;
    name : what the matrix is, for the left panel's title
    """
    sigma = _check_1d_positive("sigma", sigma)
    ranks, measured = np.asarray(ranks), _check_1d_positive("measured", measured)
    if ranks.shape != measured.shape:
        raise ValueError(f"ranks {ranks.shape} and measured {measured.shape} must have one entry each")
    tail = np.sqrt(np.concatenate([np.cumsum((sigma**2)[::-1])[::-1], [0.0]]))   # tail[r] = √Σ_{i>r} σ_i²
    predicted = tail / tail[0]
    r_all = np.arange(sigma.size + 1)
    with mpl.rc_context(TEACHING_STYLE):
        fig, (ax1, ax2) = _figure(1, 2, figsize=(13, 4.8))
        ax1.semilogy(np.arange(1, sigma.size + 1), sigma, color="C0")
        ax1.set(xlabel="index i", ylabel="singular value σᵢ", title=f"Singular values of {name}")
        ax2.plot(r_all, predicted, color="C0", label=r"Eckart–Young: $\sqrt{\sum_{i>r}\sigma_i^2}\ /\ \Vert M\Vert_F$")
        ax2.plot(ranks, measured, "o", color="C3", markersize=9, label=r"measured $\Vert M - M_r\Vert_F\ /\ \Vert M\Vert_F$")
        ax2.set_xscale("symlog", linthresh=1)
        ax2.set_ylim(0, 1.02)
        ax2.set(xlabel="rank r (symlog scale)", ylabel="relative error",
                title="Error of the best rank-r approximation")
        ax2.legend(loc="upper right")
        fig.tight_layout()
    return _save(fig, path)


def plot_param_count_comparison(ranks, lora_counts, full_counts, title=None, path=None):
    """Trainable numbers of one adapted matrix: LoRA's r·(d_in + d_out) against rank (lines)
    and full fine-tuning's d_in·d_out (dashed, same colour), for several matrix sizes.

    ranks : (m,) ints;  lora_counts : dict label -> (m,) counts;  full_counts : dict label -> int
    """
    ranks = np.asarray(ranks)
    if set(lora_counts) != set(full_counts):
        raise ValueError("lora_counts and full_counts must have the same labels, got "
                         f"{sorted(lora_counts)} and {sorted(full_counts)}")
    with mpl.rc_context(TEACHING_STYLE):
        fig, ax = _figure(figsize=(9, 5.5))
        for i, label in enumerate(lora_counts):
            color = f"C{i}"
            ax.loglog(ranks, lora_counts[label], "o-", color=color, label=f"LoRA, {label}")
            ax.axhline(full_counts[label], color=color, ls="--", lw=1.8)
            ax.text(ranks[0], full_counts[label] * 1.25, f"full fine-tuning, {label}",
                    color=color, fontsize=12)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set(xlabel="rank r", ylabel="trainable numbers per matrix",
               title=title or "LoRA r·(d_in + d_out) vs full d_in·d_out")
        ax.set_ylim(top=max(full_counts.values()) * 4)
        ax.legend(loc="lower right")
        fig.tight_layout()
    return _save(fig, path)


def plot_scale_vs_rank(ranks, sizes, ylabel, title, path=None):
    """One line per scaling rule: a size (e.g. ‖ΔW‖_F after one optimizer step) against rank,
    log–log. ``sizes`` : dict label -> (m,) values."""
    ranks = np.asarray(ranks)
    with mpl.rc_context(TEACHING_STYLE):
        fig, ax = _figure(figsize=(9, 5.5))
        for i, (label, ys) in enumerate(sizes.items()):
            ax.loglog(ranks, ys, "o-", color=f"C{i}", label=label)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set(xlabel="rank r", ylabel=ylabel, title=title)
        ax.legend()
        fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------- notebook 02


def plot_heatmaps(matrices, suptitle=None, path=None, cmap="RdBu_r"):
    """Side-by-side heatmaps, each with its own symmetric colour range and colour bar.

    matrices : dict title -> 2-D array
    """
    if not matrices:
        raise ValueError("plot_heatmaps needs at least one matrix")
    n = len(matrices)
    with mpl.rc_context(TEACHING_STYLE):
        fig, axes = _figure(1, n, figsize=(4.6 * n, 4.4), squeeze=False)
        for ax, (title, M) in zip(axes[0], matrices.items()):
            M = np.asarray(M)
            if M.ndim != 2:
                raise ValueError(f"plot_heatmaps: {title!r} must be 2-D, got shape {M.shape}")
            lim = float(np.abs(M).max()) or 1.0
            im = ax.imshow(M, cmap=cmap, vmin=-lim, vmax=lim)
            ax.set_title(title)
            ax.grid(False)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        _suptitle(fig, suptitle)
    return _save(fig, path)


def plot_softmax_jacobian(p, J, path=None):
    """Left: the probabilities p of one softmax row (bars). Right: its Jacobian
    J = diag(p) − p pᵀ as an annotated heatmap (red positive, blue negative).

    p : (T,);  J : (T, T)
    """
    p, J = np.asarray(p, dtype=np.float64), np.asarray(J, dtype=np.float64)
    T = p.size
    if J.shape != (T, T):
        raise ValueError(f"J must have shape ({T}, {T}) to match p, got {J.shape}")
    with mpl.rc_context(TEACHING_STYLE):
        fig, (ax1, ax2) = _figure(1, 2, figsize=(13, 5.6), gridspec_kw={"width_ratios": [1, 1.35]})
        ax1.bar(np.arange(T), p, color="C0")
        ax1.set(xlabel="key j", ylabel="probability pⱼ", title="softmax of one row of scores",
                xticks=np.arange(T))
        lim = float(np.abs(J).max())
        im = ax2.imshow(J, cmap="RdBu_r", vmin=-lim, vmax=lim)
        for i in range(T):
            for j in range(T):
                # 4 decimals: the smallest off-diagonal -p_i p_j must not print as "-0.000"
                ax2.text(j, i, f"{J[i, j]:+.4f}", ha="center", va="center", fontsize=10.5,
                         color="white" if abs(J[i, j]) > 0.6 * lim else "black")
        ax2.set(xlabel="score j", ylabel="probability i", xticks=np.arange(T), yticks=np.arange(T),
                title="Jacobian ∂pᵢ/∂Sⱼ = pᵢ(δᵢⱼ − pⱼ)")
        ax2.grid(False)
        fig.colorbar(im, ax=ax2, fraction=0.046, pad=0.04)
        fig.tight_layout()
    return _save(fig, path)


def plot_spectra(spectra, title, floor=1e-17, path=None, ylabel="singular value σᵢ"):
    """Singular values of several matrices on a log axis, one marker line per matrix.
    Values below ``floor`` (exact zeros) are drawn at ``floor``; a grey band marks the
    round-off level (below 1e-12 relative to the largest value).

    spectra : dict label -> (p,) singular values, descending
    """
    with mpl.rc_context(TEACHING_STYLE):
        fig, ax = _figure(figsize=(9, 5.5))
        top = max(float(np.max(s)) for s in spectra.values())
        ax.axhspan(floor, top * 1e-12, color="0.85", zorder=0)
        ax.text(1, top * 1e-13, "round-off: numerically zero", color="0.35", fontsize=12,
                va="top")
        markers = "osD^v"
        for i, (label, s) in enumerate(spectra.items()):
            s = np.maximum(np.asarray(s, dtype=np.float64), floor)
            ax.semilogy(np.arange(1, s.size + 1), s, marker=markers[i % len(markers)],
                        color=f"C{i}", label=label, alpha=0.9)
        ax.set(xlabel="index i", ylabel=ylabel, title=title)
        ax.set_ylim(floor * 0.5, top * 5)
        ax.legend(loc="center right")
        fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------- notebook 03


def plot_fd_error_vs_h(hs, errors, references=None, title=None, path=None):
    """Relative error of a finite-difference gradient against the step h, log–log.

    hs : (m,) steps;  errors : dict label -> (m,) relative errors (solid lines with markers);
    references : dict label -> (m,) model curves, thin lines: the first two dotted grey (meant for
    truncation terms), the next two dash-dotted in the colours of the first and third measured
    curves (meant for the round-off terms of float64 and float32).
    """
    hs = _check_1d_positive("hs", hs)
    with mpl.rc_context(TEACHING_STYLE):
        fig, ax = _figure(figsize=(14, 6.5))
        for i, (label, e) in enumerate(errors.items()):
            ax.loglog(hs, np.maximum(e, 1e-17), "o-", color=f"C{i}", label=label)
        styles = [(":", "0.25"), (":", "0.55"), ("-.", "C0"), ("-.", "C2")]
        for j, (label, e) in enumerate((references or {}).items()):
            ls, color = styles[j % len(styles)]
            ax.loglog(hs, e, ls, color=color, lw=1.8, alpha=0.8, label=label)
        ax.set(xlabel="step h", ylabel="relative error of the gradient",
               title=title or "Finite differences: error vs step size")
        ax.set_ylim(1e-12, 30)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=12,
                  title="measured  /  model", title_fontsize=12)
        fig.tight_layout()
    return _save(fig, path)


def plot_gradcheck_errors(results, threshold, path=None):
    """Every relative error of a gradient check, one row per layer/block, log x axis, with the
    pass threshold as a vertical line.

    results : list of (title, rows) with rows from ``lora_np.gradcheck.check_gradients``; rows
    with ``structural_zero`` set (structural zeros, absolute error) are drawn as crosses.
    """
    with mpl.rc_context(TEACHING_STYLE):
        fig, ax = _figure(figsize=(11, 0.55 * len(results) + 1.8))
        for y, (title, rows) in enumerate(results):
            rel = [r.rel_error for r in rows if not r.structural_zero]
            zero = [r.rel_error for r in rows if r.structural_zero]
            ax.semilogx(np.maximum(rel, 1e-16), [y] * len(rel), "o", color="C0", alpha=0.7)
            if zero:
                ax.semilogx(np.maximum(zero, 1e-16), [y] * len(zero), "x", color="C1",
                            markersize=10, mew=2.5)
        ax.axvline(threshold, color="C3", lw=2.5)
        ax.text(threshold * 1.3, -0.6, f"threshold {threshold:.0e}", color="C3", fontsize=12)
        ax.plot([], [], "o", color="C0", label="relative error of one gradient")
        ax.plot([], [], "x", color="C1", mew=2.5, label="key bias: max |a − n| (true gradient 0)")
        ax.set_yticks(range(len(results)), [t for t, _ in results], fontsize=11)
        ax.set_ylim(len(results) - 0.4, -1.0)
        ax.set_xlim(1e-12, 1e-2)
        ax.set(xlabel="relative error ‖a − n‖ / (‖a‖ + ‖n‖)  (a analytic, n numerical)",
               title="Every gradient of every layer vs finite differences (float64)")
        ax.legend(loc="lower right", fontsize=11)
        fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------- notebooks 04-05


def _check_same_length(**arrays):
    """Each keyword a 1-D float array; all the same length (ValueError naming them otherwise)."""
    out = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
    sizes = {k: a.shape for k, a in out.items()}
    if any(a.ndim != 1 for a in out.values()) or len({a.size for a in out.values()}) != 1:
        raise ValueError(f"expected 1-D sequences of one length, got shapes {sizes}")
    if next(iter(out.values())).size == 0:
        raise ValueError(f"expected non-empty sequences, got shapes {sizes}")
    return out


def plot_rank_floor(ranks, lora_loss, predicted_ranks, predicted, k, oracle_loss=None,
                    full_loss=None, noise_floor=None, title=None, path=None) -> Figure:
    """Loss after fine-tuning ÷ L₀ against LoRA rank r (linear axes), next to the
    Eckart–Young prediction for the best rank-r update.

    ranks, lora_loss : (m,) LoRA ranks and their final validation loss ÷ L₀ (dots)
    predicted_ranks, predicted : (p,) ranks and the predicted floor ÷ L₀ at each, e.g.
        Σ_{i>r} σᵢ² / Σ σᵢ² of ΔW* (line)
    k : the true rank (dotted vertical line)
    oracle_loss : optional (m,) loss ÷ L₀ of the model given the best rank-r approximation of
        ΔW* directly (squares)
    full_loss, noise_floor : optional horizontal lines (÷ L₀)
    """
    a = _check_same_length(ranks=ranks, lora_loss=lora_loss)
    p = _check_same_length(predicted_ranks=predicted_ranks, predicted=predicted)
    if oracle_loss is not None:
        _check_same_length(ranks=ranks, oracle_loss=oracle_loss)
    with mpl.rc_context(TEACHING_STYLE):
        fig, ax = _figure(figsize=(11, 6.2))
        ax.plot(p["predicted_ranks"], p["predicted"], "-", color="C0", lw=2.5,
                label=r"Eckart–Young: $\sum_{i>r}\sigma_i^2 \,/\, \sum_i\sigma_i^2$ of ΔW*")
        if oracle_loss is not None:
            ax.plot(a["ranks"], oracle_loss, "s", color="C2", ms=13, mfc="none", mew=2.5,
                    label="pretrained W + best rank-r approx. of ΔW*")
        ax.plot(a["ranks"], a["lora_loss"], "o", color="C1", ms=10, label="LoRA rank r, trained")
        if full_loss is not None:
            ax.axhline(full_loss, label="full fine-tuning", **_FULL)
        if noise_floor is not None:
            ax.axhline(noise_floor, color="gray", ls=":", lw=2, label="noise floor (noise² / L₀)")
        ax.axvline(k, color="C3", ls=":", lw=2, label=f"true rank k = {k}")
        ax.set_ylim(-0.03, 1.05)
        ax.set_xticks(np.unique(np.concatenate([a["ranks"], p["predicted_ranks"]])).astype(int))
        ax.set(xlabel="LoRA rank r", ylabel="validation loss ÷ L₀",
               title=title or "Below the true rank: the Eckart–Young floor")
        ax.legend(loc="upper right")
    return _tight_save(fig, path)


def plot_forgetting_vs_leak(labels, leak, old_loss, slope=None, title=None, path=None) -> Figure:
    """Old-task loss against ‖ΔW Q_A‖²_F (how much of ΔW acts on task A's inputs), log–log,
    one labelled point per method.

    labels : (m,) str;  leak, old_loss : (m,) positive floats
    slope : optional c; draws the line old_loss = c · leak (dashed grey)
    """
    v = _check_same_length(leak=leak, old_loss=old_loss)
    if len(labels) != v["leak"].size:
        raise ValueError(f"need one label per point, got {len(labels)} labels and {v['leak'].size} points")
    if np.any(v["leak"] <= 0) or np.any(v["old_loss"] <= 0):
        raise ValueError("leak and old_loss must be > 0 (they are drawn on log axes)")
    with mpl.rc_context(TEACHING_STYLE):
        fig, ax = _figure(figsize=(11, 6.5))
        if slope is not None:
            x = np.geomspace(v["leak"].min() / 2, v["leak"].max() * 2, 50)
            ax.plot(x, slope * x, color="gray", ls="--", lw=2, label=f"old-task loss = {slope:.2g} · ‖ΔW Q_A‖²")
        placed = []                                    # (log x, log y) of points labelled on the right
        for lab, x, y in sorted(zip(labels, v["leak"], v["old_loss"]), key=lambda t: t[1]):
            full = lab.startswith("full")
            ax.plot(x, y, "s" if full else "o", ms=12 if full else 10,
                    color="black" if full else "C1", zorder=3)
            pt = (np.log10(x), np.log10(y))
            crowded = any(abs(pt[0] - q[0]) < 0.3 and abs(pt[1] - q[1]) < 0.15 for q in placed)
            if crowded:                                # a neighbour's label is on the right: go left
                ax.annotate(lab, (x, y), xytext=(-10, 0), textcoords="offset points", fontsize=13,
                            ha="right", va="center")
            else:
                placed.append(pt)
                ax.annotate(lab, (x, y), xytext=(10, 0), textcoords="offset points", fontsize=13,
                            va="center")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(xlabel="‖ΔW Q_A‖²_F  (part of ΔW that task A's inputs see)",
               ylabel="task A loss after fine-tuning (MSE)",
               title=title or "Forgetting follows the part of ΔW inside task A's inputs")
        if slope is not None:
            ax.legend(loc="upper left")
    return _tight_save(fig, path)


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
    from matplotlib.patches import Patch
    configs = list(configs)
    if not isinstance(losses, dict) or not losses:
        raise ValueError("losses must be a non-empty dict task title -> one loss per config")
    for name, vals in losses.items():
        if np.asarray(vals).shape != (len(configs),):
            raise ValueError(f"losses[{name!r}] must have one value per config ({len(configs)}), "
                             f"got shape {np.asarray(vals).shape}")
    n = len(losses)
    y = np.arange(len(configs))[::-1]
    with mpl.rc_context(TEACHING_STYLE):
        fig, axes = _constrained_row(n, figsize=(8.2 * n, 7.2), sharey=True)
        handles = {}
        for ax, (name, vals) in zip(axes, losses.items()):
            vals = np.asarray(vals, dtype=np.float64)
            hl = np.zeros(len(configs), bool) if highlight is None else np.asarray(highlight[name], bool)
            ax.barh(y, vals, color=np.where(hl, "C2", "C0"), height=0.7)
            for yi, v in zip(y, vals):
                ax.text(v * 1.15, yi, f"{v:#.3g}", va="center", fontsize=13,
                        bbox=dict(facecolor="white", edgecolor="none", pad=1, alpha=0.85))
            if full is not None:
                handles["full fine-tuning"] = ax.axvline(full[name], **_FULL)
            if noise_floor is not None:
                handles["noise floor (noise² / L₀)"] = ax.axvline(noise_floor[name], color="gray", ls=":", lw=2)
            ax.set_xscale("log")
            ax.set_xlim(min(vals.min(), *(d[name] for d in (full, noise_floor) if d)) / 2.5, 6)
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
    return _save_titled(fig, path, "Same parameter budget, different matrices"
                        + (f" ({budget:,} trainable parameters each)" if budget else ""))


# --------------------------------------------------------------------- notebook 06


def plot_intruder_dimensions(max_cosines, eps, title=None, path=None) -> Figure:
    """Intruder dimensions (Shuttleworth et al. 2024, arXiv 2410.21228, Definition 1).

    Left: for each method, the best |cos| between the m-th left singular vector of the tuned W
    and any of W₀'s (``analysis.intruder_dimensions(...).max_cosines``), against m; points
    below the dashed line ε are intruders. Right: the number of intruders among those top k
    against the threshold ε (a step curve per method).

    max_cosines : dict label -> (k,) floats in [0, 1], the same k for every label
    eps : the threshold ε in (0, 1] marked on both panels
    """
    if not isinstance(max_cosines, dict) or not max_cosines:
        raise ValueError(f"max_cosines must be a non-empty dict label -> (k,) array, got "
                         f"{type(max_cosines).__name__}")
    curves = {label: np.asarray(c, dtype=np.float64) for label, c in max_cosines.items()}
    shapes = {label: c.shape for label, c in curves.items()}
    if any(c.ndim != 1 or c.size == 0 for c in curves.values()) or len(set(shapes.values())) != 1:
        raise ValueError(f"every max_cosines entry must be a 1-D array of the same length k, got {shapes}")
    if any(np.any((c < 0) | (c > 1 + 1e-12)) for c in curves.values()):
        raise ValueError("max_cosines must lie in [0, 1] (they are |cos|)")
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"eps must be in (0, 1], got {eps}")
    k = next(iter(curves.values())).size
    m = np.arange(1, k + 1)
    grid = np.linspace(0.0, 1.0, 201)
    markers = "os^Dv<>ph*"
    with mpl.rc_context(TEACHING_STYLE):
        fig, (ax1, ax2) = _figure(1, 2, figsize=(16, 6.2))
        for n, (label, c) in enumerate(curves.items()):
            if label.startswith("full"):
                style = dict(_FULL, marker="s", ms=9)
            elif "ΔW*" in label:                  # the reference: wide and pale, drawn underneath
                style = dict(color="0.6", lw=9, alpha=0.6, marker="o", ms=4)
            else:
                style = dict(color=_COLORS[n % len(_COLORS)], marker=markers[n % len(markers)], ms=9, lw=1.8)
            ax1.plot(m, c, label=label, **style)
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
    _suptitle(fig, title)
    return _save(fig, path)


def plot_when_lora_is_not_enough(low, high, path=None) -> Figure:
    """Two tasks side by side (Biderman et al. 2024, arXiv 2405.09673: LoRA learns less and
    forgets less).

    Left: validation loss ÷ L₀ against LoRA rank for a task whose true change ΔW* has low rank
    (``low``) and one whose ΔW* has high rank (``high``); dots = LoRA, dashed line = full FT of
    the same colour, thin line = the Eckart–Young fraction Σ_{i>r} σᵢ² / Σ σᵢ² of each ΔW*
    (what the best rank-r update leaves when the loss is isotropic in ΔW).
    Right, for ``high``: task B loss ÷ L₀ (learning; lower is better) against task A loss
    (forgetting), one labelled point per method.

    low, high : SweepResult
    """
    low, high = _check(low), _check(high)
    with mpl.rc_context(TEACHING_STYLE):
        fig, (ax1, ax2) = _figure(1, 2, figsize=(17, 6.6))
        ranks_all = sorted(set(low.ranks) | set(high.ranks))
        for res, color in ((low, "C0"), (high, "C1")):
            k, L0 = res.task.true_rank, res.initial_val_loss
            s2 = np.sort(res.task.singular_values)[::-1] ** 2
            r_line = np.arange(1, max(ranks_all) + 1)
            tail = [s2[min(r, s2.size):].sum() / s2.sum() for r in r_line]
            name = f"ΔW* of rank {k}"
            ax1.plot(r_line, tail, "-", color=color, lw=1.5, alpha=0.8,
                     label=f"{name}: Eckart–Young Σ_(i>r) σᵢ² / Σ σᵢ²")
            ax1.plot(res.ranks, [res.lora[r].final_val_loss / L0 for r in res.ranks], "o", color=color,
                     ms=11, label=f"{name}: LoRA")
            ax1.axhline(res.full.final_val_loss / L0, color=color, ls="--", lw=2.2,
                        label=f"{name}: full fine-tuning")
        ax1.set_xscale("log", base=2)
        ax1.set_xticks(ranks_all, [str(r) for r in ranks_all])
        ax1.minorticks_off()
        ax1.set_ylim(-0.03, 1.08)
        ax1.set(xlabel="LoRA rank r", ylabel="validation loss ÷ L₀",
                title="Low-rank vs high-rank change")
        ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=11)
        L0 = high.initial_val_loss
        pts = [(m.label, m.old_task_loss, m.final_val_loss / L0) for m in high.methods()]
        for n, (label, x, y) in enumerate(pts):
            style = dict(color="black", marker="s") if label.startswith("full") else \
                dict(color="C1", marker="o")
            ax2.plot([x], [y], ms=12, ls="none", **style)
            full = label.startswith("full")           # full FT and LoRA r = full rank overlap
            ax2.annotate(label, (x, y), xytext=(-10, 10) if full else (10, -18), textcoords="offset points",
                         fontsize=13, ha="right" if full else "left")
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set(xlabel="task A loss after fine-tuning (forgetting, MSE)",
                ylabel="task B loss ÷ L₀ (lower = learned more)",
                title=f"Rank-{high.task.true_rank} task: learns less, forgets less")
    return _tight_save(fig, path)


# --------------------------------------------------------------------- notebook 07 (variants)


def _loss_curve(ax, losses, **kw):
    steps = np.arange(len(losses))
    ax.semilogy(steps, np.maximum(losses, LOSS_FLOOR), **kw)


def _floor_line(ax, value, color, label=None):
    if value > LOSS_FLOOR:
        ax.axhline(value, color=color, linestyle=":", linewidth=1.8, label=label)


def plot_first_update_size(result, path=None):
    """Per-example size of the first update vs rank (log–log), both scalings, with the theory."""
    with mpl.rc_context(TEACHING_STYLE):
        fig, (ax,) = _constrained_row(figsize=(9.5, 6))
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
        # below the axes: inside, the legend hid the lowest dots of r = 2 and r = 4
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=11)
        title = f"First SGD step from B = 0 (α = {result.alpha:g}, d_in = {result.d_in})"
        return _save_titled(fig, path, title=title)


def plot_rank_scaling(result, path=None):
    """Loss curves for each rank: left α/r, right α/√r; dotted lines are rank-r floors."""
    with mpl.rc_context(TEACHING_STYLE):
        fig, axes = _constrained_row(ncols=len(result.curves), figsize=(14, 5.8), sharey=True)
        for ax, (label, curves) in zip(axes, result.curves.items()):
            for color, r, losses, floor in zip(_COLORS, result.ranks, curves, result.floors):
                _loss_curve(ax, losses, color=color, label=f"r = {r}")
                _floor_line(ax, floor, color)
            ax.set_title(f"s = {label}")
            ax.set_xlabel("Adam step")
        axes[0].set_ylabel("training MSE (log)")
        axes[0].legend(title="dotted: rank-r floor", loc="lower left")
        c = result.config
        return _save_titled(fig, path, title=f"Rank sweep, same α = {c['alpha']:g} and lr = {c['lr']:g}")


def plot_loraplus(result, curve_lr=1e-3, step=25, path=None):
    """Left: loss curves at lr_A = ``curve_lr`` for each λ. Right: loss at ``step`` vs lr_A."""
    j = int(np.argmin(np.abs(np.log(result.lrs / curve_lr))))
    with mpl.rc_context(TEACHING_STYLE):
        fig, (ax1, ax2) = _constrained_row(ncols=2, figsize=(14, 5.8))
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
        return _save_titled(fig, path, title=f"LoRA+: B learns λ times faster than A (r = {r})")


def _curve_panels(result, titles, path, suptitle, names=None):
    with mpl.rc_context(TEACHING_STYLE):
        fig, axes = _constrained_row(ncols=len(result.curves), figsize=(14, 5.8), sharey=True)
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
        return _save_titled(fig, path, title=suptitle)


def plot_pissa(result, path=None):
    """PiSSA vs default init on the principal-shift and random-shift tasks."""
    titles = {"principal": "shift along W₀'s top directions", "random": "shift in random directions"}
    c = result.config
    names = {"kaiming": "default init (B = 0)", "pissa": "PiSSA init"}
    clipped = any(np.nanmin(v) < LOSS_FLOOR for curves in result.curves.values() for v in curves.values())
    note = f"; y floored at {LOSS_FLOOR:g}" if clipped else ""
    return _curve_panels(result, titles, path,
                         f"PiSSA vs default init (r = {c['r']}, same α and lr{note})", names=names)


def plot_dora(result, path=None):
    """LoRA vs DoRA (exact and detached) on the random-shift and row-rescale tasks."""
    titles = {"random": "full-rank random shift", "rescale": "rows of W₀ rescaled"}
    c = result.config
    return _curve_panels(result, titles, path, f"LoRA vs DoRA (r = {c['r']}, same α and lr)")


# --------------------------------------------------------------------- benchmark


def plot_bench(rows, dtype: str = "float32", path=None) -> Figure:
    """Three panels for ``dtype``: ms/step vs width, % of the matmul rate vs width, and the
    LoRA/full ratios (time, FLOP model, state bytes, peak memory) at the largest width.

    ``rows`` are ``lora_np.bench.BenchRow`` objects (from ``bench.run``); only those of
    ``dtype`` are drawn. Saves to ``path`` if given and returns the Figure."""
    rows = [r for r in rows if r.dtype == dtype]
    if not rows:
        raise ValueError(f"plot_bench: no rows in dtype {dtype!r}")
    methods = list(dict.fromkeys(r.method for r in rows))
    styles = {"mlp": "-", "attention": "--"}
    fig = Figure(figsize=(19, 6.2))
    axes = fig.subplots(1, 3)
    for model in ("mlp", "attention"):
        for i, method in enumerate(methods):
            sel = sorted((r for r in rows if r.model == model and r.method == method), key=lambda r: r.d)
            if not sel:
                continue
            kw = dict(ls=styles[model], marker="o", color=f"C{i}", lw=2, label=f"{model}, {method}")
            axes[0].plot([r.d for r in sel], [r.ms for r in sel], **kw)
            axes[1].plot([r.d for r in sel], [100 * r.frac_matmul for r in sel], **kw)
    widths = sorted({r.d for r in rows})
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(widths, [str(w) for w in widths])
        ax.minorticks_off()
        ax.set_xlabel("width d")
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("ms per training step (median)")
    axes[0].set_title("Step time")
    axes[1].set_ylabel("% of plain np.matmul GFLOP/s")
    axes[1].set_title("Achieved rate (FLOP model / time)")
    axes[1].axhline(70, color="gray", ls=":", lw=1.5)
    axes[1].text(widths[0], 71, "target 70%", color="gray", fontsize=11)
    axes[0].legend(fontsize=10, ncol=2)

    d_max = max(r.d for r in rows)
    lora = [r for r in rows if r.d == d_max and r.rank is not None]
    labels = [f"{r.model}\nr={r.rank}" for r in lora]
    x = np.arange(len(lora))
    bars = [("time", [r.time_ratio for r in lora]), ("FLOP model", [r.flop_ratio for r in lora]),
            ("state bytes (= byte model)", [r.state_ratio for r in lora]),
            ("step peak memory", [r.peak_ratio for r in lora]),
            ("state + peak", [r.memory_ratio for r in lora])]
    w = 0.16
    for j, (name, vals) in enumerate(bars):
        axes[2].bar(x + (j - 2) * w, vals, w, label=name, color=f"C{j + 4}")
    axes[2].set_xticks(x, labels)
    axes[2].axhline(1.0, color="black", lw=1)
    axes[2].set_ylabel("LoRA / full fine-tuning")
    axes[2].set_title(f"LoRA vs full at d = {d_max}")
    axes[2].legend(fontsize=10, loc="upper left")
    axes[2].set_ylim(0, 1.45)
    for ax in axes:
        ax.title.set_fontsize(15)
        ax.xaxis.label.set_fontsize(13)
        ax.yaxis.label.set_fontsize(13)
        ax.tick_params(labelsize=11)
    fig.suptitle(f"One training step (forward, loss, backward, Adam), {dtype}, "
                 f"{os.cpu_count()} cores", fontsize=16)
    fig.tight_layout()
    return _save(fig, path, dpi=100)
