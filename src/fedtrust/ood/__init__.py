"""OOD detection building blocks (specs/rna.md): scores and metrics.

- :mod:`fedtrust.ood.scores`: ID-ness scores registered under ``"score"``
  (``msp``, ``maxlogit``, ``energy``, ``rn``; higher = more in-distribution)
  and :func:`compute_scores`, one eval-mode pass for several scores.
- :mod:`fedtrust.ood.metrics`: AUROC, AUPR-in/out, FPR95 in both conventions,
  ECE with reliability-diagram data, activation ratio and mean feature norm.

The training objectives (LA, OE, EnergyOE, OECC, RNA, PASCL, BEL) live in
:mod:`fedtrust.objectives.ood`; outlier and OOD test sources in
:mod:`fedtrust.data.outliers`.
"""

from fedtrust.ood.metrics import (
    METRIC_LABELS,
    Calibration,
    activation_ratio,
    aupr_in,
    aupr_out,
    auroc,
    calibration,
    calibration_from_logits,
    ece,
    fpr95_id_recall,
    fpr95_ood_recall,
    fpr_at_recall,
    mean_norm,
    ood_metrics,
)
from fedtrust.ood.scores import compute_scores, energy, forward_in_batches, get_score, maxlogit, msp, representation_norm

__all__ = [
    "METRIC_LABELS",
    "Calibration",
    "activation_ratio",
    "aupr_in",
    "aupr_out",
    "auroc",
    "calibration",
    "calibration_from_logits",
    "compute_scores",
    "ece",
    "energy",
    "forward_in_batches",
    "fpr95_id_recall",
    "fpr95_ood_recall",
    "fpr_at_recall",
    "get_score",
    "maxlogit",
    "mean_norm",
    "msp",
    "ood_metrics",
    "representation_norm",
]
