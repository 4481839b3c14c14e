"""Bad ``.npz`` data: every malformed input is a one-line ``DataError`` naming the file and what is expected.

The explicit cases write one bad ``train.npz`` or ``test.npz`` beside a good
partner and check the message names that file (not the other one) and the
rule it breaks. The property tests throw random key sets, shapes, dtypes,
label values, lengths and damaged bytes at ``load_dataset("npz", ...)``: each
load either returns a data set consistent with the files or raises the
one-line error, never another exception (an ``IndexError`` from a bincount,
a ``ValueError`` from numpy, a model with 58 classes built from labels 0..2
and 57).
"""

from __future__ import annotations

import io
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fedtrust.data import readers
from fedtrust.data.datasets import format_ranges, load_dataset, missing_labels
from fedtrust.errors import DataError

GOOD_X = np.arange(6 * 8 * 8, dtype=np.int64).reshape(6, 8, 8).astype(np.uint8)
GOOD_Y = np.array([0, 1, 2, 0, 1, 2])


def _write(path: Path, content: dict[str, np.ndarray] | bytes | None) -> None:
    """An ``.npz`` of ``content``'s arrays, raw bytes, or nothing (None: the file is missing)."""
    if content is None:
        return
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.savez(path, **content)


def _npz_bytes(compressed: bool = False, **arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return buffer.getvalue()


def _load_error(root: Path, train: dict | bytes | None, test: dict | bytes | None) -> str:
    """The message of the DataError that loading ``root`` as an npz set raises (fails if it loads)."""
    _write(root / "train.npz", train)
    _write(root / "test.npz", test)
    with pytest.raises(DataError) as err:
        load_dataset("npz", root)
    message = str(err.value)
    assert "\n" not in message
    return message


GOOD = {"x": GOOD_X, "y": GOOD_Y}

# (case id, train.npz content, test.npz content, the file the message must name, what it must say)
BAD_CASES = [
    ("missing x", {"y": GOOD_Y}, GOOD, "train", r"expected arrays x and y .*; missing x, found y"),
    ("missing y", {"x": GOOD_X}, GOOD, "train", r"expected arrays x and y .*; missing y, found x"),
    ("missing both", {"images": GOOD_X}, GOOD, "train", r"expected arrays x and y .*; missing x and y, found images"),
    ("x 2-d", {"x": GOOD_X.reshape(6, 64), "y": GOOD_Y}, GOOD, "train", r"x must have shape \(N,H,W\).*got \(6, 64\)"),
    ("x 5-d", {"x": GOOD_X.reshape(6, 1, 1, 8, 8), "y": GOOD_Y}, GOOD, "train", r"x must have shape \(N,H,W\)"),
    ("x 2 channels", {"x": GOOD_X.reshape(6, 2, 4, 8), "y": GOOD_Y}, GOOD, "train", r"with C in 1/3/4"),
    ("x float", {"x": GOOD_X / 255.0, "y": GOOD_Y}, GOOD, "train", r"x must be uint8 images .*got dtype float64"),
    ("x uint16", {"x": GOOD_X.astype(np.uint16), "y": GOOD_Y}, GOOD, "train", r"x must be uint8 .*got dtype uint16"),
    ("x no pixels", {"x": GOOD_X[:, :0], "y": GOOD_Y}, GOOD, "train", r"at least 1x1 pixels"),
    ("x objects", {"x": np.array([None] * 6, dtype=object), "y": GOOD_Y}, GOOD, "train",
     r"cannot read array 'x'.*expected a plain array"),
    ("y float", {"x": GOOD_X, "y": GOOD_Y.astype(np.float32)}, GOOD, "train", r"y must hold integer class labels"),
    ("y bool", {"x": GOOD_X, "y": GOOD_Y > 0}, GOOD, "train", r"y must hold integer class labels, got dtype bool"),
    ("y 2-d", {"x": GOOD_X, "y": np.zeros((6, 2), np.int64)}, GOOD, "train", r"y must be 1-d .*got shape \(6, 2\)"),
    ("y short", {"x": GOOD_X, "y": GOOD_Y[:5]}, GOOD, "train", r"x holds 6 images but y holds 5 labels"),
    ("y negative", {"x": GOOD_X, "y": GOOD_Y - 1}, GOOD, "train", r"labels must be >= 0, got -1"),
    ("y beyond int64", {"x": GOOD_X, "y": np.array([0, 1, 2, 0, 1, 2**63 + 1], np.uint64)}, GOOD, "train",
     r"labels must be class indices"),
    ("label 57 in train", {"x": GOOD_X, "y": np.array([0, 1, 2, 0, 1, 57])}, GOOD, "train",
     r"no training image of class 3\.\.56; expected every class 0\.\.57 .*largest training label \+ 1"),
    ("label 57 in test", GOOD, {"x": GOOD_X, "y": np.array([0, 1, 2, 0, 1, 57])}, "test",
     r"labels must lie in 0\.\.2 \(K = 3, the largest training label \+ 1\), got 57"),
    ("labels from 1", {"x": GOOD_X, "y": GOOD_Y + 1}, {"x": GOOD_X, "y": GOOD_Y + 1}, "train",
     r"no training image of class 0; expected every class 0\.\.3"),
    ("empty inferred class", {"x": GOOD_X, "y": np.array([0, 2, 2, 0, 0, 2])}, GOOD, "train",
     r"no training image of class 1; expected every class 0\.\.2"),
    ("empty declared class", {"x": GOOD_X, "y": np.array([0, 1, 0, 1, 0, 1]), "classes": np.array(["a", "b", "c"])},
     GOOD, "train", r"no training image of class 2 \('c'\).*K = 3 names in classes"),
    ("label beyond declared", {"x": GOOD_X, "y": np.array([0, 1, 2, 0, 1, 3]), "classes": np.array(["a", "b", "c"])},
     GOOD, "train", r"labels must lie in 0\.\.2 \(K = 3 names in classes\), got 3"),
    ("test beyond declared", {**GOOD, "classes": np.array(["a", "b", "c"])}, {"x": GOOD_X, "y": GOOD_Y + 1}, "test",
     r"labels must lie in 0\.\.2 \(K = 3 names in classes\), got 3"),
    ("classes 2-d", {**GOOD, "classes": np.array([["a", "b", "c"]])}, GOOD, "train", r"classes must be a 1-d array"),
    ("classes empty", {**GOOD, "classes": np.array([], dtype=str)}, GOOD, "train", r"classes must be a 1-d array"),
    ("classes repeated", {**GOOD, "classes": np.array(["a", "a", "c"])}, GOOD, "train",
     r"classes must be distinct names, 'a' appears 2 times"),
    ("classes disagree", {**GOOD, "classes": np.array(["a", "b", "c"])}, {**GOOD, "classes": np.array(["a", "b", "d"])},
     "test", r"classes 'a', 'b', 'd' differ from .*train\.npz's 'a', 'b', 'c'"),
    ("empty train", {"x": GOOD_X[:0], "y": GOOD_Y[:0]}, GOOD, "train", r"training split is empty; expected at"),
    ("empty test", GOOD, {"x": GOOD_X[:0], "y": GOOD_Y[:0]}, "test", r"the test split is empty; expected at least one"),
    ("shapes differ", GOOD, {"x": GOOD_X[:, :7], "y": GOOD_Y}, "test", r"images have shape \(1, 7, 8\)"),
    ("text file", b"x,y\n1,2\n", GOOD, "train", r"is not a zip archive .*expected an \.npz archive"),
    ("empty file", b"", GOOD, "train", r"is empty; expected an \.npz archive"),
    ("lone npy", np.lib.format.magic(1, 0) + b"rest", GOOD, "train", r"is a single \.npy array"),
    ("truncated zip", GOOD, _npz_bytes(**GOOD)[:-30], "test", r"test\.npz"),
    ("missing test", GOOD, None, "test", r"train\.npz is there but .*test\.npz is missing"),
    ("missing train", None, GOOD, "train", r"test\.npz is there but .*train\.npz is missing"),
]


@pytest.mark.parametrize("train, test, culprit, expected", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_npz_is_one_line_naming_the_file(tmp_path: Path, train, test, culprit: str, expected: str) -> None:
    """Each bad input names the broken file first and the rule; rules out a traceback from deep inside numpy
    or torch, a message that blames the wrong split, and a silent accept (a 58-class model, an empty class)."""
    message = _load_error(tmp_path, train, test)
    assert str(tmp_path / f"{culprit}.npz") in message
    other = tmp_path / ("test.npz" if culprit == "train" else "train.npz")
    if "is missing" not in expected and "differ from" not in expected and "images have shape" not in expected:
        assert str(other) not in message, "the message blames the good file too"
    assert re.search(expected, message), message


def test_declared_classes_allow_names_and_agreeing_test_file(tmp_path: Path) -> None:
    """The accepted counterparts of the cases above: declared names, a test file repeating them, a test split
    lacking a class. Rules out rules so strict they refuse good data."""
    names = np.array(["cat", "dog", "eel"])
    _write(tmp_path / "train.npz", {**GOOD, "classes": names})
    _write(tmp_path / "test.npz", {"x": GOOD_X[:2], "y": np.array([2, 2]), "classes": names})
    ds = load_dataset("npz", tmp_path)
    assert ds.classes == ("cat", "dog", "eel") and ds.num_classes == 3
    assert ds.train.class_counts().tolist() == [2, 2, 2] and ds.test.y.tolist() == [2, 2]


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_standard_npz_layouts_share_the_reader_rules(tmp_path: Path, name: str) -> None:
    """The standard sets' .npz layouts go through the same reader: float images and an empty test split name
    their file. A class without training images stays accepted there (a subset of a standard set may lack
    some), so only the npz set checks it."""
    shape = (28, 28) if "mnist" in name else (32, 32, 3)
    x = np.zeros((4, *shape), np.uint8)
    folder = tmp_path / name
    folder.mkdir()
    _write(folder / "train.npz", {"x": x.astype(np.float32), "y": np.arange(4)})
    _write(folder / "test.npz", {"x": x, "y": np.arange(4)})
    with pytest.raises(DataError, match="^" + re.escape(f"{folder / 'train.npz'}: x must be uint8")):
        load_dataset(name, tmp_path)
    _write(folder / "train.npz", {"x": x, "y": np.arange(4)})
    _write(folder / "test.npz", {"x": x[:0], "y": np.arange(0)})
    with pytest.raises(DataError, match="^" + re.escape(f"{folder / 'test.npz'}: the test split is empty")):
        load_dataset(name, tmp_path)
    _write(folder / "test.npz", {"x": x, "y": np.arange(4)})
    assert load_dataset(name, tmp_path).train.class_counts().tolist()[4:] == [0] * 6


@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
def test_every_damaged_byte_is_caught_or_harmless(tmp_path: Path, compressed: bool) -> None:
    """Flip each byte of an archive in turn: the read either returns the original arrays (the byte was a zip
    timestamp or other field numpy never checks) or raises the one-line DataError naming the file. Rules out
    a damaged deflate stream escaping as zlib.error, a bad CRC as BadZipFile, a mangled .npy header as
    ValueError or a renamed member as KeyError."""
    raw = _npz_bytes(compressed, **GOOD)
    path = tmp_path / "train.npz"
    outcomes = {"read": 0, "refused": 0}
    for at in range(len(raw)):
        damaged = bytearray(raw)
        damaged[at] ^= 0x55
        path.write_bytes(bytes(damaged))
        try:
            arrays = readers.read_npz(path)
        except DataError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            outcomes["refused"] += 1
            continue
        np.testing.assert_array_equal(arrays.x[:, 0], GOOD_X)
        np.testing.assert_array_equal(arrays.y, GOOD_Y)
        outcomes["read"] += 1
    assert outcomes["refused"] > len(raw) // 3 and outcomes["read"] > 0, outcomes


def test_missing_labels_and_ranges() -> None:
    """Hand-worked gaps: before the first label, between labels, after the last; a huge label costs no table."""
    assert missing_labels(np.array([0, 1, 2]), 3) == []
    assert missing_labels(np.array([1, 3]), 6) == [(0, 0), (2, 2), (4, 5)]
    assert missing_labels(np.array([0, 10**12]), 10**12 + 1) == [(1, 10**12 - 1)]
    assert format_ranges([(0, 0), (2, 2), (4, 5)]) == "0, 2, 4..5"
    assert format_ranges([(i, i) for i in range(0, 20, 2)], limit=2) == "0, 2 and 8 more ranges"


# ---------------------------------------------------------------- property tests

FLAWS = (
    "x float", "x int64", "x bool", "x flat", "x 5-d", "x 2 channels", "x no pixels", "y float", "y bool", "y 2-d",
    "y short", "y long", "y negative", "label 57", "empty class", "empty", "no x", "no y", "classes short",
    "classes repeated", "classes 2-d", "truncated", "flipped byte", "missing", "junk bytes",
    "label 57", "empty class", "flipped byte",  # twice: the flaws a load would otherwise accept silently
)
Content = dict[str, np.ndarray] | bytes | None


def _flawed(arrays: dict[str, np.ndarray], flaws: set[str], draw: st.DrawFn) -> tuple[Content, dict[str, np.ndarray]]:
    """``arrays`` with ``flaws`` applied (as arrays, damaged archive bytes, junk or a missing file), and the
    arrays the content was made from (what a load that succeeds must return)."""
    a = dict(arrays)
    x, y = a["x"], a["y"]
    edits = {
        "x float": lambda: x / 255.0, "x int64": lambda: x.astype(np.int64), "x bool": lambda: x > 0,
        "x flat": lambda: x.reshape(len(x), -1), "x 5-d": lambda: x[:, None], "x no pixels": lambda: x[..., :0],
        "x 2 channels": lambda: np.zeros((len(x), 2, 5, 6), np.uint8),
    }
    for flaw, edit in edits.items():
        if flaw in flaws:
            a["x"] = edit()
    y_edits = {
        "y float": lambda: y.astype(np.float64), "y bool": lambda: y > 0, "y 2-d": lambda: np.stack([y, y], 1),
        "y short": lambda: y[:-1], "y long": lambda: np.append(y, 0), "y negative": lambda: np.where(y == y[0], -1, y),
        "label 57": lambda: np.where(y == y[-1], 57, y), "empty class": lambda: np.where(y == 0, y.max(), y),
    }
    for flaw, edit in y_edits.items():
        if flaw in flaws:
            a["y"] = edit()
    if "empty" in flaws:
        a["x"], a["y"] = a["x"][:0], a["y"][:0]
    k = len(a.get("classes", ())) or 2
    if "classes short" in flaws:
        a["classes"] = np.array([f"c{i}" for i in range(max(k - 1, 1))])
    if "classes repeated" in flaws:
        a["classes"] = np.array(["c"] * k)
    if "classes 2-d" in flaws and "classes" in a:
        a["classes"] = a["classes"][None]
    for key in ("x", "y"):
        if f"no {key}" in flaws:
            del a[key]
    if "missing" in flaws:
        return None, a
    if "junk bytes" in flaws:
        return draw(st.binary(max_size=40)), a
    if "truncated" in flaws or "flipped byte" in flaws:
        raw = bytearray(_npz_bytes(draw(st.booleans()), **a))  # deflated members fail in zlib when damaged
        at = draw(st.integers(0, len(raw) - 1))
        if "truncated" in flaws:
            return bytes(raw[:at]), a
        raw[at] ^= draw(st.integers(1, 255))
        return bytes(raw), a
    return a, a


@st.composite
def npz_pair(draw: st.DrawFn) -> tuple[Content, Content, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(train.npz content, test.npz content, and the arrays each was made from): a valid pair in one of the
    supported layouts, label dtypes and with or without class names, then for each file, half the time, one
    or two flaws."""
    k = draw(st.integers(1, 4))
    layout = draw(st.sampled_from(["nhw", "nhwc", "nchw"]))
    c = 1 if layout == "nhw" else draw(st.sampled_from([1, 3]))
    y_dtype = draw(st.sampled_from([np.int64, np.int32, np.uint8, np.uint64]))
    names = np.array([f"c{i}" for i in range(k)]) if draw(st.booleans()) else None
    good = []
    for split in ("train", "test"):
        n = draw(st.integers(k if split == "train" else 1, 6))
        y = np.array(draw(st.permutations(np.arange(n) % k)), dtype=y_dtype)
        x = np.full((n, c, 5, 6), len(y), np.uint8)  # H, W not in 1/3/4: the layout is unambiguous
        x = {"nhw": x[:, 0], "nhwc": x.transpose(0, 2, 3, 1), "nchw": x}[layout]
        good.append({"x": x, "y": y, **({"classes": names} if names is not None and split == "train" else {})})
    made = []
    for arrays in good:
        flaws = draw(st.sets(st.sampled_from(FLAWS), min_size=1, max_size=2)) if draw(st.booleans()) else set()
        made.append(_flawed(arrays, flaws, draw))
    (train, train_arrays), (test, test_arrays) = made
    return train, test, train_arrays, test_arrays


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=npz_pair())
def test_random_npz_loads_consistently_or_fails_in_one_line(pair) -> None:
    """Whatever the files hold, loading returns a data set equal to the good arrays or raises the one-line
    DataError naming a file, never another exception type: rules out a check missing for some combination (a
    y of the wrong length reaching torch, a float x cast silently, an empty class inside 0..K-1 accepted, a
    label 57 widening the model, a damaged archive raising zlib.error)."""
    train, test, made_train, made_test = pair
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        _write(root / "train.npz", train)
        _write(root / "test.npz", test)
        try:
            ds = load_dataset("npz", root)
        except DataError as e:
            event("refused")
            message = str(e)
            assert "\n" not in message
            assert str(root / "train.npz") in message or str(root / "test.npz") in message, message
            return
    event("loaded")  # good files, harmless flaws (a test split lacking a class), damage numpy never reads
    y_train = made_train["y"].astype(np.int64)
    k = len(made_train["classes"]) if "classes" in made_train else int(y_train.max()) + 1
    assert ds.num_classes == k and len(ds.classes) == k
    assert ds.train.y.tolist() == y_train.tolist() and ds.test.y.tolist() == made_test["y"].astype(int).tolist()
    assert ds.train.x.dtype == torch.uint8 and ds.train.x.dim() == 4 and ds.train.shape == ds.test.shape
    assert ds.train.x.numel() == made_train["x"].size and (ds.train.x == len(made_train["x"])).all()  # pixels = N
    assert (ds.train.class_counts() > 0).all(), "a class without training images was accepted"
    assert 0 <= int(ds.test.y.min()) and int(ds.test.y.max()) < k


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(1, 3), min_size=1, max_size=5),
    layout=st.sampled_from(["nhw", "nhwc", "nchw"]),
    channels=st.sampled_from([1, 3]),
    declared=st.booleans(),
    test_size=st.integers(1, 4),
)
def test_well_formed_npz_always_loads_exactly(counts, layout, channels, declared, test_size) -> None:
    """Good files of every supported layout load with their labels, pixels and class count unchanged: rules
    out checks that refuse valid data (a uint8 label dtype, a class only in the training split)."""
    k = len(counts)
    y = np.repeat(np.arange(k), counts).astype(np.uint8)
    n = len(y)
    c = 1 if layout == "nhw" else channels
    x_nchw = (np.arange(n * c * 5 * 6) % 256).astype(np.uint8).reshape(n, c, 5, 6)  # H, W not in 1/3/4: unambiguous
    stored = {"nhw": x_nchw[:, 0], "nhwc": x_nchw.transpose(0, 2, 3, 1), "nchw": x_nchw}[layout]
    extra = {"classes": np.array([f"c{i}" for i in range(k)])} if declared else {}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        _write(root / "train.npz", {"x": stored, "y": y, **extra})
        _write(root / "test.npz", {"x": stored[:test_size], "y": y[:test_size]})
        ds = load_dataset("npz", root)
    assert ds.num_classes == k and ds.train.class_counts().tolist() == counts
    np.testing.assert_array_equal(ds.train.x.numpy(), x_nchw)
    assert ds.test.y.tolist() == y[: min(test_size, n)].tolist()
    assert ds.classes == (tuple(f"c{i}" for i in range(k)) if declared else tuple(map(str, range(k))))
