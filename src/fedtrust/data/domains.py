"""Synthetic multi-domain digit sets: one grey digit set rendered as visually distinct domains (Split-Mix spec §8).

Every domain turns the grey images ``g`` (uint8, N×1×H×W) into 3-channel
uint8 images of the same size, deterministically (fixed seeds, independent
of the run seed, like the digits split):

===========  =========================================================================================
domain       image
===========  =========================================================================================
plain        g in all three channels
inverted     255 − plain
mnist_m      |crop − plain| per channel, crop a random photo crop of the ``photos`` outlier source
             (scikit-image's photographs, ``data.outliers``): MNIST-M's blend (Ganin & Lempitsky 2015),
             without its binarisation of the digit
noisy        plain + Gaussian noise, σ = 64 grey levels, independent per pixel and channel, clipped
rotated      plain rotated 90° counter-clockwise (``torch.rot90``, exact)
===========  =========================================================================================

Registered sets (``data.dataset``), train and test each holding every domain,
domain-major (all of domain 0, then domain 1, ...), ``domains`` giving each
image's domain id:

* ``digits_domains``: every domain transforms the whole split (5 × 1,437 train,
  5 × 360 test): the digits are few, and MNIST-M too is made from MNIST's own
  images. An image's copies share its label and its split, so no test digit is
  seen in training under another domain.
* ``mnist_domains``, ``fashion_mnist_domains``: each domain transforms a
  disjoint fifth of the split (a fixed permutation, seed 0, cut into five
  near-equal parts), so the set keeps MNIST's size (60,000 + 10,000) instead of
  five copies (0.8 GB) and the photo crops take seconds. Read from the data
  root like ``mnist`` (``../shared/data`` holds them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedtrust.data.datasets import channel_stats, load_digits, load_fashion_mnist, load_mnist
from fedtrust.data.types import Dataset, ImageSet
from fedtrust.registry import register

DOMAINS = ("plain", "inverted", "mnist_m", "noisy", "rotated")
NOISE_STD = 64.0  # grey levels
_SEEDS = {"train": 11, "test": 12}  # fixed streams: the domains are part of the data set, not of a run


def plain(g: Tensor) -> Tensor:
    """Grey uint8 (N, 1, H, W) → the same image in three channels."""
    return g.expand(-1, 3, -1, -1).contiguous()


def inverted(g: Tensor) -> Tensor:
    """255 − plain."""
    return 255 - plain(g)


def mnist_m(g: Tensor, seed: int) -> Tensor:
    """|crop − plain| per channel with photo crops of the ``photos`` source (seeded): MNIST-M's blend."""
    from fedtrust.data.outliers import load_outliers

    crops = load_outliers("photos", (3, g.shape[2], g.shape[3]), g.shape[0], seed)
    return (crops.to(torch.int16) - plain(g).to(torch.int16)).abs().to(torch.uint8)


def noisy(g: Tensor, seed: int) -> Tensor:
    """plain + N(0, 64²) per pixel and channel, rounded and clipped to 0..255 (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(g.shape[0], 3, g.shape[2], g.shape[3], generator=gen) * NOISE_STD
    return (plain(g).float() + noise).round().clamp(0, 255).to(torch.uint8)


def rotated(g: Tensor) -> Tensor:
    """plain rotated by 90° counter-clockwise: ``out[..., i, j] = in[..., j, W − 1 − i]`` (square images)."""
    return torch.rot90(plain(g), 1, dims=(2, 3)).contiguous()


def render(domain: str, g: Tensor, seed: int) -> Tensor:
    """The grey images ``g`` in ``domain`` (one of :data:`DOMAINS`); ``seed`` drives the random domains."""
    if g.dtype != torch.uint8 or g.dim() != 4 or g.shape[1] != 1:
        raise ValueError(f"expected grey uint8 images (N, 1, H, W), got {g.dtype} {tuple(g.shape)}")
    fns: dict[str, Callable[[], Tensor]] = {
        "plain": lambda: plain(g), "inverted": lambda: inverted(g), "mnist_m": lambda: mnist_m(g, seed),
        "noisy": lambda: noisy(g, seed), "rotated": lambda: rotated(g)}
    return fns[domain]()


def domain_split(images: ImageSet, split: str, copies: bool) -> ImageSet:
    """``images`` (grey) rendered in every domain, domain-major, with domain ids.

    ``copies``: each domain renders the whole split; otherwise each renders a
    disjoint near-equal share of a fixed permutation (seed 0) of it.
    """
    n, k = len(images), len(DOMAINS)
    if copies:
        shares = [torch.arange(n)] * k
    else:
        perm = torch.from_numpy(np.random.default_rng(0).permutation(n))
        shares = [s.sort().values for s in torch.tensor_split(perm, k)]
    xs, ys, ds = [], [], []
    for d, (name, idx) in enumerate(zip(DOMAINS, shares)):
        xs.append(render(name, images.x[idx], seed=_SEEDS[split] * 100 + d))
        ys.append(images.y[idx])
        ds.append(torch.full((len(idx),), d, dtype=torch.int64))
    return ImageSet(torch.cat(xs), torch.cat(ys), images.num_classes, torch.cat(ds), DOMAINS)


def make_domain_dataset(base: Dataset, name: str, copies: bool) -> Dataset:
    """The grey ``base`` set as a multi-domain :class:`Dataset` ``name`` (mean/std from its training pixels)."""
    train, test = domain_split(base.train, "train", copies), domain_split(base.test, "test", copies)
    mean, std = channel_stats(train.x.numpy())
    return Dataset(name, train, test, mean, std, augment="none", classes=base.classes)


@register("dataset", "digits_domains")
def load_digits_domains(root: str | Path | None = None) -> Dataset:
    """scikit-learn's digits in five domains (3×8×8): 7,185 train / 1,800 test images, each digit in every domain."""
    return make_domain_dataset(load_digits(root), "digits_domains", copies=True)


@register("dataset", "mnist_domains")
def load_mnist_domains(root: str | Path | None = None) -> Dataset:
    """MNIST in five domains (3×28×28), a disjoint fifth of each split per domain (60,000 + 10,000)."""
    return make_domain_dataset(load_mnist(root), "mnist_domains", copies=False)


@register("dataset", "fashion_mnist_domains")
def load_fashion_mnist_domains(root: str | Path | None = None) -> Dataset:
    """Fashion-MNIST in five domains (3×28×28), a disjoint fifth of each split per domain (60,000 + 10,000)."""
    return make_domain_dataset(load_fashion_mnist(root), "fashion_mnist_domains", copies=False)
