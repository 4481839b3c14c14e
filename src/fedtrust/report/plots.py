"""The report's plots, each a function of the runs that returns PNG bytes (or None: nothing to draw).

Figures are built with :class:`matplotlib.figure.Figure` on an explicit
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`: the Agg backend is
chosen per figure, never through ``pyplot``, so writing a report neither
touches the user's global backend nor leaks figures. Runs get one colour each
(``tab10`` order) in every plot; within a run, extra predictors get dashed
and dotted lines. Accuracies are drawn in percent.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.collections import PolyCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from fedtrust.report import RunData

__all__ = [
    "MAX_HIST_CLIENTS",
    "Plot",
    "client_acc_png",
    "curves_png",
    "groups_png",
    "make_plots",
    "partition_png",
]

MAX_HIST_CLIENTS = 50  # the partition histogram shows at most this many clients
DPI = 100
LINESTYLES = ("-", "--", ":", "-.")
GROUPS = (("group_acc", ("many", "medium", "few")), ("hmt_acc", ("head", "middle", "tail")))


@dataclass(frozen=True)
class Plot:
    """A rendered plot: ``key`` names its PNG file, ``title`` and ``caption`` go into the page."""

    key: str
    title: str
    caption: str
    png: bytes


# --- figure helpers ----------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    """A figure drawn by the Agg backend (set explicitly, no pyplot)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _color(i: int) -> tuple[float, float, float, float]:
    """The colour of the ``i``-th run."""
    return matplotlib.colormaps["tab10"](i % 10)


def _no_data(ax: Axes, what: str) -> None:
    """Mark an empty panel."""
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _legend(ax: Axes, below: bool = False) -> None:
    """A legend, if the panel has labelled artists; ``below`` puts it under the axes (busy panels)."""
    if not ax.get_legend_handles_labels()[0]:
        return
    if below:
        y = -0.2 if ax.get_xlabel() else -0.1  # clear of the x label
        ax.legend(fontsize="small", frameon=False, loc="upper center", bbox_to_anchor=(0.5, y), ncols=2)
    else:
        ax.legend(fontsize="small", framealpha=0.85, edgecolor="none")


def _pct(values: Sequence[float | None]) -> list[float]:
    """Fractions as percentages, None as NaN (matplotlib leaves a gap)."""
    return [math.nan if v is None else 100.0 * v for v in values]


def _series_of(run: RunData) -> list[tuple[str | None, str]]:
    """(predictor, suffix for labels) pairs to draw for a run: the primary first."""
    preds = run.predictors  # the flat keys (predictor None) describe preds[0]
    return [(None, f" · {preds[0]}" if preds else "")] + [(p, f" · {p}") for p in preds[1:]]


# --- (1) curves --------------------------------------------------------------


def curves_png(runs: Sequence[RunData]) -> bytes | None:
    """Test accuracy and train loss per round, runs overlaid (two panels)."""
    if not any(run.series("test_acc")[0] or run.series("train_loss")[0] for run in runs):
        return None
    fig = _figure(11, 4)
    ax_acc, ax_loss = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        for j, (pred, suffix) in enumerate(_series_of(run)):
            rounds, acc = run.series("test_acc", pred)
            if rounds:
                ax_acc.plot(rounds, _pct(acc), color=_color(i), linestyle=LINESTYLES[j % len(LINESTYLES)],
                            marker="o" if len(rounds) <= 40 else None, markersize=3, label=run.label + suffix)
        rounds, loss = run.series("train_loss")
        if rounds:
            ax_loss.plot(rounds, loss, color=_color(i), label=run.label)
    panels = ((ax_acc, "test accuracy", "test accuracy (%)"), (ax_loss, "train loss", "train loss"))
    for ax, what, ylabel in panels:
        if ax.lines:
            ax.set(xlabel="round", ylabel=ylabel, title=f"{what} per round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            _legend(ax)
        else:
            _no_data(ax, what)
    return _png(fig)


# --- (2) per-client accuracy -------------------------------------------------


def _client_panel(ax: Axes, run: RunData, color: tuple[float, ...]) -> None:
    """Sorted bars of the primary predictor's client accuracies; other predictors as sorted steps."""
    accs = run.final_list("client_acc")
    known = sorted((a for a in accs if a is not None), reverse=True)
    xs = range(1, len(known) + 1)
    ax.bar(xs, _pct(known), width=0.85, color=color, alpha=0.8, label=_series_of(run)[0][1].lstrip(" ·") or None)
    mean = run.client_acc_mean()
    if mean is not None:
        ax.axhline(100 * mean, color="0.2", linewidth=1, linestyle="--", label=f"mean {100 * mean:.1f}%")
    for j, (pred, suffix) in enumerate(_series_of(run)[1:], start=1):
        other = sorted((a for a in run.final_list("client_acc", pred) if a is not None), reverse=True)
        if other:
            ax.step(range(1, len(other) + 1), _pct(other), where="mid", color="0.15",
                    linestyle=LINESTYLES[j % len(LINESTYLES)], label=suffix.lstrip(" ·"))
    missing = len(accs) - len(known)
    title = run.label + (f"\n({missing} client(s) without a test set)" if missing else "")
    ax.set(title=title, xlabel="clients, sorted by accuracy", ylabel="accuracy (%)", ylim=(0, 100))
    if len(known) > 30:
        ax.set_xticks([])
    _legend(ax)


def client_acc_png(runs: Sequence[RunData]) -> bytes | None:
    """Per-client personalized accuracy at the final evaluation: one sorted bar panel per run."""
    shown = [(i, run) for i, run in enumerate(runs) if any(a is not None for a in run.final_list("client_acc"))]
    if not shown:
        return None
    cols = min(len(shown), 3)
    rows = math.ceil(len(shown) / cols)
    fig = _figure(4.2 * cols, 3.4 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (i, run) in zip(axes, shown):
        _client_panel(ax, run, _color(i))
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    return _png(fig)


# --- (3) class groups and per-class accuracy ---------------------------------


def _group_series(runs: Sequence[RunData]) -> list[tuple[str, int, int, list[float | None]]]:
    """(label, run index, predictor index, many..tail values) of each run and predictor with group metrics."""
    out = []
    for i, run in enumerate(runs):
        for j, (pred, suffix) in enumerate(_series_of(run)):
            values = [run.final_mapping(key, pred).get(name) for key, names in GROUPS for name in names]
            if any(v is not None for v in values):
                out.append((run.label + suffix, i, j, values))
    return out


def _groups_panel(ax: Axes, runs: Sequence[RunData]) -> None:
    """Grouped bars: many/medium/few and head/middle/tail accuracy, one bar per run (and predictor)."""
    series = _group_series(runs)
    if not series:
        _no_data(ax, "class-group accuracy")
        return
    names = [name for _, names in GROUPS for name in names]
    centers = [k + (1 if k >= 3 else 0) * 0.5 for k in range(len(names))]  # a gap between the two families
    width = 0.8 / len(series)
    hatches = ("", "//", "..", "xx")
    for s, (label, i, j, values) in enumerate(series):
        xs = [c - 0.4 + width * (s + 0.5) for c in centers]
        ax.bar(xs, _pct(values), width=width, color=_color(i), hatch=hatches[j % len(hatches)],
               edgecolor="white", label=label)
        for x, v in zip(xs, values):
            if v is None:
                ax.text(x, 1, "n/a", ha="center", va="bottom", rotation=90, fontsize="x-small", color="0.4")
    ax.set_xticks(centers, names)
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title="accuracy by class group (final eval)")
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, below=True)


def _per_class_panel(ax: Axes, runs: Sequence[RunData]) -> None:
    """Per-class accuracy against the class's training count (log scale when counts span 10x)."""
    counts_seen: list[float] = []
    for i, run in enumerate(runs):
        pairs = [(n, a) for n, a in zip(run.class_counts, run.final_list("class_acc"))
                 if n is not None and a is not None]
        if pairs:
            ax.scatter([n for n, _ in pairs], [100 * a for _, a in pairs], color=_color(i), s=22, alpha=0.8,
                       label=run.label)
            counts_seen += [n for n, _ in pairs]
    if not counts_seen:
        _no_data(ax, "per-class accuracy with class counts")
        return
    positive = [n for n in counts_seen if n > 0]
    if positive and len(positive) == len(counts_seen) and max(positive) >= 10 * min(positive):
        ax.set_xscale("log")
    ax.set(xlabel="training examples of the class", ylabel="accuracy (%)", ylim=(-3, 103),
           title="per-class accuracy vs class count")
    ax.grid(alpha=0.3)
    _legend(ax, below=True)


def groups_png(runs: Sequence[RunData]) -> bytes | None:
    """Class-group accuracy (grouped bars) and per-class accuracy vs training class count (scatter)."""
    has_groups = bool(_group_series(runs))
    has_classes = any(run.final_list("class_acc") and run.class_counts for run in runs)
    if not (has_groups or has_classes):
        return None
    fig = _figure(11, 4)
    ax_groups, ax_classes = fig.subplots(1, 2)
    _groups_panel(ax_groups, runs)
    _per_class_panel(ax_classes, runs)
    return _png(fig)


# --- (4) partition -----------------------------------------------------------


def _class_colors(num_classes: int) -> np.ndarray:
    """One RGBA colour per class: qualitative up to 20 classes, viridis beyond."""
    if num_classes <= 20:
        cmap = matplotlib.colormaps["tab10" if num_classes <= 10 else "tab20"]
        return np.array([cmap(c) for c in range(num_classes)])
    return matplotlib.colormaps["viridis"](np.linspace(0.0, 1.0, num_classes))


def _stacked_rects(counts: np.ndarray, width: float = 0.85) -> tuple[np.ndarray, np.ndarray]:
    """Rectangles (n, 4, 2) of a clients x classes stacked bar chart and the class of each.

    One :class:`~matplotlib.collections.PolyCollection` draws them all: with
    100 classes x 50 clients, one ``ax.bar`` per class is seconds slower.
    """
    tops = counts.cumsum(axis=1)
    client, cls = np.nonzero(counts > 0)
    x0, x1 = client - width / 2, client + width / 2
    y0, y1 = tops[client, cls] - counts[client, cls], tops[client, cls]
    corners = [(x0, y0), (x0, y1), (x1, y1), (x1, y0)]
    rects = np.stack([np.stack(corner, axis=1) for corner in corners], axis=1)
    return rects, cls


def partition_png(run: RunData) -> bytes | None:
    """Stacked bars of each client's class counts (the first :data:`MAX_HIST_CLIENTS` clients)."""
    hist = run.label_hist
    if not hist:
        return None
    shown = hist[:MAX_HIST_CLIENTS]
    num_classes = max(max(len(row) for row in shown), 1)
    counts = np.zeros((len(shown), num_classes))
    for k, row in enumerate(shown):
        counts[k, : len(row)] = row
    colors = _class_colors(num_classes)
    rects, cls = _stacked_rects(counts)
    fig = _figure(min(4.5 + 0.2 * len(shown), 14), 4)
    ax = fig.subplots()
    ax.add_collection(PolyCollection(list(rects), facecolors=colors[cls], linewidths=0))
    ax.set_xlim(-0.6, len(shown) - 0.4)
    ax.set_ylim(0, max(float(counts.sum(axis=1).max()), 1.0) * 1.04)
    first = f"first {len(shown)} of {len(hist)} clients" if len(hist) > len(shown) else f"{len(hist)} clients"
    ax.set(xlabel="client", ylabel="training examples",
           title=f"{run.partition_name or 'partition'}: {first}, {num_classes} classes")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if num_classes <= 20:
        handles = [Patch(color=colors[c], label=str(c)) for c in range(num_classes)]
        ax.legend(handles=handles, title="class", fontsize="x-small", ncols=2 if num_classes > 10 else 1,
                  loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    else:
        mappable = ScalarMappable(Normalize(0, num_classes - 1), matplotlib.colormaps["viridis"])
        fig.colorbar(mappable, ax=ax, label="class")
    return _png(fig)


# --- all plots of a report ---------------------------------------------------


def _partition_groups(runs: Sequence[RunData]) -> list[list[RunData]]:
    """Runs grouped by identical partition histograms (so a shared partition is drawn once)."""
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        if run.label_hist:
            groups.setdefault(json.dumps(run.label_hist), []).append(run)
    return list(groups.values())


def _safe_key(text: str) -> str:
    """``text`` reduced to characters that are safe in a file name."""
    return "".join(ch if ch.isascii() and (ch.isalnum() or ch in "-_.") else "_" for ch in text)[:80] or "run"


def make_plots(runs: Sequence[RunData]) -> list[Plot]:
    """Every plot the runs have data for, in page order."""
    plots: list[Plot] = []
    several = len(runs) > 1

    def add(key: str, title: str, caption: str, png: bytes | None) -> None:
        if png is not None:
            plots.append(Plot(key, title, caption, png))

    add("curves", "Training curves", "Test accuracy (eval rounds) and train loss per round"
        + (", runs overlaid." if several else "."), curves_png(runs))
    add("client_acc", "Per-client accuracy", "Personalized accuracy of each client at the final evaluation, "
        "sorted; the dashed line is the mean over clients with a test set.", client_acc_png(runs))
    add("groups", "Accuracy by class group", "Left: accuracy on many/medium/few-shot and head/middle/tail "
        "classes. Right: each class's accuracy against its number of training examples.", groups_png(runs))
    for k, group in enumerate(_partition_groups(runs)):
        names = ", ".join(run.name for run in group)
        key = "partition" if not several else f"partition-{k + 1}-{_safe_key(group[0].name)}"
        caption = f"Class counts per client (stacked), training split. Run(s): {names}."
        add(key, f"Partition ({names})" if several else "Partition", caption, partition_png(group[0]))
    return plots
