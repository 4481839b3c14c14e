"""The report's Privacy section plots: leakage risk over rounds, and ``fedtrust audit``'s reconstructions
beside the originals and its I2F lower bound against the attack's error.

Built with the same Agg-only figure helpers as :mod:`fedtrust.report.plots` (no pyplot).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.ticker import MaxNLocator

from fedtrust.report.plots import LINESTYLES, Plot, _color, _figure, _grid, _legend, _png

if TYPE_CHECKING:
    from fedtrust.report.data import AuditData, RunData

MAX_AUDIT_ROWS = 12  # reconstructions shown per run


def leakage_png(runs: Sequence[RunData]) -> bytes | None:
    """The ``leakage`` evaluator's I_lb per evaluated round (log scale): mean over probes (solid) and the
    riskiest probe (dashed), runs overlaid. None when no run recorded it."""
    if not any(run.leakage_series()[0] for run in runs):
        return None
    fig = _figure(6.5, 4)
    ax = fig.subplots()
    for i, run in enumerate(runs):
        for key, style, what in (("i2f_lb", LINESTYLES[0], "mean"), ("i2f_lb_min", LINESTYLES[1], "min")):
            rounds, values = run.leakage_series(key)
            positive = [(r, v) for r, v in zip(rounds, values) if v > 0]
            if positive:
                ax.plot(*zip(*positive), color=_color(i), linestyle=style, marker="o", markersize=3,
                        label=f"{run.label} · {what}")
    ax.set(xlabel="round", ylabel="I2F lower bound ‖Jδ‖ / λmax", yscale="log",
           title="leakage risk per round (smaller: riskier)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, which="both")
    _legend(ax)
    return _png(fig)


def _attacked(audit: AuditData) -> list[dict]:
    return [r for r in audit.rows if r.get("recon") is not None and r["recon"] in audit.reconstructions]


def audit_recon_png(runs: Sequence[RunData]) -> bytes | None:
    """For each audited run, up to :data:`MAX_AUDIT_ROWS` attacked targets: the original images then the
    attack's reconstructions (grayscale or RGB, [0, 1]), titled with client, defense and PSNR."""
    panels: list[tuple[str, np.ndarray, np.ndarray]] = []
    for run in runs:
        if run.audit is None:
            continue
        for r in _attacked(run.audit)[:MAX_AUDIT_ROWS]:
            psnr = r.get("psnr")
            title = f"{run.label + ' · ' if len(runs) > 1 else ''}client {r['client']} · {r['defense']}"
            title += f"\nPSNR {psnr:.1f} dB" if isinstance(psnr, (int, float)) else "\nno reconstruction"
            panels.append((title, run.audit.originals[r["recon"]], run.audit.reconstructions[r["recon"]]))
    if not panels:
        return None
    batch = max(p[1].shape[0] for p in panels)
    per_row = max(1, 8 // (2 * batch))  # targets side by side, each as originals then reconstructions
    rows = -(-len(panels) // per_row)
    fig, axes = _grid(rows, per_row * 2 * batch, 1.15, 1.55)
    for ax in axes.flat:
        ax.set_visible(False)
    for n, (title, x0, xhat) in enumerate(panels):
        row, first = axes[n // per_row], (n % per_row) * 2 * batch
        for j in range(2 * batch):
            k, recon = j % batch, j >= batch
            if k >= x0.shape[0]:
                continue
            ax = row[first + j]
            ax.set_visible(True)
            ax.set_xticks([])
            ax.set_yticks([])
            image = (xhat if recon else x0)[k]
            shown = image[0] if image.shape[0] == 1 else np.transpose(image, (1, 2, 0))
            ax.imshow(np.nan_to_num(shown, nan=0.0), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xlabel("reconstructed" if recon else "original", fontsize="x-small")
            if j == 0:
                ax.set_title(title, fontsize="x-small", loc="left")
    return _png(fig)


def audit_scatter_png(runs: Sequence[RunData]) -> bytes | None:
    """The audit's I_lb against the attack's error ‖x̂ − x0‖₂ (model-input space), log-log, one colour per
    defense; the dashed diagonal is error = I_lb (an attack near the linearised optimum lies above it).
    Rows without a defense (I_lb = 0) cannot be drawn on a log axis and are left out."""
    points: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        if run.audit is None:
            continue
        for r in run.audit.rows:
            lb, err = r.get("i2f_lb"), r.get("l2_error")
            if isinstance(lb, (int, float)) and isinstance(err, (int, float)) and lb > 0 and err > 0:
                points.setdefault(str(r.get("defense")), []).append((float(lb), float(err)))
    values = [v for pts in points.values() for p in pts for v in p]
    if not points or not all(math.isfinite(v) for v in values):
        return None
    fig = _figure(5.5, 4.2)
    ax = fig.subplots()
    for i, (defense, pts) in enumerate(sorted(points.items())):
        xs, ys = zip(*pts)
        ax.scatter(xs, ys, color=_color(i), s=18, label=defense)
    lo, hi = min(values) / 2, max(values) * 2
    ax.plot([lo, hi], [lo, hi], color="0.4", linestyle="--", linewidth=1, label="error = I_lb")
    ax.set(xscale="log", yscale="log", xlabel="I2F lower bound ‖Jδ‖ / λmax", ylabel="attack error ‖x̂ − x0‖₂",
           title="predicted risk vs attack error")
    ax.grid(alpha=0.3, which="both")
    _legend(ax)
    return _png(fig)


def privacy_plots(runs: Sequence[RunData]) -> list[Plot]:
    """The Privacy section's plots the runs have data for."""
    plots = []
    for key, title, caption, png in (
            ("leakage", "Leakage risk over rounds", "The leakage evaluator's I2F lower bound I_lb = ‖Jδ‖/λmax(JJᵀ) "
             "of its fixed test probes at each evaluation (δ = σ·ξ, σ = eval.leakage_sigma): solid the mean over "
             "probes, dashed the riskiest probe. Lower: an attacker can get closer to the sample.", leakage_png(runs)),
            ("audit_recon", "Audit: reconstructions", "fedtrust audit: each attacked target's original images "
             "(left) and the attack's best reconstruction from the defended target (right), in [0, 1] pixels.",
             audit_recon_png(runs)),
            ("audit_scatter", "Audit: I2F against attack error", "Each audited target with a defense: its I2F "
             "lower bound against the attack's L2 error in model-input space, both log scale; the dashed line is "
             "error = I_lb.", audit_scatter_png(runs))):
        if png is not None:
            plots.append(Plot(key, title, caption, png, "privacy"))
    return plots
