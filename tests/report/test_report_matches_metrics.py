"""The report shows the run's own numbers: every figure of its summary, predictor and OOD tables and
every bar of its per-client accuracy plot equals metrics.jsonl to the precision shown.

One tiny real run: FedRoD (two predictors, global and personalized, so the predictor table is drawn)
on long-tailed digits, 3 clients, 2 rounds evaluated every round (so the final and the first
evaluation differ), personalized evaluation on, OOD sets ``textures`` and ``noise`` scored by ``msp``
and ``energy``. The page is parsed with ``html.parser``; expected numbers come straight from the
JSON lines.
"""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import fedtrust
from fedtrust.report import plots

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

SETS = {"textures": "skimage textures (textures)", "noise": "Noise"}  # configured name -> as the report shows it
SCORES = ["msp", "energy"]
OVERRIDES = ["algorithm.name=fedrod", "data.num_clients=3", "data.clients_per_round=3", "data.imbalance_ratio=10",
             "data.alpha=0.5", "data.min_size=20", "rounds=2", "eval.every=1", "eval.personalized=true",
             "eval.num_ood=200", f"eval.ood=[{','.join(SETS)}]", f"eval.scores=[{','.join(SCORES)}]"]


class Tables(HTMLParser):
    """Every ``<table>`` of a page as (the ``<h2>`` above it, header cells, body rows of cell texts)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[tuple[str, list[str], list[list[str]]]] = []
        self.h2 = ""
        self._text: list[str] | None = None
        self._row: list[str] | None = None
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        if tag == "h2":
            self._in_h2, self.h2 = True, ""
        elif tag == "table":
            self.tables.append((self.h2, [], []))
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._text = []

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False
        elif tag in ("td", "th") and self._row is not None and self._text is not None:
            self._row.append("".join(self._text).strip())
            self._text = None
        elif tag == "tr" and self._row is not None:
            _, head, body = self.tables[-1]
            (body if head else head).extend([self._row] if head else self._row)
            self._row = None

    def handle_data(self, data):
        if self._in_h2:
            self.h2 += data
        if self._text is not None:
            self._text.append(data)


def tables_of(page: str) -> dict[str, list[dict[str, str]]]:
    """Table rows as ``{header: cell}``, by the heading the table sits under (first word kept)."""
    parser = Tables()
    parser.feed(page)
    return {h2.split()[0]: [dict(zip(head, row, strict=True)) for row in body] for h2, head, body in parser.tables}


def assert_shows(cell: str, value: float | None, what: str) -> None:
    """``cell`` shows ``value``: ``—`` for None, ``87.31%`` for a fraction, else a plain number,
    within half a unit of its last digit."""
    if value is None:
        assert cell == "—", f"{what}: {cell!r} for a missing value"
        return
    m = re.fullmatch(r"(-?\d+)\.(\d+)(%?)", cell)
    assert m, f"{what}: {cell!r} is not a number"
    shown = float(cell.rstrip("%"))
    want = 100 * value if m.group(3) else value
    assert abs(shown - want) <= 0.5 * 10 ** -len(m.group(2)) + 1e-9, f"{what}: shows {cell}, metrics.jsonl {value}"


@pytest.fixture(scope="module")
def report_run(tmp_path_factory, one_thread):
    """The run, its eval records, its report page, and the bar heights of its per-client plot."""
    out = tmp_path_factory.mktemp("report") / "run"
    bars: list[list[float]] = []
    steps: list[list[float]] = []
    panel = plots._client_panel

    def spy(ax, run, color):
        panel(ax, run, color)
        bars.append([p.get_height() for p in ax.patches])
        steps.append([list(line.get_ydata()) for line in ax.get_lines() if line.get_label() == "personalized"])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "_client_panel", spy)
        result = fedtrust.run(None, OVERRIDES + [f"out={out}"], progress=False, report=True)
    records = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "test_acc" in r]
    assert result.report is not None
    return result, evals, result.report.read_text(encoding="utf-8"), bars, steps


def test_ood_table_equals_the_final_ood_metrics(report_run):
    """Rules out: a table of the first evaluation instead of the last, of another predictor, with
    metric columns shifted or mislabelled, a set or score row shown under another's name, a row left
    out or invented, and numbers rounded to fewer digits than a percentage with two decimals.
    """
    _, evals, page, _, _ = report_run
    final, first = evals[-1], evals[0]
    assert final["ood"] != first["ood"], "two evaluations must differ for the check to bite"
    rows = tables_of(page)["OOD"]
    ood = final["ood"]
    assert {f"{s}/{sc}" for s in SETS for sc in SCORES} == set(ood)
    metric_names = list(next(iter(ood.values())))
    assert list(rows[0]) == ["run", "OOD set", "score", *metric_names]
    shown = {(row["OOD set"], row["score"]): row for row in rows}
    assert len(shown) == len(rows) == len(ood)
    for key, metrics in ood.items():
        set_name, score = key.split("/")
        row = shown[(SETS[set_name], score)]
        assert row["run"] == "run"
        for m, v in metrics.items():
            assert re.fullmatch(r"\d+\.\d\d%", row[m]), row[m]
            assert_shows(row[m], v, f"{key} {m}")


def test_summary_and_predictor_tables_equal_the_final_metrics(report_run):
    """Rules out: final and best accuracy (and the best's round) from the wrong evaluation, the mean
    client accuracy of the wrong predictor or recomputed with a weighting, a predictor row showing
    another predictor's numbers, and many/medium/few columns out of order.
    """
    _, evals, page, _, _ = report_run
    final = evals[-1]
    tables = tables_of(page)
    (summary,) = tables["Summary"]
    assert_shows(summary["final test acc"], final["test_acc"], "final test acc")
    best_i = max(range(len(evals)), key=lambda i: (evals[i]["test_acc"], -i))
    best_cell = re.fullmatch(r"(\S+) \((\d+)\)", summary["best test acc (round)"])
    assert best_cell and int(best_cell.group(2)) == evals[best_i]["round"]
    assert_shows(best_cell.group(1), evals[best_i]["test_acc"], "best test acc")
    assert_shows(summary["mean client acc"], final["client_acc_mean"], "mean client acc")

    by_pred = final["by_predictor"]
    assert list(by_pred) == ["global", "personalized"]
    assert by_pred["global"]["client_acc_mean"] != by_pred["personalized"]["client_acc_mean"]
    rows = tables["Predictors"]
    assert [r["predictor"] for r in rows] == list(by_pred)
    for row in rows:
        m = by_pred[row["predictor"]]
        assert_shows(row["test acc"], m["test_acc"], "test acc")
        assert re.fullmatch(r"\d+\.\d{4}", row["test loss"])
        assert_shows(row["test loss"], m["test_loss"], "test loss")
        assert_shows(row["mean client acc"], m["client_acc_mean"], "mean client acc")
        for g in ("many", "medium", "few"):
            assert_shows(row[g], m["group_acc"][g], f"{row['predictor']} {g}")


def test_per_client_plot_draws_each_clients_final_accuracy(report_run):
    """Rules out: bars of another evaluation or predictor, a client dropped or counted twice, and
    bars unsorted or scaled other than percent; the second predictor's curve likewise.
    """
    _, evals, page, bars, steps = report_run
    final = evals[-1]
    assert "Per-client accuracy" in page
    assert len(bars) == 1
    primary = final["by_predictor"]["global"]["client_acc"]
    assert primary == final["client_acc"]
    np.testing.assert_allclose(bars[0], sorted((100 * a for a in primary), reverse=True), atol=1e-9)
    personal = final["by_predictor"]["personalized"]["client_acc"]
    assert steps[0] and len(steps[0]) == 1
    np.testing.assert_allclose(steps[0][0], sorted((100 * a for a in personal), reverse=True), atol=1e-9)
