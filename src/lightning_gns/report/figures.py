"""The report's figures, drawn with matplotlib's Agg canvas (no pyplot, no display, no global backend switch).

Each ``plot_*`` function draws one PNG of a fixed size (:data:`FIGURE_INCHES` at :data:`DPI`) and returns a
:class:`FigureFile` whose ``notes`` say what the figure leaves out or clips (values that a log scale cannot show,
an interval whose top is above the axis), so that the report can say it in words too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from lightning_gns import tags
from lightning_gns.report.reading import RunLog, Series
from lightning_gns.report.summary import RunSummary, format_number, nominal_batch_sizes

DPI = 100
#: Width and height in inches of each figure (pixels: × :data:`DPI`); the per-layer heatmap grows with the layers.
FIGURE_INCHES: dict[str, tuple[float, float]] = {
    "b_simple": (13.0, 5.0),
    "noise": (9.0, 4.5),
    "layers": (11.0, 0.0),
    "tradeoff": (13.0, 5.0),
    "batch_size": (10.0, 4.0),
}

_B_SIMPLE, _BAND, _BATCH, _SUGGESTED = "C0", "C0", "C3", "C2"


@dataclass(frozen=True)
class FigureFile:
    """A figure written to disk, its title, and what it could not show."""

    path: Path
    title: str
    notes: list[str] = field(default_factory=list)


def _figure(name: str, height: float | None = None) -> Figure:
    width, default_height = FIGURE_INCHES[name]
    figure = Figure(figsize=(width, height or default_height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path, title: str, notes: list[str]) -> FigureFile:
    figure.savefig(path, dpi=DPI, facecolor="white")
    return FigureFile(path=path, title=title, notes=notes)


def _positive(values: np.ndarray) -> np.ndarray:
    """NaN where a log axis cannot draw the value (not finite, or ≤ 0)."""
    return np.where(np.isfinite(values) & (values > 0), values, math.nan)


# -- B_simple ----------------------------------------------------------------------------------------------------


def plot_b_simple(log: RunLog, path: Path) -> FigureFile:
    """B_simple inside its interval, the suggestion and the batch size used, against examples seen and steps.

    The y axis is logarithmic. Where the interval's upper end is above the axis (it is ``+inf`` while |G|² is not
    resolved) the band is clipped at the top of the axis and marked ▲; a lower end ≤ 0 is clipped at the bottom.
    """
    b_simple = log.get(tags.B_SIMPLE)
    assert b_simple is not None
    steps = b_simple.steps
    values = b_simple.values
    lower, upper, batch, b_crit = (
        _on(log.get(name), steps) for name in (tags.B_SIMPLE_LOWER, tags.B_SIMPLE_UPPER, tags.BATCH_SIZE, tags.B_CRIT)
    )
    shown = [_positive(v) for v in (values, lower, batch, b_crit)]
    positive = np.concatenate([v[np.isfinite(v)] for v in shown])
    if not len(positive):
        positive = np.array([1.0])
    central = np.concatenate([v[np.isfinite(v)] for v in (shown[0], shown[2], shown[3])])
    reference = float(central.max()) if len(central) else float(positive.max())
    finite_upper = upper[np.isfinite(upper) & (upper > 0)]
    top = reference * 4
    if len(finite_upper):
        top = min(max(top, float(finite_upper.max()) * 1.25), reference * 30)
    bottom = float(positive.min()) / 2
    has_band = np.isfinite(lower) | np.isfinite(upper)
    band_low = np.where(np.isfinite(lower) & (lower > bottom), lower, bottom)
    band_high = np.where(upper < top, upper, top)
    clipped_top = has_band & ~(upper < top) & ~np.isnan(upper)
    clipped_bottom = has_band & ~(lower > bottom) & ~np.isnan(lower)
    band_valid = has_band & ~np.isnan(upper) & ~np.isnan(lower)

    notes = []
    n = len(steps)
    infinite = int(np.isposinf(upper).sum())
    if clipped_top.any():
        notes.append(
            f"the interval's upper end is above the axis at {int(clipped_top.sum())} of {n} logged points "
            f"({infinite} of them +inf: |G|² not yet resolved); the band is clipped at the top of the axis there (▲)"
        )
    if clipped_bottom.any():
        notes.append(
            f"the interval's lower end is below the axis (≤ {format_number(bottom)}) at "
            f"{int(clipped_bottom.sum())} of {n} points; the band is clipped at the bottom there"
        )
    undefined = int((~np.isfinite(shown[0])).sum())
    if undefined:
        notes.append(f"B_simple is undefined (|G|² ≤ 0, logged NaN) at {undefined} of {n} points: gaps in the line")
    draw_crit = bool(np.isfinite(b_crit).any()) and not np.allclose(b_crit, values, equal_nan=True)
    b_simple_label = "B_simple (smoothed)" + ("" if draw_crit else " = suggested batch (b_crit)")

    examples = log.get(tags.EXAMPLES)
    axes_x: list[tuple[np.ndarray, str]] = []
    if examples is not None:
        axes_x.append((examples.on(steps), f"examples seen ({log.prefix}examples)"))
    axes_x.append((steps.astype(np.float64), "optimizer step"))
    figure = _figure("b_simple")
    axes = figure.subplots(1, len(axes_x), sharey=True, squeeze=False)[0]
    for ax, (x, label) in zip(axes, axes_x, strict=True):
        ax.fill_between(
            x,
            band_low,
            band_high,
            where=band_valid,
            color=_BAND,
            alpha=0.22,
            linewidth=0,
            label="interval (b_simple_lower … b_simple_upper)",
            interpolate=False,
        )
        ax.plot(x, shown[0], color=_B_SIMPLE, marker=".", markersize=4, linewidth=1.6, label=b_simple_label)
        if draw_crit:
            ax.plot(x, shown[3], color=_SUGGESTED, linestyle="--", linewidth=1.4, label="suggested batch (b_crit)")
        if np.isfinite(shown[2]).any():
            ax.plot(x, shown[2], color=_BATCH, drawstyle="steps-post", linewidth=2.0, label="batch size used")
        if clipped_top.any():
            ax.plot(
                x[clipped_top],
                np.full(int(clipped_top.sum()), top),
                linestyle="none",
                marker="^",
                color=_BAND,
                markersize=6,
                clip_on=False,
                label="band clipped at the top (upper end above)",
            )
        ax.set_yscale("log")
        ax.set_ylim(bottom, top)
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.25)
    axes[0].set_ylabel("batch size (examples per step), log scale")
    axes[0].legend(loc="best", fontsize=9)
    figure.suptitle("B_simple with its interval, the suggestion and the batch size used")
    return _save(figure, path, "B_simple over training", notes)


def _on(series: Series | None, steps: np.ndarray) -> np.ndarray:
    return np.full(len(steps), math.nan) if series is None else series.on(steps)


# -- |G|² and tr Σ -----------------------------------------------------------------------------------------------


def plot_noise_components(log: RunLog, path: Path) -> FigureFile:
    """|G|² and tr(Σ), the two smoothed estimates whose ratio is B_simple, against steps on a log scale.

    Values ≤ 0 (the |G|² estimate can be, early on or near convergence) are not drawn; the legend counts them.
    """
    figure = _figure("noise")
    ax = figure.subplots()
    notes = []
    drawn = False
    for name, label, color in ((tags.GRAD_SQ_NORM, "|G|²", "C1"), (tags.TRACE_SIGMA, "tr(Σ)", "C4")):
        series = log.get(name)
        if series is None:
            notes.append(f"`{log.prefix}{name}` was not logged")
            continue
        values = _positive(series.values)
        hidden = int(np.isnan(values).sum())
        legend = f"{label} ({log.prefix}{name})"
        if hidden:
            legend += f": {hidden} of {len(values)} values ≤ 0 or not finite, not drawn"
            notes.append(f"{label}: {hidden} of {len(values)} logged values are ≤ 0 or not finite and are not drawn")
        ax.plot(series.steps, values, marker=".", markersize=4, color=color, label=legend)
        drawn = drawn or bool(np.isfinite(values).any())
    if drawn:
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no positive value to draw", transform=ax.transAxes, ha="center", va="center")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("squared-gradient units, log scale")
    ax.grid(True, which="both", alpha=0.25)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=9)
    ax.set_title("|G|² and tr(Σ): B_simple = tr(Σ) / |G|² is their vertical distance")
    return _save(figure, path, "|G|² and tr(Σ)", notes)


# -- per layer ---------------------------------------------------------------------------------------------------


def plot_layers(log: RunLog, path: Path) -> FigureFile:
    """A heatmap of each layer's smoothed B_simple (rows) over the logging steps (columns), colour in log scale.

    Cells where the layer's B_simple is undefined (NaN, or ≤ 0) are grey.
    """
    names = log.layer_names
    series = [log.scalars[log.prefix + tags.layer_b_simple(name)] for name in names]
    steps = np.unique(np.concatenate([s.steps for s in series]))
    grid = np.stack([_positive(s.on(steps, exact=True)) for s in series])
    finite = grid[np.isfinite(grid)]
    notes = []
    undefined = int(np.isnan(grid).sum())
    if undefined:
        notes.append(f"{undefined} of {grid.size} cells are undefined (the layer's |G|² ≤ 0) and shown grey")
    height = min(12.0, max(3.0, 1.6 + 0.32 * len(names)))
    figure = _figure("layers", height=height)
    ax = figure.subplots()
    edges = _edges(steps.astype(np.float64))
    rows = np.arange(len(names) + 1) - 0.5
    low, high = (float(finite.min()), float(finite.max())) if len(finite) else (1.0, 10.0)
    if high <= low:
        low, high = low / 2, high * 2
    colormap: Any = _colormap()
    mesh = ax.pcolormesh(
        edges, rows, np.ma.masked_invalid(grid), cmap=colormap, norm=LogNorm(low, high), shading="flat"
    )
    figure.colorbar(mesh, ax=ax, label="layer B_simple (grey: undefined)")
    every = max(1, math.ceil(len(names) / 40))
    ax.yaxis.set_major_locator(FixedLocator(list(range(0, len(names), every))))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_yticklabels(names[::every], fontsize=8)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer")
    ax.set_title(f"Per-layer B_simple over training ({len(names)} layers; colour in log scale)")
    return _save(figure, path, "Per-layer B_simple", notes)


def _colormap() -> Any:
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad="lightgrey")


def _edges(centers: np.ndarray) -> np.ndarray:
    """Cell edges halfway between centres, the outer ones as far out as their neighbour."""
    if len(centers) == 1:
        return np.array([centers[0] - 0.5, centers[0] + 0.5])
    middle = (centers[1:] + centers[:-1]) / 2
    return np.concatenate([[2 * centers[0] - middle[0]], middle, [2 * centers[-1] - middle[-1]]])


# -- trade-off ---------------------------------------------------------------------------------------------------


def plot_tradeoff(summary: RunSummary, path: Path) -> FigureFile:
    """The steps/examples trade-off the paper predicts for the measured B_noise, on a log2 grid of batch sizes.

    Left: S/S_min against E/E_min (the frontier (S/S_min − 1)(E/E_min − 1) = 1), each candidate batch size a
    point, the batch size used and the suggestion marked. Right: both ratios against the batch size, with the band
    they span while B_noise ranges over its interval (clipped at the top of the axis where the interval is open).
    """
    b_noise = summary.b_noise
    rows = summary.trade_off
    grid = np.array([row.batch_size for row in rows], dtype=np.float64)
    steps = np.array([row.steps_ratio for row in rows])
    examples = np.array([row.examples_ratio for row in rows])
    used, suggested = summary.batch_size, summary.suggestion.b_crit
    lower, upper = summary.suggestion.lower, summary.suggestion.upper
    notes = []
    figure = _figure("tradeoff")
    frontier, ratios = figure.subplots(1, 2)

    dense = np.geomspace(grid[0], grid[-1], 200)
    frontier.plot(1 + dense / b_noise, 1 + b_noise / dense, color="0.5", linewidth=1, zorder=1)
    frontier.scatter(examples, steps, s=18, color="C0", zorder=2, label="candidate batch sizes (powers of 2)")
    for size, x, y in zip(grid, examples, steps, strict=True):
        frontier.annotate(f"{int(size)}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
    marks = ((used, "batch size used", _BATCH, "*", 160), (suggested, "suggestion (b_crit)", _SUGGESTED, "D", 60))
    for size, label, color, marker, area in marks:
        if math.isfinite(size) and size > 0:
            frontier.scatter(
                1 + size / b_noise,
                1 + b_noise / size,
                s=area,
                marker=marker,
                color=color,
                zorder=3,
                edgecolors="black",
                linewidths=0.5,
                label=f"{label}: {format_number(size)}",
            )
    frontier.set_xscale("log")
    frontier.set_yscale("log")
    frontier.set_xlabel("examples to reach a loss, E / E_min = 1 + B / B_noise")
    frontier.set_ylabel("optimizer steps to reach it, S / S_min = 1 + B_noise / B")
    frontier.grid(True, which="both", alpha=0.25)
    frontier.legend(loc="upper right", fontsize=9)

    top = float(max(steps.max(), examples.max())) * 1.3
    ratios.plot(grid, steps, marker="o", markersize=4, color="C0", label="steps S / S_min")
    ratios.plot(grid, examples, marker="s", markersize=4, color="C1", label="examples E / E_min")
    if math.isfinite(lower) and lower > 0 and not math.isnan(upper):
        high = upper if math.isfinite(upper) else math.inf
        ratios.fill_between(
            grid,
            1 + lower / grid,
            np.minimum(1 + high / grid, top),
            color="C0",
            alpha=0.15,
            linewidth=0,
            label="steps, B_noise over its interval",
        )
        ratios.fill_between(
            grid,
            1 + grid / high,
            np.minimum(1 + grid / lower, top),
            color="C1",
            alpha=0.15,
            linewidth=0,
            label="examples, B_noise over its interval",
        )
        if not math.isfinite(upper):
            notes.append("the interval of B_noise is open above (+inf): its bands are clipped at the top of the axis")
    for size, label, color, style in ((used, "used", _BATCH, "-"), (suggested, "suggested", _SUGGESTED, "--")):
        if math.isfinite(size) and size > 0:
            ratios.axvline(size, color=color, linestyle=style, linewidth=1.5, label=f"{label}: {format_number(size)}")
    ratios.set_xscale("log", base=2)
    ratios.set_yscale("log")
    ratios.set_ylim(0.9, top)
    ratios.set_xlabel("batch size B (log2 scale)")
    ratios.set_ylabel("cost over the minimum")
    ratios.grid(True, which="both", alpha=0.25)
    ratios.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    figure.suptitle(
        f"Predicted trade-off for B_noise = {format_number(b_noise)} (final smoothed B_simple; McCandlish et al. 2018)"
    )
    return _save(figure, path, "Predicted steps/examples trade-off", notes)


# -- batch-size history ------------------------------------------------------------------------------------------


def plot_batch_size(log: RunLog, path: Path) -> FigureFile:
    """The batch size used over training, with the learning rate on a second axis when it was logged."""
    batch = log.get(tags.BATCH_SIZE)
    assert batch is not None
    figure = _figure("batch_size")
    ax = figure.subplots()
    # Short last batches of epochs are not changes of the batch size in use.
    nominal, _ = nominal_batch_sizes(batch)
    ax.plot(batch.steps, nominal, drawstyle="steps-post", color=_BATCH, linewidth=2, label="batch size used")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("batch size (examples per step)")
    ax.grid(True, which="both", alpha=0.25)
    handles, labels = ax.get_legend_handles_labels()
    lr = log.get(tags.LR)
    if lr is not None:
        twin = ax.twinx()
        twin.plot(lr.steps, lr.values, drawstyle="steps-post", color="C0", linestyle="--", label="learning rate")
        twin.set_ylabel("learning rate")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="upper left", fontsize=9)
    ax.set_title("Batch size (and learning rate) over training")
    return _save(figure, path, "Batch-size history", [])
