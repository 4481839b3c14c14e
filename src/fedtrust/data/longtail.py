"""Long-tailed subsets and the class groups long-tail results are reported by.

* :func:`longtail_counts` / :func:`make_longtail`: the exponential profile of
  Cao et al. (2019) used by RNA (spec rna.md §3) and FedLoGe (fedloge.md §1).
  Partition the kept subset with any partitioner (``data.partition``) and map
  client indices back through it: ``keep[part]``.
* :func:`shot_groups`: many/medium/few by RNA's count thresholds (rna.md §3).
* :func:`cumulative_groups`: head/middle/tail by cumulative share (fedloge.md §6).
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

import numpy as np

from fedtrust.errors import ConfigError, DataError

ORDERS = ("first", "random")


def _check_ratio(imbalance_ratio: float) -> float:
    if isinstance(imbalance_ratio, bool) or not isinstance(imbalance_ratio, Real) or not (1 <= imbalance_ratio < float("inf")):
        raise ConfigError(
            "imbalance_ratio must be a number ≥ 1 (n_max/n_min; FedLoGe's --IF 0.01 is imbalance_ratio 100), "
            f"got {imbalance_ratio!r}"
        )
    return float(imbalance_ratio)


def longtail_counts(n_max: int | Sequence[int] | np.ndarray, num_classes: int, imbalance_ratio: float) -> list[int]:
    """Per-class sizes of the exponential long-tail profile (rna.md §3, fedloge.md §1; Cao et al. 2019).

    ``n_c = int(n_max · (1/IF)^(c/(C−1)))`` for c = 0..C−1, with IF =
    ``imbalance_ratio`` = n_max/n_min; class 0 is the head, IF 1 is balanced.
    ``n_max`` is an int, or per-class available counts, whose minimum is then
    used so no class is asked for more images than it has.
    CIFAR-10, IF 100: 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ConfigError(f"num_classes must be an integer ≥ 1, got {num_classes!r}")
    rho = 1.0 / _check_ratio(imbalance_ratio)
    if not np.isscalar(n_max):
        available = np.asarray(n_max)
        if available.shape != (num_classes,):
            raise DataError(f"per-class counts must have length num_classes={num_classes}, got shape {available.shape}")
        n_max = int(available.min())
    if int(n_max) < 1:
        raise DataError(f"long-tail needs n_max ≥ 1 image per class, got {n_max}")
    if num_classes == 1:
        return [int(n_max)]
    counts = [int(int(n_max) * rho ** (c / (num_classes - 1))) for c in range(num_classes)]
    if counts[-1] < 1:
        raise DataError(
            f"imbalance_ratio {imbalance_ratio} leaves class {num_classes - 1} with 0 images (n_max={n_max}); "
            f"use imbalance_ratio ≤ {n_max}"
        )
    return counts


def make_longtail(
    labels: np.ndarray,
    num_classes: int,
    imbalance_ratio: float,
    rng: np.random.Generator | None = None,
    order: str = "first",
    n_max: int | None = None,
) -> np.ndarray:
    """Sorted int64 indices of a long-tailed subset of ``labels`` (rna.md §3).

    Class c keeps ``longtail_counts(n_max, C, IF)[c]`` images. ``order="first"``
    keeps the first n_c of class c in file order, as the RNA and FedLoGe code
    does (no shuffle); ``order="random"`` draws them without replacement from
    ``rng``. ``n_max`` defaults to the smallest class's available count.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be a 1-D integer array, got dtype {labels.dtype} shape {labels.shape}")
    if order not in ORDERS:
        raise ConfigError(f"long-tail order must be one of {', '.join(ORDERS)}, got {order!r}")
    if order == "random" and rng is None:
        raise ConfigError("long-tail order 'random' needs an rng (numpy Generator)")
    available = np.bincount(labels, minlength=num_classes)
    if len(available) > num_classes or (labels.size and int(labels.min()) < 0):
        raise DataError(f"labels must lie in 0..{num_classes - 1}")
    counts = longtail_counts(available if n_max is None else n_max, num_classes, imbalance_ratio)
    short = [c for c in range(num_classes) if counts[c] > available[c]]
    if short:
        c = short[0]
        raise DataError(f"long-tail asks for {counts[c]} images of class {c} but only {available[c]} exist; lower n_max")
    keep = [_take(np.flatnonzero(labels == c), counts[c], order, rng) for c in range(num_classes)]
    return np.sort(np.concatenate(keep)).astype(np.int64)


def _take(idx: np.ndarray, n: int, order: str, rng: np.random.Generator | None) -> np.ndarray:
    """The first ``n`` of ``idx`` (file order), or ``n`` drawn without replacement."""
    if order == "first":
        return idx[:n]
    assert rng is not None
    return rng.choice(idx, size=n, replace=False)


def shot_groups(train_counts: Sequence[int] | np.ndarray) -> dict[str, list[int]]:
    """Many/medium/few classes by the RNA rule (rna.md §3).

    With n the training counts sorted descending and C ≤ 100 classes:
    ``t_many = n[int(0.34·C)]``, ``t_few = n[int(0.67·C)]``; many is
    ``n_c > t_many``, few is ``n_c < t_few``, medium the rest. For C > 100
    (ImageNet-LT) the fixed cut-offs ``n_c > 100`` and ``n_c < 20`` are used.
    C10 IF100 gives {0,1,2} / {3,4,5,6} / {7,8,9}.
    """
    n = np.asarray(train_counts)
    if n.ndim != 1 or n.size == 0:
        raise DataError(f"train_counts must be a non-empty 1-D array, got shape {n.shape}")
    num_classes = n.size
    if num_classes > 100:
        t_many, t_few = 100, 20
    else:
        desc = np.sort(n)[::-1]
        t_many, t_few = desc[int(0.34 * num_classes)], desc[int(0.67 * num_classes)]
    many = [c for c in range(num_classes) if n[c] > t_many]
    few = [c for c in range(num_classes) if n[c] < t_few]
    medium = [c for c in range(num_classes) if t_few <= n[c] <= t_many]
    return {"many": many, "medium": medium, "few": few}


def cumulative_groups(
    train_counts: Sequence[int] | np.ndarray, head: float = 0.75, middle: float = 0.95
) -> dict[str, list[int]]:
    """Head/middle/tail classes by cumulative share (fedloge.md §6, FedLoGe ``shot_split``).

    Classes are sorted by count, descending (ties keep class order). Head is
    every class up to and including the one where the cumulative share first
    reaches ``head``; middle continues up to and including the one where it
    reaches ``middle``; tail is the rest. C10 IF100 gives 3 / 3 / 4.
    """
    n = np.asarray(train_counts, dtype=np.float64)
    if n.ndim != 1 or n.size == 0 or n.sum() <= 0 or (n < 0).any():
        raise DataError("train_counts must be a non-empty 1-D array of non-negative counts with a positive sum")
    if not 0 < head <= middle <= 1:
        raise ConfigError(f"cumulative group thresholds must satisfy 0 < head ≤ middle ≤ 1, got head={head}, middle={middle}")
    order = np.argsort(-n, kind="stable")
    share = np.cumsum(n[order]) / n.sum()
    cut_head = int(np.searchsorted(share, head, side="left"))
    cut_middle = max(cut_head, int(np.searchsorted(share, middle, side="left")))
    return {
        "head": sorted(order[: cut_head + 1].tolist()),
        "middle": sorted(order[cut_head + 1 : cut_middle + 1].tolist()),
        "tail": sorted(order[cut_middle + 1 :].tolist()),
    }
