"""Long-tail profile (rna.md §3, fedloge.md §1) and class groups (rna.md §3, fedloge.md §6)."""

from __future__ import annotations

import numpy as np
import pytest

from fedtrust.data.longtail import cumulative_groups, longtail_counts, make_longtail, shot_groups
from fedtrust.data.partition import label_histogram, partition
from fedtrust.errors import ConfigError, DataError

C10_IF100 = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_cifar10_lt_if100_exact_counts() -> None:
    counts = longtail_counts(5000, 10, 100)
    assert counts == C10_IF100
    assert sum(counts) == 12_406


def test_cifar100_lt_totals() -> None:
    c100 = longtail_counts(500, 100, 100)
    assert (c100[0], c100[-1], sum(c100)) == (500, 5, 10_847)
    assert sum(longtail_counts(500, 100, 50)) == 12_608


def test_imbalance_ratio_one_is_balanced_and_available_counts_use_the_minimum() -> None:
    assert longtail_counts(70, 4, 1) == [70, 70, 70, 70]
    assert longtail_counts([5100, 5000, 5200, 5050, 5000, 5000, 5000, 5000, 5000, 5000], 10, 100) == C10_IF100
    assert longtail_counts(9, 1, 100) == [9]


def test_bad_ratio_and_empty_tail() -> None:
    with pytest.raises(ConfigError, match="imbalance_ratio 100"):
        longtail_counts(5000, 10, 0.01)  # FedLoGe's --IF convention, inverted
    with pytest.raises(DataError, match="0 images"):
        longtail_counts(10, 10, 100)


def _interleaved_labels() -> np.ndarray:
    """Class c has 20 images, at positions c, c+5, c+10, ... (5 classes, 100 images)."""
    return np.tile(np.arange(5), 20).astype(np.int64)


def test_make_longtail_first_keeps_first_images_in_file_order() -> None:
    labels = _interleaved_labels()
    keep = make_longtail(labels, 5, imbalance_ratio=10)
    expected_counts = longtail_counts(20, 5, 10)
    assert expected_counts == [20, 11, 6, 3, 2]
    assert np.bincount(labels[keep], minlength=5).tolist() == expected_counts
    for c, n_c in enumerate(expected_counts):
        assert keep[labels[keep] == c].tolist() == [c + 5 * i for i in range(n_c)]
    assert np.all(np.diff(keep) > 0)


def test_make_longtail_n_max_is_the_smallest_available_class() -> None:
    labels = np.repeat(np.arange(3), [50, 30, 40])
    keep = make_longtail(labels, 3, imbalance_ratio=3)
    assert np.bincount(labels[keep]).tolist() == longtail_counts(30, 3, 3)
    with pytest.raises(DataError, match="only 30 exist"):
        make_longtail(labels, 3, imbalance_ratio=1, n_max=40)


def test_make_longtail_random_is_reproducible_and_needs_rng() -> None:
    labels = _interleaved_labels()
    a = make_longtail(labels, 5, 10, rng=np.random.default_rng(3), order="random")
    b = make_longtail(labels, 5, 10, rng=np.random.default_rng(3), order="random")
    first = make_longtail(labels, 5, 10)
    np.testing.assert_array_equal(a, b)
    assert np.bincount(labels[a]).tolist() == np.bincount(labels[first]).tolist()
    assert not np.array_equal(a, first)
    with pytest.raises(ConfigError, match="needs an rng"):
        make_longtail(labels, 5, 10, order="random")
    with pytest.raises(ConfigError):
        make_longtail(labels, 5, 10, order="last")


def test_longtail_composes_with_a_partitioner() -> None:
    labels = np.repeat(np.arange(10), 600)
    keep = make_longtail(labels, 10, 100)
    parts = [keep[p] for p in partition(labels[keep], "dirichlet", 8, 0, alpha=0.5, min_size=5)]
    hist = label_histogram(parts, labels, 10)
    assert hist.sum(axis=0).tolist() == longtail_counts(600, 10, 100)
    assert len(np.unique(np.concatenate(parts))) == len(keep)


# --------------------------------------------------------------------------- groups


def test_shot_groups_cifar10_if100() -> None:
    assert shot_groups(C10_IF100) == {"many": [0, 1, 2], "medium": [3, 4, 5, 6], "few": [7, 8, 9]}


def test_shot_groups_cifar100_if100() -> None:
    groups = shot_groups(longtail_counts(500, 100, 100))
    assert [len(groups[g]) for g in ("many", "medium", "few")] == [34, 34, 32]
    assert sorted(sum(groups.values(), [])) == list(range(100))


def test_shot_groups_hand_worked_and_large_c() -> None:
    # sorted n = 50, 40, 30, 20, 10: t_many = n[int(1.7)] = 40, t_few = n[int(3.35)] = 20
    assert shot_groups([30, 10, 50, 20, 40]) == {"many": [2], "medium": [0, 3, 4], "few": [1]}
    # C > 100: fixed cut-offs > 100 and < 20
    counts = [101] * 50 + [100] * 30 + [20] * 10 + [19] * 11
    groups = shot_groups(counts)
    assert [len(groups[g]) for g in ("many", "medium", "few")] == [50, 40, 11]


def test_cumulative_groups_cifar10_if100() -> None:
    assert cumulative_groups(C10_IF100) == {"head": [0, 1, 2], "middle": [3, 4, 5], "tail": [6, 7, 8, 9]}


@pytest.mark.parametrize("ratio,sizes", [(100, [30, 31, 39]), (50, [34, 34, 32])])
def test_cumulative_groups_cifar100(ratio: int, sizes: list[int]) -> None:
    groups = cumulative_groups(longtail_counts(500, 100, ratio))
    assert [len(groups[g]) for g in ("head", "middle", "tail")] == sizes


def test_cumulative_groups_boundary_and_unsorted_counts() -> None:
    # share reaches exactly 75 % at class 0: the crossing class is head
    assert cumulative_groups([3, 1]) == {"head": [0], "middle": [1], "tail": []}
    # sorted order 1, 2, 0 with shares .625, .9375, 1.0
    assert cumulative_groups([10, 100, 50]) == {"head": [1, 2], "middle": [0], "tail": []}
    with pytest.raises(ConfigError):
        cumulative_groups([1, 2], head=0.9, middle=0.8)
