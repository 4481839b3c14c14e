"""Data set registry: ``load_dataset(name, root)`` returns a :class:`Dataset`.

``digits`` is bundled with scikit-learn and always available. File-based
sets are read from a data root (see ``data.readers``); each looks for its
files in these layouts, in order, and uses the first one complete:

==============  ===============================================================
name            layouts under ``ROOT``
==============  ===============================================================
mnist           ``mnist/{train,test}.npz``; ``MNIST/raw/`` IDX files (torchvision)
fashion_mnist   ``fashion_mnist/{train,test}.npz``; ``FashionMNIST/raw/`` IDX files
cifar10         ``cifar10/{train or train_full_jpeg,test}.npz``; ``cifar-10-batches-py/``
cifar100        ``cifar100/{train,test}.npz``; ``cifar-100-python/{train,test}`` (fine labels)
svhn            ``svhn/{train,test}.npz``; ``{train,test}_32x32.mat`` in ``ROOT`` or ``ROOT/svhn``
npz             ``ROOT/train.npz`` and ``ROOT/test.npz`` (any image set of your own)
==============  ===============================================================

IDX files may be gzip-compressed (``.gz``). The ``.npz`` files hold ``x``
uint8 ((N,H,W), (N,H,W,C) or (N,C,H,W)) and ``y`` int64, opened without
pickle; ``../shared/data`` beside the checkout holds such copies of MNIST,
Fashion-MNIST and CIFAR-10. A missing set raises a one-line ``DataError``
naming every path looked at and how to get the data; a malformed or empty
file, or labels outside the set's classes, one naming the file and what is
expected (:func:`load_npz` lists the rules).

Multi-domain sets register elsewhere: ``digits_domains``, ``mnist_domains`` and
``fashion_mnist_domains`` in :mod:`fedtrust.data.domains`, ``fedbn_digits`` and
``domainnet`` in :mod:`fedtrust.data.fedbn`. A loader's keyword options besides
``root`` (:func:`dataset_params`) come from ``data.dataset_params``.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtrust.data import readers
from fedtrust.data.readers import Arrays
from fedtrust.data.types import Dataset, ImageSet
from fedtrust.errors import ConfigError, DataError
from fedtrust.registry import get, register

DIGITS_TEST_SIZE = 360  # 20 % of 1,797, stratified, fixed split (seed 0) independent of the run seed


def load_dataset(name: str, root: str | Path | None = None, **params: Any) -> Dataset:
    """Load a registered data set by name; ``root`` is the data directory for file-based sets.

    ``params`` are the loader's own options (``data.dataset_params``, e.g. ``image_size`` of ``domainnet``);
    one it does not take is a one-line ConfigError listing those it does.
    """
    loader = get("dataset", name)
    unknown = sorted(set(params) - set(dataset_params(name)))
    if unknown:
        valid = ", ".join(dataset_params(name)) or "none"
        raise ConfigError(f"unknown config key {f'data.dataset_params.{unknown[0]}'!r} for data set {name!r}; valid: {valid}")
    return loader(Path(root) if root is not None else None, **params)


def dataset_params(name: str) -> dict[str, Any]:
    """The options a registered data set's loader takes besides ``root``, with their defaults."""
    sig = inspect.signature(get("dataset", name))
    return {p.name: p.default for p in sig.parameters.values() if p.name != "root"}


@register("dataset", "digits")
def load_digits(root: str | Path | None = None) -> Dataset:
    """scikit-learn's 1,797 8×8 handwritten digits, pixels 0..16 rescaled to uint8 0..255.

    The train/test split is stratified and fixed (``random_state=0``), so every
    run and every test sees the same 1,437 training and 360 test images.
    Importing scikit-learn costs about a second, paid by every process that
    loads digits (each Flower ClientApp message); so the images and the split
    are cached in :func:`digits_cache_file` after the first load, and read from
    there while it holds them for the installed scikit-learn.
    """
    x, y, idx_train, idx_test = _digits_arrays()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    train = ImageSet(xt[idx_train].contiguous(), yt[idx_train].contiguous(), 10)
    test = ImageSet(xt[idx_test].contiguous(), yt[idx_test].contiguous(), 10)
    mean = float(train.x.float().mean() / 255.0)
    std = float(train.x.float().std() / 255.0)
    return Dataset("digits", train, test, (mean,), (std,), augment="none", classes=tuple(str(i) for i in range(10)))


DIGITS_KEYS = ("x", "y", "idx_train", "idx_test")


def digits_cache_file() -> Path:
    """Where the digits cache lives: ``$FEDTRUST_CACHE``, else ``$XDG_CACHE_HOME/fedtrust``, else
    ``~/.cache/fedtrust``; one file per scikit-learn version (its data or split could change)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        sk = version("scikit-learn")
    except PackageNotFoundError:
        sk = "unknown"
    base = os.environ.get("FEDTRUST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "fedtrust")
    return Path(base) / f"digits-sklearn-{sk}.npz"


def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x, y, idx_train, idx_test)``: x uint8 (1797, 1, 8, 8), y int64, the sorted split indices; from the
    cache when it holds sound arrays, else computed with scikit-learn and cached (best effort: an unwritable
    cache only costs the next process the import again)."""
    path = digits_cache_file()
    try:
        with np.load(path) as npz:
            arrays = tuple(npz[k] for k in DIGITS_KEYS)
        if _digits_sound(*arrays):
            return arrays  # type: ignore[return-value]
    except (OSError, ValueError, KeyError, EOFError):
        pass
    arrays = _digits_from_sklearn()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **dict(zip(DIGITS_KEYS, arrays)))
        os.replace(tmp, path)
    except OSError:
        pass
    return arrays


def _digits_sound(x: np.ndarray, y: np.ndarray, idx_train: np.ndarray, idx_test: np.ndarray) -> bool:
    n = 1797
    return (x.dtype == np.uint8 and x.shape == (n, 1, 8, 8) and y.dtype == np.int64 and y.shape == (n,)
            and idx_train.shape == (n - DIGITS_TEST_SIZE,) and idx_test.shape == (DIGITS_TEST_SIZE,)
            and np.array_equal(np.sort(np.concatenate([idx_train, idx_test])), np.arange(n)))


def _digits_from_sklearn() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=DIGITS_TEST_SIZE, stratify=y, random_state=0
    )
    return x, y, np.sort(idx_train).astype(np.int64), np.sort(idx_test).astype(np.int64)


# ---------------------------------------------------------------- file-based sets


@dataclass(frozen=True)
class DatasetSpec:
    """What is fixed about a standard data set: image shape, normalisation, default augmentation, class names.

    ``mean``/``std`` are per-channel statistics of the training pixels scaled
    to [0, 1], the values commonly published for each set.
    """

    name: str
    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str
    classes: tuple[str, ...]
    how_to_get: str  # ends the "not found" error: "get it with ..."


_DIGIT_NAMES = tuple(str(i) for i in range(10))
_NPZ_HINT = "or the .npz files (x uint8, y int64) described in the README"

MNIST = DatasetSpec(
    "mnist", (1, 28, 28), (0.1307,), (0.3081,), "none", _DIGIT_NAMES,
    f"get it with torchvision.datasets.MNIST(root, download=True) {_NPZ_HINT}",
)
FASHION_MNIST = DatasetSpec(
    "fashion_mnist", (1, 28, 28), (0.2860,), (0.3530,), "none",
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    f"get it with torchvision.datasets.FashionMNIST(root, download=True) {_NPZ_HINT}",
)
# std is the true per-channel pixel std (0.2470, ...), not the often-copied (0.2023, 0.1994, 0.2010).
CIFAR10 = DatasetSpec(
    "cifar10", (3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "crop_flip",
    ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    f"get it with torchvision.datasets.CIFAR10(root, download=True) {_NPZ_HINT}",
)
CIFAR100 = DatasetSpec(
    "cifar100", (3, 32, 32), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "crop_flip",
    tuple(
        "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly "
        "camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup "
        "dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower "
        "leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid "
        "otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road "
        "rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower "
        "sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale "
        "willow_tree wolf woman worm".split()
    ),
    f"get it with torchvision.datasets.CIFAR100(root, download=True) {_NPZ_HINT}",
)
SVHN = DatasetSpec(
    "svhn", (3, 32, 32), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), "crop", _DIGIT_NAMES,
    "get it with torchvision.datasets.SVHN(root, split='train', download=True) and split='test', "
    f"{_NPZ_HINT}",
)

Split = tuple[Arrays, Arrays]


@dataclass(frozen=True)
class Layout:
    """One way a data set can sit on disk: the paths it needs (shown in errors) and, if all exist, how to read them.

    ``partial`` says, for a layout found in part, which of its files is there and which is missing.
    """

    looked_at: tuple[str, ...]
    read: Callable[[], Split] | None
    partial: str = ""


def _npz_layout(folder: Path, train_names: Sequence[str] = ("train.npz",)) -> Layout:
    """``folder/<train name>`` (first that exists) and ``folder/test.npz``."""
    trains = [folder / n for n in train_names]
    test = folder / "test.npz"
    train = next((p for p in trains if p.is_file()), None)
    looked_at = (*map(str, trains), str(test))
    if train is None and test.is_file():
        return Layout(looked_at, None, f"{test} is there but {' or '.join(map(str, trains))} is missing")
    if train is not None and not test.is_file():
        return Layout(looked_at, None, f"{train} is there but {test} is missing")
    if train is None:
        return Layout(looked_at, None)
    return Layout(looked_at, lambda: (readers.read_npz(train), readers.read_npz(test)))


def _idx_layout(raw: Path) -> Layout:
    """torchvision's MNIST-style ``raw/`` folder: four IDX files, each plain or ``.gz``."""
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    found = [readers.find_idx(raw, s) for s in stems]
    looked_at = tuple(f"{raw / s}[.gz]" for s in stems)
    if any(f is None for f in found):
        return Layout(looked_at, None)
    train_x, train_y, test_x, test_y = found
    return Layout(looked_at, lambda: (readers.read_idx_pair(train_x, train_y), readers.read_idx_pair(test_x, test_y)))


def _pickle_layout(folder: Path, train: Sequence[str], test: Sequence[str], label_key: str) -> Layout:
    """torchvision's CIFAR python folder: training and test batch files, read with the restricted unpickler."""
    train_paths, test_paths = [folder / n for n in train], [folder / n for n in test]
    looked_at = tuple(str(p) for p in (*train_paths, *test_paths))
    if not all(p.is_file() for p in (*train_paths, *test_paths)):
        return Layout(looked_at, None)
    return Layout(
        looked_at,
        lambda: (readers.read_cifar_batches(train_paths, label_key), readers.read_cifar_batches(test_paths, label_key)),
    )


def _mat_layout(folder: Path) -> Layout:
    """SVHN's ``train_32x32.mat`` and ``test_32x32.mat`` in ``folder``."""
    train, test = folder / "train_32x32.mat", folder / "test_32x32.mat"
    if not (train.is_file() and test.is_file()):
        return Layout((str(train), str(test)), None)
    return Layout((str(train), str(test)), lambda: (readers.read_svhn_mat(train), readers.read_svhn_mat(test)))


def read_first_layout(name: str, root: str | Path | None, layouts: Callable[[Path], list[Layout]],
                      how_to_get: str) -> Split:
    """Read the first complete layout under ``root``, or raise one DataError naming every path looked at."""
    if root is None:
        raise DataError(
            f"data set {name!r} is read from files but no data root was set; "
            f"set one to the folder holding it ({how_to_get})"
        )
    root = Path(root)  # a loader called directly may get a str
    candidates = layouts(root)
    for layout in candidates:
        if layout.read is not None:
            return layout.read()
    where = "" if root.is_dir() else f" (data root {root} does not exist)"
    partial = "".join(f" ({layout.partial})" for layout in candidates if layout.partial)
    paths = ", ".join(p for layout in candidates for p in layout.looked_at)
    raise DataError(f"data set {name!r} not found{where}{partial}: looked for {paths}; {how_to_get}")


def _image_set(arrays: Arrays, num_classes: int, shape: tuple[int, ...] | None) -> ImageSet:
    """Wrap numpy arrays as tensors without copying, checking the image shape and label range."""
    if shape is not None and arrays.x.shape[1:] != shape:
        raise DataError(f"{arrays.source}: images have shape {arrays.x.shape[1:]}, expected {shape}")
    if len(arrays.y) and int(arrays.y.max()) >= num_classes:
        raise DataError(f"{arrays.source}: labels must lie in 0..{num_classes - 1}, got max {int(arrays.y.max())}")
    x = arrays.x if arrays.x.flags.writeable else arrays.x.copy()  # torch warns on read-only memory
    return ImageSet(torch.from_numpy(x), torch.from_numpy(arrays.y), num_classes)


def _check_not_empty(split: Split) -> None:
    """Neither split may be empty: no model trains on nothing, and no metric is defined on nothing."""
    for arrays, what in zip(split, ("training", "test")):
        if len(arrays.y) == 0:
            raise DataError(f"{arrays.source}: the {what} split is empty; expected at least one image")


def _from_spec(spec: DatasetSpec, split: Split) -> Dataset:
    """A standard set's Dataset: the spec's class names, normalisation and augmentation over the read splits.

    The labels must lie in the spec's classes; a class without training images
    is accepted (a subset of a standard set may lack some), unlike in ``npz``.
    """
    _check_not_empty(split)
    k = len(spec.classes)
    train, test = (_image_set(a, k, spec.shape) for a in split)
    return Dataset(spec.name, train, test, spec.mean, spec.std, augment=spec.augment, classes=spec.classes)


def _load_standard(spec: DatasetSpec, root: str | Path | None, layouts: Callable[[Path], list[Layout]]) -> Dataset:
    """Read the first complete layout of ``spec``'s set under ``root``."""
    return _from_spec(spec, read_first_layout(spec.name, root, layouts, spec.how_to_get))


@register("dataset", "mnist")
def load_mnist(root: str | Path | None = None) -> Dataset:
    """MNIST, 60,000 + 10,000 handwritten digits, (N, 1, 28, 28)."""
    return _load_standard(MNIST, root, lambda r: [_npz_layout(r / "mnist"), _idx_layout(r / "MNIST" / "raw")])


@register("dataset", "fashion_mnist")
def load_fashion_mnist(root: str | Path | None = None) -> Dataset:
    """Fashion-MNIST, 60,000 + 10,000 clothing images, (N, 1, 28, 28)."""
    return _load_standard(
        FASHION_MNIST, root, lambda r: [_npz_layout(r / "fashion_mnist"), _idx_layout(r / "FashionMNIST" / "raw")]
    )


@register("dataset", "cifar10")
def load_cifar10(root: str | Path | None = None) -> Dataset:
    """CIFAR-10, 50,000 + 10,000 colour images, (N, 3, 32, 32).

    ``cifar10/train_full_jpeg.npz`` (the JPEG copy in ``../shared/data``) is
    decoded once and cached (``readers.read_jpeg_npz``); it is lossy, fine for
    comparing methods but not for matching published numbers exactly.
    """
    batches = [f"data_batch_{i}" for i in range(1, 6)]
    return _load_standard(
        CIFAR10,
        root,
        lambda r: [
            _npz_layout(r / "cifar10", ("train.npz", "train_full_jpeg.npz")),
            _pickle_layout(r / "cifar-10-batches-py", batches, ["test_batch"], "labels"),
        ],
    )


@register("dataset", "cifar100")
def load_cifar100(root: str | Path | None = None) -> Dataset:
    """CIFAR-100 with its 100 fine labels, 50,000 + 10,000 colour images, (N, 3, 32, 32)."""
    return _load_standard(
        CIFAR100,
        root,
        lambda r: [
            _npz_layout(r / "cifar100"),
            _pickle_layout(r / "cifar-100-python", ["train"], ["test"], "fine_labels"),
        ],
    )


@register("dataset", "svhn")
def load_svhn(root: str | Path | None = None) -> Dataset:
    """SVHN cropped digits, 73,257 + 26,032 colour images, (N, 3, 32, 32); label 10 of the .mat files is digit 0.

    The ``extra`` split is not read.
    """
    return _load_standard(SVHN, root, lambda r: [_npz_layout(r / "svhn"), _mat_layout(r), _mat_layout(r / "svhn")])


@register("dataset", "npz")
def load_npz(root: str | Path | None = None) -> Dataset:
    """Any image set of your own: ``ROOT/train.npz`` and ``ROOT/test.npz``.

    Each file holds ``x`` uint8 of shape (N, H, W), (N, H, W, C) or
    (N, C, H, W) (pixels 0..255: float or wider-integer images are refused, as
    their scale would be a guess) and ``y`` integer labels, one per image. A
    JPEG pack (``jpeg``, ``offsets``, ``y``) is accepted in place of ``x``.
    ``mean`` and ``std`` are computed per channel from the training pixels, and
    the default augmentation is ``"none"`` (choose one in the config).

    Classes: ``train.npz`` may declare ``classes`` (one distinct name per
    class), and then K = ``len(classes)``; otherwise K is the largest training
    label plus one. Either way the labels of both files must lie in 0..K-1 and
    every class 0..K-1 must have a training image: an empty class is an error
    naming it (a label 57 in a 10-class set, or labels 1..10, would otherwise
    build a model with classes nobody trains). ``test.npz`` may repeat
    ``classes``, but then the same names. Neither split may be empty, and both
    have one image shape. Each violation is a one-line :class:`DataError`
    naming the file and what is expected.
    """
    how = (
        "write two files ROOT/train.npz and ROOT/test.npz with arrays x (uint8 images) and y (int labels), "
        "see fedtrust.data.datasets.load_npz"
    )
    train, test = read_first_layout("npz", root, lambda r: [_npz_layout(r)], how)
    if train.x.shape[1:] != test.x.shape[1:]:
        raise DataError(f"{test.source}: images have shape {test.x.shape[1:]}, {train.source} has {train.x.shape[1:]}")
    _check_not_empty((train, test))
    if test.classes and test.classes != train.classes:
        raise DataError(f"{test.source}: classes {_names(test.classes)} differ from {train.source}'s "
                        f"{_names(train.classes) if train.classes else '(none)'}; expected the same names or none")
    if train.classes:
        k, why = len(train.classes), f"K = {len(train.classes)} names in classes"
    else:
        k = int(train.y.max()) + 1
        why = f"K = {k}, the largest training label + 1"
    for arrays in (train, test):
        if int(arrays.y.max()) >= k:
            raise DataError(f"{arrays.source}: labels must lie in 0..{k - 1} ({why}), got {int(arrays.y.max())}")
    empty = missing_labels(np.unique(train.y), k)
    if empty:
        named = f" ({_names(tuple(train.classes[i] for i in _first(empty)))})" if train.classes else ""
        raise DataError(f"{train.source}: no training image of class {format_ranges(empty)}{named}; expected every "
                        f"class 0..{k - 1} to have one ({why}): renumber the labels 0..K-1 or drop the class")
    classes = train.classes or tuple(str(i) for i in range(k))
    mean, std = channel_stats(train.x)
    return Dataset("npz", _image_set(train, k, None), _image_set(test, k, None), mean, std, "none", classes)


def missing_labels(present: np.ndarray, k: int) -> list[tuple[int, int]]:
    """The labels of 0..k-1 absent from ``present`` (sorted, distinct, all < k) as inclusive ranges.

    Works from the gaps between present labels, so a label of 10**12 costs no
    10**12-entry count table.
    """
    bounds = [-1, *(int(v) for v in present), k]
    return [(a + 1, b - 1) for a, b in zip(bounds[:-1], bounds[1:]) if b - a > 1]


def format_ranges(ranges: Sequence[tuple[int, int]], limit: int = 6) -> str:
    """``[(3, 3), (5, 9)]`` → ``"3, 5..9"``; beyond ``limit`` ranges, ``"<first limit> and N more ranges"``."""
    shown = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in ranges[:limit])
    return shown + (f" and {len(ranges) - limit} more ranges" if len(ranges) > limit else "")


def _first(ranges: Sequence[tuple[int, int]], limit: int = 6) -> list[int]:
    """The first ``limit`` labels of ``ranges``."""
    out: list[int] = []
    for a, b in ranges:
        out.extend(range(a, min(b, a + limit - len(out) - 1) + 1))
        if len(out) >= limit:
            break
    return out


def _names(names: Sequence[str], limit: int = 6) -> str:
    """Class names quoted, the first ``limit`` of them."""
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of uint8 NCHW pixels scaled to [0, 1], from 256-bin histograms."""
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = np.bincount(x[:, c].ravel(), minlength=256).astype(np.float64)
        p = counts / counts.sum()
        mean = float(p @ levels)
        means.append(mean)
        stds.append(float(np.sqrt(max(p @ (levels - mean) ** 2, 0.0))))
    return tuple(means), tuple(stds)
