"""The report's backdoor panel draws the run's own ASR and clean accuracy per round (with τ-rejection dashed)."""

from __future__ import annotations

import json

import pytest
from matplotlib.axes import Axes

import fedtrust
from fedtrust.report import load_run, plots, write_report

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]

RUN = ["data.num_clients=4", "data.clients_per_round=4", "rounds=2", "eval.every=1", "eval.personalized=false",
       "executor=sequential"]
ATTACK = ["attack.name=backdoor", "attack.ids=[1]", "eval.reject_tau=0.4"]


def test_backdoor_panel_plots_the_metrics_of_each_round(tmp_path, monkeypatch):
    run_dir = fedtrust.run(None, RUN + ATTACK + [f"out={tmp_path / 'bd'}"], progress=False, report=False).run_dir
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    calls: list[tuple[Axes, str, list, list]] = []
    original = Axes.plot

    def spy(self, x, y, *args, **kwargs):
        calls.append((self, kwargs.get("linestyle"), list(x), list(y)))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    assert plots.backdoor_png([load_run(run_dir)]) is not None
    drawn = {f"{ax.get_title()}|{style}": (x, y) for ax, style, x, y in calls}  # titles are set after plotting
    for title, key, style in (("attack success rate per round", "asr", "-"),
                              ("attack success rate per round", "asr_tau", "--"),
                              ("clean accuracy per round", "test_acc", "-"),
                              ("clean accuracy per round", "acc_tau", "--")):
        rounds, values = drawn[f"{title}|{style}"]
        assert rounds == [r["round"] for r in records if key in r]
        assert values == pytest.approx([100 * r[key] for r in records if key in r]), key
    page = write_report([run_dir]).read_text()
    assert "Backdoor" in page


def test_no_backdoor_panel_without_an_attack(tmp_path):
    run_dir = fedtrust.run(None, RUN + [f"out={tmp_path / 'clean'}"], progress=False, report=False).run_dir
    assert plots.backdoor_png([load_run(run_dir)]) is None
