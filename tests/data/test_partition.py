"""Partitioners: validity properties (hypothesis), reproducibility, hand-worked cases, the 1,000-client MNIST case."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtrust.data.partition import (
    _repair_min_size,
    label_histogram,
    partition,
    partition_stats,
    partitioner_params,
)
from fedtrust.errors import ConfigError, DataError

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # 60,000

labels_st = st.lists(st.integers(0, 9), min_size=0, max_size=300).map(lambda v: np.asarray(v, dtype=np.int64))
fuzz = settings(max_examples=60, deadline=None)


def assert_valid(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    """Disjoint, complete, sorted int64 index arrays, one per client."""
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0), "indices must be sorted and unique"
    allidx = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    assert len(allidx) == n, "every index exactly once"
    assert np.array_equal(np.sort(allidx), np.arange(n))


def feasible(name: str, labels: np.ndarray, k: int, params: dict) -> bool:
    n = len(labels)
    if name == "iid":
        return n >= k
    if name == "dirichlet":
        return k * params.get("min_size", 10) <= n
    s = k * params.get("classes_per_client", 2)
    return n >= s and len(np.unique(labels)) <= s


def mnist_like_labels(rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.repeat(np.arange(10), MNIST_TRAIN_COUNTS)).astype(np.int64)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize(
    "name,params",
    [
        ("iid", {}),
        ("dirichlet", {"alpha": 0.3, "min_size": 2}),
        ("dirichlet", {"alpha": 5.0, "min_size": 0}),
        ("shards", {"classes_per_client": 2}),
    ],
)
@fuzz
@given(labels=labels_st, k=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_partition_is_valid_or_says_why(name: str, params: dict, labels: np.ndarray, k: int, seed: int) -> None:
    if not feasible(name, labels, k, params):
        with pytest.raises(DataError):
            partition(labels, name, k, seed, **params)
        return
    parts = partition(labels, name, k, seed, **params)
    assert_valid(parts, len(labels), k)
    again = partition(labels, name, k, seed, **params)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again)), "same seed, same partition"


@fuzz
@given(labels=labels_st, k=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_iid_sizes_differ_by_at_most_one(labels: np.ndarray, k: int, seed: int) -> None:
    if len(labels) < k:
        return
    sizes = [len(p) for p in partition(labels, "iid", k, seed)]
    assert max(sizes) - min(sizes) <= 1


@fuzz
@given(
    labels=labels_st,
    k=st.integers(1, 30),
    min_size=st.integers(0, 8),
    alpha=st.sampled_from([0.01, 0.1, 1.0, 10.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_meets_min_size_when_feasible(labels: np.ndarray, k: int, min_size: int, alpha: float, seed: int) -> None:
    if k * min_size > len(labels):
        with pytest.raises(DataError, match="infeasible"):
            partition(labels, "dirichlet", k, seed, alpha=alpha, min_size=min_size)
        return
    parts = partition(labels, "dirichlet", k, seed, alpha=alpha, min_size=min_size, max_redraws=3)
    assert_valid(parts, len(labels), k)
    assert min(len(p) for p in parts) >= min_size


@fuzz
@given(labels=labels_st, k=st.integers(1, 15), cpc=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_shards_give_at_most_classes_per_client(labels: np.ndarray, k: int, cpc: int, seed: int) -> None:
    if not feasible("shards", labels, k, {"classes_per_client": cpc}):
        return
    parts = partition(labels, "shards", k, seed, classes_per_client=cpc)
    assert all(len(np.unique(labels[p])) <= cpc for p in parts)
    assert all(len(p) > 0 for p in parts), "every client gets classes_per_client non-empty shards"


@pytest.mark.parametrize("name,params", [("iid", {}), ("dirichlet", {"alpha": 0.5}), ("shards", {"classes_per_client": 2})])
def test_different_seeds_give_different_partitions(name: str, params: dict) -> None:
    labels = np.repeat(np.arange(10), 50)
    base = partition(labels, name, 10, 0, **params)
    for seed in (1, 2, 3):
        other = partition(labels, name, 10, seed, **params)
        assert not all(np.array_equal(a, b) for a, b in zip(base, other))


# --------------------------------------------------------------------------- dirichlet


def test_dirichlet_1000_clients_alpha_01_mnist_terminates_and_meets_min_size() -> None:
    """Reference code redraws forever here; the bounded redraw + repair must finish and meet min_size."""
    labels = mnist_like_labels(np.random.default_rng(0))
    parts = partition(labels, "dirichlet", 1000, seed=1, alpha=0.1, min_size=10)
    assert_valid(parts, 60_000, 1000)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 10
    hist = label_histogram(parts, labels, 10)
    assert np.mean((hist > 0).sum(axis=1)) < 6, "alpha 0.1 must stay strongly skewed"


def test_dirichlet_min_size_at_the_feasibility_edge_and_beyond() -> None:
    labels = mnist_like_labels(np.random.default_rng(0))
    parts = partition(labels, "dirichlet", 1000, seed=0, alpha=0.1, min_size=60)
    assert [len(p) for p in parts] == [60] * 1000
    with pytest.raises(DataError, match=r"infeasible.*min_size ≤ 60") as err:
        partition(labels, "dirichlet", 1000, seed=0, alpha=0.1, min_size=61)
    assert "\n" not in str(err.value)


def test_repair_moves_from_largest_client_deterministically() -> None:
    counts = np.array([[10, 0], [0, 1], [3, 0]])
    fixed = _repair_min_size(counts, min_size=3)
    np.testing.assert_array_equal(fixed, [[8, 0], [2, 1], [3, 0]])
    np.testing.assert_array_equal(fixed.sum(axis=0), counts.sum(axis=0))


def test_dirichlet_large_alpha_is_a_proportional_cut() -> None:
    """With alpha → ∞, p → uniform, so each client gets n_c/K of each class up to the floor of the cut."""
    labels = np.repeat(np.arange(4), [400, 300, 200, 100])
    hist = label_histogram(partition(labels, "dirichlet", 10, 0, alpha=1e7, min_size=0), labels, 4)
    assert np.abs(hist - np.array([40, 30, 20, 10])).max() <= 1


def test_dirichlet_small_alpha_is_more_skewed_than_large() -> None:
    labels = np.repeat(np.arange(10), 200)

    def classes_held(alpha: float) -> float:
        hist = label_histogram(partition(labels, "dirichlet", 20, 0, alpha=alpha, min_size=0), labels, 10)
        return float((hist > 0).sum(axis=1).mean())
    assert classes_held(0.05) < 4 < 9 < classes_held(100.0)


# --------------------------------------------------------------------------- shards


def test_shards_whole_classes_when_sizes_divide() -> None:
    """McMahan: 4 classes × 10, 2 clients × 2 shards → each client holds exactly two whole classes."""
    labels = np.tile(np.arange(4), 10)
    parts = partition(labels, "shards", 2, 0, classes_per_client=2)
    hist = label_histogram(parts, labels, 4)
    assert sorted(hist.flatten().tolist()) == [0, 0, 0, 0, 10, 10, 10, 10]


def test_shards_too_few_samples_or_too_many_classes() -> None:
    with pytest.raises(DataError, match="at least"):
        partition(np.arange(5) % 2, "shards", 3, 0, classes_per_client=2)
    with pytest.raises(DataError, match="classes_per_client ≥ 2"):
        partition(np.arange(100) % 10, "shards", 5, 0, classes_per_client=1)


# --------------------------------------------------------------------------- entry point and stats


def test_unknown_param_is_one_line_config_error_listing_valid() -> None:
    with pytest.raises(ConfigError, match="unknown params alfa; valid: alpha, min_size, max_redraws"):
        partition(np.zeros(10, dtype=np.int64), "dirichlet", 2, 0, alfa=0.1)
    with pytest.raises(ConfigError, match="did you mean"):
        partition(np.zeros(10, dtype=np.int64), "dirichlet_", 2, 0)
    assert partitioner_params("shards") == {"classes_per_client": 2}


@pytest.mark.parametrize(
    "name,params",
    [
        ("dirichlet", {"alpha": 0}),
        ("dirichlet", {"alpha": "0.5"}),
        ("dirichlet", {"min_size": -1}),
        ("shards", {"classes_per_client": 0}),
    ],
)
def test_bad_param_values_are_config_errors(name: str, params: dict) -> None:
    with pytest.raises(ConfigError):
        partition(np.arange(100) % 10, name, 2, 0, **params)


def test_bad_inputs() -> None:
    with pytest.raises(DataError):
        partition(np.array([0.5, 1.0]), "iid", 1, 0)
    with pytest.raises(DataError):
        partition(np.array([-1, 0]), "iid", 1, 0)
    with pytest.raises(ConfigError):
        partition(np.array([0, 1]), "iid", 0, 0)


def test_partition_stats_hand_worked() -> None:
    labels = np.array([0, 1, 1, 2, 0, 2])
    parts = [np.array([0, 1, 2]), np.array([3, 4]), np.array([5])]
    stats = partition_stats(parts, labels, num_classes=4)
    assert stats == {
        "num_clients": 3,
        "num_classes": 4,
        "sizes": [3, 2, 1],
        "label_hist": [[1, 2, 0, 0], [1, 0, 1, 0], [0, 0, 1, 0]],
        "class_counts": [2, 2, 2, 0],
        "classes_per_client": [2, 2, 1],
    }
    assert json.loads(json.dumps(stats)) == stats
