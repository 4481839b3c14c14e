"""OOD-detection and calibration metrics (spec rna.md §4, §6 "Mechanism").

Inputs are ID-ness scores (higher = more in-distribution, as every
``fedtrust.ood.scores`` returns) for the ID test set (``score_id``) and one
OOD test set (``score_ood``). Everything is computed in float64 numpy from
cumulative counts over distinct thresholds, so ties are handled exactly as
scikit-learn does (sklearn is the reference in the tests).

Conventions (spec §4; y = 1 for OOD and s = −score, "OOD is positive"):

- ``auroc`` = ``roc_auc_score(y, s)``; symmetric, so it equals the ID-positive AUROC.
- ``aupr_out`` = ``average_precision_score(y, s)``: the RNA repo's "AUPR".
- ``aupr_in`` = ``average_precision_score(1 − y, −s)``.
- ``fpr95_ood_recall`` (**RNA repo convention**, what the RNA tables report):
  the fraction of ID samples flagged as OOD at the threshold whose OOD recall
  (TPR, OOD positive) is *nearest* 0.95, taking the last such point (largest
  FPR) on ties: ``fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)``,
  ``d = |tpr − .95|``, ``fpr[last index with d == d.min()]``.
- ``fpr95_id_recall`` (**"OOD FPR at 95 % ID TPR"**, the common convention):
  the same computation with ``y' = 1 − y``, ``s' = −s``: the fraction of OOD
  samples accepted as ID where the ID recall is nearest 0.95.

  With fewer than 10 positives the TPR nearest 0.95 is 1.0, which every ROC
  point after the last positive shares, so "last index" returns FPR = 1 even
  for a perfect separation. That is the convention; use ≥ 20 samples per side.

Calibration: :func:`calibration` (ECE over 15 equal-width bins of the
max-softmax confidence, ``(m−1)/15 < conf ≤ m/15``, plus the reliability
diagram data). Mechanism: :func:`activation_ratio` (fraction of ``z`` entries
> 0; the definition is our choice, spec §7.2) and :func:`mean_norm`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedtrust.errors import DataError

ArrayLike = Tensor | np.ndarray

METRIC_LABELS: dict[str, str] = {
    "auroc": "AUROC",
    "aupr_in": "AUPR-in (ID positive)",
    "aupr_out": "AUPR-out (OOD positive; the RNA repo's AUPR)",
    "fpr95_ood_recall": "FPR95, RNA-repo convention: ID flagged as OOD at 95 % OOD recall",
    "fpr95_id_recall": "FPR95, common convention: OOD accepted as ID at 95 % ID recall",
}
"""Report labels of the keys :func:`ood_metrics` returns."""

ECE_BINS = 15
RECALL_LEVEL = 0.95


def _as_numpy(x: ArrayLike, name: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float64)
    a = a.reshape(-1)
    if a.size == 0:
        raise DataError(f"{name} is empty: OOD metrics need at least one score on each side")
    if not np.all(np.isfinite(a)):
        raise DataError(f"{name} holds {int(np.sum(~np.isfinite(a)))} non-finite scores")
    return a


def _counts(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (true positives, false positives) when predicting "positive" for score ≥ t.

    One entry per distinct score t, from the highest down (sklearn's
    ``_binary_clf_curve``): ties share a threshold, so their order never matters.
    """
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_pos = scores[order], is_pos[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(is_pos)[last_of_value]
    fps = (last_of_value + 1) - tps
    return tps, fps


def _roc(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` with the (0, 0) point first: ``roc_curve(..., drop_intermediate=False)``."""
    tps, fps = _counts(pos, neg)
    tpr = np.r_[0.0, tps] / tps[-1]
    fpr = np.r_[0.0, fps] / fps[-1]
    return fpr, tpr


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    fpr, tpr = _roc(pos, neg)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))  # trapezoids (np.trapezoid needs numpy 2)


def _average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    """``Σ_n (R_n − R_{n−1}) P_n`` over distinct thresholds (sklearn's ``average_precision_score``)."""
    tps, fps = _counts(pos, neg)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_recall(pos: np.ndarray, neg: np.ndarray, level: float = RECALL_LEVEL) -> float:
    """FPR at the ROC point whose TPR is nearest ``level``; the last (largest-FPR) point on ties.

    ``pos`` are the positives' scores and ``neg`` the negatives' (higher =
    "more positive"). Equals ``fpr[last argmin |tpr − level|]`` of
    ``roc_curve(drop_intermediate=False)`` (spec rna.md §4).
    """
    fpr, tpr = _roc(pos, neg)
    d = np.abs(tpr - level)
    return float(fpr[np.flatnonzero(d == d.min())[-1]])


def auroc(score_id: ArrayLike, score_ood: ArrayLike) -> float:
    """Area under the ROC curve; the same with OOD or ID as the positive class (ties count 1/2)."""
    return _auc(_as_numpy(score_id, "score_id"), _as_numpy(score_ood, "score_ood"))


def aupr_in(score_id: ArrayLike, score_ood: ArrayLike) -> float:
    """AUPR with ID positive, ranked by the ID-ness score: ``average_precision_score(1 − y, score)``."""
    return _average_precision(_as_numpy(score_id, "score_id"), _as_numpy(score_ood, "score_ood"))


def aupr_out(score_id: ArrayLike, score_ood: ArrayLike) -> float:
    """AUPR with OOD positive, ranked by ``−score``: ``average_precision_score(y, −score)`` (RNA repo's AUPR)."""
    return _average_precision(-_as_numpy(score_ood, "score_ood"), -_as_numpy(score_id, "score_id"))


def fpr95_ood_recall(score_id: ArrayLike, score_ood: ArrayLike) -> float:
    """RNA-repo FPR95: fraction of ID flagged as OOD where OOD recall is nearest 95 % (spec §4)."""
    return fpr_at_recall(-_as_numpy(score_ood, "score_ood"), -_as_numpy(score_id, "score_id"))


def fpr95_id_recall(score_id: ArrayLike, score_ood: ArrayLike) -> float:
    """Common FPR95 ("OOD FPR at 95 % ID TPR"): fraction of OOD accepted as ID where ID recall is nearest 95 %."""
    return fpr_at_recall(_as_numpy(score_id, "score_id"), _as_numpy(score_ood, "score_ood"))


def ood_metrics(score_id: ArrayLike, score_ood: ArrayLike) -> dict[str, float]:
    """All detection metrics for one (ID, OOD) pair of ID-ness scores; keys and labels in :data:`METRIC_LABELS`."""
    s_id, s_ood = _as_numpy(score_id, "score_id"), _as_numpy(score_ood, "score_ood")
    return {
        "auroc": _auc(s_id, s_ood),
        "aupr_in": _average_precision(s_id, s_ood),
        "aupr_out": _average_precision(-s_ood, -s_id),
        "fpr95_ood_recall": fpr_at_recall(-s_ood, -s_id),
        "fpr95_id_recall": fpr_at_recall(s_id, s_ood),
    }


# ---------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """ECE and reliability-diagram data over equal-width confidence bins.

    Bin m (1-based) holds ``(m−1)/M < conf ≤ m/M``; a confidence of exactly 0
    goes to the first bin. Empty bins have NaN confidence and accuracy.

    Attributes:
        ece: ``Σ_m |B_m|/n · |acc(B_m) − conf(B_m)|``.
        edges: the ``M + 1`` bin edges ``m/M``.
        confidence: mean confidence per bin (M,).
        accuracy: accuracy per bin (M,).
        count: samples per bin (M,).
    """

    ece: float
    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray


def calibration(confidence: ArrayLike, correct: ArrayLike, n_bins: int = ECE_BINS) -> Calibration:
    """ECE of ``confidence`` (in [0, 1]) against ``correct`` (0/1), spec rna.md §4 (Guo et al., ICML 2017).

    Edges are ``m / n_bins`` in float64, so a confidence equal to ``m/15`` (as
    a float64) lies in bin m, whose upper edge it is.
    """
    conf = _as_numpy(confidence, "confidence")
    hit = _as_numpy(correct, "correct")
    if conf.shape != hit.shape:
        raise DataError(f"confidence and correct differ in length: {conf.size} vs {hit.size}")
    if conf.min() < 0 or conf.max() > 1:
        raise DataError(f"confidences must lie in [0, 1], got {conf.min():.4g}..{conf.max():.4g}")
    edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / count
        mean_acc = np.bincount(bins, weights=hit, minlength=n_bins) / count
    gaps = np.where(count > 0, np.abs(mean_acc - mean_conf), 0.0)
    ece = float(np.sum(count / conf.size * gaps))
    return Calibration(ece, edges, mean_conf, mean_acc, count)


def calibration_from_logits(logits: Tensor, labels: Tensor, n_bins: int = ECE_BINS) -> Calibration:
    """:func:`calibration` of the max-softmax confidence of raw ``logits`` against ``labels``."""
    prob = torch.softmax(logits.detach().double(), dim=1)
    conf, pred = prob.max(dim=1)
    return calibration(conf, (pred == labels.to(pred.device)).double(), n_bins)


def ece(logits: Tensor, labels: Tensor, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of raw ``logits`` (15 bins by default, spec rna.md §4)."""
    return calibration_from_logits(logits, labels, n_bins).ece


# ---------------------------------------------------------------- representation mechanism


def activation_ratio(features: Tensor) -> float:
    """Fraction of entries of ``z`` (B, d) that are > 0 (the paper's activation ratio; spec §6, §7.2)."""
    return float((features > 0).double().mean())


def mean_norm(features: Tensor) -> float:
    """Mean representation norm ``mean_i ||z_i||_2`` over a set (spec §6 "Mechanism")."""
    return float(torch.linalg.vector_norm(features.double(), ord=2, dim=1).mean())
