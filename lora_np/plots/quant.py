"""Figures of notebook 09 (QLoRA, ``lora_np.quant``): the NF4 code values, bits against error,
the spectrum of the quantisation error, LoftQ's alternation, the real model quantised and tuned.

Every function takes plain numbers (code values, samples, singular values, losses, byte counts),
draws one figure inside ``teaching_figure``, returns the Figure and, given ``path``, saves a PNG.
Nothing here computes what the notebook teaches: the numbers come from ``lora_np.quant`` and
``lora_np.analysis``.
"""

from __future__ import annotations

import numpy as np

from ..validate import check_float_array
from .checks import check_positive_1d
from .style import COLORS, teaching_figure

__all__ = ["plot_nf4_codes", "plot_bits_vs_error", "plot_error_spectrum", "plot_loftq",
           "plot_qlora_vs_lora"]


#: the stacked parts of a memory bar: frozen float weights, NF4 arrays, the training state
_PART_COLORS = ("0.6", COLORS[0], COLORS[2], COLORS[4])


def _dict_of(name, value) -> dict:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{name} must be a non-empty dict label -> values, got {value!r}")
    return value


def plot_nf4_codes(codes: dict, samples, path=None):
    """Left: where the 16 values of each 4-bit code lie in [−1, 1] (one row per code, e.g. NF4
    and a uniform grid), over the histogram of block-normalised weights ``samples`` (W / absmax
    of its block). Right: the share of those weights that each code index receives (1/16 would
    use all 4 bits fully).

    codes : dict label -> 16 ascending values in [−1, 1];  samples : 1-D values in [−1, 1].
    """
    codes = {k: check_float_array(f"codes[{k!r}]", v, ndim=1) for k, v in _dict_of("codes", codes).items()}
    for k, v in codes.items():
        if v.size != 16 or np.any(np.diff(v) <= 0) or np.abs(v).max() > 1:
            raise ValueError(f"codes[{k!r}] must be 16 ascending values in [-1, 1], got {v.size} values")
    x = check_float_array("samples", samples, ndim=1)
    with teaching_figure(1, 2, figsize=(15, 5.8), path=path,
                         title="4-bit codes for block-normalised weights") as (fig, (ax1, ax2)):
        ax1.hist(x, bins=120, range=(-1, 1), density=True, color="0.75")
        top = ax1.get_ylim()[1]
        for i, (label, v) in enumerate(codes.items()):
            y = top * (1.12 + 0.3 * i)
            ax1.plot(v, np.full(16, y), "|", ms=20, mew=3, color=COLORS[i])
            ax1.text(0, y + 0.09 * top, f"{label}: its 16 values", color=COLORS[i], fontsize=13,
                     ha="center", va="bottom")
        ax1.set_ylim(0, top * (1.3 + 0.3 * len(codes)))
        ax1.set_xlabel("normalised weight $w\\,/\\,\\max_{\\mathrm{block}}|w|$")
        ax1.set_ylabel("density (grey: the weights)")
        ax1.set_title("code values over the weights")
        width = 0.8 / len(codes)
        for i, (label, v) in enumerate(codes.items()):
            mids = (v[:-1] + v[1:]) / 2
            idx = np.searchsorted(mids, x, side="left")
            share = np.bincount(idx, minlength=16) / x.size
            ax2.bar(np.arange(16) + (i - (len(codes) - 1) / 2) * width, share, width, color=COLORS[i], label=label)
        ax2.axhline(1 / 16, color="black", ls="--", lw=1.5, label="1/16 (every code equally used)")
        ax2.set_xlabel("code index (0 … 15)")
        ax2.set_ylabel("share of the weights")
        ax2.set_title("how often each code is used")
        ax2.set_xticks(range(0, 16, 3))
        ax2.legend(fontsize=11)
    return fig


def plot_bits_vs_error(rows, path=None):
    """Relative error ‖W − deq(W)‖_F / ‖W‖_F against bits per parameter, one point per block
    size, one line per setting. ``rows``: dict label -> list of (block_size, bits, error)."""
    rows = _dict_of("rows", rows)
    with teaching_figure(figsize=(10, 6), path=path) as (fig, (ax,)):
        for i, (label, pts) in enumerate(rows.items()):
            pts = sorted(pts, key=lambda p: p[1])
            bits = check_positive_1d(f"rows[{label!r}] bits", [p[1] for p in pts])
            err = check_positive_1d(f"rows[{label!r}] errors", [p[2] for p in pts])
            ax.plot(bits, err, "o-", color=COLORS[i], label=label)
            for (bs, b, e) in pts:
                ax.annotate(f"{bs}", (b, e), textcoords="offset points", xytext=(6, 6), fontsize=11,
                            color=COLORS[i])
        ax.set_xlabel("bits per parameter (codes + constants)")
        ax.set_ylabel("relative error $\\|W - \\mathrm{deq}(W)\\|_F / \\|W\\|_F$")
        ax.set_title("NF4: smaller blocks cost bits, buy accuracy (numbers: block size)")
        ax.legend()
    return fig


def plot_error_spectrum(spectra: dict, energy: float = 0.9, path=None):
    """Left: singular values σ_i / σ_1 of each matrix. Right: the share of ‖M‖_F² in the top k
    directions, with the ``energy`` line (the energy rank is where a curve crosses it).
    ``spectra``: dict label -> singular values (descending)."""
    spectra = {k: check_positive_1d(f"spectra[{k!r}]", v) for k, v in _dict_of("spectra", spectra).items()}
    styles = ["-", "--", ":", "-."]
    with teaching_figure(1, 2, figsize=(15, 5.8), path=path,
                         title="What the quantisation error looks like") as (fig, (ax1, ax2)):
        for i, (label, s) in enumerate(spectra.items()):
            k = np.arange(1, s.size + 1)
            ls = styles[i % len(styles)]
            ax1.plot(k, s / s[0], ls, color=COLORS[i], label=label)
            ax2.plot(k, np.cumsum(s ** 2) / np.sum(s ** 2), ls, color=COLORS[i], label=label)
        ax1.set_yscale("log")
        ax1.set_xlabel("index i")
        ax1.set_ylabel("$\\sigma_i / \\sigma_1$")
        ax1.set_title("singular values")
        ax1.legend(fontsize=11)
        ax2.axhline(energy, color="black", lw=1.2, ls="--")
        ax2.text(1, energy + 0.015, f"{energy:.0%} of the energy", fontsize=12)
        ax2.set_xlabel("top k directions")
        ax2.set_ylabel("share of $\\|M\\|_F^2$")
        ax2.set_title("energy in the top k directions")
        ax2.set_ylim(0, 1.02)
        ax2.legend(fontsize=11, loc="lower right")
    return fig


def plot_loftq(errors: dict, path=None):
    """LoftQ's alternation: ``errors`` dict label -> [e_0, e_1, …], the relative error of
    ``deq(Q_t) + s B_t A_t`` against W after t steps (t = 0: NF4 alone, no adapter)."""
    errors = {k: check_positive_1d(f"errors[{k!r}]", v) for k, v in _dict_of("errors", errors).items()}
    with teaching_figure(figsize=(10, 6), path=path) as (fig, (ax,)):
        for i, (label, e) in enumerate(errors.items()):
            ax.plot(np.arange(e.size), e / e[0], "o-", color=COLORS[i], label=label)
        ax.set_xlabel("LoftQ step t (0: NF4 alone; 1: NF4 + rank-r SVD of its error)")
        ax.set_ylabel("error / NF4's error")
        ax.set_title("How much of the quantisation error a rank-r adapter removes")
        ax.set_ylim(0, 1.05)
        ax.legend()
    return fig


def plot_qlora_vs_lora(losses: dict, nbytes: dict, path=None):
    """Left: held-out loss of each model, one dot per seed and their mean (a short line). Right: the
    bytes each model holds, stacked by part. ``losses``: label -> list of per-seed losses;
    ``nbytes``: label -> dict part -> bytes (the same parts for every label)."""
    losses = {k: check_float_array(f"losses[{k!r}]", v, ndim=1) for k, v in _dict_of("losses", losses).items()}
    nbytes = _dict_of("nbytes", nbytes)
    with teaching_figure(1, 2, figsize=(15, 6), path=path,
                         title="LoRA on a float32 base vs QLoRA on an NF4 base") as (fig, (ax1, ax2)):
        labels = list(losses)
        for i, label in enumerate(labels):
            v = losses[label]
            ax1.plot([i - 0.25, i + 0.25], [v.mean()] * 2, color=COLORS[i], lw=3)
            ax1.plot(np.full(v.size, i), v, "o", color=COLORS[i], ms=9, label=f"{label}: {v.mean():.3f}")
        lo = min(v.min() for v in losses.values())
        hi = max(v.max() for v in losses.values())
        ax1.set_ylim(lo - 0.3 * (hi - lo) - 1e-3, hi + 0.3 * (hi - lo) + 1e-3)
        ax1.set_xticks(range(len(labels)), [label.replace(" ", "\n", 1) for label in labels], fontsize=11)
        ax1.set_xlabel("model (dots: seeds; line: their mean)")
        ax1.set_ylabel("held-out KJV loss (nats/char)")
        ax1.set_title("learning")
        ax1.legend(fontsize=10, loc="upper right")
        names = list(nbytes)
        parts = list(next(iter(nbytes.values())))
        bottom = np.zeros(len(names))
        for j, part in enumerate(parts):
            vals = np.array([nbytes[n][part] for n in names], dtype=np.float64) / 1e3
            ax2.bar(range(len(names)), vals, 0.6, bottom=bottom, color=_PART_COLORS[j % len(_PART_COLORS)], label=part)
            bottom += vals
        for i, total in enumerate(bottom):
            ax2.text(i, total, f"{total:,.0f} kB", ha="center", va="bottom", fontsize=12)
        ax2.set_ylim(0, bottom.max() * 1.15)
        ax2.set_xticks(range(len(names)), names)
        ax2.set_xlabel("model")
        ax2.set_ylabel("bytes held (kB = 1000 bytes)")
        ax2.set_title("memory")
        ax2.legend(fontsize=11)
    return fig
