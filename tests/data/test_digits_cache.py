"""The digits cache (fedtrust.data.datasets): the same images and split as scikit-learn, without importing it.

Reference: the arrays computed with scikit-learn itself (``_digits_from_sklearn``). A cached load must equal
it bit for bit; a damaged or foreign cache file must be ignored and rewritten, an unwritable cache folder
must cost nothing but the import.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedtrust.data import datasets


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("FEDTRUST_CACHE", str(tmp_path / "cache"))
    return datasets.digits_cache_file()


def _assert_reference(ds) -> None:
    x, y, idx_train, idx_test = datasets._digits_from_sklearn()
    assert np.array_equal(ds.train.x.numpy(), x[idx_train]) and np.array_equal(ds.train.y.numpy(), y[idx_train])
    assert np.array_equal(ds.test.x.numpy(), x[idx_test]) and np.array_equal(ds.test.y.numpy(), y[idx_test])


def test_first_load_writes_the_cache_and_the_second_reads_it(cache: Path) -> None:
    """Rules out a cache that stores another split (a shuffled order, the unsorted indices) or other pixels."""
    assert not cache.exists()
    first = datasets.load_digits()
    assert cache.is_file() and cache.parent.name == "cache" and "digits-sklearn-" in cache.name
    _assert_reference(first)
    second = datasets.load_digits()
    _assert_reference(second)
    assert (first.mean, first.std) == (second.mean, second.std)
    assert not list(cache.parent.glob("*.tmp*"))


def test_a_cached_load_does_not_import_sklearn(cache: Path) -> None:
    """The point of the cache: a fresh process that loads digits from it never imports scikit-learn."""
    datasets.load_digits()
    code = ("import sys\nfrom fedtrust.data.datasets import load_digits\nds = load_digits()\n"
            "print(len(ds.train.y), len(ds.test.y), 'sklearn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ},
                         check=True).stdout.split()
    assert out == ["1437", "360", "False"]


@pytest.mark.parametrize("damage", [b"not a zip file", None])
def test_a_damaged_cache_is_ignored_and_rewritten(cache: Path, damage: bytes | None) -> None:
    """Garbage bytes, or a well-formed file with wrong arrays (a split of the wrong size), are not trusted."""
    cache.parent.mkdir(parents=True)
    if damage is None:
        x, y, tr, te = datasets._digits_from_sklearn()
        np.savez(cache, x=x, y=y, idx_train=tr[:-1], idx_test=te)
    else:
        cache.write_bytes(damage)
    _assert_reference(datasets.load_digits())
    with np.load(cache) as npz:
        assert npz["idx_train"].shape == (1437,)


def test_an_unwritable_cache_costs_only_the_import(tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("FEDTRUST_CACHE", str(blocker / "cache"))
    _assert_reference(datasets.load_digits())
