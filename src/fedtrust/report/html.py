"""The report page: one self-contained HTML file (inline CSS, plots as base64 ``data:`` URIs, no scripts).

Every string that comes from a run's files (names, config values, notes) goes
through :func:`html.escape`; numbers are formatted here. A value that is not
recorded shows as an em dash.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import TYPE_CHECKING

import yaml

from fedtrust.report.data import as_float

if TYPE_CHECKING:
    from fedtrust.report.data import RunData
    from fedtrust.report.plots import Plot

__all__ = ["fmt_duration", "fmt_pct", "render_html"]

MISSING = "—"

CSS = """
:root { color-scheme: light; }
body { font: 16px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1f2328; background: #fff; max-width: 1120px; margin: 2rem auto; padding: 0 1.25rem; }
h1 { font-size: 1.7rem; margin-bottom: .2rem; }
h2 { font-size: 1.25rem; margin-top: 2.2rem; border-bottom: 1px solid #d8dee4; padding-bottom: .3rem; }
h3 { font-size: 1.05rem; margin-top: 1.4rem; }
.sub { color: #59636e; margin-top: 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .93rem; }
th, td { padding: .38rem .75rem; border-bottom: 1px solid #d8dee4; text-align: left; vertical-align: top; }
th { background: #f6f8fa; font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody tr:hover { background: #f6f8fa; }
figure { margin: 1.2rem 0 2rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; border-radius: 4px; }
figcaption { color: #59636e; font-size: .9rem; margin-top: .35rem; }
.notes { background: #fff8c5; border-left: 4px solid #d4a72c; padding: .6rem 1rem; border-radius: 4px; }
.notes ul { margin: .3rem 0; padding-left: 1.2rem; }
details { margin: .6rem 0; }
summary { cursor: pointer; font-weight: 600; }
pre { background: #f6f8fa; padding: .8rem 1rem; overflow: auto; font-size: .82rem; border-radius: 4px; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
footer { margin-top: 3rem; color: #59636e; font-size: .85rem; }
"""


# --- formatting --------------------------------------------------------------


def esc(value: object) -> str:
    """Any value as escaped HTML text."""
    return html.escape(str(value), quote=True)


def fmt_pct(value: float | None, digits: int = 2) -> str:
    """A fraction as a percentage, e.g. ``0.8731`` -> ``87.31%``; None -> em dash."""
    return MISSING if value is None else f"{100 * value:.{digits}f}%"


def fmt_num(value: float | None, digits: int = 4) -> str:
    """A plain number with ``digits`` decimals; None -> em dash."""
    return MISSING if value is None else f"{value:.{digits}f}"


def fmt_sig(value: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant figures (``0.00262``, ``1.52e-04``); None or NaN -> em dash."""
    return MISSING if value is None or value != value else f"{value:.{digits}g}"


def fmt_duration(seconds: float | None) -> str:
    """Seconds as ``12.3 s``, ``4 min 05 s`` or ``2 h 03 min``; None -> em dash."""
    if seconds is None:
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _fmt_metric(value: float | None) -> str:
    """A metric that is usually a fraction (AUROC, FPR95): percent inside [0, 1], plain otherwise."""
    return fmt_pct(value) if value is None or 0.0 <= value <= 1.0 else fmt_num(value)


def _rounds(run: RunData) -> str:
    """Rounds done, with the planned total when the run stopped early."""
    done, planned = run.rounds_done, run.rounds_planned
    if done is None:
        return MISSING if planned is None else f"0 / {planned}"
    return f"{done} / {planned}" if planned is not None and planned != done else str(done)


def _table(headers: Sequence[str], rows: Sequence[Sequence[tuple[str, bool]]]) -> str:
    """An HTML table; each cell is (already escaped HTML, is numeric)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "\n".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if num else f"<td>{c}</td>" for c, num in row) + "</tr>"
        for row in rows
    )
    return f'<div class="scroll"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table></div>'


# --- sections ----------------------------------------------------------------


def _summary_section(runs: Sequence[RunData]) -> str:
    """The summary table: one row per run."""
    headers = ["run", "algorithm", "dataset", "partition", "rounds", "final test acc",
               "best test acc (round)", "mean client acc", "wall time"]
    rows = []
    for run in runs:
        best = run.best
        rows.append([
            (esc(run.name), False),
            (esc(run.algorithm or MISSING), False),
            (esc(run.dataset or MISSING), False),
            (esc(run.partition_name or MISSING), False),
            (esc(_rounds(run)), True),
            (esc(fmt_pct(run.final_value("test_acc"))), True),
            (esc(MISSING if best is None else f"{fmt_pct(best[0])} ({best[1]})"), True),
            (esc(fmt_pct(run.client_acc_mean())), True),
            (esc(fmt_duration(run.wall_time_s)), True),
        ])
    return "<h2>Summary</h2>\n" + _table(headers, rows)


def _notes_section(runs: Sequence[RunData]) -> str:
    """What was missing or skipped in each run directory (empty when nothing was)."""
    items = [f"<li><strong>{esc(run.name)}</strong>: {esc(note)}</li>" for run in runs for note in run.notes]
    if not items:
        return ""
    return '<h2>Missing or skipped data</h2>\n<div class="notes"><ul>\n' + "\n".join(items) + "\n</ul></div>"


def _predictor_section(runs: Sequence[RunData]) -> str:
    """Final metrics of every predictor, for runs that evaluate several (empty otherwise)."""
    headers = ["run", "predictor", "test acc", "test loss", "mean client acc", "many", "medium", "few"]
    rows = []
    for run in runs:
        predictors = run.predictors if len(run.predictors) > 1 else []
        for pred in predictors:
            groups = run.final_mapping("group_acc", pred)
            rows.append([(esc(run.name), False), (esc(pred), False),
                         (esc(fmt_pct(run.final_value("test_acc", pred))), True),
                         (esc(fmt_num(run.final_value("test_loss", pred))), True),
                         (esc(fmt_pct(run.client_acc_mean(pred))), True)]
                        + [(esc(fmt_pct(groups.get(g))), True) for g in ("many", "medium", "few")])
    if not rows:
        return ""
    return "<h2>Predictors (final evaluation)</h2>\n" + _table(headers, rows)


def _ood_key(run: RunData, key: str) -> tuple[str, str]:
    """A metrics.jsonl ``ood`` key ``"<set>/<score>"`` as (set name as the report shows it, score)."""
    from fedtrust.report.data import ood_label

    set_name, _, score = key.rpartition("/")
    if not set_name:  # a key without a score part
        set_name, score = key, MISSING
    sc = run.eval_scores
    titles = {o.name: o.title for o in sc.ood} if sc is not None else {}
    return ood_label(set_name, titles.get(set_name)), score


def _ood_table(runs: Sequence[RunData]) -> str:
    """OOD detection metrics of the final evaluation, one row per run, OOD set and score (empty if none)."""
    metric_names: list[str] = []
    for run in runs:
        for values in run.final_ood.values():
            metric_names += [m for m in values if m not in metric_names]
    if not metric_names:
        return ""
    rows = [
        [(esc(run.name), False), *((esc(part), False) for part in _ood_key(run, key))]
        + [(esc(_fmt_metric(values.get(m))), True) for m in metric_names]
        for run in runs
        for key, values in run.final_ood.items()
    ]
    return _table(["run", "OOD set", "score", *metric_names], rows)


def _ood_notes(runs: Sequence[RunData]) -> str:
    """One line per run that has no per-sample OOD scores, saying why."""
    items = []
    for run in runs:
        if run.scores_note is not None:
            items.append(f"<li><strong>{esc(run.name)}</strong>: {esc(run.scores_note)}</li>")
        elif run.eval_scores is not None and not run.eval_scores.ood:
            items.append(f"<li><strong>{esc(run.name)}</strong>: no OOD test sets (<code>eval.ood</code> is empty): "
                         "reliability diagram only</li>")
    return '<div class="notes"><ul>\n' + "\n".join(items) + "\n</ul></div>" if items else ""


def _ood_section(runs: Sequence[RunData], plots: Sequence[Plot], png_names: Mapping[str, str]) -> str:
    """OOD detection, calibration and class groups: metrics table, notes, then the section's plots."""
    parts = [_ood_table(runs), _ood_notes(runs)]
    parts += [_figure_html(p, png_names.get(p.key)) for p in plots if p.section == "ood"]
    body = "\n".join(part for part in parts if part)
    return "<h2>OOD detection, calibration and class groups (final evaluation)</h2>\n" + body if body else ""


def _audit_table(run: RunData) -> str:
    """One run's ``fedtrust audit`` rows: target, defense, I2F lower bound and the attack's errors."""
    audit = run.audit
    if audit is None or not audit.rows:
        return ""
    s = audit.settings
    cost = audit.cost
    head = (f"<p><b>{esc(run.label)}</b>: audit at round {esc(audit.round)}, target {esc(s.get('target'))}, "
            f"attack {esc(s.get('attack'))} ({esc(s.get('iterations'))} iterations, {esc(s.get('restarts'))} "
            f"restarts, labels given). Cost per row: I_lb {fmt_sig(as_float(cost.get('i2f_seconds_mean')))} s, "
            f"attack {fmt_sig(as_float(cost.get('attack_seconds_mean')))} s.</p>")
    headers = ["client", "samples", "defense", "I_lb", "λmax", "‖x̂−x0‖₂", "MSE", "PSNR (dB)", "SSIM"]
    rows = []
    for r in audit.rows:
        text = [esc(r.get("client")), esc(" ".join(map(str, r.get("samples") or []))), esc(r.get("defense"))]
        nums = [fmt_sig(as_float(r.get(k))) for k in ("i2f_lb", "lambda_max", "l2_error", "mse", "psnr", "ssim")]
        rows.append([(c, False) for c in text] + [(c, True) for c in nums])
    return head + "\n" + _table(headers, rows)


def _privacy_section(runs: Sequence[RunData], plots: Sequence[Plot], png_names: Mapping[str, str]) -> str:
    """Gradient leakage: the audit tables, then the leakage curve and the audit's figures; empty without any."""
    parts = [_audit_table(run) for run in runs]
    parts += [_figure_html(p, png_names.get(p.key)) for p in plots if p.section == "privacy"]
    body = "\n".join(part for part in parts if part)
    if not body:
        return ""
    intro = ("<p>How much a shared gradient reveals (spec i2f.md): the I2F lower bound ‖Jδ‖/λmax(JJᵀ) of the "
             "reconstruction error a gradient-inversion attacker can reach when the shared gradient carries the "
             "perturbation δ (smaller: riskier; 0 without a defense), and, where <code>fedtrust audit</code> ran "
             "an attack, its reconstructions and errors. LPIPS is not computed (it needs pretrained weights).</p>")
    return "<h2>Privacy</h2>\n" + intro + "\n" + body


def _figure_html(plot: Plot, png_name: str | None) -> str:
    """A plot inlined as a base64 PNG, with its caption."""
    data = base64.b64encode(plot.png).decode("ascii")
    file_note = f" PNG: <code>{esc(png_name)}</code>." if png_name else ""
    return (
        f"<h3>{esc(plot.title)}</h3>\n<figure>\n"
        f'<img src="data:image/png;base64,{data}" alt="{esc(plot.title)}">\n'
        f"<figcaption>{esc(plot.caption)}{file_note}</figcaption>\n</figure>"
    )


def _plots_section(plots: Sequence[Plot], png_names: Mapping[str, str]) -> str:
    """The training plots (not the OOD section's), or a line saying there is nothing to draw."""
    shown = [p for p in plots if p.section == "plots"]
    if not shown:
        return "<h2>Plots</h2>\n<p>No plots: none of the runs recorded metrics or a partition yet.</p>"
    return "<h2>Plots</h2>\n" + "\n".join(_figure_html(p, png_names.get(p.key)) for p in shown)


def _config_section(runs: Sequence[RunData]) -> str:
    """Each run's directory and resolved config, folded."""
    parts = ["<h2>Runs</h2>"]
    for run in runs:
        config = (yaml.safe_dump(run.config, sort_keys=False, default_flow_style=False)
                  if run.config is not None else "(config.yaml missing or unreadable)")
        parts.append(
            f"<details><summary>{esc(run.label)}</summary>\n"
            f"<p>Directory: <code>{esc(run.path)}</code></p>\n<pre><code>{esc(config)}</code></pre></details>"
        )
    return "\n".join(parts)


def _version() -> str:
    """The installed fedtrust version, or ``unknown``."""
    try:
        return metadata.version("fedtrust")
    except metadata.PackageNotFoundError:
        return "unknown"


# --- page --------------------------------------------------------------------


def render_html(runs: Sequence[RunData], plots: Sequence[Plot], png_names: Mapping[str, str] | None = None) -> str:
    """The whole report page for ``runs`` with ``plots`` inlined.

    ``png_names`` maps a plot key to the relative path of its PNG copy; it
    is only mentioned in captions, the page never loads it.
    """
    names = ", ".join(run.name for run in runs)
    title = f"fedtrust report: {names}"
    subtitle = f"{len(runs)} run{'s' if len(runs) != 1 else ''}: {names}"
    body = "\n".join(
        section
        for section in (
            f"<h1>fedtrust run report</h1>\n<p class=\"sub\">{esc(subtitle)}</p>",
            _summary_section(runs),
            _notes_section(runs),
            _predictor_section(runs),
            _plots_section(plots, png_names or {}),
            _ood_section(runs, plots, png_names or {}),
            _privacy_section(runs, plots, png_names or {}),
            _config_section(runs),
            f"<footer>Written by fedtrust {esc(_version())}. Accuracies are on the test split; "
            "per-client accuracy is each client's personalized accuracy on its local test data.</footer>",
        )
        if section
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )
