"""The report's width and robustness plots draw the run's own final numbers: accuracy per width predictor
(and per MACs), and PGD against clean accuracy per dual-BN mix μ."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from matplotlib.axes import Axes

import fedtrust
from fedtrust.report import load_run, plots, write_report


def fake_run(path: Path, final: dict) -> Path:
    path.mkdir(parents=True)
    records = [{"round": 1, "train_loss": 1.0}, {"round": 2, "train_loss": 0.5, **final}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def spy_plot(monkeypatch) -> list[tuple[Axes, list, list]]:
    calls: list[tuple[Axes, list, list]] = []
    original = Axes.plot

    def spy(self, x, y, *args, **kwargs):
        calls.append((self, list(x), list(y)))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    return calls


def widths_record(accs: dict[str, float], macs: dict[str, float] | None) -> dict:
    by = {name: {"test_acc": acc, **({"cost": {"macs": macs[name], "params": 1}} if macs else {})}
          for name, acc in accs.items()}
    return {"test_acc": next(iter(accs.values())), "by_predictor": by}


def test_width_plot_draws_each_width_predictors_final_accuracy_and_macs(tmp_path, monkeypatch):
    """Rules out: predictors plotted in dict order instead of by width, an accuracy not in percent, a
    non-width predictor (``global``) drawn as a width, MACs taken from another predictor."""
    accs = {"x1": 0.8, "x0.25": 0.6, "x0.5": 0.7, "x0.125": 0.5}
    macs = {"x1": 8e5, "x0.25": 2e5, "x0.5": 4e5, "x0.125": 1e5}
    run = load_run(fake_run(tmp_path / "a", widths_record(accs, macs)))
    calls = spy_plot(monkeypatch)
    assert plots.width_png([run]) is not None
    by_title = {ax.get_title(): (x, y) for ax, x, y in calls}
    assert by_title["accuracy per width"] == ([0.125, 0.25, 0.5, 1.0], pytest.approx([50.0, 60.0, 70.0, 80.0]))
    assert by_title["accuracy per cost"] == ([1e5, 2e5, 4e5, 8e5], pytest.approx([50.0, 60.0, 70.0, 80.0]))
    assert plots.predictor_width("global") is None and plots.predictor_width("x2") is None
    assert plots.predictor_width("x0.5") == 0.5


def test_no_width_plot_without_two_width_predictors(tmp_path):
    one = load_run(fake_run(tmp_path / "one", {"test_acc": 0.9}))
    personal = load_run(fake_run(tmp_path / "p", {"test_acc": 0.9, "by_predictor": {"global": {"test_acc": 0.9},
                                                                                      "personalized": {"test_acc": 0.8}}}))
    assert plots.width_png([one, personal]) is None


def test_robust_plot_draws_clean_against_pgd_accuracy_per_mu(tmp_path, monkeypatch):
    """Rules out: the axes swapped, μ labels out of order, the flat (primary) sweep drawn twice for a run with
    predictors."""
    sweep = {"eps": 0.2, "steps": 7, "step_size": 0.03, "samples": 10, "mu": [0.0, 0.5, 1.0],
             "clean_acc": [0.9, 0.8, 0.7], "robust_acc": [0.1, 0.3, 0.5]}
    narrow = {**sweep, "clean_acc": [0.6, 0.5, 0.4], "robust_acc": [0.05, 0.1, 0.2]}
    final = {"test_acc": 0.9, "robust": sweep,
             "by_predictor": {"x1": {"test_acc": 0.9, "robust": sweep}, "x0.5": {"test_acc": 0.6, "robust": narrow}}}
    run = load_run(fake_run(tmp_path / "r", final))
    calls = spy_plot(monkeypatch)
    assert plots.robust_png([run]) is not None
    drawn = [(x, y) for _, x, y in calls]
    assert drawn == [(pytest.approx([90.0, 80.0, 70.0]), pytest.approx([10.0, 30.0, 50.0])),
                     (pytest.approx([60.0, 50.0, 40.0]), pytest.approx([5.0, 10.0, 20.0]))]
    assert plots.robust_png([load_run(fake_run(tmp_path / "none", {"test_acc": 0.5}))]) is None


def test_a_splitmix_run_report_shows_the_width_plot(tmp_path, one_thread):
    run_dir = fedtrust.run("configs/splitmix-digits-domains.yaml",
                           ["rounds=1", "eval.every=1", "checkpoint_every=0", "algorithm.base_ratio=0.5", "budget.widths=[0.5,1.0]",
                            f"out={tmp_path / 'sm'}"], progress=False, report=False).run_dir
    run = load_run(run_dir)
    assert [plots.predictor_width(p) for p in run.predictors] == [1.0, 0.5]
    page = write_report([run_dir]).read_text()
    assert "Accuracy per width" in page and "Robustness trade-off" not in page
