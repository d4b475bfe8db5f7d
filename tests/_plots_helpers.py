"""Helpers shared by the tests of lora_np.plots (tests/test_plots_*.py)."""

from matplotlib.figure import Figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def line(ax, label):
    """The line of ``ax`` labelled ``label`` (AssertionError listing the labels if none)."""
    for ln in ax.get_lines():
        if ln.get_label() == label:
            return ln
    raise AssertionError(f"no line labelled {label!r}; have {[l.get_label() for l in ax.get_lines()]}")


def assert_readable(fig):
    """A Figure whose every panel (colour bars aside) has axis labels and a title."""
    assert isinstance(fig, Figure)
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), \
            "every panel needs axis labels and a title"
