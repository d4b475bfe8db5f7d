"""The look of every lora_np figure, and the one way a figure is made, laid out and saved.

Every plotting function draws inside ``teaching_figure``::

    with teaching_figure(1, 2, figsize=(15, 5.8), path=path) as (fig, (ax1, ax2)):
        ax1.plot(...)
    return fig

The context manager applies ``TEACHING_STYLE`` (big fonts and thick lines, to be read on a
projector) while the figure is drawn and laid out, and makes a ``matplotlib.figure.Figure``
directly rather than through pyplot, so nothing stays open after a script or a test and a
notebook shows each figure once, as the returned value. When the block ends it adds the title,
lays the panels out and, given a path, saves a PNG. The PNG is rendered after the style is
closed, like the figure a notebook displays once the function has returned, and carries no
"Software" entry, so its bytes do not depend on the matplotlib version string and rerunning
writes the same file.
"""

from __future__ import annotations

import contextlib
import pathlib

import matplotlib as mpl
from matplotlib.figure import Figure

__all__ = ["TEACHING_STYLE", "COLORS", "FULL_FT", "PAD", "WIDE_PAD", "teaching_figure", "log2_ticks"]

#: rc settings for figures that are read on a projector: big fonts, thick lines
TEACHING_STYLE = {
    "font.size": 14, "axes.titlesize": 16, "axes.labelsize": 15, "xtick.labelsize": 13,
    "ytick.labelsize": 13, "legend.fontsize": 12, "lines.linewidth": 2.2, "lines.markersize": 7,
    "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 100, "savefig.dpi": 110,
}

#: matplotlib's default colour cycle, for series that are coloured by position
COLORS = mpl.rcParams["axes.prop_cycle"].by_key()["color"]

#: the line of full fine-tuning, the same in every figure that compares it with LoRA
FULL_FT = dict(color="black", ls="--", lw=2.2)

#: space around and between the panels of a tight layout, in points: matplotlib's default of
#: 1.08 font sizes, at its own 10 pt font (PAD, the default) or at the teaching 14 pt (WIDE_PAD,
#: the figures of notebooks 01–03)
PAD = 1.08 * 10
WIDE_PAD = 1.08 * 14

_TITLE_SIZE = 17
_TITLE_ROOM = (0, 0, 1, 0.93)       # tight layout below a figure title: the top 7 % is the title's


@contextlib.contextmanager
def teaching_figure(nrows: int = 1, ncols: int = 1, *, figsize=(9, 5.5), path=None, title=None,
                    constrained: bool = False, pad: float = PAD, style=TEACHING_STYLE, dpi=None,
                    **subplots_kw):
    """Yield ``(fig, axes)``; when the ``with`` block ends, title, lay out and save ``fig``.

    nrows, ncols, figsize, **subplots_kw : the grid of axes (``Figure.subplots`` arguments,
        e.g. ``sharey=True``, ``gridspec_kw``)
    path : where to save the PNG (its folder is created), or None to save nothing
    title : optional figure title (``suptitle``) above all the panels
    constrained : lay out with matplotlib's constrained layout (needed for a legend placed
        ``"outside"``; it runs when the figure is drawn) instead of ``tight_layout``
    pad : space around and between the panels of the tight layout, in points
    style : rc settings in force while the figure is drawn (None: matplotlib's current ones)
    dpi : resolution of the PNG (default: ``style``'s ``savefig.dpi``)

    ``axes`` is always a 1-D array of the ``nrows·ncols`` Axes, row by row, so a caller
    unpacks one panel (``(ax,)``) the same way as several (``(ax1, ax2)``). If the block
    raises, nothing is saved.
    """
    with mpl.rc_context(style):
        fig = Figure(figsize=figsize, layout="constrained" if constrained else None)
        axes = fig.subplots(nrows, ncols, squeeze=False, **subplots_kw).ravel()
        yield fig, axes
        if title:
            fig.suptitle(title, fontsize=_TITLE_SIZE)
        if not constrained:               # tight_layout's pad is in font sizes
            fig.tight_layout(pad=pad / mpl.rcParams["font.size"], rect=_TITLE_ROOM if title else None)
        dpi = dpi or mpl.rcParams["savefig.dpi"]
    if path is not None:
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight", metadata={"Software": None})


def log2_ticks(ax, ticks) -> None:
    """A log₂ x axis labelled with the plain numbers ``ticks`` (ranks, widths), no minor ticks."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
