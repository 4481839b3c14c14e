"""The in-memory data representation (DESIGN principle 1).

A data set is a pair of tensors held in memory: ``x`` uint8 images of shape
``(N, C, H, W)`` and ``y`` int64 labels of shape ``(N,)``. A client is an index
array into the training split. Nothing here creates a DataLoader.

A multi-domain set (``digits_domains``, ``fedbn_digits``, ``domainnet``; Split-Mix
spec §1, §8) also carries ``domains``, int64 domain ids of shape ``(N,)``, and
``domain_names``; both travel through :meth:`ImageSet.subset` and ``to``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedtrust.errors import DataError


@dataclass(frozen=True)
class ImageSet:
    """Images ``x`` (uint8, N×C×H×W) with labels ``y`` (int64, N).

    ``domains`` (int64, N; optional) is each image's domain id, an index into
    ``domain_names``; None for a single-domain set.
    """

    x: Tensor
    y: Tensor
    num_classes: int
    domains: Tensor | None = None
    domain_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise DataError(f"images must be a uint8 tensor of shape (N, C, H, W), got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise DataError(f"labels must be int64 of shape ({self.x.shape[0]},), got {self.y.dtype} {tuple(self.y.shape)}")
        if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= self.num_classes):
            raise DataError(f"labels must lie in 0..{self.num_classes - 1}, got {int(self.y.min())}..{int(self.y.max())}")
        if self.domains is not None:
            self._check_domains()
        elif self.domain_names:
            raise DataError(f"domain names {list(self.domain_names)} given without domain ids; expected both or neither")

    def _check_domains(self) -> None:
        d, k = self.domains, len(self.domain_names)
        if d.dtype != torch.int64 or d.shape != (self.x.shape[0],):
            raise DataError(f"domain ids must be int64 of shape ({self.x.shape[0]},), got {d.dtype} {tuple(d.shape)}")
        if k == 0 or len(set(self.domain_names)) != k:
            raise DataError(f"domain ids need distinct domain names, got {list(self.domain_names)}")
        if len(d) and (int(d.min()) < 0 or int(d.max()) >= k):
            raise DataError(f"domain ids must lie in 0..{k - 1}, got {int(d.min())}..{int(d.max())}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-image shape (C, H, W)."""
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, index: Tensor) -> "ImageSet":
        """The images at ``index`` (a LongTensor), same class count (and domain ids, if any)."""
        domains = None if self.domains is None else self.domains[index]
        return ImageSet(self.x[index], self.y[index], self.num_classes, domains, self.domain_names)

    def class_counts(self) -> Tensor:
        """Number of images per class, shape (num_classes,)."""
        return torch.bincount(self.y, minlength=self.num_classes)

    def to(self, device: torch.device | str) -> "ImageSet":
        """The same set on ``device``."""
        domains = None if self.domains is None else self.domains.to(device)
        return ImageSet(self.x.to(device), self.y.to(device), self.num_classes, domains, self.domain_names)


@dataclass(frozen=True)
class Dataset:
    """A named data set: train and test splits plus how to normalise its pixels.

    ``mean``/``std`` are per-channel statistics of pixels scaled to [0, 1];
    ``augment`` names the default training augmentation (see ``data.augment``).
    """

    name: str
    train: ImageSet
    test: ImageSet
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"
    classes: tuple[str, ...] = field(default=())

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.train.shape

    @property
    def domain_names(self) -> tuple[str, ...]:
        """The domains of a multi-domain set, in id order; empty for a single-domain one."""
        return self.train.domain_names
