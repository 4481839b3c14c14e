"""Accuracy metrics: hand-worked cases, sklearn references, local test sets (fedloge.md §1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, recall_score

from fedtrust.errors import DataError
from fedtrust.metrics import (
    accuracy,
    group_accuracy,
    local_test_indices,
    per_class_accuracy,
)

# class 0: 2 of 3 right, class 1: 1 of 2, class 2: 1 of 4; class 3 absent
Y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
PRED = torch.tensor([0, 0, 1, 1, 0, 2, 0, 1, 1])


def test_accuracy_hand_worked_and_from_logits() -> None:
    assert accuracy(PRED, Y) == pytest.approx(4 / 9)
    logits = torch.nn.functional.one_hot(PRED, 4).float() * 3.0 - 1.0
    assert accuracy(logits, Y) == pytest.approx(4 / 9)
    assert math.isnan(accuracy(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(DataError):
        accuracy(PRED[:-1], Y)


def test_per_class_accuracy_hand_worked_with_absent_class() -> None:
    acc = per_class_accuracy(PRED, Y, num_classes=4)
    assert acc[:3].tolist() == pytest.approx([2 / 3, 1 / 2, 1 / 4])
    assert math.isnan(acc[3].item())


def test_group_accuracy_is_nanmean_per_group() -> None:
    acc = per_class_accuracy(PRED, Y, num_classes=4)
    out = group_accuracy(acc, {"all": [0, 1, 2, 3], "with_absent": [0, 3], "only_absent": [3], "empty": []})
    assert out["all"] == pytest.approx((2 / 3 + 1 / 2 + 1 / 4) / 3)
    assert out["with_absent"] == pytest.approx(2 / 3)
    assert math.isnan(out["only_absent"]) and math.isnan(out["empty"])
    with pytest.raises(DataError):
        group_accuracy(acc, {"bad": [4]})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracies_match_sklearn(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 7, (500,), generator=g)
    pred = torch.where(torch.rand(500, generator=g) < 0.6, y, torch.randint(0, 7, (500,), generator=g))
    assert accuracy(pred, y) == pytest.approx(accuracy_score(y.numpy(), pred.numpy()))
    ref = recall_score(y.numpy(), pred.numpy(), labels=list(range(7)), average=None, zero_division=np.nan)
    np.testing.assert_allclose(per_class_accuracy(pred, y, 7).numpy(), ref)


# --------------------------------------------------------------------------- local test sets


COUNTS = np.array([[6, 2, 0], [1, 0, 3], [1, 1, 0]])  # N_train = 14
TEST_LABELS = np.repeat(np.arange(3), 3)  # 3 test images per class, N_test = 9


def test_local_test_indices_hand_worked() -> None:
    """wanted = floor(n_kc · 9 / 14), zero where n_kc < 2, capped at 3 per class.

    client 0: class 0 floor(54/14)=3, class 1 floor(18/14)=1; client 1: class 2
    floor(27/14)=1 (class 0 has 1 < min_train); client 2: nothing.
    """
    parts = local_test_indices(COUNTS, TEST_LABELS, np.random.default_rng(0))
    assert [np.bincount(TEST_LABELS[p], minlength=3).tolist() for p in parts] == [[3, 1, 0], [0, 0, 1], [0, 0, 0]]
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)


def test_local_test_indices_cap_and_min_train() -> None:
    # one client, N_train = 14, N_test = 14 (3 of class 0, 11 of class 1): wanted = n_kc, class 0 capped at 3
    parts = local_test_indices(np.array([[12, 2]]), np.repeat([0, 1], [3, 11]), np.random.default_rng(0))
    assert np.bincount(np.repeat([0, 1], [3, 11])[parts[0]], minlength=2).tolist() == [3, 2]
    # N_test = 14 (7 per class): class 0 wants floor(1·14/14) = 1 unless n_kc = 1 < min_train
    test = np.repeat([0, 1], 7)
    for min_train, expected in [(2, [0, 7]), (1, [1, 7]), (14, [0, 0])]:
        parts = local_test_indices(np.array([[1, 13]]), test, np.random.default_rng(0), min_train=min_train)
        assert np.bincount(test[parts[0]], minlength=2).tolist() == expected


def test_local_test_indices_reproducible_and_random() -> None:
    labels = np.repeat(np.arange(3), 50)
    counts = np.array([[40, 20, 10], [5, 30, 25]])
    a = local_test_indices(counts, labels, np.random.default_rng(7))
    b = local_test_indices(counts, labels, np.random.default_rng(7))
    c = local_test_indices(counts, labels, np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    with pytest.raises(DataError):
        local_test_indices(np.zeros((2, 3), dtype=np.int64), labels, np.random.default_rng(0))
