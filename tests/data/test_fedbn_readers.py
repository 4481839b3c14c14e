"""Readers of the Split-Mix paper's data in FedBN's layouts, on tiny synthetic files written in that format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedtrust.data.datasets import load_dataset
from fedtrust.data.fedbn import DIGIT_DOMAINS, DOMAINNET_CLASSES
from fedtrust.errors import ConfigError, DataError

# FedBN's utils/data_preprocess.py: image shape per Digit-5 domain (grey domains have no channel axis)
SHAPES = {"MNIST": (28, 28), "SVHN": (32, 32, 3), "USPS": (16, 16), "SynthDigits": (32, 32, 3),
          "MNIST_M": (28, 28, 3)}


def dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, pickle.HIGHEST_PROTOCOL)  # as FedBN writes them


def write_digits(folder: Path, n: int = 6, parts: int = 2) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """FedBN Digit-5 under ``folder``: <domain>/partitions/train_part{k}.pkl and <domain>/test.pkl."""
    rng = np.random.default_rng(0)
    written: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for d, name in enumerate(DIGIT_DOMAINS):
        files = []
        for k in range(parts + 1):
            x = rng.integers(0, 256, size=(n + k, *SHAPES[name]), dtype=np.uint8)
            y = rng.integers(0, 10, size=n + k).astype(np.int64)
            if name == "USPS":
                y = y.reshape(-1, 1)  # an (N, 1) column is accepted
            path = folder / name / ("test.pkl" if k == parts else f"partitions/train_part{k}.pkl")
            dump(path, (x, y))
            files.append((x, y.reshape(-1)))
        written[name] = files
    return written


def test_fedbn_digits_reads_every_domain_domain_major(tmp_path):
    files = write_digits(tmp_path / "Digits", n=6, parts=2)
    ds = load_dataset("fedbn_digits", tmp_path, parts=2)
    assert ds.shape == (3, 28, 28) and ds.domain_names == DIGIT_DOMAINS and ds.num_classes == 10
    train_sizes = [6 + 7] * 5
    assert torch.bincount(ds.train.domains).tolist() == train_sizes
    assert torch.bincount(ds.test.domains).tolist() == [8] * 5
    assert ds.train.domains.tolist() == [d for d in range(5) for _ in range(13)]
    # labels in file order: partition 0, then 1, per domain
    expected_y = np.concatenate([np.concatenate([f[0][1], f[1][1]]) for f in files.values()])
    assert ds.train.y.tolist() == expected_y.tolist()
    # 28×28 sets are not resized: MNIST_M is exact, MNIST is its grey image in three channels
    mm = ds.test.x[ds.test.domains == 4]
    assert torch.equal(mm, torch.from_numpy(files["MNIST_M"][2][0]).permute(0, 3, 1, 2))
    mn = ds.train.x[ds.train.domains == 0][:6]
    assert torch.equal(mn, torch.from_numpy(files["MNIST"][0][0])[:, None].expand(-1, 3, -1, -1))


def test_fedbn_digits_options_parts_size_domains_and_the_bare_root(tmp_path):
    write_digits(tmp_path, n=6, parts=2)  # domain folders directly under the root (FedBN's data/)
    ds = load_dataset("fedbn_digits", tmp_path, parts=1, image_size=16, domains=["USPS", "MNIST"])
    assert ds.shape == (3, 16, 16) and ds.domain_names == ("USPS", "MNIST")
    assert len(ds.train) == 12 and len(ds.test) == 16
    with pytest.raises(DataError, match="domains must be distinct names"):
        load_dataset("fedbn_digits", tmp_path, domains=["MNIST", "KMNIST"])


def test_fedbn_digits_missing_folder_or_part_is_one_line(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("fedbn_digits", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "Digits") in msg and "MNIST" in msg and "\n" not in msg
    write_digits(tmp_path / "Digits", n=4, parts=2)
    with pytest.raises(DataError) as e:
        load_dataset("fedbn_digits", tmp_path, parts=3)
    assert str(tmp_path / "Digits" / "MNIST" / "partitions" / "train_part2.pkl") in str(e.value)
    assert "\n" not in str(e.value)


def test_fedbn_pickles_go_through_the_restricted_unpickler(tmp_path):
    write_digits(tmp_path, n=4, parts=1)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    dump(tmp_path / "MNIST" / "test.pkl", (Evil(), np.zeros(1, dtype=np.int64)))
    with pytest.raises(DataError, match="refusing"):
        load_dataset("fedbn_digits", tmp_path, parts=1)


def write_domainnet(folder: Path, domains: tuple[str, ...]) -> dict[str, list[tuple[str, tuple[int, int, int]]]]:
    """FedBN DomainNet: <domain>_{train,test}.pkl = (paths, text labels); images at <domain>/<class>/<file>.

    Each image is one flat colour, so any resize keeps its pixels exactly; one per domain is greyscale.
    """
    listed: dict[str, list[tuple[str, tuple[int, int, int]]]] = {}
    for d, dom in enumerate(domains):
        for split, n in (("train", 3), ("test", 2)):
            paths, labels = [], []
            for i in range(n):
                cls = DOMAINNET_CLASSES[(i + d) % 10]
                rel = f"{dom}/{cls}/{dom}_{split}_{i}.png"
                colour = (10 * d + i, 100 + i, 200 - d)
                if i == 0:
                    Image.new("L", (13, 9), 77).save(_mk(folder / rel))
                    colour = (77, 77, 77)
                else:
                    Image.new("RGB", (12, 17), colour).save(_mk(folder / rel))
                paths.append(f"DomainNet/{rel}")  # FedBN lists paths relative to its data/ folder
                labels.append(cls)
                listed.setdefault(f"{dom}/{split}", []).append((cls, colour))
            dump(folder / f"{dom}_{split}.pkl", (np.array(paths), np.array(labels)))
    return listed


def _mk(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_domainnet_reads_paths_labels_and_images(tmp_path):
    listed = write_domainnet(tmp_path / "DomainNet", ("real", "sketch"))
    ds = load_dataset("domainnet", tmp_path, image_size=8, domains=["real", "sketch"])
    assert ds.shape == (3, 8, 8) and ds.domain_names == ("real", "sketch") and ds.classes == DOMAINNET_CLASSES
    assert ds.train.domains.tolist() == [0, 0, 0, 1, 1, 1]
    for split in ("train", "test"):
        s = getattr(ds, split)
        want = listed[f"real/{split}"] + listed[f"sketch/{split}"]
        assert s.y.tolist() == [DOMAINNET_CLASSES.index(c) for c, _ in want]
        for img, (_, colour) in zip(s.x, want):
            assert img[:, 0, 0].tolist() == list(colour) and bool((img == img[:, :1, :1]).all())


def test_domainnet_missing_folder_list_or_image_is_one_line(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("domainnet", tmp_path)
    assert str(tmp_path / "DomainNet") in str(e.value) and "real_train.pkl" in str(e.value)
    assert "\n" not in str(e.value)
    write_domainnet(tmp_path, ("real",))  # lists and domain folders directly under the root
    assert len(load_dataset("domainnet", tmp_path, image_size=4, domains=["real"]).train) == 3
    with pytest.raises(DataError) as e:
        load_dataset("domainnet", tmp_path, image_size=4)  # all six domains: clipart's list is missing
    assert str(tmp_path / "clipart_train.pkl") in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "real" / "bird").rename(tmp_path / "real" / "gone")
    with pytest.raises(DataError, match="not found") as e:
        load_dataset("domainnet", tmp_path, image_size=4, domains=["real"])
    assert "\n" not in str(e.value)


def test_dataset_params_reach_the_loader_and_unknown_ones_are_one_line(tmp_path):
    from fedtrust.runner.config import build_config
    from fedtrust.runner.federation import build_dataset

    write_domainnet(tmp_path / "DomainNet", ("real",))
    cfg = build_config({"data": {"dataset": "domainnet", "root": str(tmp_path),
                                 "dataset_params": {"image_size": 5, "domains": ["real"]}}})
    assert build_dataset(cfg).shape == (3, 5, 5)
    with pytest.raises(ConfigError) as e:
        build_config({"data": {"dataset": "domainnet", "dataset_params": {"size": 5}}})
    assert "data.dataset_params.size" in str(e.value) and "image_size" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="valid: none"):
        build_config({"data": {"dataset": "digits", "dataset_params": {"image_size": 5}}})
