"""The one plotting module: figures, colours, axes and labels shared by every plot sparsify draws.

``report`` (training curves, the sparsity/quality trade-off) and
``scaling_law`` (the fit against its points) draw with these, so every PNG
looks alike: a bare matplotlib ``Figure`` on the Agg canvas (no pyplot, no
global backend switch, safe in threads and servers), constrained layout,
110 dpi, tab10/tab20 colours for runs, log axes labelled with plain numbers,
percent axes for fractions. matplotlib is imported only when a plot is drawn.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

DPI = 110


def figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1):
    """A new figure of ``figsize`` inches and its ``nrows x ncols`` axes, as ``(fig, [ax, ...])`` row by row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    return fig, axes


def save(fig, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (creating its folder); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def colors(n: int) -> list:
    """``n`` distinct colours for categories (runs): tab10, or tab20 beyond ten (then cycling)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def ramp(n: int) -> list:
    """``n`` colours along an ordered scale (viridis), for ordered values such as sparsities."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / max(n - 1, 1)) for i in range(n)]


def log_axis(axis, low: float, high: float) -> None:
    """A log scale labelled with plain numbers (20, 50, 100), densely enough for narrow ranges."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.axes.set_yscale("log") if axis.axis_name == "y" else axis.axes.set_xscale("log")
    decades = math.log10(high / low) if high > low else 0
    subs = (1, 2, 3, 4, 5, 6, 7, 8, 9) if decades < 1 else (1, 2, 5) if decades < 2.5 else (1,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def value_axis(axis, values: Sequence[float], *, fraction: bool = False) -> None:
    """Tick labels for a linear axis: percents for a fraction within [0, 1], engineering suffixes from 1e4."""
    from matplotlib.ticker import EngFormatter, PercentFormatter

    if axis.get_scale() == "log" or not values:
        return
    if fraction and all(0 <= v <= 1 for v in values):
        axis.set_major_formatter(PercentFormatter(1.0))
    elif max(abs(v) for v in values) >= 1e4:
        axis.set_major_formatter(EngFormatter())


def place_labels(fig, ax, labels: Sequence[tuple[str, float, float, str]]) -> None:
    """Annotate points, each where its label covers the least of the labels and points placed so far
    and stays inside the axes: next to the point if there is room, else further out along one of
    eight directions with a thin leader line, so a label never sits closer to a neighbour's point."""
    fig.canvas.draw()  # final limits and layout, to measure in pixels
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    markers = [ax.transData.transform((px, py)) for _, px, py, _ in labels]
    taken = [(mx - 6, my - 6, mx + 6, my + 6) for mx, my in markers]

    def overlap(a, b) -> float:
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    directions = ((1, 1, "left", "bottom"), (-1, 1, "right", "bottom"), (1, -1, "left", "top"),
                  (-1, -1, "right", "top"), (0, 1, "center", "bottom"), (0, -1, "center", "top"),
                  (1, 0, "left", "center"), (-1, 0, "right", "center"))
    for text, px, py, color in sorted(labels, key=lambda label: (label[1], label[2])):
        best = None
        ox, oy = ax.transData.transform((px, py))
        crowded = sum((mx - ox) ** 2 + (my - oy) ** 2 < 20 ** 2 for mx, my in markers) > 1
        for reach in (2.5, 4.5) if crowded else (1.0, 2.5, 4.5):  # crowded points get leader lines
            for ux, uy, ha, va in directions:
                dx, dy = 6 * reach * ux, 5 * reach * uy
                leader = dict(arrowstyle="-", color=color, lw=0.6, alpha=0.8, shrinkA=0, shrinkB=4) if reach > 1 else None
                note = ax.annotate(text, (px, py), xytext=(dx, dy), textcoords="offset points", fontsize=7.5,
                                   color=color, ha=ha, va=va, arrowprops=leader)
                e = note.get_window_extent(renderer)
                box = (e.x0, e.y0, e.x1, e.y1)
                outside = (e.width * e.height) - overlap(box, (frame.x0, frame.y0, frame.x1, frame.y1))
                # prefer near and diagonal placements when they are free; a label nearer another point
                # than its own reads as that point's label
                own = ax.transData.transform((px, py))
                near = min(((box[0] + box[2]) / 2 - mx) ** 2 + ((box[1] + box[3]) / 2 - my) ** 2
                           for mx, my in markers)
                mine = ((box[0] + box[2]) / 2 - own[0]) ** 2 + ((box[1] + box[3]) / 2 - own[1]) ** 2
                misread = 400 if near < mine - 1e-6 else 0
                cost = (sum(overlap(box, t) for t in taken) + 3 * outside + 20 * reach
                        + (5 if ux == 0 or uy == 0 else 0) + misread)
                if best is None or cost < best[0]:
                    if best is not None:
                        best[1].remove()
                    best = (cost, note, box)
                else:
                    note.remove()
            if best[0] <= 20 * reach + 5:  # free of overlaps at this reach: no need to go further out
                break
        taken.append(best[2])
