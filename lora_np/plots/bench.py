"""The figure of the benchmark (``python -m lora_np.bench``): step time, achieved rate and the
LoRA/full ratios of one training step, per dtype.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.figure import Figure

from .style import log2_ticks, teaching_figure

__all__ = ["plot_bench"]

#: the fraction of plain np.matmul's rate a step should reach, drawn as a reference line
MATMUL_TARGET_PERCENT = 80


def _per_width(axes, rows) -> None:
    """Left: ms/step vs width; middle: % of the matmul rate vs width; one line per model and
    method (solid MLP, dashed attention, colour = method)."""
    methods = list(dict.fromkeys(r.method for r in rows))
    styles = {"mlp": "-", "attention": "--"}
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
        log2_ticks(ax, widths)
        ax.set_xlabel("width d")
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("ms per training step (median)")
    axes[0].set_title("Step time")
    axes[1].set_ylabel("% of plain np.matmul GFLOP/s")
    axes[1].set_title("Achieved rate (FLOP model / time)")
    axes[1].axhline(MATMUL_TARGET_PERCENT, color="gray", ls=":", lw=1.5)
    axes[1].text(widths[0], MATMUL_TARGET_PERCENT + 1, f"target {MATMUL_TARGET_PERCENT}%", color="gray",
                 fontsize=11)
    axes[0].legend(fontsize=10, ncol=2)


def _ratios(ax, rows) -> None:
    """Bars of LoRA / full (time, FLOP model, state bytes, peak memory) at the largest width."""
    d_max = max(r.d for r in rows)
    lora = [r for r in rows if r.d == d_max and r.rank is not None]
    x = np.arange(len(lora))
    bars = [("time", [r.time_ratio for r in lora]), ("FLOP model", [r.flop_ratio for r in lora]),
            ("state bytes (= byte model)", [r.state_ratio for r in lora]),
            ("step peak memory", [r.peak_ratio for r in lora]),
            ("state + peak", [r.memory_ratio for r in lora])]
    w = 0.16
    for j, (name, vals) in enumerate(bars):
        ax.bar(x + (j - 2) * w, vals, w, label=name, color=f"C{j + 4}")
    ax.set_xticks(x, [f"{r.model}\nr={r.rank}" for r in lora])
    ax.axhline(1.0, color="black", lw=1)
    ax.set_ylabel("LoRA / full fine-tuning")
    ax.set_title(f"LoRA vs full at d = {d_max}")
    ax.legend(fontsize=10, loc="upper left")
    ax.set_ylim(0, 1.45)


def plot_bench(rows, dtype: str = "float32", path=None) -> Figure:
    """Three panels for ``dtype``: ms/step vs width, % of the matmul rate vs width, and the
    LoRA/full ratios (time, FLOP model, state bytes, peak memory) at the largest width.

    ``rows`` are ``lora_np.bench.BenchRow`` objects (from ``bench.run``); only those of
    ``dtype`` are drawn. Saves to ``path`` if given and returns the Figure. Drawn in
    matplotlib's default style, smaller than the teaching figures: three dense panels."""
    rows = [r for r in rows if r.dtype == dtype]
    if not rows:
        raise ValueError(f"plot_bench: no rows in dtype {dtype!r}")
    with teaching_figure(1, 3, figsize=(19, 6.2), path=path, style=None, dpi=100) as (fig, axes):
        _per_width(axes, rows)
        _ratios(axes[2], rows)
        for ax in axes:
            ax.title.set_fontsize(15)
            ax.xaxis.label.set_fontsize(13)
            ax.yaxis.label.set_fontsize(13)
            ax.tick_params(labelsize=11)
        fig.suptitle(f"One training step (forward, loss, backward, Adam), {dtype}, "
                     f"{os.cpu_count()} cores", fontsize=16)
    return fig
