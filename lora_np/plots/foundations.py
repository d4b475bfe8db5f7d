"""Figures of notebooks 01–03: low-rank approximation (images, Eckart–Young, parameter counts,
scaling), the hand-derived gradients (heat maps, the softmax Jacobian, update spectra) and the
finite-difference checks of those gradients.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from ..analysis import tail_energy
from ..validate import check_descending_positive
from .checks import check_positive_1d, check_same_length
from .style import WIDE_PAD, teaching_figure

__all__ = ["plot_images", "plot_eckart_young", "plot_param_count_comparison", "plot_scale_vs_rank",
           "plot_heatmaps", "plot_softmax_jacobian", "plot_spectra", "plot_fd_error_vs_h",
           "plot_gradcheck_errors"]


# --------------------------------------------------------------------- notebook 01


def plot_images(images, titles, suptitle=None, ncols=None, path=None) -> Figure:
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
    with teaching_figure(nrows, ncols, figsize=(3.6 * ncols, 4.6 * nrows + 0.8), path=path, pad=WIDE_PAD,
                         title=suptitle) as (fig, axes):
        for ax in axes:
            ax.axis("off")
        for ax, im, title in zip(axes, images, titles):
            ax.imshow(im, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(title, fontsize=13)
    return fig


def plot_eckart_young(sigma, ranks, measured, name="the matrix", path=None) -> Figure:
    """Left: singular values σ_i of a matrix M (log scale). Right: the relative error of the
    best rank-r approximation, ‖M − M_r‖_F / ‖M‖_F, as predicted by Eckart–Young,
    √(Σ_{i>r} σ_i²) / √(Σ σ_i²) (line, ``analysis.tail_energy``, at r = 1 … p), and as measured
    (dots, one per entry of ``ranks``), against r on a plain log axis (r = 0, where the error is
    1 by definition, has no place on it).

    sigma : (p,) singular values > 0 (drawn on a log axis), descending;  ranks : (m,) ints ≥ 1;
    measured : (m,) errors;  name : what the matrix is, for the left panel's title
    """
    sigma = check_descending_positive("sigma", sigma)
    v = check_same_length(ranks=ranks, measured=measured)
    if np.any(v["ranks"] < 1):
        raise ValueError(f"ranks must be >= 1 (drawn on a log axis), got {v['ranks'].tolist()}")
    predicted = np.sqrt(tail_energy(sigma, relative=True))          # [r] = ‖M − M_r‖_F / ‖M‖_F
    with teaching_figure(1, 2, figsize=(13, 4.8), path=path, pad=WIDE_PAD) as (fig, (ax1, ax2)):
        ax1.semilogy(np.arange(1, sigma.size + 1), sigma, color="C0")
        ax1.set(xlabel="index $i$", ylabel=r"singular value $\sigma_i$", title=f"Singular values of {name}")
        ax2.plot(np.arange(1, sigma.size + 1), predicted[1:], color="C0",
                 label=r"Eckart–Young: $\sqrt{\sum_{i>r}\sigma_i^2}\ /\ \Vert M\Vert_F$")
        ax2.plot(v["ranks"], v["measured"], "o", color="C3", markersize=9,
                 label=r"measured $\Vert M - M_r\Vert_F\ /\ \Vert M\Vert_F$")
        ax2.set_xscale("log")
        ax2.set_ylim(0, 1.02)
        ax2.set(xlabel="rank $r$ (log scale)", ylabel="relative error",
                title="Error of the best rank-$r$ approximation")
        ax2.legend(loc="upper right")
    return fig


def plot_param_count_comparison(ranks, lora_counts, full_counts, title=None, path=None) -> Figure:
    """Trainable numbers of one adapted matrix: LoRA's r·(d_in + d_out) against rank (lines)
    and full fine-tuning's d_in·d_out (dashed, same colour), for several matrix sizes.

    ranks : (m,) ints;  lora_counts : dict label -> (m,) counts;  full_counts : dict label -> int
    """
    ranks = np.asarray(ranks)
    if set(lora_counts) != set(full_counts):
        raise ValueError("lora_counts and full_counts must have the same labels, got "
                         f"{sorted(lora_counts)} and {sorted(full_counts)}")
    with teaching_figure(figsize=(9, 5.5), path=path, pad=WIDE_PAD) as (fig, (ax,)):
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
    return fig


def plot_scale_vs_rank(ranks, sizes, ylabel, title, path=None) -> Figure:
    """One line per scaling rule: a size (e.g. ‖ΔW‖_F after one optimizer step) against rank,
    log–log. ``sizes`` : dict label -> (m,) values."""
    ranks = np.asarray(ranks)
    with teaching_figure(figsize=(9, 5.5), path=path, pad=WIDE_PAD) as (fig, (ax,)):
        for i, (label, ys) in enumerate(sizes.items()):
            ax.loglog(ranks, ys, "o-", color=f"C{i}", label=label)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set(xlabel="rank r", ylabel=ylabel, title=title)
        ax.legend()
    return fig


# --------------------------------------------------------------------- notebook 02


def plot_heatmaps(matrices, suptitle=None, path=None, cmap="RdBu_r") -> Figure:
    """Side-by-side heatmaps, each with its own symmetric colour range and colour bar.

    matrices : dict title -> 2-D array
    """
    if not matrices:
        raise ValueError("plot_heatmaps needs at least one matrix")
    bad = {title: np.shape(M) for title, M in matrices.items() if np.ndim(M) != 2}
    if bad:
        raise ValueError(f"plot_heatmaps: every matrix must be 2-D, got shapes {bad}")
    n = len(matrices)
    with teaching_figure(1, n, figsize=(4.6 * n, 4.4), path=path, pad=WIDE_PAD,
                         title=suptitle) as (fig, axes):
        for ax, (title, M) in zip(axes, matrices.items()):
            M = np.asarray(M)
            lim = float(np.abs(M).max()) or 1.0
            im = ax.imshow(M, cmap=cmap, vmin=-lim, vmax=lim)
            ax.set_title(title)
            ax.grid(False)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return fig


def plot_softmax_jacobian(p, J, path=None) -> Figure:
    """Three panels for one softmax row. Left: its probabilities p (bars). Middle: its Jacobian
    J = diag(p) − p pᵀ as a heat map with a colour bar (red positive, blue negative); only the
    diagonal p_i(1 − p_i) is written out, with two decimals, so the labels stay readable when
    projected. Right: the curve p(1 − p), which peaks at p = ½ and vanishes at p = 0 and 1,
    with the row's own p_i on it.

    p : (T,);  J : (T, T)
    """
    p, J = np.asarray(p, dtype=np.float64), np.asarray(J, dtype=np.float64)
    T = p.size
    if J.shape != (T, T):
        raise ValueError(f"J must have shape ({T}, {T}) to match p, got {J.shape}")
    with teaching_figure(1, 3, figsize=(19, 5.8), path=path, pad=WIDE_PAD,
                         gridspec_kw={"width_ratios": [1, 1.3, 1]}) as (fig, (ax1, ax2, ax3)):
        ax1.bar(np.arange(T), p, color="C0")
        ax1.set(xlabel="key $j$", ylabel="probability $p_j$", title="softmax of one row of scores",
                xticks=np.arange(T))
        lim = float(np.abs(J).max())
        im = ax2.imshow(J, cmap="RdBu_r", vmin=-lim, vmax=lim)
        for i in range(T):
            ax2.text(i, i, f"{J[i, i]:.2f}", ha="center", va="center", fontsize=15,
                     color="white" if abs(J[i, i]) > 0.6 * lim else "black")
        ax2.set(xlabel="score $j$", ylabel="probability $i$", xticks=np.arange(T), yticks=np.arange(T),
                title=r"Jacobian $\partial p_i/\partial S_j = p_i(\delta_{ij} - p_j)$")
        ax2.grid(False)
        fig.colorbar(im, ax=ax2, fraction=0.046, pad=0.04)
        grid = np.linspace(0.0, 1.0, 201)
        ax3.plot(grid, grid * (1 - grid), color="0.4", label="$p(1-p)$")
        ax3.plot(p, p * (1 - p), "o", color="C3", markersize=10, label="this row's $p_i$")
        ax3.axvline(0.5, color="0.6", ls=":", lw=1.8)
        ax3.set(xlabel="probability $p_i$", ylabel=r"diagonal entry $p_i(1-p_i)$",
                title=r"largest at $p = \frac{1}{2}$, zero at 0 and 1", xlim=(0, 1), ylim=(0, 0.28))
        ax3.legend(loc="lower center")
    return fig


def plot_spectra(spectra, title, floor=1e-17, path=None, ylabel="singular value σᵢ") -> Figure:
    """Singular values of several matrices on a log axis, one marker line per matrix.
    Values below ``floor`` (exact zeros) are drawn at ``floor``; a grey band marks the
    round-off level (below 1e-12 relative to the largest value).

    spectra : dict label -> (p,) singular values, descending
    """
    markers = "osD^v"
    with teaching_figure(figsize=(9, 5.5), path=path, pad=WIDE_PAD) as (fig, (ax,)):
        top = max(float(np.max(s)) for s in spectra.values())
        ax.axhspan(floor, top * 1e-12, color="0.85", zorder=0)
        ax.text(1, top * 1e-13, "round-off: numerically zero", color="0.35", fontsize=12,
                va="top")
        for i, (label, s) in enumerate(spectra.items()):
            s = np.maximum(np.asarray(s, dtype=np.float64), floor)
            ax.semilogy(np.arange(1, s.size + 1), s, marker=markers[i % len(markers)],
                        color=f"C{i}", label=label, alpha=0.9)
        ax.set(xlabel="index i", ylabel=ylabel, title=title)
        ax.set_ylim(floor * 0.5, top * 5)
        ax.legend(loc="center right")
    return fig


# --------------------------------------------------------------------- notebook 03


_FD_ERROR_LABEL = r"error relative to the exact value, $|n - a|\,/\,|a|$"


def plot_fd_error_vs_h(hs, errors, references=None, title=None, ylabel=_FD_ERROR_LABEL,
                       path=None) -> Figure:
    """Error of a finite-difference derivative n against the step h, log–log, measured
    relative to the exact value a (the default ``ylabel``; pass another one for another error).

    hs : (m,) steps h > 0;  errors : dict label -> (m,) relative errors (solid lines with
    markers; an exact 0 is drawn at 1e-17); references : dict label -> (m,) model curves, thin
    lines: the first two dotted grey (meant for truncation terms), the next two dash-dotted in
    the colours of the first and third measured curves (meant for the round-off terms of
    float64 and float32).
    """
    hs = check_positive_1d("hs", hs)
    styles = [(":", "0.25"), (":", "0.55"), ("-.", "C0"), ("-.", "C2")]
    with teaching_figure(figsize=(14, 6.5), path=path, pad=WIDE_PAD) as (fig, (ax,)):
        for i, (label, e) in enumerate(errors.items()):
            ax.loglog(hs, np.maximum(e, 1e-17), "o-", color=f"C{i}", label=label)
        for j, (label, e) in enumerate((references or {}).items()):
            ls, color = styles[j % len(styles)]
            ax.loglog(hs, e, ls, color=color, lw=1.8, alpha=0.8, label=label)
        ax.set(xlabel="step $h$", ylabel=ylabel,
               title=title or "Finite differences: error vs step size")
        ax.set_ylim(1e-12, 30)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=12,
                  title="measured  /  model", title_fontsize=12)
    return fig


def plot_gradcheck_errors(results, threshold, path=None) -> Figure:
    """Every error of a gradient check, one row per layer/block, log x axis, with the pass
    threshold as a vertical line: dots are relative errors ‖a − n‖ / (‖a‖ + ‖n‖)
    (``gradcheck.rel_error``); crosses are rows with ``structural_zero`` set (the true gradient
    is 0, so the row holds the absolute error max |a − n|, and its pass rule is max |n| ≤ 1e-7,
    ``gradcheck.ZERO_NUMERICAL``). The x label says which is which.

    results : list of (title, rows) with rows from ``lora_np.gradcheck.check_gradients``
    """
    any_zero = any(r.structural_zero for _, rows in results for r in rows)
    with teaching_figure(figsize=(11, 0.55 * len(results) + 2.6), path=path, constrained=True) as (fig, (ax,)):
        for y, (title, rows) in enumerate(results):
            rel = [r.rel_error for r in rows if not r.structural_zero]
            zero = [r.rel_error for r in rows if r.structural_zero]
            ax.semilogx(np.maximum(rel, 1e-16), [y] * len(rel), "o", color="C0", alpha=0.7)
            if zero:
                ax.semilogx(np.maximum(zero, 1e-16), [y] * len(zero), "x", color="C1",
                            markersize=10, mew=2.5)
        ax.axvline(threshold, color="C3", lw=2.5)
        ax.text(threshold * 1.3, -0.6, f"threshold {threshold:.0e}", color="C3", fontsize=12)
        ax.plot([], [], "o", color="C0", label=r"relative error $\Vert a-n\Vert\,/\,(\Vert a\Vert+\Vert n\Vert)$")
        if any_zero:
            ax.plot([], [], "x", color="C1", mew=2.5,
                    label=r"key bias (true gradient 0): absolute error $\max|a-n|$")
        ax.set_yticks(range(len(results)), [t for t, _ in results], fontsize=11)
        ax.set_ylim(len(results) - 0.4, -1.0)
        ax.set_xlim(1e-12, 1e-2)
        xlabel = (r"error ($a$ analytic, $n$ numerical): dots relative, crosses absolute" if any_zero
                  else r"relative error $\Vert a-n\Vert\,/\,(\Vert a\Vert+\Vert n\Vert)$ ($a$ analytic, $n$ numerical)")
        ax.set(xlabel=xlabel, title="Every gradient of every layer vs finite differences (float64)")
        # below the x label (constrained layout makes room): inside it would cover the dots of the last rows
        fig.legend(loc="outside lower center", fontsize=12, ncol=1)
    return fig
