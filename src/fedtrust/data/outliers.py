"""Auxiliary outliers and OOD test sets, registered under the ``"outliers"`` kind.

``load_outliers(name, shape, n, seed, root)`` returns ``n`` uint8 images
``(n, C, H, W)`` resized to the ID data's ``shape`` (bilinear, antialiased;
RGB → grey by ITU-R 601 luminance when ``C = 1``, grey → RGB by repetition
when ``C = 3``), the same for the same ``seed``. Sources:

==================  ======================  ===========  =====================================================
name                display name            suggested    what
==================  ======================  ===========  =====================================================
photos              skimage photos          train        random crops of scikit-image's bundled photographs
textures            skimage textures        test         random crops of scikit-image's brick, grass, gravel
noise               Noise                   test         half uniform noise, half Gaussian-blurred noise
openclipart         OpenClipArt             train        ``ood/openclipart_28.npz`` when C = 1, else ``_32``
openclipart_28      OpenClipArt             train        ``ROOT/ood/openclipart_28.npz`` (grey, light on black)
openclipart_32      OpenClipArt             train        ``ROOT/ood/openclipart_32.npz`` (RGB on white)
animal_mnist        Animal-MNIST            test (near) ``ROOT/ood/animal_mnist.npz``
notmnist_fonts      notMNIST-fonts          test (near) ``ROOT/ood/notmnist_fonts.npz``
textures_gimp_32    Textures-GIMP           test (far)  ``ROOT/ood/textures_gimp_32.npz``
emoji_google_32     Emoji-Google            test (far)  ``ROOT/ood/emoji_google_32.npz``
mnist               MNIST                   test        MNIST test images (cross-dataset OOD)
fashion_mnist       Fashion-MNIST           test        Fashion-MNIST test images (cross-dataset OOD)
npz:PATH            file stem               either      any ``.npz`` with uint8 ``x``, read by the same reader
classes:D:S:C1,...  D classes C1, ... (S)   S           the images of classes C1, ... of split S of data set D
==================  ======================  ===========  =====================================================

``photos``, ``textures`` and ``noise`` are bundled (scikit-image, no data
root needed); ``photos`` and ``textures`` use disjoint images, so one can be
the training pool and the other a test set. File sets are the proxies of
``../shared/data/ood`` (see its README; name them by what they are,
"Textures-GIMP", not "DTD"). ``classes:DATASET:SPLIT:C1,C2,...`` holds out
classes of a registered data set (IS&BC's digits setup: ID 0–5 through
``data.id_classes``, training outliers ``classes:digits:train:6,7``, test OOD
``classes:digits:test:8,9``). :func:`check_disjoint` refuses an experiment that
puts one source (by *family*: ``openclipart_28`` and ``openclipart_32`` are
the same pictures; ``classes:`` sources of one data set by class) on both the
training and the test side, or an ID class on either.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedtrust.data import readers
from fedtrust.data.class_subsets import class_images
from fedtrust.errors import ConfigError, DataError
from fedtrust.registry import get, names, register

Shape = tuple[int, int, int]
Sampler = Callable[[Shape, int | None, int, Path | None], Tensor]

GENERATED_DEFAULT_N = 2000  # images a bundled generator gives when n is None
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luminance weights (Pillow's "L" conversion)
PHOTOS = ("astronaut", "camera", "chelsea", "clock", "coffee", "coins", "hubble_deep_field",
          "immunohistochemistry", "moon", "rocket")
TEXTURES = ("brick", "grass", "gravel")
CROP_FRACTION = (1 / 16, 1 / 2)  # crop side as a fraction of the photo's shorter side
NPZ_PREFIX = "npz:"
CLASSES_PREFIX = "classes:"
CLASSES_FORM = "classes:DATASET:SPLIT:C1,C2,... (e.g. classes:digits:train:6,7)"


@dataclass(frozen=True)
class OutlierSource:
    """One registered outlier / OOD image source.

    Attributes:
        name: registry name.
        display: the name reports use ("Textures-GIMP", not "DTD").
        family: what :func:`check_disjoint` compares; variants of the same pictures share it.
        role: the side it is meant for: "train" (outlier pool), "test" or "either".
        sampler: ``(shape, n, seed, root) -> uint8 (n, C, H, W)``.
        classes: the classes of data set ``family`` it holds (``classes:`` sources); None: all of the family.
    """

    name: str
    display: str
    family: str
    role: str
    sampler: Sampler
    classes: tuple[int, ...] | None = None

    def overlap(self, other: "OutlierSource") -> tuple[int, ...] | None:
        """The classes both hold (``()`` when both hold the whole family), or None when they share no image source."""
        if self.family != other.family:
            return None
        if self.classes is None or other.classes is None:
            return self.classes or other.classes or ()
        shared = tuple(c for c in self.classes if c in other.classes)
        return shared or None

    def load(self, shape: Shape, n: int | None = None, seed: int = 0, root: str | Path | None = None) -> Tensor:
        """``n`` images resized to ``shape`` (all of a file set, or 2,000 generated, when ``n`` is None)."""
        shape = _check_shape(shape)
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ConfigError(f"outliers {self.name!r}: n must be an integer >= 0 or null, got {n!r}")
        return self.sampler(shape, n, seed, Path(root) if root is not None else None)


def _source(name: str, display: str, family: str, role: str, sampler: Sampler) -> OutlierSource:
    return register("outliers", name)(OutlierSource(name, display, family, role, sampler))


def _check_shape(shape: object) -> Shape:
    if (not isinstance(shape, (tuple, list)) or len(shape) != 3
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)):
        raise ConfigError(f"outlier shape must be (C, H, W) with positive integers, got {shape!r}")
    if shape[0] not in (1, 3):
        raise ConfigError(f"outlier shape must have C = 1 or 3 channels, got {tuple(shape)}")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# ---------------------------------------------------------------- resizing


def convert_channels(x: Tensor, channels: int) -> Tensor:
    """Float images (N, c, h, w) → (N, channels, h, w): RGB → grey by luminance, grey → RGB by repetition, alpha dropped."""
    x = x.float()
    if x.shape[1] == 4:
        x = x[:, :3]
    if channels == 1 and x.shape[1] == 3:
        x = torch.einsum("nchw,c->nhw", x, torch.tensor(LUMA, dtype=x.dtype, device=x.device)).unsqueeze(1)
    if channels == 3 and x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != channels:
        raise DataError(f"cannot turn {x.shape[1]}-channel images into {channels}-channel ones")
    return x


def resize(x: Tensor, h: int, w: int) -> Tensor:
    """Bilinear, antialiased resizing of float images (N, C, h0, w0) to (N, C, h, w), in chunks."""
    if x.shape[2:] == (h, w) or x.shape[0] == 0:
        return x
    return torch.cat([F.interpolate(c, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
                      for c in x.split(1024)])


def fit_to_shape(x: Tensor, shape: Shape) -> Tensor:
    """uint8 or float images (N, c, h, w) in 0..255 → uint8 (N, C, H, W): channels, then size, then rounding."""
    c_out, h, w = shape
    grey_to_rgb = c_out == 3 and x.shape[1] == 1  # resize the one grey channel, then repeat it
    y = resize(convert_channels(x, 1 if grey_to_rgb else c_out), h, w)
    if grey_to_rgb:
        y = convert_channels(y, 3)
    return y.round().clamp(0, 255).to(torch.uint8).contiguous()


def _pick(x: Tensor, n: int | None, seed: int, source: str) -> Tensor:
    """``n`` distinct rows of ``x`` drawn with ``seed`` (all rows, in order, when ``n`` is None)."""
    if n is None:
        return x
    if n > x.shape[0]:
        raise DataError(f"{source}: asked for {n} images, it holds {x.shape[0]}")
    return x[torch.randperm(x.shape[0], generator=_generator(seed))[:n]]


# ---------------------------------------------------------------- bundled: scikit-image crops


def _skimage_images(image_names: Sequence[str]) -> list[Tensor]:
    """The named ``skimage.data`` images as float (c, h, w) tensors in 0..255."""
    import skimage.data

    out = []
    for image_name in image_names:
        a = np.asarray(getattr(skimage.data, image_name)())
        a = a[..., :3] if a.ndim == 3 else a[..., None]
        out.append(torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).float())
    return out


def _pyramid(image: Tensor, min_side: int) -> list[Tensor]:
    """``image`` (c, h, w) halved repeatedly by 2x2 box averaging while its shorter side stays >= ``min_side``."""
    levels = [image.unsqueeze(0)]
    while min(levels[-1].shape[2:]) // 2 >= min_side:
        levels.append(F.avg_pool2d(levels[-1], 2))
    return levels


def random_crops(images: Sequence[Tensor], shape: Shape, n: int, generator: torch.Generator) -> Tensor:
    """``n`` random crops of ``images`` (float (c, h, w) in 0..255) resized to ``shape``.

    Per crop: a uniformly chosen image, a side of 1/16 to 1/2 of its shorter
    side (the crop has the target's aspect ratio), a uniform position and a
    horizontal flip with probability 1/2. Crops are cut from the coarsest
    level of a halving pyramid that still samples them at >= 2x the target
    size, which keeps the antialiased resize cheap and nearly identical.
    """
    c_out, h_out, w_out = shape
    idx = torch.randint(len(images), (n,), generator=generator)
    frac = torch.empty(n).uniform_(*CROP_FRACTION, generator=generator)
    pos = torch.rand(n, 2, generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    pyramids = [_pyramid(convert_channels(img.unsqueeze(0), c_out)[0], 2 * max(h_out, w_out)) for img in images]
    crops = []
    for i in range(n):
        levels = pyramids[int(idx[i])]
        _, _, h, w = levels[0].shape
        ch = max(1, min(h, int(round(float(frac[i]) * min(h, w)))))
        cw = max(1, min(w, int(round(ch * w_out / h_out))))
        top, left = int(float(pos[i, 0]) * (h - ch + 1)), int(float(pos[i, 1]) * (w - cw + 1))
        k = max(0, min(len(levels) - 1, int(math.floor(math.log2(max(1.0, min(ch / h_out, cw / w_out) / 2))))))
        level, f = levels[k], 2**k
        crop = level[:, :, top // f:(top + ch) // f, left // f:(left + cw) // f]
        crop = resize(crop, h_out, w_out)
        crops.append(crop.flip(-1) if bool(flip[i]) else crop)
    if not crops:
        return torch.empty(0, c_out, h_out, w_out, dtype=torch.uint8)
    return torch.cat(crops).round().clamp(0, 255).to(torch.uint8).contiguous()


def _crop_sampler(image_names: Sequence[str], stream: int) -> Sampler:
    def sample(shape: Shape, n: int | None, seed: int, root: Path | None) -> Tensor:
        gen = _generator(seed * 1000 + stream)
        return random_crops(_skimage_images(image_names), shape, GENERATED_DEFAULT_N if n is None else n, gen)

    return sample


# ---------------------------------------------------------------- bundled: noise


def _gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Blur each image of ``x`` (N, C, H, W) with its own Gaussian ``sigma`` (N,), reflect padding."""
    n, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k1 = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k1 = (k1 / k1.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N·C, 2r+1)
    y = x.reshape(1, n * c, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k1.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, k1.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def noise_images(shape: Shape, n: int, generator: torch.Generator) -> Tensor:
    """``n`` noise images: the first ⌈n/2⌉ uniform on 0..255 per pixel, the rest Gaussian-blurred and contrast-stretched.

    The blur's σ is drawn per image from [0.5, 1.5]·max(H, W)/16 (at least 0.5 px).
    """
    c, h, w = shape
    n_uniform = (n + 1) // 2
    uniform = torch.randint(0, 256, (n_uniform, c, h, w), generator=generator, dtype=torch.uint8)
    raw = torch.rand(n - n_uniform, c, h, w, generator=generator)
    scale = max(h, w) / 16
    sigma = (torch.empty(n - n_uniform).uniform_(0.5, 1.5, generator=generator) * scale).clamp_min(0.5)
    if raw.shape[0] == 0:
        return uniform
    blurred = _gaussian_blur(raw, sigma)
    lo = blurred.amin(dim=(1, 2, 3), keepdim=True)
    hi = blurred.amax(dim=(1, 2, 3), keepdim=True)
    blurred = (blurred - lo) / (hi - lo).clamp_min(1e-6) * 255
    return torch.cat([uniform, blurred.round().clamp(0, 255).to(torch.uint8)])


def _noise_sampler(shape: Shape, n: int | None, seed: int, root: Path | None) -> Tensor:
    return noise_images(shape, GENERATED_DEFAULT_N if n is None else n, _generator(seed * 1000 + 3))


# ---------------------------------------------------------------- files under ROOT/ood and cross-dataset


def read_image_file(path: Path) -> Tensor:
    """uint8 images (N, C, H, W) of an image ``.npz``.

    A labelled file (``x`` and ``y``, or a JPEG pack) goes through the data-set
    reader (``readers.read_npz``); an unlabelled one (``x`` only, such as
    ``textures_gimp_32.npz``) is read with the same layout rules (``readers.to_nchw``).
    """
    if not path.is_file():
        raise DataError(f"OOD image file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "y" not in data.files:
                if "x" not in data.files:
                    raise DataError(f"{path}: expected an array x of uint8 images, found {', '.join(data.files)}")
                return torch.from_numpy(readers.to_nchw(data["x"], str(path)).copy())
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read {path} as .npz: {readers.one_line(e)}") from e
    return torch.from_numpy(readers.read_npz(path).x.copy())


def _file_sampler(stem: str) -> Sampler:
    def sample(shape: Shape, n: int | None, seed: int, root: Path | None) -> Tensor:
        if root is None:
            raise DataError(f"OOD set {stem!r} is read from ROOT/ood/{stem}.npz but no data root was set")
        path = root / "ood" / f"{stem}.npz"
        return fit_to_shape(_pick(read_image_file(path), n, seed, str(path)), shape)

    return sample


def _openclipart_sampler(shape: Shape, n: int | None, seed: int, root: Path | None) -> Tensor:
    return _file_sampler("openclipart_28" if shape[0] == 1 else "openclipart_32")(shape, n, seed, root)


def _dataset_sampler(dataset: str) -> Sampler:
    def sample(shape: Shape, n: int | None, seed: int, root: Path | None) -> Tensor:
        from fedtrust.data.datasets import load_dataset

        x = load_dataset(dataset, root).test.x
        return fit_to_shape(_pick(x, n, seed, f"{dataset} test set"), shape)

    return sample


_source("photos", "skimage photos", "skimage_photos", "train", _crop_sampler(PHOTOS, 1))
_source("textures", "skimage textures", "skimage_textures", "test", _crop_sampler(TEXTURES, 2))
_source("noise", "Noise", "noise", "test", _noise_sampler)
_source("openclipart", "OpenClipArt", "openclipart", "train", _openclipart_sampler)
_source("openclipart_28", "OpenClipArt", "openclipart", "train", _file_sampler("openclipart_28"))
_source("openclipart_32", "OpenClipArt", "openclipart", "train", _file_sampler("openclipart_32"))
_source("animal_mnist", "Animal-MNIST", "animal_mnist", "test", _file_sampler("animal_mnist"))
_source("notmnist_fonts", "notMNIST-fonts", "notmnist_fonts", "test", _file_sampler("notmnist_fonts"))
_source("textures_gimp_32", "Textures-GIMP", "textures_gimp", "test", _file_sampler("textures_gimp_32"))
_source("emoji_google_32", "Emoji-Google", "emoji_google", "test", _file_sampler("emoji_google_32"))
_source("mnist", "MNIST", "mnist", "test", _dataset_sampler("mnist"))
_source("fashion_mnist", "Fashion-MNIST", "fashion_mnist", "test", _dataset_sampler("fashion_mnist"))


def parse_classes_source(name: str) -> tuple[str, str, tuple[int, ...]]:
    """``classes:DATASET:SPLIT:C1,C2,...`` → (DATASET, SPLIT, classes); one-line ConfigError when malformed."""
    parts = name[len(CLASSES_PREFIX):].split(":")
    try:
        if len(parts) != 3 or not parts[0]:
            raise ValueError
        classes = tuple(int(c) for c in parts[2].split(","))
    except ValueError:
        raise ConfigError(f"malformed outlier source {name!r}; expected {CLASSES_FORM}") from None
    dataset, split = parts[0], parts[1]
    if dataset not in names("dataset"):
        raise ConfigError(f"outlier source {name!r}: unknown data set {dataset!r}; "
                          f"valid: {', '.join(names('dataset'))}")
    if split not in ("train", "test"):
        raise ConfigError(f"outlier source {name!r}: unknown split {split!r}; valid: train, test")
    if len(set(classes)) != len(classes) or min(classes) < 0:
        raise ConfigError(f"outlier source {name!r}: classes must be distinct integers >= 0, got {list(classes)}")
    return dataset, split, classes


def _classes_source(name: str) -> OutlierSource:
    """The ``classes:`` source ``name``: its split "train" is meant as training outliers, "test" as an OOD test set."""
    dataset, split, classes = parse_classes_source(name)

    def sample(shape: Shape, n: int | None, seed: int, root: Path | None) -> Tensor:
        from fedtrust.data.datasets import load_dataset

        data = load_dataset(dataset, root)
        if max(classes) >= data.num_classes:
            raise ConfigError(f"outlier source {name!r}: class {max(classes)} is out of range for {dataset}; "
                              f"valid: 0..{data.num_classes - 1}")
        return fit_to_shape(_pick(class_images(data, split, classes), n, seed, name), shape)

    display = f"{dataset} classes {', '.join(map(str, classes))} ({split})"
    return OutlierSource(name, display, dataset, split, sample, classes)


# ---------------------------------------------------------------- public API


def get_source(name: str) -> OutlierSource:
    """The source ``name``: a registered one, ``npz:PATH`` for any image ``.npz`` of your own, or
    ``classes:DATASET:SPLIT:C1,C2,...`` for held-out classes of a registered data set."""
    if name.startswith(CLASSES_PREFIX):
        return _classes_source(name)
    if name.startswith(NPZ_PREFIX):
        path = Path(name[len(NPZ_PREFIX):]).expanduser()

        def sample(shape: Shape, n: int | None, seed: int, root: Path | None) -> Tensor:
            return fit_to_shape(_pick(read_image_file(path), n, seed, str(path)), shape)

        return OutlierSource(name, path.stem, f"file:{path.resolve()}", "either", sample)
    return get("outliers", name)


def load_outliers(name: str, shape: Shape, n: int | None = None, seed: int = 0,
                  root: str | Path | None = None) -> Tensor:
    """``n`` uint8 images ``(n, C, H, W)`` of source ``name`` at the ID ``shape``, deterministic per ``seed``.

    Raises:
        ConfigError: unknown source, bad shape or ``n``.
        DataError: a file set's ``.npz`` is missing (the message names the path) or holds fewer than ``n`` images.
    """
    return get_source(name).load(shape, n, seed, root)


def display_name(name: str) -> str:
    """The name reports use for source ``name`` ("Textures-GIMP", "skimage photos", ...)."""
    return get_source(name).display


def source_names(role: str | None = None) -> list[str]:
    """Registered source names, optionally only those whose suggested role is ``role`` (or "either")."""
    return [n for n in names("outliers") if role is None or get("outliers", n).role in (role, "either")]


def check_disjoint(train_sources: Iterable[str], test_sources: Iterable[str], id_dataset: str | None = None,
                   id_classes: Sequence[int] | None = None) -> None:
    """Refuse one source on both sides of an experiment (spec: "never the same source on both sides").

    Sources are compared by family, so ``openclipart_28`` for training and
    ``openclipart_32`` for testing is refused too; two ``classes:`` sources of
    one data set are refused only when they share a class (the server would
    have seen the test OOD). With ``id_dataset`` set, a source that holds ID
    images is refused: a test source that *is* the ID data set (e.g. ``mnist``
    vs ID ``mnist``), and a ``classes:`` source on either side whose classes
    are ID, i.e. in ``id_classes`` (every class when ``id_classes`` is None).

    Raises:
        ConfigError: one line naming the shared source or classes.
    """
    train = [get_source(n) for n in train_sources]
    test = [get_source(n) for n in test_sources]
    for t in test:
        for s in train:
            shared = s.overlap(t)
            if shared:
                raise ConfigError(
                    f"outlier source {s.name!r} (training) and OOD test set {t.name!r} share "
                    f"{_classes_text(shared)} of {t.family}; the server must never see the test OOD, "
                    f"use disjoint classes")
            if shared is not None:
                raise ConfigError(
                    f"outlier source {s.name!r} (training) and OOD test set {t.name!r} are the same source "
                    f"({t.display}); use disjoint sources")
    if id_dataset is None:
        return
    for side, sources in (("outlier source", train), ("OOD test set", test)):
        for source in sources:
            if source.family != id_dataset or (source.classes is None and side == "outlier source"):
                continue
            if source.classes is None:
                raise ConfigError(f"OOD test set {source.name!r} is the ID data set {id_dataset!r}")
            if id_classes is None:
                raise ConfigError(f"{side} {source.name!r} holds ID images: data.id_classes is null, so every "
                                  f"class of {id_dataset} is ID; set data.id_classes to hold classes out")
            shared = [c for c in source.classes if c in id_classes]
            if shared:
                raise ConfigError(f"{side} {source.name!r} holds ID {_classes_text(shared)} (data.id_classes="
                                  f"{list(id_classes)}); use classes outside data.id_classes")


def _classes_text(classes: Sequence[int]) -> str:
    """The words for ``classes`` in a message: "class 6", "classes 6, 7"."""
    return f"class{'es' if len(classes) > 1 else ''} {', '.join(map(str, classes))}"
