"""Class subsets of a data set: the ID classes of a run (``data.id_classes``), held-out classes as outliers.

The IS&BC digits setup (spec ``fedood_isbc.md`` §6) splits one data set by
class: ID = digits 0–5, the server's training outliers = 6–7, test OOD = 8–9.
:func:`select_classes` makes the ID data set; :func:`class_images` gives the
images of held-out classes (the ``classes:`` outlier source).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from fedtrust.data.types import Dataset, ImageSet
from fedtrust.errors import DataError


def check_classes(classes: Sequence[int], num_classes: int, what: str) -> None:
    """Raise a one-line :class:`DataError` unless ``classes`` are distinct indices in ``0..num_classes-1``.

    ``what`` names the list in the message (e.g. "data.id_classes").
    """
    if len(set(classes)) != len(classes):
        raise DataError(f"{what}: classes {list(classes)} repeat a class; expected distinct classes")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise DataError(f"{what}: class {bad[0]} is out of range; valid: 0..{num_classes - 1}")


def select_image_classes(images: ImageSet, classes: Sequence[int], what: str = "classes") -> ImageSet:
    """The images of ``classes``, in their original order, relabelled to their position in ``classes``.

    Label ``classes[j]`` becomes ``j``; the result has ``len(classes)`` classes. Domain ids, if any, are kept.
    """
    check_classes(classes, images.num_classes, what)
    relabel = torch.full((images.num_classes,), -1, dtype=torch.long, device=images.y.device)
    relabel[torch.as_tensor(list(classes), dtype=torch.long, device=images.y.device)] = torch.arange(
        len(classes), device=images.y.device)
    index = torch.nonzero(relabel[images.y] >= 0).squeeze(1)
    kept = images.subset(index)  # keeps the domain ids of a multi-domain set
    return dataclasses.replace(kept, y=relabel[kept.y], num_classes=len(classes))


def select_classes(dataset: Dataset, classes: Sequence[int]) -> Dataset:
    """``dataset`` cut to ``classes`` (train and test), relabelled ``0..k-1`` in the order given.

    The class names follow the same order. ``mean``/``std`` stay those of the
    whole data set on purpose: a run on a class subset normalises its inputs
    like any other run on the data set (and like the step-1 model an IS&BC
    run starts from), so weights and scores move between them unchanged.

    Raises:
        DataError: a repeated class or one outside ``0..num_classes-1``.
    """
    what = f"{dataset.name} classes"
    check_classes(classes, dataset.num_classes, what)
    names = tuple(dataset.classes[c] for c in classes) if dataset.classes else ()
    return Dataset(dataset.name, select_image_classes(dataset.train, classes, what),
                   select_image_classes(dataset.test, classes, what), dataset.mean, dataset.std,
                   augment=dataset.augment, classes=names)


def class_images(dataset: Dataset, split: str, classes: Sequence[int]) -> Tensor:
    """uint8 images (N, C, H, W) of ``classes`` in split ``split`` ("train" or "test"), in file order."""
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; valid: train, test")
    return select_image_classes(getattr(dataset, split), classes, f"{dataset.name} classes").x
