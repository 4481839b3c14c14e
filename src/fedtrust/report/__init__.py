"""Run reports: one self-contained HTML page for one run directory or several.

A run directory (see ``fedtrust.runner``) holds ``config.yaml``,
``metrics.jsonl``, ``partition.json``, ``summary.json`` and
``eval_scores.npz`` (per-sample scores of the final evaluation, for the OOD
section's histograms, ROC curves and reliability diagram; older runs lack it), and
``checkpoint.safetensors``, whose FLIP client state gives a FLIP run under a backdoor
attack its "FLIP inverted masks" figure, and ``audit/`` (``fedtrust audit``), which with the
``leakage`` evaluator's records gives the "Privacy" section.
Any of them may be missing or damaged (a run killed before its first evaluation, a truncated last
line): :func:`load_run` keeps whatever parses and records a note for each
problem, and the report shows those notes instead of failing.

:func:`write_report` writes the HTML page, with every plot inlined as a base64
``data:`` URI so the page stands alone, and also saves each plot as a PNG in a
``report_files/`` folder beside the page (named ``<page stem>-<plot>.png`` so
that several reports can share the folder).

The data model (:class:`RunData`, :func:`load_run`) lives in :mod:`~fedtrust.report.data`, the only
place that interprets the run files; :mod:`~fedtrust.report.plots` and :mod:`~fedtrust.report.html`
import it from there (not from this package), so the package has no import cycle.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from fedtrust.errors import FedTrustError
from fedtrust.report.data import (ASSETS_DIR, EvalScoresData, FlipMasks, FlipPairMask, OODScores, RunData, as_float,
                                  load_run, ood_label)

__all__ = ["EvalScoresData", "FlipMasks", "FlipPairMask", "OODScores", "RunData", "as_float", "default_report_path",
           "load_run", "ood_label", "write_report"]


# --- writing -----------------------------------------------------------------


def default_report_path(run_dirs: Sequence[Path]) -> Path:
    """``<run>/report.html`` for one run; ``<parent of first run>/report-<n>runs.html`` for several."""
    first = Path(run_dirs[0]).resolve()
    if len(run_dirs) == 1:
        return first / "report.html"
    return first.parent / f"report-{len(run_dirs)}runs.html"


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_report(run_dirs: Sequence[Path | str], out: Path | str | None = None) -> Path:
    """Write the HTML report of one or several runs and return its path.

    Args:
        run_dirs: run directories, shown in this order (the first one sets the
            default location).
        out: the HTML file to write; default :func:`default_report_path`.
            The plots are also saved as PNGs in ``report_files/`` beside it.

    Raises:
        FedTrustError: ``run_dirs`` is empty or names something that is not a
            directory. Missing or broken files inside a run are not errors:
            the report says what is missing.
    """
    # Imported here: matplotlib loads only when a report is actually written.
    from fedtrust.report.html import render_html
    from fedtrust.report.plots import make_plots
    from fedtrust.report.privacy_plots import privacy_plots

    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise FedTrustError("write_report needs at least one run directory")
    for path in paths:
        if not path.is_dir():
            raise FedTrustError(f"run directory '{path}' does not exist or is not a directory")
    runs = [load_run(p) for p in paths]
    out_path = Path(out) if out is not None else default_report_path(paths)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    plots = make_plots(runs) + privacy_plots(runs)
    assets = out_path.parent / ASSETS_DIR
    if plots:
        assets.mkdir(exist_ok=True)
    png_names = {}
    for plot in plots:
        png_names[plot.key] = f"{ASSETS_DIR}/{out_path.stem}-{plot.key}.png"
        _write_atomic(out_path.parent / png_names[plot.key], plot.png)
    page = render_html(runs, plots, png_names)
    _write_atomic(out_path, page.encode("utf-8"))
    return out_path
