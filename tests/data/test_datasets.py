"""Data set readers and registry: every on-disk format on tiny synthetic files, then the real offline copies.

The synthetic files are written in each format's real layout (IDX headers,
CIFAR pickles of dicts with bytes keys, SVHN's (H, W, C, N) .mat, a JPEG pack)
and read back through ``load_dataset``, so a pixel that lands in the wrong
place or a label off by one shows up. The real-data tests read
``../shared/data`` beside the checkout and skip where it is absent.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtrust.data import readers
from fedtrust.data.datasets import CIFAR10, MNIST, channel_stats, load_dataset
from fedtrust.errors import DataError
from fedtrust.registry import get, names

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
FILE_BASED = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "npz")


def _images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _labels(n: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed + 100).integers(0, k, size=n).astype(np.int64)


def _real(subpath: str) -> Path:
    path = SHARED_DATA / subpath
    if not path.exists():
        pytest.skip(f"../shared/data absent: {path} not found (only the checkout with shared/ beside it has it)")
    return SHARED_DATA


# ---------------------------------------------------------------- writers in each real format


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _write_mnist_raw(raw: Path, compress: bool) -> dict[str, np.ndarray]:
    """torchvision's MNIST/raw layout with 12 training and 5 test images."""
    arrays = {
        "train-images-idx3-ubyte": _images(12, (28, 28), 0),
        "train-labels-idx1-ubyte": _labels(12, 10, 0).astype(np.uint8),
        "t10k-images-idx3-ubyte": _images(5, (28, 28), 1),
        "t10k-labels-idx1-ubyte": _labels(5, 10, 1).astype(np.uint8),
    }
    for stem, array in arrays.items():
        _write_idx(raw / stem, array, compress)
    return arrays


def _cifar_batch(x_nchw: np.ndarray, labels: np.ndarray, label_key: str) -> dict[bytes, object]:
    """A batch dict as in the real files: bytes keys, data (N, 3072) uint8, labels a list of ints."""
    return {
        b"batch_label": b"synthetic batch",
        label_key.encode(): [int(v) for v in labels],
        b"data": x_nchw.reshape(len(x_nchw), -1),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(x_nchw))],
    }


def _write_pickle(path: Path, obj: object, protocol: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _write_npz_split(folder: Path, train: tuple[np.ndarray, object], test: tuple[np.ndarray, object]) -> None:
    """``folder/train.npz`` and ``folder/test.npz`` from (x, y) pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (x, y) in (("train", train), ("test", test)):
        np.savez_compressed(folder / f"{name}.npz", x=x, y=np.asarray(y))


def _jpeg_pack(x_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    blobs = []
    for image in x_nhwc:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=90)
        blobs.append(np.frombuffer(buffer.getvalue(), np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    return np.concatenate(blobs), offsets


def _pil_decode(jpeg: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.stack([np.array(Image.open(io.BytesIO(jpeg[a:b].tobytes()))) for a, b in zip(offsets[:-1], offsets[1:])])


# ---------------------------------------------------------------- npz


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw"])
def test_npz_layouts_become_nchw(tmp_path: Path, layout: str) -> None:
    x_nchw = _images(6, (1, 28, 28), 0)
    stored = {"nhw": x_nchw[:, 0], "nhwc": x_nchw.transpose(0, 2, 3, 1), "nchw": x_nchw}[layout]
    _write_npz_split(tmp_path / "mnist", (stored, _labels(6, 10, 0)), (stored[:3], _labels(3, 10, 1)))
    ds = load_dataset("mnist", tmp_path)
    assert ds.train.x.shape == (6, 1, 28, 28) and ds.test.x.shape == (3, 1, 28, 28)
    assert ds.train.x.dtype == torch.uint8 and ds.train.y.dtype == torch.int64
    np.testing.assert_array_equal(ds.train.x.numpy(), x_nchw)
    np.testing.assert_array_equal(ds.train.y.numpy(), _labels(6, 10, 0))
    assert ds.classes == MNIST.classes and ds.mean == MNIST.mean and ds.augment == "none"


def test_colour_npz_nhwc_round_trip(tmp_path: Path) -> None:
    x_nhwc = _images(4, (32, 32, 3), 2)
    _write_npz_split(tmp_path / "cifar100", (x_nhwc, np.array([0, 99, 5, 42])), (x_nhwc[:2], np.array([1, 2])))
    ds = load_dataset("cifar100", tmp_path)
    np.testing.assert_array_equal(ds.train.x.permute(0, 2, 3, 1).numpy(), x_nhwc)
    assert ds.num_classes == 100 and ds.augment == "crop_flip" and ds.classes[0] == "apple"


def test_npz_is_preferred_to_torchvision_layout(tmp_path: Path) -> None:
    _write_mnist_raw(tmp_path / "MNIST" / "raw", compress=False)
    _write_npz_split(
        tmp_path / "mnist", (_images(2, (28, 28), 9), np.array([3, 4])), (_images(1, (28, 28), 8), np.array([5]))
    )
    assert load_dataset("mnist", tmp_path).train.y.tolist() == [3, 4]


def test_npz_missing_arrays_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "mnist").mkdir()
    np.savez(tmp_path / "mnist" / "train.npz", images=np.zeros((1, 28, 28), np.uint8))
    np.savez(tmp_path / "mnist" / "test.npz", x=np.zeros((1, 28, 28), np.uint8), y=np.zeros(1, np.int64))
    with pytest.raises(DataError, match=r"train\.npz: expected arrays x and y") as err:
        load_dataset("mnist", tmp_path)
    assert "\n" not in str(err.value)


def test_wrong_image_shape_for_named_set(tmp_path: Path) -> None:
    _write_npz_split(
        tmp_path / "mnist", (_images(2, (32, 32, 3), 0), np.array([0, 1])), (_images(1, (32, 32, 3), 1), np.array([0]))
    )
    with pytest.raises(DataError, match=r"expected \(1, 28, 28\)"):
        load_dataset("mnist", tmp_path)


def test_label_out_of_range_names_file(tmp_path: Path) -> None:
    _write_npz_split(
        tmp_path / "mnist", (_images(2, (28, 28), 0), np.array([0, 10])), (_images(1, (28, 28), 1), np.array([0]))
    )
    with pytest.raises(DataError, match=r"train\.npz: labels must lie in 0\.\.9"):
        load_dataset("mnist", tmp_path)


def test_npz_is_not_unpickled(tmp_path: Path) -> None:
    (tmp_path / "mnist").mkdir()
    np.savez(tmp_path / "mnist" / "train.npz", x=np.array([object()], dtype=object), y=np.zeros(1, np.int64))
    np.savez(tmp_path / "mnist" / "test.npz", x=np.zeros((1, 28, 28), np.uint8), y=np.zeros(1, np.int64))
    with pytest.raises(DataError, match="cannot read array 'x'"):
        load_dataset("mnist", tmp_path)


# ---------------------------------------------------------------- generic npz


def test_generic_npz_infers_classes_and_stats(tmp_path: Path) -> None:
    x = _images(50, (12, 10, 3), 3)
    y = np.arange(50) % 4
    _write_npz_split(tmp_path, (x, y), (x[:7], np.array([0, 1, 2, 3, 3, 0, 1])))
    ds = load_dataset("npz", tmp_path)  # K from the training labels (a test label beyond: test_bad_npz.py)
    assert ds.num_classes == 4 and ds.classes == ("0", "1", "2", "3") and ds.shape == (3, 12, 10)
    pixels = x.astype(np.float64) / 255.0
    np.testing.assert_allclose(ds.mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(ds.std, pixels.std(axis=(0, 1, 2)), rtol=1e-12)
    assert ds.augment == "none" and ds.name == "npz"


def test_generic_npz_uses_class_names(tmp_path: Path) -> None:
    x = _images(3, (8, 8), 4)
    np.savez(tmp_path / "train.npz", x=x, y=np.array([0, 1, 2]), classes=np.array(["cat", "dog", "eel"]))
    np.savez(tmp_path / "test.npz", x=x, y=np.array([2, 0, 1]))
    ds = load_dataset("npz", tmp_path)
    assert ds.classes == ("cat", "dog", "eel") and ds.num_classes == 3 and ds.shape == (1, 8, 8)


def test_generic_npz_split_shapes_must_agree(tmp_path: Path) -> None:
    _write_npz_split(tmp_path, (_images(2, (8, 8), 0), np.array([0, 1])), (_images(2, (9, 9), 0), np.array([0, 1])))
    with pytest.raises(DataError, match="images have shape"):
        load_dataset("npz", tmp_path)


def test_channel_stats_single_channel() -> None:
    x = np.array([0, 255, 255, 0], np.uint8).reshape(4, 1, 1, 1)
    mean, std = channel_stats(x)
    assert mean == pytest.approx((0.5,)) and std == pytest.approx((0.5,))


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)


@pytest.mark.parametrize("compress", [False, True], ids=["idx", "idx.gz"])
@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_torchvision_layout(tmp_path: Path, compress: bool, name: str, folder: str) -> None:
    arrays = _write_mnist_raw(tmp_path / folder / "raw", compress)
    ds = load_dataset(name, tmp_path)
    assert ds.train.x.shape == (12, 1, 28, 28) and ds.test.x.shape == (5, 1, 28, 28)
    assert ds.train.x.dtype == torch.uint8 and ds.test.y.dtype == torch.int64
    np.testing.assert_array_equal(ds.train.x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test.y.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.num_classes == 10


def test_idx_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad-idx"
    path.write_bytes(b"\x00\x00\x0d\x01" + np.asarray([1], ">u4").tobytes() + b"\x00" * 4)
    with pytest.raises(DataError, match="not an unsigned-byte IDX file"):
        readers.read_idx(path)


def test_idx_truncated(tmp_path: Path) -> None:
    path = tmp_path / "short-idx"
    path.write_bytes(bytes([0, 0, 8, 1]) + np.asarray([10], ">u4").tobytes() + b"\x01\x02")
    with pytest.raises(DataError, match="ends after 2 of 10 bytes"):
        readers.read_idx(path)


def test_idx_label_count_mismatch(tmp_path: Path) -> None:
    _write_idx(tmp_path / "images", _images(3, (4, 4), 0), compress=False)
    _write_idx(tmp_path / "labels", np.zeros(2, np.uint8), compress=False)
    with pytest.raises(DataError, match="expected 3 labels"):
        readers.read_idx_pair(tmp_path / "images", tmp_path / "labels")


# ---------------------------------------------------------------- CIFAR pickles


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_pickles(tmp_path: Path, protocol: int) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    batches = [(_images(3, (3, 32, 32), i), _labels(3, 10, i)) for i in range(6)]
    for i, (x, y) in enumerate(batches[:5], start=1):
        _write_pickle(folder / f"data_batch_{i}", _cifar_batch(x, y, "labels"), protocol)
    _write_pickle(folder / "test_batch", _cifar_batch(*batches[5], "labels"), protocol)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.train.x.shape == (15, 3, 32, 32) and ds.test.x.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(ds.train.x.numpy(), np.concatenate([x for x, _ in batches[:5]]))
    np.testing.assert_array_equal(ds.train.y.numpy(), np.concatenate([y for _, y in batches[:5]]))
    np.testing.assert_array_equal(ds.test.x.numpy(), batches[5][0])
    # a row of `data` is the red plane, then green, then blue, each row-major
    assert ds.train.x[0, 1, 0, 5].item() == batches[0][0].reshape(3, -1)[0][1 * 1024 + 5]
    assert ds.classes == CIFAR10.classes and ds.augment == "crop_flip"


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    x_train, x_test = _images(4, (3, 32, 32), 0), _images(2, (3, 32, 32), 1)
    train = _cifar_batch(x_train, np.array([0, 99, 50, 7]), "fine_labels") | {b"coarse_labels": [0, 19, 3, 1]}
    test = _cifar_batch(x_test, np.array([98, 1]), "fine_labels") | {b"coarse_labels": [2, 2]}
    _write_pickle(folder / "train", train, 2)
    _write_pickle(folder / "test", test, 2)
    ds = load_dataset("cifar100", tmp_path)
    assert ds.train.y.tolist() == [0, 99, 50, 7] and ds.test.y.tolist() == [98, 1]
    assert ds.num_classes == 100 and ds.classes[99] == "worm"
    np.testing.assert_array_equal(ds.test.x.numpy(), x_test)


class _RunsCommand:
    """Pickles as a call to os.system: what a tampered data file would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


def test_pickle_with_foreign_global_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-100-python"
    batch = _cifar_batch(_images(1, (3, 32, 32), 0), np.array([0]), "fine_labels")
    batch[b"filenames"] = [_RunsCommand(f"touch {marker}")]
    _write_pickle(folder / "train", batch, 2)
    _write_pickle(folder / "test", batch, 2)
    with pytest.raises(DataError, match=r"refusing .*train: global (posix|nt|os)\.system is not allowed") as err:
        load_dataset("cifar100", tmp_path)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_pickle_codecs_limited_to_latin1(tmp_path: Path) -> None:
    import _codecs

    class _Rot13:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return _codecs.encode, ("text", "rot13")

    path = tmp_path / "batch"
    _write_pickle(path, {b"data": _Rot13()}, 2)
    with pytest.raises(DataError, match="encoding 'rot13' is not allowed"):
        readers.restricted_load(path)


def test_pickle_not_a_dict(tmp_path: Path) -> None:
    path = tmp_path / "batch"
    _write_pickle(path, [1, 2, 3], 2)
    with pytest.raises(DataError, match="expected a dict, got list"):
        readers.read_cifar_batch(path, "labels")


# ---------------------------------------------------------------- SVHN .mat


@pytest.mark.parametrize("subfolder", ["", "svhn"])
def test_svhn_mat(tmp_path: Path, subfolder: str) -> None:
    scipy_io = pytest.importorskip("scipy.io")
    folder = tmp_path / subfolder
    folder.mkdir(exist_ok=True)
    x_train, x_test = _images(5, (3, 32, 32), 0), _images(2, (3, 32, 32), 1)
    y_train = np.array([[10], [1], [9], [10], [5]], np.uint8)  # 10 is digit 0
    for name, x, y in (("train", x_train, y_train), ("test", x_test, np.array([[3], [10]], np.uint8))):
        scipy_io.savemat(folder / f"{name}_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": y})
    ds = load_dataset("svhn", tmp_path)
    assert ds.train.x.shape == (5, 3, 32, 32) and ds.train.x.dtype == torch.uint8
    assert ds.train.y.tolist() == [0, 1, 9, 0, 5] and ds.test.y.tolist() == [3, 0]
    np.testing.assert_array_equal(ds.train.x.numpy(), x_train)
    assert ds.augment == "crop" and ds.num_classes == 10


# ---------------------------------------------------------------- JPEG pack


def _write_jpeg_cifar(folder: Path, n: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:32, 0:32]
    x_nhwc = np.stack(  # smooth gradients, which JPEG keeps close
        [np.stack([(xx * 7 + 5 * i) % 256, yy * 7 + i, (xx + yy) * 3 + i], -1) for i in range(n)]
    ).astype(np.uint8)
    jpeg, offsets = _jpeg_pack(x_nhwc)
    y = np.arange(n, dtype=np.int64) % 10
    np.savez(folder / "train_full_jpeg.npz", jpeg=jpeg, offsets=offsets, y=y)
    np.savez(folder / "test.npz", x=x_nhwc[:4], y=y[:4])
    return x_nhwc, jpeg, offsets


def test_jpeg_pack_decodes_and_caches_beside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readers, "default_cache_dir", lambda: tmp_path / "user-cache")
    x_nhwc, jpeg, offsets = _write_jpeg_cifar(tmp_path / "cifar10")
    ds = load_dataset("cifar10", tmp_path)
    expected = _pil_decode(jpeg, offsets)
    np.testing.assert_array_equal(ds.train.x.permute(0, 2, 3, 1).numpy(), expected)
    assert np.abs(expected.astype(int) - x_nhwc).mean() < 4  # lossy, but the same picture
    assert ds.train.y.tolist() == [i % 10 for i in range(20)] and ds.train.x.shape == (20, 3, 32, 32)
    cache = tmp_path / "cifar10" / "train_full_jpeg.decoded.npz"
    assert cache.is_file() and not (tmp_path / "user-cache").exists()
    # the second load reads the cache: decoding would fail
    monkeypatch.setattr(readers, "decode_jpegs", lambda *a: pytest.fail("decoded again despite a valid cache"))
    np.testing.assert_array_equal(load_dataset("cifar10", tmp_path).train.x.numpy(), ds.train.x.numpy())


def test_jpeg_cache_is_invalidated_by_new_source(tmp_path: Path) -> None:
    _, jpeg, offsets = _write_jpeg_cifar(tmp_path)
    path = tmp_path / "train_full_jpeg.npz"
    first = readers.read_jpeg_npz(path, cache_dir=tmp_path / "user")
    np.savez(path, jpeg=jpeg, offsets=offsets, y=(np.arange(20) + 1) % 10)
    second = readers.read_jpeg_npz(path, cache_dir=tmp_path / "user")
    assert second.y.tolist() == ((first.y + 1) % 10).tolist()


def test_jpeg_cache_goes_to_user_dir_when_data_is_read_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_jpeg_cifar(data)
    data.chmod(0o555)
    try:
        arrays = readers.read_jpeg_npz(data / "train_full_jpeg.npz", cache_dir=tmp_path / "user")
    finally:
        data.chmod(0o755)
    assert arrays.x.shape == (20, 3, 32, 32)
    assert not (data / "train_full_jpeg.decoded.npz").exists()
    assert len(list((tmp_path / "user").glob("train_full_jpeg-*.decoded.npz"))) == 1


def test_jpeg_pack_bad_offsets(tmp_path: Path) -> None:
    np.savez(tmp_path / "pack.npz", jpeg=np.zeros(10, np.uint8), offsets=np.array([0, 5, 4]), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match="offsets must rise strictly"):
        readers.read_npz(tmp_path / "pack.npz", cache_dir=tmp_path)


# ---------------------------------------------------------------- missing data


@pytest.mark.parametrize("name", FILE_BASED)
def test_missing_data_is_one_line_naming_paths(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError) as err:
        load_dataset(name, tmp_path)
    message = str(err.value)
    assert "\n" not in message and f"data set {name!r} not found" in message
    assert str(tmp_path / "test.npz") in message or str(tmp_path / name / "test.npz") in message
    expected_hint = "ROOT/train.npz" if name == "npz" else "download=True"
    assert expected_hint in message


def test_missing_names_torchvision_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", tmp_path / "nowhere")
    message = str(err.value)
    for path in ("cifar10/train.npz", "cifar10/train_full_jpeg.npz", "cifar10/test.npz",
                 "cifar-10-batches-py/data_batch_5", "cifar-10-batches-py/test_batch"):
        assert str(tmp_path / "nowhere" / path) in message
    assert "does not exist" in message


def test_incomplete_layout_counts_as_missing(tmp_path: Path) -> None:
    _write_mnist_raw(tmp_path / "MNIST" / "raw", compress=True)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\[\.gz\]"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize("name", FILE_BASED)
def test_no_root_says_so(name: str) -> None:
    with pytest.raises(DataError, match="no data root was set"):
        load_dataset(name, None)


def test_every_file_based_set_is_registered() -> None:
    assert set(FILE_BASED) | {"digits"} <= set(names("dataset"))


# ---------------------------------------------------------------- real offline copies (../shared/data)


def test_real_mnist() -> None:
    ds = load_dataset("mnist", _real("mnist/train.npz"))
    assert ds.train.x.shape == (60000, 1, 28, 28) and ds.test.x.shape == (10000, 1, 28, 28)
    assert ds.train.x.dtype == torch.uint8 and ds.train.y.dtype == torch.int64
    assert ds.train.class_counts().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert ds.test.class_counts().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert float(ds.train.x.float().mean() / 255) == pytest.approx(ds.mean[0], abs=1e-4)
    assert float(ds.train.x.float().std() / 255) == pytest.approx(ds.std[0], abs=1e-4)


def test_real_fashion_mnist() -> None:
    ds = load_dataset("fashion_mnist", _real("fashion_mnist/train.npz"))
    assert ds.train.x.shape == (60000, 1, 28, 28) and ds.test.x.shape == (10000, 1, 28, 28)
    assert ds.train.class_counts().tolist() == [6000] * 10 and ds.test.class_counts().tolist() == [1000] * 10
    assert float(ds.train.x.float().mean() / 255) == pytest.approx(ds.mean[0], abs=1e-3)


def test_real_cifar10_test_split() -> None:
    arrays = readers.read_npz(_real("cifar10/test.npz") / "cifar10" / "test.npz")
    assert arrays.x.shape == (10000, 3, 32, 32) and arrays.x.dtype == np.uint8
    assert np.bincount(arrays.y).tolist() == [1000] * 10


@pytest.mark.slow
def test_real_cifar10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _real("cifar10/train_full_jpeg.npz")
    shared = (root / "cifar10").resolve()
    writable = readers.is_writable_dir
    # never write a cache into the shared copy from a test, even where it is writable: use tmp_path
    monkeypatch.setattr(readers, "is_writable_dir", lambda d: d.resolve() != shared and writable(d))
    monkeypatch.setattr(readers, "default_cache_dir", lambda: tmp_path)
    ds = load_dataset("cifar10", root)
    assert ds.train.x.shape == (50000, 3, 32, 32) and ds.test.x.shape == (10000, 3, 32, 32)
    assert ds.train.class_counts().tolist() == [5000] * 10 and ds.test.class_counts().tolist() == [1000] * 10
    means = (ds.train.x.double().mean(dim=(0, 2, 3)) / 255).tolist()
    assert means == pytest.approx([0.4913, 0.4821, 0.4465], abs=1e-4)
    assert len(list(tmp_path.glob("*.decoded.npz"))) == 1


@pytest.mark.parametrize("name", [n for n in names("dataset") if n not in ("digits", "digits_domains")])
def test_every_file_loader_takes_a_str_root_and_names_a_missing_folder(tmp_path: Path, name: str) -> None:
    """A loader called directly (``fedtrust.data.load_mnist("data")``) with a str root, not only a Path.
    Rules out: ``str / str`` TypeErrors from inside a loader instead of the DataError naming where it looked."""
    missing = str(tmp_path / "absent")
    with pytest.raises(DataError, match=r"not found") as err:
        get("dataset", name)(missing)
    assert missing in str(err.value)


def test_a_str_root_reads_what_a_path_root_reads(tmp_path: Path) -> None:
    x = _images(3, (1, 28, 28), 4)
    _write_npz_split(tmp_path / "mnist", (x, np.array([1, 2, 3])), (x[:1], np.array([4])))
    from fedtrust.data.datasets import load_mnist

    a, b = load_mnist(str(tmp_path)), load_mnist(tmp_path)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
