"""The Split-Mix paper's multi-domain data in FedBN's layouts (Split-Mix spec §1): ``fedbn_digits``, ``domainnet``.

Both read from the data root (``data.root``) and give a multi-domain
:class:`~fedtrust.data.types.Dataset`: 3-channel uint8 images resized to
``image_size`` (bilinear, antialiased), domain-major, with domain ids.
Options come from ``data.dataset_params``.

``fedbn_digits`` (Digit-5 as FedBN's ``utils/data_preprocess.py`` writes it):
``ROOT/Digits/<domain>/`` or ``ROOT/<domain>/`` for the domains MNIST, SVHN,
USPS, SynthDigits, MNIST_M, each holding ``partitions/train_part{k}.pkl``
(k = 0..9, about 743 images each) and ``test.pkl``. Each file is a pickled
pair ``(images, labels)``: uint8 images (N, H, W) (grey) or (N, H, W, 3),
integer labels (N,) or (N, 1). Training reads partitions 0..``parts``−1
(Split-Mix's ``percent=0.3`` is ``parts=3``, the default).

``domainnet`` (FedBN's 10-class DomainNet subset): ``ROOT/DomainNet/`` or
``ROOT/`` holding ``{domain}_train.pkl`` and ``{domain}_test.pkl`` for the
domains real, clipart, infograph, painting, quickdraw, sketch. Each is a
pickled pair ``(paths, text_labels)``; the image of a path is read from
``<folder>/<domain>/<class>/<file>``, the path's last three components (as
Split-Mix's ``DomainNetDataset``). Labels are the class names bird, feather,
headphones, ice_cream, teapot, tiger, whale, windmill, wine_glass, zebra
(ids 0..9 in that order). Grey images become RGB; every image is resized to
``image_size`` × ``image_size`` without keeping its aspect ratio (default 64:
256×256, the paper's size, would take 4 GB held in memory).

Pickles are read with the restricted unpickler of ``data.readers`` (numpy
arrays, lists, tuples and strings only, never code). A missing folder or file
is a one-line :class:`~fedtrust.errors.DataError` naming the expected path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtrust.data import readers
from fedtrust.data.datasets import channel_stats
from fedtrust.data.types import Dataset, ImageSet
from fedtrust.errors import DataError
from fedtrust.registry import register

DIGIT_DOMAINS = ("MNIST", "SVHN", "USPS", "SynthDigits", "MNIST_M")
DOMAINNET_DOMAINS = ("real", "clipart", "infograph", "painting", "quickdraw", "sketch")  # Split-Mix domain_order 0
DOMAINNET_CLASSES = ("bird", "feather", "headphones", "ice_cream", "teapot", "tiger", "whale", "windmill",
                     "wine_glass", "zebra")
FEDBN_HINT = "get them with FedBN's utils/data_preprocess.py (github.com/med-air/FedBN)"


def _pick_domains(domains: Sequence[str] | None, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    if domains is None:
        return known
    chosen = tuple(domains)
    bad = [d for d in chosen if d not in known]
    if bad or not chosen or len(set(chosen)) != len(chosen):
        raise DataError(f"{what}: domains must be distinct names from {', '.join(known)}, got {list(chosen)}")
    return chosen


def _check_size(image_size: int, what: str) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"{what}: image_size must be an integer >= 1, got {image_size!r}")
    return image_size


def _find_folder(root: str | Path | None, candidates: Sequence[str], marker: str, name: str, expected: str) -> Path:
    """The first of ``root/c`` holding ``marker``, or a one-line DataError naming where the set is expected."""
    if root is None:
        raise DataError(f"data set {name!r} is read from files but no data root was set; set data.root to the "
                        f"folder holding {expected}")
    root = Path(root)  # a loader called directly may get a str
    looked = [root / c if c else root for c in candidates]
    for folder in looked:
        if (folder / marker).exists():
            return folder
    raise DataError(f"data set {name!r} not found: expected {expected} in {' or '.join(map(str, looked))} "
                    f"(no {marker} there); {FEDBN_HINT}")


def _pair(path: Path) -> tuple[Any, Any]:
    """A pickled ``(a, b)`` pair, read with the restricted unpickler."""
    if not path.is_file():
        raise DataError(f"{path} not found; expected a pickled (images or paths, labels) pair ({FEDBN_HINT})")
    obj = readers.restricted_load(path)
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataError(f"{path}: expected a pickled pair (images or paths, labels), got {type(obj).__name__}")
    return obj[0], obj[1]


def to_rgb_size(x: np.ndarray, size: int, source: str) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, H, W, C) → uint8 (N, 3, size, size): grey repeated, then resized."""
    from fedtrust.data.outliers import fit_to_shape

    if not isinstance(x, np.ndarray):
        raise DataError(f"{source}: images must be a numpy array, got {type(x).__name__}")
    nchw = readers.to_nchw(x, source)
    return fit_to_shape(torch.from_numpy(np.ascontiguousarray(nchw)), (3, size, size))


def _digit_split(path: Path, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _pair(path)
    x = to_rgb_size(images, size, str(path))
    y = readers.to_labels(np.asarray(labels), x.shape[0], str(path))
    if len(y) and int(y.max()) > 9:
        raise DataError(f"{path}: digit labels must lie in 0..9, got {int(y.max())}")
    return x, torch.from_numpy(np.ascontiguousarray(y))


def _join(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], names: tuple[str, ...], k: int) -> ImageSet:
    """Per-domain (x, y) pairs → one domain-major ImageSet."""
    domains = torch.cat([torch.full((len(y),), d, dtype=torch.int64) for d, (_, y) in enumerate(parts)])
    return ImageSet(torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]), k, domains, names)


@register("dataset", "fedbn_digits")
def load_fedbn_digits(root: str | Path | None = None, image_size: int = 28, parts: int = 3,
                      domains: Sequence[str] | None = None) -> Dataset:
    """FedBN's Digit-5 (MNIST, SVHN, USPS, SynthDigits, MNIST_M) as one multi-domain set, 3×``image_size``².

    ``parts``: training partitions 0..parts−1 per domain (1..10); ``domains``: which domains, in this order
    (null: all five in the paper's order).
    """
    size = _check_size(image_size, "fedbn_digits")
    if isinstance(parts, bool) or not isinstance(parts, int) or not 1 <= parts <= 10:
        raise DataError(f"fedbn_digits: parts must be an integer in 1..10 (FedBN's partitions), got {parts!r}")
    names = _pick_domains(domains, DIGIT_DOMAINS, "fedbn_digits")
    folder = _find_folder(root, ("Digits", ""), names[0], "fedbn_digits",
                          f"the FedBN Digits folders {', '.join(names)}")
    train, test = [], []
    for d in names:
        xs, ys = zip(*(_digit_split(folder / d / "partitions" / f"train_part{k}.pkl", size) for k in range(parts)))
        train.append((torch.cat(xs), torch.cat(ys)))
        test.append(_digit_split(folder / d / "test.pkl", size))
    train_set, test_set = _join(train, names, 10), _join(test, names, 10)
    mean, std = channel_stats(train_set.x.numpy())
    return Dataset("fedbn_digits", train_set, test_set, mean, std, augment="none",
                   classes=tuple(str(i) for i in range(10)))


def _as_strings(values: Any, source: str, what: str) -> list[str]:
    items = values.tolist() if isinstance(values, np.ndarray) else values
    if not isinstance(items, (list, tuple)):
        raise DataError(f"{source}: {what} must be a list or array of strings, got {type(values).__name__}")
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in items]


def _read_image(path: Path, size: int) -> np.ndarray:
    """One image file as uint8 (3, size, size): RGB, bilinear resize (Pillow)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB").resize((size, size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except FileNotFoundError:
        raise DataError(f"image {path} not found; expected <DomainNet folder>/<domain>/<class>/<file> for each listed "
                        f"path") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {readers.one_line(e)}") from e


def _domainnet_split(folder: Path, domain: str, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    path = folder / f"{domain}_{split}.pkl"
    paths_raw, labels_raw = _pair(path)
    paths, labels = _as_strings(paths_raw, str(path), "paths"), _as_strings(labels_raw, str(path), "labels")
    if len(paths) != len(labels):
        raise DataError(f"{path}: {len(paths)} paths but {len(labels)} labels; expected one label per image")
    if not paths:
        raise DataError(f"{path}: no images listed; expected at least one")
    index = {c: i for i, c in enumerate(DOMAINNET_CLASSES)}
    bad = next((t for t in labels if t not in index), None)
    if bad is not None:
        raise DataError(f"{path}: unknown class {bad!r}; expected one of {', '.join(DOMAINNET_CLASSES)}")
    x = np.stack([_read_image(folder.joinpath(*p.replace("\\", "/").split("/")[-3:]), size) for p in paths])
    return torch.from_numpy(x), torch.tensor([index[t] for t in labels], dtype=torch.int64)


@register("dataset", "domainnet")
def load_domainnet(root: str | Path | None = None, image_size: int = 64, domains: Sequence[str] | None = None) -> Dataset:
    """FedBN's 10-class DomainNet subset (six domains) as one multi-domain set, 3×``image_size``².

    ``domains``: which domains, in this order (null: real, clipart, infograph, painting, quickdraw, sketch).
    """
    size = _check_size(image_size, "domainnet")
    names = _pick_domains(domains, DOMAINNET_DOMAINS, "domainnet")
    folder = _find_folder(root, ("DomainNet", ""), f"{names[0]}_train.pkl", "domainnet",
                          "FedBN's DomainNet lists {domain}_train.pkl, {domain}_test.pkl and the domain folders")
    train = [_domainnet_split(folder, d, "train", size) for d in names]
    test = [_domainnet_split(folder, d, "test", size) for d in names]
    k = len(DOMAINNET_CLASSES)
    train_set, test_set = _join(train, names, k), _join(test, names, k)
    mean, std = channel_stats(train_set.x.numpy())
    return Dataset("domainnet", train_set, test_set, mean, std, augment="none", classes=DOMAINNET_CLASSES)
