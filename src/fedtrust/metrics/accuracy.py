"""Accuracy: overall, per class, per class group (many/medium/few, head/middle/tail), local test sets.

Predictions are either class indices ``(N,)`` or scores/logits ``(N, C)``
(reduced by argmax); labels are int64 ``(N,)`` on the same device. Per-class
results are tensors; scalar summaries are Python floats (one sync each).

Personalized evaluation (fedloge.md §1, §6): :func:`local_test_indices` builds
each client's label-matched test set from the shared balanced test set; the
per-client accuracies themselves are computed in one place,
:mod:`fedtrust.evaluation.clients`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from fedtrust.errors import DataError


def _labels_of(pred: Tensor) -> Tensor:
    """Class indices from predictions: argmax over dim 1 for scores, as-is for indices."""
    if pred.dim() == 2:
        return pred.argmax(dim=1)
    if pred.dim() == 1:
        return pred
    raise DataError(f"predictions must be class indices (N,) or scores (N, C), got shape {tuple(pred.shape)}")


def _check_pair(pred: Tensor, y: Tensor) -> Tensor:
    pred = _labels_of(pred)
    if y.dim() != 1 or pred.shape[0] != y.shape[0]:
        raise DataError(f"predictions and labels must have matching length N, got {tuple(pred.shape)} and {tuple(y.shape)}")
    return pred


def accuracy(pred: Tensor, y: Tensor) -> float:
    """Top-1 accuracy ``mean(pred == y)`` (rna.md §4: not the per-batch mean); NaN when empty."""
    pred = _check_pair(pred, y)
    if y.numel() == 0:
        return math.nan
    return float((pred == y).double().mean())


def per_class_accuracy(pred: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """Accuracy on each class's samples, float64 ``(num_classes,)``; NaN for classes absent from ``y``."""
    pred = _check_pair(pred, y)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(f"labels must lie in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}")
    total = torch.bincount(y, minlength=num_classes).double()
    correct = torch.bincount(y[pred == y], minlength=num_classes).double()
    return correct / total  # 0/0 → NaN for absent classes


def group_accuracy(per_class: Tensor, groups: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """Nanmean of per-class accuracies within each group (rna.md §3, fedloge.md §6).

    Classes with NaN accuracy (absent from the test labels) are skipped; a group
    that is empty or has only NaN classes is NaN.
    """
    num_classes = per_class.shape[0]
    out: dict[str, float] = {}
    for name, classes in groups.items():
        idx = [int(c) for c in classes]
        if any(c < 0 or c >= num_classes for c in idx):
            raise DataError(f"group {name!r} names classes outside 0..{num_classes - 1}: {idx}")
        values = per_class[idx] if idx else per_class.new_empty(0)
        finite = values[~torch.isnan(values)]
        out[name] = float(finite.mean()) if finite.numel() else math.nan
    return out


# --------------------------------------------------------------------------- personalized evaluation


def local_test_indices(
    client_label_counts: np.ndarray, test_labels: np.ndarray, rng: np.random.Generator, min_train: int = 2
) -> list[np.ndarray]:
    """Each client's label-matched local test set (fedloge.md §1 "Local test set").

    Client k gets, for each class c, ``floor(n_kc / N_train · N_test)`` test
    images of class c drawn without replacement (capped at the number of class-c
    test images), where N_train is the total of ``client_label_counts`` and
    N_test = ``len(test_labels)``. Classes the client holds fewer than
    ``min_train`` training samples of get none. The floor is computed in exact
    integer arithmetic. Images may repeat across clients. Returns sorted int64
    indices into ``test_labels``, one array per client, reproducible from ``rng``.
    """
    counts, test_labels = _check_local_inputs(client_label_counts, test_labels)
    num_clients, num_classes = counts.shape
    n_train, n_test = int(counts.sum()), len(test_labels)
    by_class = [np.flatnonzero(test_labels == c) for c in range(num_classes)]
    wanted = np.where(counts >= min_train, counts * n_test // n_train, 0)
    parts = []
    for k in range(num_clients):
        picks = [
            rng.choice(by_class[c], size=min(int(wanted[k, c]), len(by_class[c])), replace=False)
            for c in range(num_classes)
            if wanted[k, c] > 0
        ]
        parts.append(np.sort(np.concatenate(picks)).astype(np.int64) if picks else np.zeros(0, dtype=np.int64))
    return parts


def _check_local_inputs(client_label_counts: np.ndarray, test_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    counts = np.asarray(client_label_counts)
    test_labels = np.asarray(test_labels)
    if counts.ndim != 2 or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise DataError(
            f"client_label_counts must be a non-negative integer array [num_clients, C], got {counts.dtype} {counts.shape}"
        )
    if counts.sum() == 0:
        raise DataError("client_label_counts sums to 0: clients hold no training samples")
    if test_labels.ndim != 1 or (test_labels.size and (test_labels.min() < 0 or test_labels.max() >= counts.shape[1])):
        raise DataError(f"test_labels must be a 1-D array of classes in 0..{counts.shape[1] - 1}")
    return counts.astype(np.int64), test_labels.astype(np.int64)
