"""Readers for the on-disk formats of standard image data sets.

Every reader returns :class:`Arrays`: numpy ``x`` uint8 of shape ``(N, C, H, W)``
and ``y`` int64 of shape ``(N,)``, plus the file it came from for error
messages. The registry (``data.datasets``) turns them into tensors with
``torch.from_numpy`` (no copy). Formats:

* ``.npz`` with arrays ``x`` (``(N,H,W)``, ``(N,H,W,C)`` or ``(N,C,H,W)``) and
  ``y``, optionally ``classes``; opened without ``allow_pickle``.
* ``.npz`` with ``jpeg`` (concatenated JPEG bytes), ``offsets`` (``N+1``) and
  ``y``, as ``shared/data/cifar10/train_full_jpeg.npz``. Decoded with Pillow
  and cached as an uncompressed decoded ``.npz`` (see :func:`read_jpeg_npz`).
* IDX files (MNIST, Fashion-MNIST), plain or gzip-compressed.
* CIFAR-10/100 python pickles, through a restricted unpickler
  (:class:`NumpyOnlyUnpickler`).
* SVHN ``*_32x32.mat`` files (MATLAB v5) through ``scipy.io.loadmat``.

Any unreadable or malformed file raises a one-line
:class:`~fedtrust.errors.DataError` naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import stat
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fedtrust.errors import DataError

IMAGE_CHANNELS = (1, 3, 4)  # channel counts recognised when guessing NHWC versus NCHW
INT64_MAX = int(np.iinfo(np.int64).max)
NPY_MAGIC = b"\x93NUMPY"
# What reading a damaged .npz member can raise: a bad zip entry or CRC, a truncated deflate stream, a
# malformed .npy header, an unsupported zip feature (encryption, compression method).
READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError)
IDX_UBYTE = 0x08  # IDX type code for unsigned bytes, the only one image/label files use
CACHE_SUFFIX = ".decoded.npz"


@dataclass(frozen=True)
class Arrays:
    """One split read from disk: ``x`` uint8 (N, C, H, W), ``y`` int64 (N,)."""

    x: np.ndarray
    y: np.ndarray
    source: str
    classes: tuple[str, ...] = ()


def one_line(error: BaseException) -> str:
    """An exception's message squeezed onto one line."""
    return " ".join(str(error).split()) or type(error).__name__


# ---------------------------------------------------------------- array layout


def to_nchw(x: np.ndarray, source: str) -> np.ndarray:
    """Images as uint8 (N, C, H, W), from (N, H, W), (N, H, W, C) or (N, C, H, W).

    A 4-d array is channels-last when its last axis has 1, 3 or 4 entries and
    its second does not; otherwise it must already be channels-first. Only the
    channels-last case copies (to keep the result contiguous).

    Only uint8 is taken: every other dtype (float pixels in [0, 1], uint16,
    int64 holding 0..255, bool) would need a guess at its scale, so it is a
    one-line :class:`DataError` asking for uint8 instead. An image axis of
    length 0 is refused too (no pixels to normalise).
    """
    if x.dtype != np.uint8:
        raise DataError(f"{source}: x must be uint8 images (pixels 0..255), got dtype {x.dtype}; "
                        "scale to 0..255 and save x.astype(numpy.uint8)")
    if x.ndim == 3:
        out = x.reshape(x.shape[0], 1, x.shape[1], x.shape[2])
    elif x.ndim == 4 and x.shape[-1] in IMAGE_CHANNELS and x.shape[1] not in IMAGE_CHANNELS:
        out = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    elif x.ndim == 4 and x.shape[1] in IMAGE_CHANNELS:
        out = x
    else:
        raise DataError(
            f"{source}: x must have shape (N,H,W), (N,H,W,C) or (N,C,H,W) with C in 1/3/4, got {x.shape}"
        )
    if 0 in out.shape[2:]:
        raise DataError(f"{source}: x must hold images of at least 1x1 pixels, got shape {x.shape}")
    return out


def to_labels(y: np.ndarray, n: int, source: str) -> np.ndarray:
    """Labels as int64 of shape (n,), one per image; an (n, 1) column is accepted.

    Any integer dtype is taken (values must fit int64); float or bool labels are
    refused rather than rounded.
    """
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: y must hold integer class labels, got dtype {y.dtype}")
    if y.ndim != 1:
        raise DataError(f"{source}: y must be 1-d (one label per image), got shape {y.shape}")
    if len(y) != n:
        raise DataError(f"{source}: x holds {n} images but y holds {len(y)} labels; expected one label per image")
    if n and int(y.min()) < 0:
        raise DataError(f"{source}: labels must be >= 0, got {int(y.min())}")
    if n and int(y.max()) > INT64_MAX:
        raise DataError(f"{source}: labels must be class indices 0..K-1, got {int(y.max())}")
    return y.astype(np.int64, copy=False)


def _classes(values: np.ndarray | None, source: str) -> tuple[str, ...]:
    """Class names from a ``classes`` array: 1-d, at least one, all distinct."""
    if values is None:
        return ()
    values = np.asarray(values)
    if values.ndim != 1 or len(values) == 0:
        raise DataError(f"{source}: classes must be a 1-d array of class names (one per label), "
                        f"got shape {values.shape}")
    names = tuple(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values.tolist())
    if len(set(names)) != len(names):
        repeated = next(n for n in names if names.count(n) > 1)
        raise DataError(f"{source}: classes must be distinct names, {repeated!r} appears {names.count(repeated)} times")
    return names


# ---------------------------------------------------------------- .npz files


def read_npz(path: Path, cache_dir: Path | None = None) -> Arrays:
    """Read an image ``.npz``: either ``x``/``y`` arrays or a JPEG pack (``jpeg``/``offsets``/``y``).

    A file that is not a zip archive of ``.npy`` arrays (a lone ``.npy``, text,
    a truncated download), a missing ``x`` or ``y``, and a malformed array (see
    :func:`to_nchw`, :func:`to_labels`) raise a one-line :class:`DataError`
    naming ``path`` and what is expected.
    """
    with _open_npz(path) as data:
        files = set(data.files)
        if {"x", "y"} <= files:
            x = to_nchw(_get(data, "x", path), str(path))
            y = to_labels(_get(data, "y", path), x.shape[0], str(path))
            classes = _classes(_get(data, "classes", path), str(path)) if "classes" in files else ()
            return Arrays(x, y, str(path), classes)
    if "jpeg" in files:
        return read_jpeg_npz(path, cache_dir)
    missing = " and ".join(k for k in ("x", "y") if k not in files)
    found = ", ".join(sorted(files)) or "none"
    raise DataError(f"{path}: expected arrays x and y (uint8 images, integer labels) or a JPEG pack "
                    f"(jpeg, offsets, y); missing {missing}, found {found}")


def _open_npz(path: Path) -> Any:
    """``np.load(path)`` of a zip archive, or a one-line DataError saying what the file is instead."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
        is_zip = zipfile.is_zipfile(path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {one_line(e)}") from e
    if not is_zip:
        what = ("is empty" if not head else "is a single .npy array" if head == NPY_MAGIC
                else "is not a zip archive (corrupt or not an .npz)")
        raise DataError(f"{path} {what}; expected an .npz archive written by numpy.savez with arrays x and y")
    try:
        data = np.load(path, allow_pickle=False)
    except READ_ERRORS as e:
        raise DataError(f"cannot read {path} as .npz: {one_line(e)}; expected an archive written by numpy.savez") from e
    if not isinstance(data, np.lib.npyio.NpzFile):  # a zip-headed .npy cannot be, but never hand on a bare array
        raise DataError(f"{path} is not an .npz archive; expected one written by numpy.savez with arrays x and y")
    return data


def _get(data: Any, key: str, path: Path) -> np.ndarray:
    try:
        return data[key]
    except READ_ERRORS as e:
        raise DataError(f"cannot read array {key!r} of {path}: {one_line(e)}; "
                        "expected a plain array of numbers or strings (no Python objects)") from e


# ---------------------------------------------------------------- JPEG packs


def default_cache_dir() -> Path:
    """Per-user cache for decoded data when the data folder is read-only: ``~/.cache/fedtrust``."""
    return Path.home() / ".cache" / "fedtrust"


def is_writable_dir(directory: Path) -> bool:
    """Whether ``directory`` may be written to, honouring its permission bits even for root.

    ``os.access`` says yes to root on any directory of a writable file system,
    so a data share deliberately made read-only (``chmod a-w``) would be written
    into. This also asks for the write bit of the class (owner, group, other)
    that the process falls in.
    """
    try:
        st = directory.stat()
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or not os.access(directory, os.W_OK):
        return False
    if not hasattr(os, "geteuid"):
        return True
    if st.st_uid == os.geteuid():
        bit = stat.S_IWUSR
    elif st.st_gid == os.getegid() or st.st_gid in os.getgroups():
        bit = stat.S_IWGRP
    else:
        bit = stat.S_IWOTH
    return bool(st.st_mode & bit)


def read_jpeg_npz(path: Path, cache_dir: Path | None = None) -> Arrays:
    """Decode a JPEG pack (``jpeg`` bytes, ``offsets``, ``y``) with Pillow, caching the result.

    Image ``i`` is ``jpeg[offsets[i]:offsets[i+1]]``. The decoded images are
    saved as an uncompressed ``.npz`` (``x`` NCHW, ``y``, ``source_sha256``)
    next to the pack when its folder is writable, otherwise in ``cache_dir``
    (default :func:`default_cache_dir`). A cache is used only when its
    ``source_sha256`` matches the pack's bytes, so an edited pack is decoded
    again. If neither place can be written, the data is decoded on every load.
    """
    digest = _sha256(path)
    candidates = _cache_candidates(path, digest, cache_dir if cache_dir is not None else default_cache_dir())
    for candidate in candidates:
        cached = _read_cache(candidate, digest)
        if cached is not None:
            return Arrays(cached.x, cached.y, str(path))
    with _open_npz(path) as data:
        missing = sorted({"jpeg", "offsets", "y"} - set(data.files))
        if missing:
            raise DataError(f"{path}: a JPEG pack needs arrays jpeg, offsets and y; missing {', '.join(missing)}")
        jpeg, offsets, y = (_get(data, k, path) for k in ("jpeg", "offsets", "y"))
    x = decode_jpegs(jpeg, offsets, str(path))
    y = to_labels(y, x.shape[0], str(path))
    _write_cache(candidates, x, y, digest)
    return Arrays(x, y, str(path))


def decode_jpegs(jpeg: np.ndarray, offsets: np.ndarray, source: str) -> np.ndarray:
    """Decode ``len(offsets) - 1`` same-sized JPEG images into uint8 (N, C, H, W)."""
    from PIL import Image, UnidentifiedImageError

    if jpeg.dtype != np.uint8 or jpeg.ndim != 1 or offsets.ndim != 1 or len(offsets) < 1:
        raise DataError(
            f"{source}: jpeg must be 1-d uint8 and offsets 1-d, got {jpeg.dtype} {jpeg.shape} and {offsets.shape}"
        )
    if int(offsets[0]) != 0 or int(offsets[-1]) != len(jpeg) or np.any(np.diff(offsets) <= 0):
        raise DataError(f"{source}: offsets must rise strictly from 0 to len(jpeg) = {len(jpeg)}")
    view = memoryview(jpeg)
    bounds = offsets.tolist()
    out: np.ndarray | None = None
    for i in range(len(bounds) - 1):
        try:
            image = np.asarray(Image.open(io.BytesIO(view[bounds[i] : bounds[i + 1]])))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"{source}: image {i} is not a readable JPEG: {one_line(e)}") from e
        image = image[:, :, None] if image.ndim == 2 else image
        if out is None:
            out = np.empty((len(bounds) - 1, *image.shape), np.uint8)
        if image.shape != out.shape[1:]:
            raise DataError(f"{source}: image {i} has shape {image.shape}, image 0 has {out.shape[1:]}")
        out[i] = image
    if out is None:
        raise DataError(f"{source}: the JPEG pack holds no images")
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    except OSError as e:
        raise DataError(f"cannot read {path}: {one_line(e)}") from e
    return h.hexdigest()


def _cache_candidates(path: Path, digest: str, cache_dir: Path) -> list[Path]:
    """Cache files to try, in order: beside the pack, then the user cache (name keyed by content)."""
    return [path.with_name(path.stem + CACHE_SUFFIX), cache_dir / f"{path.stem}-{digest[:16]}{CACHE_SUFFIX}"]


def _read_cache(candidate: Path, digest: str) -> Arrays | None:
    if not candidate.is_file():
        return None
    try:
        with np.load(candidate, allow_pickle=False) as data:
            if str(data["source_sha256"]) != digest:
                return None
            x, y = data["x"], data["y"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None  # unreadable or foreign cache: decode again and overwrite it
    if x.dtype != np.uint8 or x.ndim != 4 or y.dtype != np.int64 or y.shape != (x.shape[0],):
        return None
    return Arrays(x, y, str(candidate))


def _write_cache(candidates: Sequence[Path], x: np.ndarray, y: np.ndarray, digest: str) -> None:
    """Save the decoded arrays to the first candidate whose folder is writable."""
    for target in candidates:
        if target is candidates[-1]:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
        if is_writable_dir(target.parent) and _save_atomically(target, x=x, y=y, source_sha256=np.array(digest)):
            return
    warnings.warn(f"could not cache decoded images in {' or '.join(str(c.parent) for c in candidates)}", stacklevel=3)


def _save_atomically(target: Path, **arrays: np.ndarray) -> bool:
    """Write an uncompressed ``.npz`` to a temporary file beside ``target``, then rename it; False on failure."""
    tmp: Path | None = None
    try:
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=target.name, suffix=".tmp", delete=False) as f:
            tmp = Path(f.name)
            np.savez(f, **arrays)
        tmp.chmod(0o644)  # readable by whoever reads the data, not only by us (temp files start as 0600)
        os.replace(tmp, target)
        return True
    except OSError:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        return False


# ---------------------------------------------------------------- IDX (MNIST)


def find_idx(folder: Path, stem: str) -> Path | None:
    """``folder/stem`` or ``folder/stem.gz``, whichever exists first (plain preferred)."""
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (the MNIST format), gzip-compressed if it ends in ``.gz``.

    Layout: two zero bytes, a type code (0x08 = ubyte), the number of
    dimensions ``d``, ``d`` big-endian uint32 sizes, then the data in C order.
    """
    try:
        with _open_binary(path) as f:
            return _read_idx_stream(f, path)
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path} as an IDX file: {one_line(e)}") from e


def _open_binary(path: Path) -> BinaryIO:
    """``path`` opened for binary reading, decompressed on the fly when it ends in ``.gz``."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # type: ignore[return-value]


def _read_idx_stream(f: BinaryIO, path: Path) -> np.ndarray:
    magic = f.read(4)
    if len(magic) != 4 or magic[:2] != b"\x00\x00" or magic[2] != IDX_UBYTE or magic[3] == 0:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {magic.hex() or 'empty'})")
    shape = tuple(int(d) for d in np.frombuffer(f.read(4 * magic[3]), dtype=">u4"))
    if len(shape) != magic[3]:
        raise DataError(f"{path}: truncated IDX header")
    out = np.empty(shape, np.uint8)
    buffer = memoryview(out).cast("B")
    filled = 0
    while filled < len(buffer):
        got = f.readinto(buffer[filled:])
        if not got:
            raise DataError(f"{path}: IDX data ends after {filled} of {len(buffer)} bytes")
        filled += got
    return out


def read_idx_pair(images: Path, labels: Path) -> Arrays:
    """An IDX image file (N, H, W) with its IDX label file (N,)."""
    x = read_idx(images)
    if x.ndim != 3:
        raise DataError(f"{images}: expected IDX images of shape (N, H, W), got {x.shape}")
    y = read_idx(labels)
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{labels}: expected {len(x)} labels for {images}, got shape {y.shape}")
    return Arrays(to_nchw(x, str(images)), y.astype(np.int64), str(images))


# ---------------------------------------------------------------- CIFAR pickles


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it for bytes, limited to latin-1."""
    if encoding.replace("_", "-").lower() not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin-1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The callables that numpy's own pickles name, under their numpy 1 and numpy 2 module paths."""
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    scalar = np.int64(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays, dtypes and scalars, and nothing else.

    Why: a pickle is a program. Its ``GLOBAL``/``REDUCE`` opcodes import any
    callable by name and call it, so a tampered data file (say a mirror's
    ``data_batch_1``) can run ``os.system`` the moment ``pickle.load`` reads it.
    The CIFAR batches only need dicts, lists, strings, ints and numpy arrays;
    the first four need no globals, and arrays need numpy's ``_reconstruct``
    (or ``_frombuffer``, protocol 5), ``ndarray``, ``dtype`` and ``scalar``.
    Those build inert arrays from bytes. Every other global is refused, so
    loading a hostile file fails with a ``DataError`` instead of running code.
    ``_codecs.encode`` (how Python 3 writes bytes in protocol 2) is allowed
    only for latin-1.
    """

    ALLOWED = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data file") from None


def restricted_load(path: Path) -> Any:
    """Unpickle ``path`` with :class:`NumpyOnlyUnpickler` (Python 2 strings read as latin-1, as numpy advises)."""
    try:
        with open(path, "rb") as f:
            return NumpyOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"refusing {path}: {one_line(e)} (only numpy arrays may be unpickled)") from e
    except (OSError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise DataError(f"cannot unpickle {path}: {one_line(e)}") from e


def read_cifar_batch(path: Path, label_key: str) -> Arrays:
    """One CIFAR python batch: ``data`` (N, 3072) uint8 rows in C, H, W order and ``label_key`` labels."""
    batch = restricted_load(path)
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict, got {type(batch).__name__}")
    batch = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise DataError(f"{path}: expected keys data and {label_key}, found {', '.join(map(str, batch))}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: data must be uint8 of shape (N, 3072), got {getattr(data, 'shape', type(data))}")
    x = data.reshape(len(data), 3, 32, 32)
    y = to_labels(np.asarray(batch[label_key]), len(x), str(path))
    return Arrays(x, y, str(path))


def read_cifar_batches(paths: Sequence[Path], label_key: str) -> Arrays:
    """Several CIFAR batches concatenated in the given order."""
    parts = [read_cifar_batch(p, label_key) for p in paths]
    if len(parts) == 1:
        return parts[0]
    return Arrays(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]), str(paths[0].parent))


# ---------------------------------------------------------------- SVHN .mat


def read_svhn_mat(path: Path) -> Arrays:
    """SVHN's cropped-digit ``.mat``: ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) in 1..10, where 10 is digit 0.

    MAT v5 files hold plain arrays, so ``scipy.io.loadmat`` runs no code. scipy
    is imported here only, so the package works without it.
    """
    try:
        from scipy.io import loadmat
    except ImportError as e:
        raise DataError(f"reading {path} needs scipy (pip install scipy)") from e
    try:
        mat = loadmat(path, variable_names=("X", "y"))
    except (OSError, ValueError, TypeError, NotImplementedError) as e:
        raise DataError(f"cannot read {path} as a MATLAB v5 file: {one_line(e)}") from e
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path}: expected variables X and y")
    x = mat["X"]
    if x.dtype != np.uint8 or x.ndim != 4:
        raise DataError(f"{path}: X must be uint8 of shape (H, W, C, N), got {x.dtype} {x.shape}")
    x = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    y = to_labels(mat["y"], len(x), str(path))
    return Arrays(x, np.where(y == 10, 0, y), str(path))
