"""Helpers of the plot tests: the figures a plot function saved, and what they show."""

from __future__ import annotations


def saved_figures(monkeypatch) -> list:
    """Every matplotlib figure saved from now on (to inspect what a plot drew)."""
    from matplotlib.figure import Figure

    saved, save = [], Figure.savefig

    def record(fig, *args, **kwargs):
        fig.canvas.draw()
        saved.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return saved


def visible(line) -> bool:
    """A plotted line can be seen: it has a marker, or a line through two points or more."""
    marker = line.get_marker() not in (None, "", " ", "None", "none")
    drawn = line.get_linestyle() not in ("", " ", "None", "none") and len(line.get_xdata()) > 1
    return marker or drawn
