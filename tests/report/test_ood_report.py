"""The report's OOD section and the ``eval_scores.npz`` it draws from, on tiny real runs.

One run trains digits for 2 rounds (2 clients, eval every round) with OOD sets
``textures`` and ``noise`` and scores ``msp`` and ``rn``; a second one has no
OOD sets. The saved scores are checked against ``fedtrust.ood.scores`` on the
trained model, the ROC areas against metrics.jsonl, the reliability bins
against ``ece``'s.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import fedtrust
from fedtrust.evaluation import predict_logits
from fedtrust.ood.metrics import calibration_from_logits
from fedtrust.ood.scores import compute_scores
from fedtrust.report import load_run, write_report
from fedtrust.report.html import fmt_pct
from fedtrust.report.plots import roc_curves, reliability
from fedtrust.runner import callbacks
from fedtrust.runner.federation import build_federation
from fedtrust.runner.rundir import EVAL_SCORES, read_metrics
from fedtrust.runner.run import RunResult

ROUNDS = 2
NUM_OOD = 200
SETS = ["textures", "noise"]
SCORES = ["msp", "rn"]
TINY = ["data.num_clients=2", "data.clients_per_round=2", "eval.every=1", "eval.personalized=false",
        f"eval.num_ood={NUM_OOD}", f"eval.scores=[{','.join(SCORES)}]"]


@pytest.fixture(scope="module")
def ood_run(tmp_path_factory: pytest.TempPathFactory, one_thread) -> tuple[RunResult, list[int]]:
    """A finished tiny run with OOD sets, and the rounds at which eval_scores.npz was written."""
    out = tmp_path_factory.mktemp("ood") / "run"
    written: list[int] = []
    save = callbacks.write_eval_scores

    def spy(run_dir, eval_round, scores):
        written.append(eval_round)
        return save(run_dir, eval_round, scores)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(callbacks, "write_eval_scores", spy)
        result = fedtrust.run(None, TINY + [f"out={out}", f"rounds={ROUNDS}", f"eval.ood=[{','.join(SETS)}]"],
                              progress=False, report=False)
    return result, written


@pytest.fixture(scope="module")
def trained(ood_run):
    """The run's final global model and evaluation setup, rebuilt from its config and final state."""
    result, _ = ood_run
    fed = build_federation(result.config)
    return fed.algorithm.predictors(result.state)["global"], fed.eval_setup


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory, one_thread) -> Path:
    """A finished one-round run without OOD sets."""
    out = tmp_path_factory.mktemp("plain") / "run"
    fedtrust.run(None, TINY + [f"out={out}", "rounds=1"], progress=False, report=False)
    return out


def final_record(run_dir: Path) -> dict:
    return [r for r in read_metrics(run_dir) if "test_acc" in r][-1]


def inline_alts(page: str) -> list[str]:
    return re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]+" alt="([^"]*)">', page)


# --- the saved file ---------------------------------------------------------------


def test_eval_scores_written_once_at_the_final_round_with_keys_and_shapes(ood_run) -> None:
    result, written = ood_run
    assert written == [ROUNDS]  # eval rounds 1 and 2, saved only after the last
    with np.load(result.run_dir / EVAL_SCORES, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    expected = {"version", "round", "predictor", "labels", "pred", "confidence", "scores", "ood_sets",
                "ood_titles"} | {f"id/{s}" for s in SCORES} | {f"ood/{k}/{s}" for k in range(2) for s in SCORES}
    assert set(data) == expected
    assert int(data["round"]) == ROUNDS and str(data["predictor"]) == "global"
    assert list(data["scores"]) == SCORES and list(data["ood_sets"]) == SETS
    assert list(data["ood_titles"]) == ["skimage textures", "Noise"]
    assert data["labels"].shape == data["pred"].shape == data["confidence"].shape == (360,)
    assert data["labels"].dtype == np.int64 and data["confidence"].dtype == np.float64
    for s in SCORES:
        assert data[f"id/{s}"].shape == (360,) and data[f"id/{s}"].dtype == np.float32
        for k in range(2):
            assert data[f"ood/{k}/{s}"].shape == (NUM_OOD,) and data[f"ood/{k}/{s}"].dtype == np.float32
    assert not (result.run_dir / (EVAL_SCORES + ".tmp")).exists()


def test_saved_scores_are_those_of_the_trained_model(ood_run, trained) -> None:
    result, _ = ood_run
    model, setup = trained
    saved = load_run(result.run_dir).eval_scores
    assert saved is not None
    want_id = compute_scores(model, setup.test.x, setup.normalize, setup.batch_size, SCORES)
    for s in SCORES:
        np.testing.assert_allclose(saved.id_scores[s], want_id[s].numpy(), rtol=1e-6, atol=1e-6)
    for ood in saved.ood:
        want = compute_scores(model, setup.ood_sets[ood.name], setup.normalize, setup.batch_size, SCORES)
        for s in SCORES:
            np.testing.assert_allclose(ood.scores[s], want[s].numpy(), rtol=1e-6, atol=1e-6)
    logits = predict_logits(model, setup.test.x, setup.normalize, setup.batch_size)
    np.testing.assert_array_equal(saved.labels, setup.test.y.numpy())
    np.testing.assert_array_equal(saved.pred, logits.argmax(1).numpy())
    np.testing.assert_allclose(saved.confidence, torch.softmax(logits.double(), 1).amax(1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(saved.id_scores["msp"], saved.confidence, rtol=1e-5)  # MSP is the confidence


def test_roc_auroc_in_the_legend_is_the_metrics_auroc(ood_run) -> None:
    result, _ = ood_run
    ood_metrics = final_record(result.run_dir)["ood"]
    curves = roc_curves(load_run(result.run_dir).eval_scores)
    assert {(c.ood_set, c.score) for c in curves} == {(o, s) for o in SETS for s in SCORES}
    for curve in curves:
        recorded = ood_metrics[f"{curve.ood_set}/{curve.score}"]["auroc"]
        assert curve.auroc == pytest.approx(recorded, abs=1e-9)
        assert f"AUROC {fmt_pct(recorded)}" in curve.label
        assert curve.fpr[0] == 0 and curve.tpr[-1] == 1


def test_reliability_bins_are_those_of_ece(ood_run, trained) -> None:
    result, _ = ood_run
    model, setup = trained
    want = calibration_from_logits(predict_logits(model, setup.test.x, setup.normalize, setup.batch_size),
                                   setup.test.y)
    got = reliability(load_run(result.run_dir).eval_scores)
    np.testing.assert_array_equal(got.count, want.count)
    np.testing.assert_allclose(got.confidence, want.confidence, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(got.accuracy, want.accuracy, rtol=1e-12, equal_nan=True)
    assert got.ece == pytest.approx(final_record(result.run_dir)["ece"], abs=1e-12)
    assert len(got.count) == 15 and got.count.sum() == 360


# --- the report ---------------------------------------------------------------------


def test_report_has_the_ood_section_with_inlined_plots(ood_run) -> None:
    result, _ = ood_run
    page = write_report([result.run_dir]).read_text(encoding="utf-8")
    section = page[page.index("<h2>OOD detection, calibration and class groups"):page.index("<h2>Runs</h2>")]
    assert inline_alts(section) == ["OOD score histograms", "ROC curves", "Reliability diagram",
                                    "Accuracy by class group"]
    assert "skimage textures (textures)" in section and "<td>Noise</td>" in section
    assert "no eval_scores.npz" not in page
    files = {p.name for p in (result.run_dir / "report_files").glob("*.png")}
    assert {"report-ood_hist.png", "report-ood_roc.png", "report-reliability.png"} <= files


def test_run_without_eval_scores_renders_with_a_note(ood_run, plain_run: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(ood_run[0].run_dir, old, ignore=shutil.ignore_patterns(EVAL_SCORES, "report*"))
    page = write_report([old]).read_text(encoding="utf-8")
    assert "no eval_scores.npz" in page
    alts = inline_alts(page)
    assert "Accuracy by class group" in alts and "ROC curves" not in alts and "Reliability diagram" not in alts
    assert "skimage textures (textures)" in page  # the metrics table still shows
    # side by side with a run that has scores: its plots are drawn, the old run keeps its note
    both = write_report([ood_run[0].run_dir, old], tmp_path / "both.html").read_text(encoding="utf-8")
    assert {"OOD score histograms", "ROC curves", "Reliability diagram"} <= set(inline_alts(both))
    assert "no eval_scores.npz" in both


def test_run_without_ood_sets_still_saves_the_reliability_data(plain_run: Path) -> None:
    run = load_run(plain_run)
    assert run.eval_scores is not None and run.eval_scores.round == 1
    assert run.eval_scores.ood == [] and run.eval_scores.score_names == []
    assert reliability(run.eval_scores).ece == pytest.approx(final_record(plain_run)["ece"], abs=1e-12)
    page = write_report([plain_run]).read_text(encoding="utf-8")
    alts = inline_alts(page)
    assert "Reliability diagram" in alts and "ROC curves" not in alts and "OOD score histograms" not in alts
    assert "<code>eval.ood</code> is empty" in page


def test_broken_eval_scores_file_is_a_note(plain_run: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(plain_run, broken, ignore=shutil.ignore_patterns("report*"))
    (broken / EVAL_SCORES).write_bytes(b"not a zip")
    page = write_report([broken]).read_text(encoding="utf-8")
    assert "eval_scores.npz could not be read (not an .npz archive)" in page
    assert "Reliability diagram" not in inline_alts(page)
