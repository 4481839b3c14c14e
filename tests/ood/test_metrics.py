"""OOD metrics against sklearn (spec rna.md §4) and hand-worked FPR95 / ECE cases.

Convention of the references: y = 1 for OOD, s = −score (OOD positive), as in the RNA repo.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from fedtrust.errors import DataError
from fedtrust.ood.metrics import (
    METRIC_LABELS,
    activation_ratio,
    aupr_in,
    aupr_out,
    auroc,
    calibration,
    calibration_from_logits,
    ece,
    fpr95_id_recall,
    fpr95_ood_recall,
    mean_norm,
    ood_metrics,
)


def _labels_and_ood_score(score_id: np.ndarray, score_ood: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.r_[np.zeros(len(score_id)), np.ones(len(score_ood))]
    return y, -np.r_[score_id, score_ood]


def _reference_fpr95(y: np.ndarray, s: np.ndarray) -> float:
    """Spec §4: fpr[last index of min |tpr − .95|] of roc_curve(drop_intermediate=False)."""
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    d = np.abs(tpr - 0.95)
    return float(fpr[np.flatnonzero(d == d.min())[-1]])


def _check_against_sklearn(score_id: np.ndarray, score_ood: np.ndarray) -> None:
    y, s = _labels_and_ood_score(score_id, score_ood)
    got = ood_metrics(score_id, score_ood)
    assert got["auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert got["aupr_out"] == pytest.approx(average_precision_score(y, s), abs=1e-6)
    assert got["aupr_in"] == pytest.approx(average_precision_score(1 - y, -s), abs=1e-6)
    assert got["fpr95_ood_recall"] == pytest.approx(_reference_fpr95(y, s), abs=1e-12)
    assert got["fpr95_id_recall"] == pytest.approx(_reference_fpr95(1 - y, -s), abs=1e-12)
    assert auroc(score_id, score_ood) == got["auroc"]
    assert aupr_in(score_id, score_ood) == got["aupr_in"]
    assert aupr_out(score_id, score_ood) == got["aupr_out"]
    assert fpr95_ood_recall(score_id, score_ood) == got["fpr95_ood_recall"]
    assert fpr95_id_recall(score_id, score_ood) == got["fpr95_id_recall"]


_tied = st.lists(st.integers(-4, 4), min_size=1, max_size=60).map(lambda v: np.asarray(v, dtype=np.float64))
_floats = st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=60).map(np.asarray)


@settings(max_examples=150, deadline=None)
@given(score_id=_tied, score_ood=_tied)
def test_matches_sklearn_with_many_ties(score_id: np.ndarray, score_ood: np.ndarray) -> None:
    _check_against_sklearn(score_id, score_ood)


@settings(max_examples=100, deadline=None)
@given(score_id=_floats, score_ood=_floats)
def test_matches_sklearn_on_float_scores(score_id: np.ndarray, score_ood: np.ndarray) -> None:
    _check_against_sklearn(score_id, score_ood)


def test_matches_sklearn_on_large_random_sets() -> None:
    rng = np.random.default_rng(0)
    _check_against_sklearn(rng.normal(1.0, 1.0, 3000).round(1), rng.normal(0.0, 1.0, 2000).round(1))


def test_torch_inputs_and_extremes() -> None:
    hi, lo = torch.tensor([3.0, 4.0, 5.0]), torch.tensor([0.0, 1.0])
    assert auroc(hi, lo) == 1.0 and auroc(lo, hi) == 0.0
    assert auroc(torch.ones(4), torch.ones(3)) == 0.5
    m = ood_metrics(torch.arange(20.0) + 20, torch.arange(20.0))
    assert m["aupr_in"] == m["aupr_out"] == 1.0
    assert m["fpr95_ood_recall"] == m["fpr95_id_recall"] == 0.0
    assert set(m) == set(METRIC_LABELS)


def test_fpr95_small_sets_take_the_last_point_at_full_recall() -> None:
    """With < 10 positives the TPR nearest .95 is 1.0, held by every point after the last positive:
    "last index on ties" then returns FPR 1 even for a perfect separation (the spec's convention)."""
    assert fpr95_ood_recall(torch.tensor([3.0, 4.0, 5.0]), torch.tensor([0.0, 1.0])) == 1.0


def test_fpr95_repo_convention_hand_worked_tie() -> None:
    """20 OOD (ID-ness 1..20), 4 ID (5.5, 19.5, 30, 40); OOD is flagged when ID-ness <= t.

    OOD recall 19/20 = 0.95 exactly at t in [19, 19.5): ID 5.5 flagged, FPR 1/4; also at t in
    [19.5, 20): ID 5.5 and 19.5 flagged, FPR 2/4. Both points have d = 0; the repo takes the
    last one, 0.5 ("first TPR >= .95" would give 0.25).
    """
    score_ood = np.arange(1.0, 21.0)
    score_id = np.array([5.5, 19.5, 30.0, 40.0])
    assert fpr95_ood_recall(score_id, score_ood) == 0.5


def test_fpr95_id_convention_hand_worked() -> None:
    """20 ID (ID-ness 1..20), 4 OOD (0.5, 2.5, 10.5, 25); accept as ID when ID-ness >= t.

    ID recall 19/20 at t in (1, 2]: OOD 2.5, 10.5 and 25 accepted, FPR 3/4 (a unique point).
    The repo convention on the same data: OOD recall moves in steps of 1/4, the nearest to .95 is
    1.0, reached only once every ID sample (ID-ness <= 25) is flagged: FPR 1.
    """
    score_id = np.arange(1.0, 21.0)
    score_ood = np.array([0.5, 2.5, 10.5, 25.0])
    assert fpr95_id_recall(score_id, score_ood) == 0.75
    assert fpr95_ood_recall(score_id, score_ood) == 1.0


def test_bad_inputs_are_one_line_data_errors() -> None:
    for bad in ([], [0.1, float("nan")]):
        with pytest.raises(DataError) as err:
            ood_metrics(np.array([1.0]), np.array(bad))
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- ECE


def test_ece_hand_worked_with_a_confidence_on_a_bin_edge() -> None:
    """conf 0.2 = 3/15 is the upper edge of bin 3, so it does not share bin 4 with 0.21.

    Bins: 3 {0.2: right}, 4 {0.21: wrong}, 14 {0.9: right}, 15 {1.0: right}.
    ECE = (|1 − .2| + |0 − .21| + |1 − .9| + |1 − 1|) / 4 = 1.11 / 4 = 0.2775
    (0.1725 if 0.2 fell into bin 4).
    """
    cal = calibration(np.array([0.2, 0.21, 0.9, 1.0]), np.array([1, 0, 1, 1]))
    assert cal.ece == pytest.approx(0.2775, abs=1e-12)
    assert cal.count.tolist() == [0, 0, 1, 1] + [0] * 9 + [1, 1]
    assert cal.confidence[2] == 0.2 and cal.accuracy[3] == 0.0 and cal.confidence[13] == 0.9
    assert np.isnan(cal.confidence[0]) and np.isnan(cal.accuracy[0])
    assert len(cal.edges) == 16 and cal.edges[3] == 0.2


def test_ece_zero_confidence_goes_to_the_first_bin() -> None:
    cal = calibration(np.array([0.0, 1 / 15]), np.array([0, 0]))
    assert cal.count[0] == 2 and cal.ece == pytest.approx(0.5 / 15)


def _reference_ece(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """Guo et al. (2017) loop: bins (lo, hi] over m/15 edges."""
    total = 0.0
    for m in range(1, n_bins + 1):
        inside = (conf > (m - 1) / n_bins) & (conf <= m / n_bins)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return total


def test_ece_from_logits_matches_the_reference_loop() -> None:
    torch.manual_seed(0)
    logits = torch.randn(500, 10, dtype=torch.float64) * 3
    labels = torch.randint(0, 10, (500,))
    prob = torch.softmax(logits, 1)
    conf, pred = prob.max(1)
    expected = _reference_ece(conf.numpy(), (pred == labels).double().numpy())
    assert ece(logits, labels) == pytest.approx(expected, abs=1e-12)
    cal = calibration_from_logits(logits.float(), labels)
    assert cal.count.sum() == 500 and cal.ece == pytest.approx(expected, abs=1e-6)


def test_two_class_flat_logits_are_half_confident() -> None:
    cal = calibration_from_logits(torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]))
    assert cal.count[7] == 4  # 0.5 lies in (7/15, 8/15]
    assert cal.ece == pytest.approx(0.0)  # argmax picks class 0: half right at confidence one half


# ---------------------------------------------------------------- mechanism


def test_activation_ratio_and_mean_norm() -> None:
    z = torch.tensor([[0.0, 3.0, 4.0], [0.0, 0.0, 0.0]])
    assert activation_ratio(z) == pytest.approx(2 / 6)
    assert mean_norm(z) == pytest.approx(2.5)
    assert mean_norm(torch.tensor([[1.0, 1.0]])) == pytest.approx(math.sqrt(2))
