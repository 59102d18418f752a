"""Matplotlib figures as the report draws them: on their own Agg canvas (never through pyplot), written
atomically. Every plot of the report, the causal-LM and load parts and `workbench compare` use these."""
from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from core import atomic


def subplots(*args, figsize, **kwargs):
    """`plt.subplots` without pyplot: a Figure on its own Agg canvas, so drawing never switches the
    caller's matplotlib backend nor fills pyplot's figure registry (nothing to close)."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(*args, **kwargs)


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    atomic.write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return path
