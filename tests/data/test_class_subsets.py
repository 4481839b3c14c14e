"""Class subsets (fedtrust.data.class_subsets, ``data.id_classes``) and the ``classes:`` outlier source.

The IS&BC digits setup (spec fedood_isbc.md §6): ID = digits 0–5, server outliers = 6–7, test OOD = 8–9.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fedtrust
from fedtrust.cli import main
from fedtrust.data.class_subsets import select_classes
from fedtrust.data.datasets import load_dataset
from fedtrust.data.outliers import check_disjoint, display_name, get_source, load_outliers
from fedtrust.errors import ConfigError, DataError
from fedtrust.runner.config import build_config

ISBC = ["data.id_classes=[0,1,2,3,4,5]", "data.outliers=classes:digits:train:6,7",
        'eval.ood=["classes:digits:test:8,9"]']


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


# ---------------------------------------------------------------- select_classes / data.id_classes


def test_select_classes_keeps_the_chosen_images_in_order_relabelled(digits) -> None:
    """Rules out: relabelling by sorted class (2 → 0 instead of 7 → 0), regrouping the images by class instead of
    keeping file order, cutting one split only, a stale num_classes, class names not following the order, and
    recomputing mean/std on the subset."""
    classes = [7, 2, 5]
    sub = select_classes(digits, classes)
    for split in ("train", "test"):
        full, cut = getattr(digits, split), getattr(sub, split)
        y = full.y.numpy()
        mask = np.isin(y, classes)
        expected_y = np.array([classes.index(c) for c in y[mask]])
        assert torch.equal(cut.x, full.x[torch.from_numpy(mask)])
        assert np.array_equal(cut.y.numpy(), expected_y)
        assert cut.num_classes == 3 and cut.class_counts().tolist() == [int((y == c).sum()) for c in classes]
    assert sub.num_classes == 3 and sub.classes == ("7", "2", "5")
    assert (sub.mean, sub.std, sub.name, sub.augment) == (digits.mean, digits.std, digits.name, digits.augment)


@pytest.mark.parametrize("classes", [[1, 1], [0, 10], [-1, 3]], ids=["duplicate", "too high", "negative"])
def test_select_classes_refuses_repeated_or_out_of_range_classes(digits, classes: list[int]) -> None:
    """Rules out: a repeated class giving two labels to one image set, and a class index wrapping around
    (-1 → the last class) or silently selecting nothing."""
    with pytest.raises(DataError, match="repeat|out of range"):
        select_classes(digits, classes)


def test_run_with_id_classes_trains_and_reports_k_classes(tmp_path: Path, digits) -> None:
    """A 1-round run on digits 0–5 builds a 6-logit model and reports 6 class accuracies. Rules out: applying
    id_classes after the partition or only to the model (class counts over 10 classes, or 8s and 9s left in
    training with labels >= 6), and metrics still sized by the full data set."""
    out = tmp_path / "run"
    result = fedtrust.run(None, ["data.num_clients=4", "data.clients_per_round=2", "train.steps=2",
                                 "eval.personalized=false", "rounds=1", "data.id_classes=[0,1,2,3,4,5]",
                                 f"out={out}"], progress=False, report=False)
    assert result.state.arrays["model/head.weight"].shape[0] == 6
    assert len(result.summary["class_acc"]) == 6
    part = json.loads((out / "partition.json").read_text())
    y = digits.train.y.numpy()
    assert part["num_classes"] == 6
    assert part["class_counts"] == [int((y == c).sum()) for c in range(6)]
    assert sorted(c for group in part["groups"].values() for c in group) == list(range(6))


@pytest.mark.parametrize("value, words", [("[0,1,1]", "repeat"), ("[3]", "at least 2"), ("[0,10]", "0..9")],
                         ids=["duplicates", "one class", "out of range"])
def test_bad_id_classes_is_a_one_line_error(tmp_path: Path, capsys, value: str, words: str) -> None:
    """Rules out: accepting a repeated, single or out-of-range ID class (the out-of-range one is only known once
    the data set is loaded, so it must still come out as a one-line error naming the key, not a traceback)."""
    rc = main(["run", "rounds=1", "data.num_clients=4", "data.clients_per_round=2", "train.steps=1",
               f"data.id_classes={value}", f"out={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "\n" not in err
    assert "data.id_classes" in err and words in err


# ---------------------------------------------------------------- the classes: source


@pytest.mark.parametrize("split, classes", [("train", (6, 7)), ("test", (8, 9))])
def test_classes_source_returns_exactly_those_images(digits, split: str, classes: tuple[int, int]) -> None:
    """All of a ``classes:`` source (n=None) is the split's images of those classes in file order. Rules out:
    reading the other split (the default test split of the cross-dataset sources), ignoring the class list, and
    any resampling of images already at the ID shape."""
    images = getattr(digits, split)
    expected = images.x[torch.from_numpy(np.isin(images.y.numpy(), classes))]
    got = load_outliers(f"classes:digits:{split}:{classes[0]},{classes[1]}", (1, 8, 8))
    assert got.dtype == torch.uint8 and torch.equal(got, expected)


def test_classes_source_draws_n_distinct_seeded_images(digits) -> None:
    """Rules out: ignoring n, drawing with replacement, drawing from outside the classes, and an unseeded draw."""
    name = "classes:digits:train:6,7"
    pool = digits.train.x[torch.from_numpy(np.isin(digits.train.y.numpy(), [6, 7]))].flatten(1)
    a = load_outliers(name, (1, 8, 8), n=50, seed=1)
    rows = [int((pool == row).all(dim=1).nonzero()[0]) for row in a.flatten(1)]  # IndexError: not in the pool
    assert a.shape == (50, 1, 8, 8) and len(set(rows)) == 50
    assert torch.equal(a, load_outliers(name, (1, 8, 8), n=50, seed=1))
    assert not torch.equal(a, load_outliers(name, (1, 8, 8), n=50, seed=2))
    assert load_outliers(name, (3, 16, 16), n=5, seed=1).shape == (5, 3, 16, 16)  # fitted like other sources


def test_classes_source_names_and_roles() -> None:
    """Rules out: a display name without the classes or split, and the train split suggested as an OOD test set."""
    assert display_name("classes:digits:train:6,7") == "digits classes 6, 7 (train)"
    assert get_source("classes:digits:train:6,7").role == "train"
    assert get_source("classes:digits:test:8,9").role == "test"


@pytest.mark.parametrize("name, words", [
    ("classes:digits:train", "expected classes:DATASET:SPLIT:C1,C2"),
    ("classes:digits:train:6,x", "expected classes:DATASET:SPLIT:C1,C2"),
    ("classes:digits:train:", "expected classes:DATASET:SPLIT:C1,C2"),
    ("classes::train:6", "expected classes:DATASET:SPLIT:C1,C2"),
    ("classes:digitz:train:6", "unknown data set 'digitz'"),
    ("classes:digits:val:6", "unknown split 'val'"),
    ("classes:digits:train:6,6", "distinct"),
    ("classes:digits:train:6,10", "class 10 is out of range for digits; valid: 0..9"),
], ids=["no classes", "not an int", "empty classes", "no dataset", "unknown dataset", "unknown split",
        "duplicate", "out of range"])
def test_bad_classes_source_is_a_one_line_error(name: str, words: str) -> None:
    """Rules out: a malformed spec read as something else (a truncated class list, the split as the data set),
    and a class the data set lacks yielding an empty or wrong pool."""
    with pytest.raises(ConfigError) as e:
        load_outliers(name, (1, 8, 8), n=1)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_malformed_classes_source_is_refused_by_the_config() -> None:
    """Rules out: the config accepting a malformed ``classes:`` source that fails only when the data loads."""
    with pytest.raises(ConfigError, match="expected classes:DATASET:SPLIT"):
        build_config({}, ["data.outliers=classes:digits:6,7"])


# ---------------------------------------------------------------- check_disjoint


def test_isbc_digits_setup_is_accepted() -> None:
    """ID 0–5, training outliers 6–7 (+ photos), test OOD 8–9 (+ textures): the spec §6 setup must validate."""
    cfg = build_config({}, [*ISBC[:2], 'eval.ood=["classes:digits:test:8,9", textures]'])
    assert cfg.data.id_classes == [0, 1, 2, 3, 4, 5] and cfg.eval.ood == ["classes:digits:test:8,9", "textures"]
    check_disjoint(["classes:digits:train:6,7", "photos"], ["classes:digits:test:8,9", "textures"], "digits",
                   [0, 1, 2, 3, 4, 5])
    check_disjoint(["photos"], ["classes:mnist:test:8,9"], "digits", None)  # another data set's classes: not ID


@pytest.mark.parametrize("overrides, words", [
    (["data.id_classes=[0,1,2,3,4,5]", "data.outliers=classes:digits:train:5,6"], "holds ID class 5"),
    (["data.id_classes=[0,1,2,3,4,5]", 'eval.ood=["classes:digits:test:4,8"]'], "holds ID class 4"),
    (['eval.ood=["classes:digits:test:8,9"]'], "data.id_classes is null"),
    (["data.outliers=classes:digits:train:6,7"], "data.id_classes is null"),
    (["data.id_classes=[0,1,2,3,4,5]", "data.outliers=classes:digits:train:6,7",
      'eval.ood=["classes:digits:test:7,8"]'], "share class 7 of digits"),
    (["data.id_classes=[0,1,2,3,4,5]", "data.outliers=classes:digits:train:6,7",
      'eval.ood=["classes:digits:test:6,7"]'], "share classes 6, 7 of digits"),
], ids=["outliers are ID", "OOD is ID", "OOD with all classes ID", "outliers with all classes ID",
        "train/test share a class", "train/test same classes, other split"])
def test_overlapping_classes_are_refused(overrides: list[str], words: str) -> None:
    """Rules out: an outlier or OOD ``classes:`` source holding ID classes (with id_classes null, every class is
    ID), and test OOD classes the server saw as training outliers, even from the other split."""
    with pytest.raises(ConfigError) as e:
        build_config({}, overrides)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_overlap_error_reaches_the_cli_as_one_line(tmp_path: Path, capsys) -> None:
    """Rules out: the train/test class overlap surfacing as a traceback instead of ``error:`` and status 2."""
    rc = main(["run", *ISBC[:2], 'eval.ood=["classes:digits:test:7,8"]', f"out={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "share class 7" in err and "\n" not in err
