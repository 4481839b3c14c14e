"""Every preset in configs/ is a valid config and builds its federation (a typo in a preset, or a preset
that parses but cannot be assembled, fails here, not in a user's run)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fedtrust.data import readers
from fedtrust.fl.executor import Executor
from fedtrust.fl.sampling import clients_per_round
from fedtrust.runner.config import load_config
from fedtrust.runner.federation import build_federation

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))

STAND_IN = {"cifar100": ((3, 32, 32), 100)}
"""Data sets no copy of ../shared/data holds: their presets are built on a small synthetic set in the same
file layout (random images, every class present), so the loader, long tail, partition, model, objective
and algorithm are all still built; only the pixels are fake."""

FEDBN_STAND_IN = {"fedbn_digits"}
"""FedBN pickle layouts (Digit-5) no copy of ../shared/data holds: random pickles in FedBN's layout, as above."""

SLOW = {"rna-cifar10-lt.yaml", "isbc-cifar10.yaml", "splitmix-cifar10.yaml", "sheterofl-cifar10.yaml"}  # decode the 50,000-image CIFAR-10 JPEG pack (about 8 s)


def test_there_are_presets():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_preset_validates(path):
    cfg = load_config(path)
    assert cfg.rounds >= 1


def write_stand_in(root: Path, name: str, per_class: int = 100) -> None:
    """``ROOT/<name>/{train,test}.npz`` (x uint8 NHWC, y int64) with ``per_class`` training images a class."""
    (c, h, w), k = STAND_IN[name]
    rng = np.random.default_rng(0)
    (root / name).mkdir(parents=True)
    for split, n in (("train", per_class), ("test", 2)):
        y = np.repeat(np.arange(k, dtype=np.int64), n)
        x = rng.integers(0, 256, size=(len(y), h, w, c), dtype=np.uint8)
        np.savez(root / name / f"{split}.npz", x=x, y=y)


def write_fedbn_digits_stand_in(root: Path, parts: int = 3, per_class: int = 2) -> None:
    """``ROOT/Digits/<domain>/partitions/train_part{k}.pkl`` (k < parts) and ``test.pkl``: pickled (x uint8 NHWC
    28×28×3, y int64) pairs, every class in every file, as FedBN's data_preprocess.py writes them."""
    import pickle

    from fedtrust.data.fedbn import DIGIT_DOMAINS

    rng = np.random.default_rng(0)
    for name in DIGIT_DOMAINS:
        for file in [f"partitions/train_part{k}.pkl" for k in range(parts)] + ["test.pkl"]:
            y = np.repeat(np.arange(10, dtype=np.int64), per_class)
            x = rng.integers(0, 256, size=(len(y), 28, 28, 3), dtype=np.uint8)
            path = root / "Digits" / name / file
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                pickle.dump((x, y), f, pickle.HIGHEST_PROTOCOL)


def preset_case(path: Path) -> list:
    marks = [pytest.mark.slow] if path.name in SLOW else []
    return pytest.param(path, id=path.name, marks=marks)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("path", [preset_case(p) for p in CONFIGS])
def test_preset_builds_its_federation(path, request, tmp_path, monkeypatch):
    """``build_federation`` on the preset as written (data under ../shared/data or a stand-in, see STAND_IN).

    Rules out a preset that validates but cannot be assembled (a data set, outlier or OOD source missing or
    of the wrong image shape, a partition its data cannot satisfy, a model the algorithm or objective cannot
    wrap) and one that builds something else than it says (client count, long-tail ratio, output classes).
    Only size keys are overridden: FedLoGe's SSE-C refinement steps (an init-time loop).
    """
    raw = load_config(path)
    overrides = []
    if raw.algorithm.name == "fedloge":
        overrides.append("algorithm.refine_steps=20")
    if raw.data.dataset in STAND_IN:
        write_stand_in(tmp_path, raw.data.dataset)
        overrides.append(f"data.root={tmp_path}")
    elif raw.data.dataset in FEDBN_STAND_IN:
        write_fedbn_digits_stand_in(tmp_path, raw.data.dataset_params.get("parts", 3))
        overrides.append(f"data.root={tmp_path}")
    elif raw.data.dataset != "digits" or raw.data.root is not None:
        shared = request.getfixturevalue("shared_data")  # skips with the path it looked in when absent
        overrides.append(f"data.root={shared}")
        # a decoded JPEG pack is cached in tmp_path, never next to the shared copy or in ~/.cache
        writable = readers.is_writable_dir
        monkeypatch.setattr(readers, "is_writable_dir", lambda d: d.resolve() != (shared / "cifar10").resolve()
                            and writable(d))
        monkeypatch.setattr(readers, "default_cache_dir", lambda: tmp_path)
    cfg = load_config(path, overrides)
    fed = build_federation(cfg)

    algo = fed.algorithm
    assert algo.name == cfg.algorithm.name and algo.ctx.objective.name == cfg.objective.name
    assert fed.dataset.name == cfg.data.dataset
    k = fed.dataset.num_classes
    assert len(fed.data) == cfg.data.num_clients
    sizes = [len(i) for i in fed.data.indices]
    every = torch.cat(list(fed.data.indices))
    assert min(sizes) > 0 and len(every) == len(fed.data.train) == len(torch.unique(every))  # a partition
    counts = np.asarray(fed.partition["class_counts"])
    assert len(counts) == k and counts.min() > 0
    if cfg.data.imbalance_ratio > 1:
        assert counts.max() / counts.min() == pytest.approx(cfg.data.imbalance_ratio, rel=0.1)
    assert isinstance(fed.executor, Executor)
    assert fed.executor.num_sampled == clients_per_round(cfg.data.clients_per_round, cfg.data.num_clients)
    if cfg.data.outliers is None:
        assert algo.ctx.outliers is None
    else:
        assert algo.ctx.outliers.shape == (cfg.data.num_outliers, *fed.dataset.shape)
    assert set(fed.eval_setup.ood_sets) == set(cfg.eval.ood)
    for name, ood in fed.eval_setup.ood_sets.items():
        assert ood.shape[1:] == fed.dataset.shape, name

    torch.manual_seed(0)
    state = algo.init()
    x = algo.ctx.normalize(fed.data.train.x[:4])
    assert x.shape == (4, *fed.dataset.shape)
    for name, model in algo.predictors(state).items():  # a client never sampled: its personalized model too
        with torch.no_grad():
            out = model.eval()(x)
        assert out.shape == (4, k) and torch.isfinite(out).all(), name
