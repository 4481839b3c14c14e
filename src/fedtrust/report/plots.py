"""The report's plots, each a function of the runs that returns PNG bytes (or None: nothing to draw).

Figures are built with :class:`matplotlib.figure.Figure` on an explicit
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg`: the Agg backend is
chosen per figure, never through ``pyplot``, so writing a report neither
touches the user's global backend nor leaks figures. Runs get one colour each
(``tab10`` order) in every plot; within a run, extra predictors get dashed
and dotted lines. Accuracies are drawn in percent.

The OOD section's plots (score histograms, ROC curves, reliability diagram)
draw the final evaluation's per-sample scores (``eval_scores.npz``); there,
inside a run's panels, colours tell the ID set, OOD sets and scores apart,
and several runs are stacked as rows (or panels) of one figure. ROC curves
come from :func:`sklearn.metrics.roc_curve`; reliability bins from
:func:`fedtrust.ood.metrics.calibration`, the function ``ece`` uses.
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
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, StrMethodFormatter

from fedtrust.ood.metrics import Calibration, calibration
from fedtrust.report.data import as_float

if TYPE_CHECKING:
    from fedtrust.report.data import EvalScoresData, FlipMasks, RunData

__all__ = [
    "MAX_HIST_CLIENTS",
    "Plot",
    "RocCurve",
    "client_acc_png",
    "curves_png",
    "flip_masks_png",
    "groups_png",
    "make_plots",
    "ood_hist_png",
    "partition_png",
    "predictor_width",
    "reliability",
    "reliability_png",
    "robust_png",
    "roc_curves",
    "roc_png",
    "score_label",
    "width_png",
]

MAX_HIST_CLIENTS = 50  # the partition histogram shows at most this many clients
DPI = 100
LINESTYLES = ("-", "--", ":", "-.")
GROUPS = (("group_acc", ("many", "medium", "few")), ("hmt_acc", ("head", "middle", "tail")))
HIST_BINS = 40
SCORE_LABELS = {"msp": "MSP", "maxlogit": "MaxLogit", "energy": "Energy (−E, T = 1)", "rn": "RN (‖z‖₂)"}


@dataclass(frozen=True)
class Plot:
    """A rendered plot: ``key`` names its PNG file, ``title`` and ``caption`` go into the page.

    ``section`` says where the page shows it: ``"plots"`` (training) or ``"ood"``
    (OOD detection, calibration and class groups).
    """

    key: str
    title: str
    caption: str
    png: bytes
    section: str = "plots"


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


def backdoor_png(runs: Sequence[RunData]) -> bytes | None:
    """Attack success rate and clean accuracy per evaluated round, runs side by side (two panels); dashed:
    the same under FLIP's τ-rejection (``asr_tau``, ``acc_tau``) where the run has them. None without ASR."""
    if not any(run.series("asr")[0] for run in runs):
        return None
    fig = _figure(11, 4)
    ax_asr, ax_acc = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        for ax, key, tau_key in ((ax_asr, "asr", "asr_tau"), (ax_acc, "test_acc", "acc_tau")):
            for k, style, suffix in ((key, "-", ""), (tau_key, "--", " · τ-rejection")):
                rounds, values = run.series(k)
                if rounds and run.series("asr")[0]:
                    ax.plot(rounds, _pct(values), color=_color(i), linestyle=style, marker="o" if len(rounds) <= 40
                            else None, markersize=3, label=run.label + suffix)
    for ax, what in ((ax_asr, "attack success rate"), (ax_acc, "clean accuracy")):
        ax.set(xlabel="round", ylabel=f"{what} (%)", title=f"{what} per round", ylim=(-2, 102))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        _legend(ax)
    return _png(fig)


def predictor_width(name: str) -> float | None:
    """The width of a width predictor (``"x0.25"`` → 0.25: Split-Mix's mixed models, HeteroFL's slices), else
    None."""
    if not name.startswith("x"):
        return None
    try:
        width = float(name[1:])
    except ValueError:
        return None
    return width if 0 < width <= 1 else None


def _width_points(run: RunData) -> list[tuple[float, float, float | None]]:
    """(width, final accuracy, MACs or None) of each width predictor of ``run``, narrowest first."""
    points = []
    for name in run.predictors:
        width, acc = predictor_width(name), run.final_value("test_acc", name)
        if width is not None and acc is not None:
            cost = run.final_raw("cost", name)
            macs = as_float(cost.get("macs")) if isinstance(cost, dict) else None
            points.append((width, acc, macs))
    return sorted(points)


def width_png(runs: Sequence[RunData]) -> bytes | None:
    """Final accuracy against model width (left) and against the MACs of one forward pass (right, where the
    run has the ``cost`` evaluator), one line per run over its width predictors. None when no run has two
    width predictors."""
    lines = [(i, run, _width_points(run)) for i, run in enumerate(runs)]
    lines = [(i, run, pts) for i, run, pts in lines if len(pts) > 1]
    if not lines:
        return None
    fig = _figure(11, 4)
    ax_w, ax_m = fig.subplots(1, 2)
    for i, run, pts in lines:
        widths, accs, macs = zip(*pts)
        ax_w.plot(widths, _pct(accs), color=_color(i), marker="o", markersize=4, label=run.label)
        if all(m is not None for m in macs):
            ax_m.plot(macs, _pct(accs), color=_color(i), marker="o", markersize=4, label=run.label)
    ax_w.set_xscale("log", base=2)
    ticks = sorted({w for _, _, pts in lines for w, _, _ in pts})
    ax_w.set_xticks(ticks, [f"{w:g}" for w in ticks])
    ax_w.xaxis.set_minor_formatter(NullFormatter())
    ax_w.set(xlabel="width (predictor x<w>)", ylabel="test accuracy (%)", title="accuracy per width")
    ax_w.grid(alpha=0.3)
    _legend(ax_w)
    if ax_m.lines:
        ax_m.set_xscale("log")
        ax_m.set(xlabel="MACs of one forward pass (torch.utils.flop_counter)", ylabel="test accuracy (%)",
                 title="accuracy per cost")
        ax_m.grid(alpha=0.3)
        _legend(ax_m)
    else:
        _no_data(ax_m, "cost (eval metric `cost`)")
    return _png(fig)


def _robust_sweeps(run: RunData) -> list[tuple[str | None, dict]]:
    """(predictor, ``robust`` record) of the final evaluation: the flat one, else each predictor's."""
    names: list[str | None] = [None, *run.predictors]
    out = []
    for name in names:
        sweep = run.final_raw("robust", name)
        if isinstance(sweep, dict) and sweep.get("mu") and (name is not None or not run.predictors):
            out.append((name, sweep))
    return out


def robust_png(runs: Sequence[RunData]) -> bytes | None:
    """Robust (white-box PGD) against clean accuracy at the final evaluation, one line per (run, predictor)
    through the test-time dual-BN mixes μ (each point labelled with its μ): the trade-off one training buys
    (Split-Mix spec §4). None without a ``robust_acc`` evaluation."""
    sweeps = [(i, run, name, sw) for i, run in enumerate(runs) for name, sw in _robust_sweeps(run)]
    if not sweeps:
        return None
    fig = _figure(6.5, 5)
    ax = fig.subplots()
    for j, (i, run, name, sw) in enumerate(sweeps):
        clean, robust = _pct(_float_values(sw.get("clean_acc"))), _pct(_float_values(sw.get("robust_acc")))
        mus = sw["mu"]
        label = run.label + (f" · {name}" if name else "")
        ax.plot(clean, robust, color=_color(i), linestyle=LINESTYLES[j % len(LINESTYLES)], marker="o",
                markersize=4, label=label)
        for c, r, mu in zip(clean, robust, mus):
            if mu is not None and math.isfinite(c) and math.isfinite(r):
                ax.annotate(f"μ={mu:g}", (c, r), textcoords="offset points", xytext=(4, 4), fontsize="x-small",
                            color=_color(i))
    eps = as_float(sweeps[0][3].get("eps"))
    steps = sweeps[0][3].get("steps")
    ax.set(xlabel="clean accuracy (%)", ylabel="PGD accuracy (%)",
           title=f"robust vs clean accuracy per μ (PGD-{steps}, ε = {eps:.3g})" if eps is not None else
           "robust vs clean accuracy per μ")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _png(fig)


def _float_values(values: object) -> list[float]:
    return [v if v is not None else math.nan for v in (as_float(x) for x in values)] if isinstance(values, list) else []


def _mask_panel(ax: Axes, image: np.ndarray, title: str) -> None:
    """One mask as a grayscale image on a fixed [0, 1] scale (white = 1), no ticks."""
    ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(title, fontsize="small")
    ax.set_xticks([])
    ax.set_yticks([])


def flip_mask_title(source: int, target: int, clients: int, l1: float) -> str:
    """The title of a pair's panel: the pair, how many clients hold it, and the mean mask's L1."""
    return f"{source}→{target} · {clients} client{'s' if clients != 1 else ''}\nL1 {l1:.1f}"


def flip_masks_png(runs: Sequence[RunData]) -> bytes | None:
    """FLIP's inverted masks toward the attack's target next to the real trigger: one row per FLIP run with
    masks; the first panel is the trigger's pixels, then the mean mask of each pair (s, t). None without."""
    shown = [run for run in runs if run.flip_masks is not None]
    if not shown:
        return None
    cols = 1 + max(max(len(run.flip_masks.pairs) for run in shown if run.flip_masks), 1)
    fig, axes = _grid(len(shown), cols, 1.45, 1.75)
    for row, run in zip(axes, shown):
        fm: FlipMasks = run.flip_masks  # type: ignore[assignment]
        trig = fm.trigger.astype(np.float64)
        first = f"{run.label}\n" if len(shown) > 1 else ""
        _mask_panel(row[0], trig, f"{first}real trigger\n{int(trig.sum())} px")
        for ax, pair in zip(row[1:], fm.pairs):
            _mask_panel(ax, pair.mask, flip_mask_title(pair.source, fm.target, pair.clients, pair.l1))
        if not fm.pairs:
            _no_data(row[1], f"mask toward {fm.target}")
        for ax in row[1 + max(len(fm.pairs), 1):]:
            ax.set_visible(False)
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
        ax.set_xscale("log")  # ticks at 1, 2, 5 x 10^k, written as plain numbers (no crowded 3x10^1 labels)
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
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


# --- (5) OOD scores: histograms, ROC curves, reliability ------------------------


def score_label(name: str) -> str:
    """How plots name a score: ``MSP``, ``RN (‖z‖₂)``, ...; an unknown score keeps its name."""
    return SCORE_LABELS.get(name, name)


def _finite(values: np.ndarray) -> np.ndarray:
    """The finite entries of ``values`` (a non-finite score cannot be binned or ranked)."""
    return values[np.isfinite(values)]


@dataclass(frozen=True)
class RocCurve:
    """The ROC curve of one score on one OOD set, OOD as the positive class.

    ``fpr``: fraction of ID test images flagged as OOD; ``tpr``: fraction of
    OOD images detected, both as the threshold on ``−score`` falls.
    """

    ood_set: str
    ood_label: str
    score: str
    fpr: np.ndarray
    tpr: np.ndarray
    auroc: float

    @property
    def label(self) -> str:
        """The legend entry: score and AUROC in percent (as the report's tables print it)."""
        return f"{score_label(self.score)}: AUROC {100 * self.auroc:.2f}%"


def roc_curves(scores: EvalScoresData) -> list[RocCurve]:
    """Every (OOD set, score) ROC curve of a run, from :func:`sklearn.metrics.roc_curve`.

    The labels are y = 1 for OOD and the ranking is ``−score`` (spec rna.md §4),
    so the area equals the ``ood["<set>/<score>"]["auroc"]`` of metrics.jsonl.
    """
    from sklearn.metrics import auc, roc_curve

    curves = []
    for ood in scores.ood:
        for name in scores.score_names:
            s_id, s_ood = _finite(scores.id_scores[name]), _finite(ood.scores[name])
            if not (s_id.size and s_ood.size):
                continue
            y = np.r_[np.zeros(s_id.size), np.ones(s_ood.size)]
            fpr, tpr, _ = roc_curve(y, -np.r_[s_id, s_ood])
            curves.append(RocCurve(ood.name, ood.label, name, fpr, tpr, float(auc(fpr, tpr))))
    return curves


def reliability(scores: EvalScoresData) -> Calibration:
    """Reliability-diagram bins and ECE of the ID test predictions (``ece``'s own function and bins)."""
    return calibration(scores.confidence, scores.correct)


def _ood_runs(runs: Sequence[RunData]) -> list[tuple[int, RunData, EvalScoresData]]:
    """(run index, run, scores) of the runs with per-sample scores on at least one OOD set."""
    return [(i, run, run.eval_scores) for i, run in enumerate(runs)
            if run.eval_scores is not None and run.eval_scores.ood and run.eval_scores.score_names]


def _grid(rows: int, cols: int, width: float, height: float) -> tuple[Figure, np.ndarray]:
    """A figure of ``rows`` x ``cols`` panels of ``width`` x ``height`` inches each."""
    fig = _figure(width * cols, height * rows)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _row_title(ax: Axes, run: RunData, what: str, several: bool) -> None:
    """A panel title: ``what``, preceded by the run's label when several runs share the figure."""
    ax.set_title(f"{run.label}\n{what}" if several else what, fontsize="medium")


def _clip_spike(ax: Axes, peaks: list[tuple[float, str, float]]) -> None:
    """Cap the y axis when one set's peak dwarfs the others (a spike would flatten them); label the cut peak.

    ``peaks`` holds (peak density, colour, x of the peak bin) per set.
    """
    if len(peaks) < 2:
        return
    ranked = sorted(peaks, reverse=True)
    top, second = ranked[0][0], ranked[1][0]
    if second <= 0 or top <= 3 * second:
        return
    cap = 1.6 * second
    ax.set_ylim(0, cap)
    for peak, color, x in ranked:
        if peak > cap:
            ax.annotate(f"↑ {peak:.3g}", (x, cap), xytext=(3, -3), textcoords="offset points", ha="left", va="top",
                        fontsize="small", color=color, fontweight="bold",
                        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1})


def _hist_panel(ax: Axes, run: RunData, scores: EvalScoresData, name: str) -> None:
    """Density histograms of score ``name``: ID test set vs each OOD set, on bins shared by all."""
    sets = [(f"ID: {run.dataset or 'test'} test set", _finite(scores.id_scores[name]), "0.3")]
    sets += [(ood.label, _finite(ood.scores[name]), _color(k)) for k, ood in enumerate(scores.ood)]
    pooled = np.concatenate([values for _, values, _ in sets])
    if not pooled.size:
        _no_data(ax, "finite score")
        return
    edges = np.histogram_bin_edges(pooled, bins=HIST_BINS)
    peaks = []
    for label, values, color in sets:
        if values.size:
            density, _, _ = ax.hist(values, bins=edges, density=True, histtype="stepfilled", color=color, alpha=0.3)
            ax.hist(values, bins=edges, density=True, histtype="step", color=color, linewidth=1.4,
                    label=f"{label} (n={values.size})")
            k = int(np.argmax(density))
            peaks.append((float(density[k]), color, float(edges[k])))
    _clip_spike(ax, peaks)
    ax.set(xlabel="score (higher = more in-distribution)", ylabel="density")
    ax.grid(alpha=0.3)


def ood_hist_png(runs: Sequence[RunData]) -> bytes | None:
    """Score histograms, ID vs each OOD set: one panel per score, one row per run with OOD scores."""
    shown = _ood_runs(runs)
    if not shown:
        return None
    cols = max(len(sc.score_names) for _, _, sc in shown)
    fig, axes = _grid(len(shown), cols, 4.4 if cols > 1 else 6.5, 3.6)
    for row, (_, run, sc) in zip(axes, shown):
        for c, ax in enumerate(row):
            if c >= len(sc.score_names):
                ax.set_visible(False)
                continue
            _hist_panel(ax, run, sc, sc.score_names[c])
            _row_title(ax, run, score_label(sc.score_names[c]), len(runs) > 1)
        row[0].legend(fontsize="small", framealpha=0.85, edgecolor="none", loc="best")
    return _png(fig)


def roc_png(runs: Sequence[RunData]) -> bytes | None:
    """ROC curves: one panel per OOD set, one curve per score (AUROC in the legend), one row per run."""
    shown = _ood_runs(runs)
    if not shown:
        return None
    cols = max(len(sc.ood) for _, _, sc in shown)
    fig, axes = _grid(len(shown), cols, 4.4, 4.2)
    for row, (_, run, sc) in zip(axes, shown):
        curves = roc_curves(sc)
        for c, ax in enumerate(row):
            if c >= len(sc.ood):
                ax.set_visible(False)
                continue
            ood = sc.ood[c]
            ax.plot([0, 1], [0, 1], color="0.6", linewidth=1, linestyle="--", label="chance (AUROC 50%)")
            for curve in curves:
                if curve.ood_set == ood.name:
                    j = sc.score_names.index(curve.score)  # styles differ too: identical curves stay visible
                    ax.plot(curve.fpr, curve.tpr, color=_color(j), linestyle=LINESTYLES[j % len(LINESTYLES)],
                            linewidth=2.4 - 0.4 * (j % 3), label=curve.label)
            ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), aspect="equal",
                   xlabel="ID test images flagged as OOD (FPR)", ylabel="OOD images detected (TPR)")
            _row_title(ax, run, f"ID vs {ood.label}", len(runs) > 1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small", framealpha=0.85, edgecolor="none", loc="lower right")
    return _png(fig)


def _reliability_panel(ax: Axes, ax_count: Axes, run: RunData, scores: EvalScoresData,
                       color: tuple[float, ...]) -> None:
    """Accuracy per confidence bin (bars) with the gap to the bin's mean confidence (hatched); counts below."""
    cal = reliability(scores)
    centers = 100 * (cal.edges[:-1] + cal.edges[1:]) / 2
    width = 100 * float(np.diff(cal.edges).min()) * 0.92
    full = cal.count > 0
    acc, conf = 100 * np.nan_to_num(cal.accuracy), 100 * np.nan_to_num(cal.confidence)
    ax.plot([0, 100], [0, 100], color="0.4", linewidth=1, linestyle="--", label="perfect calibration")
    ax.bar(centers[full], acc[full], width=width, color=color, alpha=0.85, label="accuracy of the bin")
    ax.bar(centers[full], (conf - acc)[full], bottom=acc[full], width=width, fill=False, edgecolor="0.15",
           hatch="////", linewidth=0.8, label="gap to its mean confidence")
    accuracy = float(scores.correct.mean())
    ax.set(xlim=(0, 100), ylim=(0, 100), ylabel="accuracy (%)")
    ax.set_title(f"{run.label}\nECE {100 * cal.ece:.2f}% · accuracy {100 * accuracy:.2f}%", fontsize="medium")
    ax.tick_params(labelbottom=False)
    ax.grid(alpha=0.3)
    ax_count.bar(centers, cal.count, width=width, color="0.55")
    ax_count.set(xlim=(0, 100), xlabel="confidence: max softmax (%)", ylabel="images")
    ax_count.yaxis.set_major_locator(MaxNLocator(nbins=3, integer=True))
    ax_count.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    ax_count.legend(handles, labels, fontsize="small", frameon=False, loc="upper center",
                    bbox_to_anchor=(0.5, -0.55), ncols=2)


def reliability_png(runs: Sequence[RunData]) -> bytes | None:
    """Reliability diagram of each run's final ID test predictions (one panel per run with scores)."""
    shown = [(i, run) for i, run in enumerate(runs) if run.eval_scores is not None and run.eval_scores.labels.size]
    if not shown:
        return None
    cols = min(len(shown), 3)
    rows = math.ceil(len(shown) / cols)
    fig = _figure(4.6 * cols, 5.4 * rows)
    axes = fig.subplots(2 * rows, cols, squeeze=False, sharex="col",
                        gridspec_kw={"height_ratios": [3.2, 1] * rows})
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        ax, ax_count = axes[2 * r, c], axes[2 * r + 1, c]
        if k < len(shown):
            i, run = shown[k]
            assert run.eval_scores is not None
            _reliability_panel(ax, ax_count, run, run.eval_scores, _color(i))
        else:
            ax.set_visible(False)
            ax_count.set_visible(False)
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


def _flip_caption(runs: Sequence[RunData]) -> str:
    """Per run with FLIP masks: the checkpoint's round, the benign clients with FLIP state, the sources found."""
    parts = []
    for run in runs:
        fm = run.flip_masks
        if fm is not None:
            at = f"round {fm.round}" if fm.round is not None else "the last checkpoint"
            left = f", attackers {', '.join(map(str, fm.excluded))} left out" if fm.excluded else ""
            parts.append(f" {run.name}: {at}, {fm.clients} benign clients with FLIP state, {fm.num_sources} "
                         f"source(s) with a mask toward {fm.target}{left}.")
    return "".join(parts)


def make_plots(runs: Sequence[RunData]) -> list[Plot]:
    """Every plot the runs have data for, in page order."""
    plots: list[Plot] = []
    several = len(runs) > 1

    def add(key: str, title: str, caption: str, png: bytes | None, section: str = "plots") -> None:
        if png is not None:
            plots.append(Plot(key, title, caption, png, section))

    add("curves", "Training curves", "Test accuracy (eval rounds) and train loss per round"
        + (", runs overlaid." if several else "."), curves_png(runs))
    add("backdoor", "Backdoor", "Attack success rate (stamped non-target test images predicted as the target) "
        "and clean accuracy per evaluated round; dashed: counting only predictions whose top-1 probability "
        "reaches the rejection threshold τ (FLIP), where set.", backdoor_png(runs))
    add("flip_masks", "FLIP inverted masks", "Left: the pixels the attack's full test trigger sets (white). Then, "
        "for the attack's target class t, the mask m = tanh(a)/2 + 1/2 of each pair s→t cached in the benign "
        "clients' FLIP state in checkpoint.safetensors (the pair's last inversion: its best mask when τ_inv was "
        "reached, else its last step), averaged over the clients that hold the pair (their count above each "
        "panel), with the mean's L1; at most 9 sources, those with the smallest L1. Black 0, white "
        "1." + _flip_caption(runs), flip_masks_png(runs))
    add("width", "Accuracy per width", "Final test accuracy of each width predictor (Split-Mix's mixed models of "
        "the first w/r bases, HeteroFL's width-w slices) against its width and against the MACs of one forward "
        "pass (eval metric `cost`), one line per run.", width_png(runs))
    add("robust", "Robustness trade-off", "Final evaluation: accuracy under white-box L∞ PGD against clean "
        "accuracy for each test-time dual-BN mix μ of `eval.robust.mus` (μ = 0 the clean BNs, 1 the adversarial "
        "ones), one line per run and predictor: one training, every robustness level.", robust_png(runs))
    add("client_acc", "Per-client accuracy", "Personalized accuracy of each client at the final evaluation, "
        "sorted; the dashed line is the mean over clients with a test set.", client_acc_png(runs))
    for k, group in enumerate(_partition_groups(runs)):
        names = ", ".join(run.name for run in group)
        key = "partition" if not several else f"partition-{k + 1}-{_safe_key(group[0].name)}"
        caption = f"Class counts per client (stacked), training split. Run(s): {names}."
        add(key, f"Partition ({names})" if several else "Partition", caption, partition_png(group[0]))
    rows = " Rows: runs." if len(_ood_runs(runs)) > 1 else ""
    add("ood_hist", "OOD score histograms", "Final evaluation, primary predictor: density of each score on the "
        "ID test set and on each OOD test set, on bins shared within a panel (higher = more "
        f"in-distribution).{rows}", ood_hist_png(runs), "ood")
    add("ood_roc", "ROC curves", "OOD as the positive class, ranked by the negated score: x is the fraction of "
        "ID test images flagged as OOD, y the fraction of OOD images detected; the legend gives each score's "
        f"AUROC (the table's number, from the same scores).{rows}", roc_png(runs), "ood")
    add("reliability", "Reliability diagram", "Final evaluation, primary predictor, ID test set: accuracy per "
        "confidence bin (15 equal-width bins of the max softmax, the bins of ECE), hatched: the gap to the "
        "bin's mean confidence; the dashed diagonal is perfect calibration. Below: test images per bin.",
        reliability_png(runs), "ood")
    add("groups", "Accuracy by class group", "Left: accuracy on many/medium/few-shot and head/middle/tail "
        "classes. Right: each class's accuracy against its number of training examples.", groups_png(runs), "ood")
    return plots
