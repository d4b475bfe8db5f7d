"""Notebook 10's figures: the merge/unmerge round-trip error (``lora_np.deploy.round_trip_errors``)
and the terms of training memory (``lora_np.counting.training_memory``)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from ..counting import TrainingMemory
from ..deploy import RoundTrips
from .style import teaching_figure

__all__ = ["plot_round_trips", "plot_training_memory", "MEMORY_TERMS"]

#: the TrainingMemory fields drawn, in stacking order, with their legend labels
MEMORY_TERMS = (("weights", "weights (frozen + trainable)"), ("gradients", "gradients"),
                ("optimizer", "Adam's $m$, $v$"), ("master", "fp32 master copy"),
                ("activations", "activations"))


def _check_rows(name: str, value, kind: type, made_by: str) -> None:
    """``value`` must be a non-empty dict of label -> ``kind`` (what ``made_by`` returns)."""
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{name} must be a non-empty dict of label -> {kind.__name__}")
    for label, v in value.items():
        if not isinstance(v, kind):
            raise TypeError(f"{name}[{label!r}] must be a {kind.__name__} ({made_by}), got {type(v).__name__}")


def plot_round_trips(curves: dict, path=None) -> Figure:
    """Left: ‖W_n − W₀‖_F after n merge/unmerge round trips, one line per entry of ``curves``
    (label -> ``RoundTrips``), with each one's one-ulp size ‖spacing(W₀)‖_F dotted in the same
    colour; right: the same errors in those ulps, with a √n guide. Both axes logarithmic."""
    _check_rows("curves", curves, RoundTrips, "deploy.round_trip_errors")
    with teaching_figure(1, 2, figsize=(15, 5.8), path=path,
                         title="Merge, unmerge, repeat: what rounding does to $W$") as (fig, (ax1, ax2)):
        n_max = 1
        ulp_colors = {}                          # each distinct one-ulp size, dotted once: -> its colour
        for i, (label, rt) in enumerate(curves.items()):
            n = np.arange(1, len(rt.errors) + 1)
            n_max = max(n_max, n[-1])
            ls = "-" if i % 2 == 0 else "--"
            ax1.plot(n, rt.errors, color=f"C{i // 2}", ls=ls, label=label)
            ax2.plot(n, rt.errors / rt.ulp, color=f"C{i // 2}", ls=ls, label=label)
            if rt.ulp not in ulp_colors:
                ulp_colors[rt.ulp] = f"C{i // 2}"
                ax1.axhline(rt.ulp, color=f"C{i // 2}", ls=":", lw=1.8)
        guide = np.arange(1, n_max + 1)
        top = max(rt.errors[-1] / rt.ulp for rt in curves.values())     # the guide ends on the highest curve
        ax2.plot(guide, top * np.sqrt(guide / guide[-1]), color="gray", ls=":", lw=2.5,
                 label=r"$\propto\sqrt{n}$")
        for ulp, color in ulp_colors.items():            # at the right end, below the line: clear of the curves
            ax1.text(n_max, ulp / 1.4, r"one ulp per entry, $\|\mathrm{spacing}(W_0)\|_F$", color=color,
                     fontsize=11, ha="right", va="top")
        ax2.axhline(1.0, color="black", ls=":", lw=1.5)
        ax2.text(n_max, 0.9, "one ulp per entry", fontsize=11, ha="right", va="top")
        for ax in (ax1, ax2):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("round trips $n$")
        ax1.set_ylabel(r"$\|W_n - W_0\|_F$")
        ax1.set_title("Error of the weights")
        ax2.set_ylabel(r"$\|W_n - W_0\|_F \;/\; \|\mathrm{spacing}(W_0)\|_F$")
        ax2.set_title("The same, in ulps of $W_0$")
        ax1.legend(fontsize=11, loc="center right")
        ax2.legend(fontsize=11, loc="upper left")
    return fig


def plot_training_memory(rows: dict, path=None, unit: float = 1e9, unit_name: str = "GB",
                         title=None, marks=None) -> Figure:
    """Horizontal stacked bars, one per entry of ``rows`` (label -> ``TrainingMemory``), one
    segment per term (``MEMORY_TERMS``), the total written at the end of each bar, in
    ``unit_name`` (bytes / ``unit``) on a linear axis. ``marks``: optional label -> bytes, each
    drawn as a labelled vertical dashed line (a published number to compare with)."""
    _check_rows("rows", rows, TrainingMemory, "counting.training_memory")
    labels = list(rows)
    y = np.arange(len(labels))[::-1]
    with teaching_figure(1, 1, figsize=(13, 1.2 * len(labels) + 2.2), path=path, title=title) as (fig, (ax,)):
        left = np.zeros(len(labels))
        for j, (field, name) in enumerate(MEMORY_TERMS):
            widths = np.array([getattr(rows[l], field) for l in labels], dtype=float) / unit
            if not np.any(widths):
                continue
            ax.barh(y, widths, left=left, color=f"C{j}", label=name, height=0.6)
            left += widths
        for yi, total in zip(y, left):
            ax.text(total + left.max() * 0.01, yi, f"{total:,.0f} {unit_name}", va="center", fontsize=13)
        for i, (label, value) in enumerate((marks or {}).items()):
            ax.axvline(value / unit, color="gray", ls="--", lw=1.8)
            ax.text(value / unit + 0.01 * left.max(), y.max() + 0.45 + 0.3 * (i % 2), label, color="dimgray",
                    fontsize=11, ha="left", va="bottom")
        ax.set_yticks(y, labels)
        ax.set_ylim(y.min() - 0.5, y.max() + 1.2 if marks else y.max() + 0.5)
        ax.set_xlim(0, left.max() * 1.18)
        ax.set_xlabel(f"training memory ({unit_name})")
        ax.set_ylabel("fine-tuning run")
        ax.set_title("What training holds in memory, term by term")
        ax.legend(fontsize=11, loc="lower right")
        ax.grid(True, axis="x", alpha=0.3)
        ax.grid(False, axis="y")
    return fig
