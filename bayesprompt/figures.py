"""Matplotlib figures without pyplot, written atomically as PNG.

Figures are `matplotlib.figure.Figure` objects drawn on the Agg canvas, never registered with
pyplot: nothing to close, and importing this module leaves the user's pyplot backend alone
(e.g. inline plots in a notebook).
"""

from __future__ import annotations

import os
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend import Legend

from bayesprompt.files import atomic_write

DPI = 150


def new_figure(**kwargs: Any) -> Figure:
    """A pyplot-free figure on the Agg canvas."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Save ``fig`` as PNG atomically, creating the folder. Every legend counts for the tight
    bounding box (by default a legend kept with ``ax.add_artist`` beside the axes is cut off)."""
    legends = [legend for ax in fig.axes for legend in ax.findobj(Legend)]
    extra = fig.get_default_bbox_extra_artists() + legends
    atomic_write(path, lambda temporary: fig.savefig(
        temporary, format="png", dpi=DPI, bbox_inches="tight", bbox_extra_artists=extra))
