"""The vectorised executor equals the sequential reference (float64, so float32 chaos can't hide a bug)."""

from __future__ import annotations

import pytest
import torch

from fedtrust.fl.executor import ClientStore, SequentialExecutor
from fedtrust.fl.stacked_optim import StackedOptimizer
from fedtrust.fl.protocol import OptimizerSpec
from fedtrust.fl.vectorized import VectorizedExecutor, choose_executor
from fedtrust.runner.config import build_config
from fedtrust.runner.federation import build_federation




def run_both(overrides, rounds=2):
    cfg = build_config({}, ["data.num_clients=6", "data.clients_per_round=4", "data.alpha=0.3",
                            "data.min_size=20", "eval.personalized=false", *overrides])
    fed = build_federation(cfg)
    torch.manual_seed(0)
    state = fed.algorithm.init()
    sizes = {len(i) for i in fed.data.indices}
    assert len(sizes) > 1, "clients must be uneven"
    seq = SequentialExecutor(fed.algorithm, fed.data, cfg.seed, fed.device, 4)
    vec = VectorizedExecutor(fed.algorithm, fed.data, cfg.seed, fed.device, 4)
    return seq.run(state, ClientStore(), 0, rounds), vec.run(state, ClientStore(), 0, rounds), state


CASES = {
    "fedavg-sgd-momentum-wd": ["train.momentum=0.9", "train.weight_decay=0.001"],
    "fedavg-sgd-nesterov": ["train.nesterov=true"],
    "fedavg-adam": ["train.optimizer=adam", "train.lr=0.005", "train.weight_decay=0.0001"],
    "fedprox-sgd": ["algorithm.name=fedprox", "algorithm.mu=0.1", "train.weight_decay=0.001"],
    "fedprox-adam": ["algorithm.name=fedprox", "algorithm.mu=0.1", "train.optimizer=adam", "train.lr=0.005"],
    "fixed-steps-augmented": ["train.steps=7", "data.augment=crop_flip", "train.batch_size=32"],
    "two-epochs-plain-sgd": ["train.epochs=2", "train.momentum=0"],
    "rna-outliers-in-the-bn-batch": ["objective.name=rna", "data.outliers=photos", "data.num_outliers=300",
                                     "algorithm.bn_aggregation=pooled"],
    "pascl-two-views-augmented": ["objective.name=pascl", "data.outliers=photos", "data.num_outliers=300",
                                  "data.augment=crop_flip"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_vectorized_equals_sequential(name, float64):
    a, b, start = run_both(CASES[name])
    for k in a.arrays:
        assert torch.allclose(a.arrays[k].double(), b.arrays[k].double(), atol=1e-9, rtol=1e-7), k
    moved = [k for k in a.arrays if not torch.equal(a.arrays[k], start.arrays[k])]
    assert moved, "training changed nothing, so the comparison proves nothing"


def test_vectorized_float32_stays_close_in_accuracy(tmp_path):
    import fedtrust

    common = ["rounds=6", "eval.every=6", "data.partition=iid"]
    a = fedtrust.run(None, common + ["executor=sequential", f"out={tmp_path / 'a'}"], progress=False, report=False)
    b = fedtrust.run(None, common + ["executor=vectorized", f"out={tmp_path / 'b'}"], progress=False, report=False)
    assert a.summary["executor"] == "sequential" and b.summary["executor"] == "vectorized"
    assert abs(a.summary["test_acc"] - b.summary["test_acc"]) <= 0.02


def test_stacked_adam_rows_update_only_the_rows_given():
    params = {"w": torch.ones(3, 2)}
    opt = StackedOptimizer(OptimizerSpec("adam", lr=0.1), params, 3)
    opt.step({"w": torch.ones(2, 2)}, torch.tensor([0, 2]))
    assert torch.equal(params["w"][1], torch.ones(2))
    # Adam's first step moves each coordinate by lr against the gradient sign
    assert torch.allclose(params["w"][0], torch.full((2,), 0.9))
    assert opt.steps.tolist() == [1, 0, 1]


def test_auto_picks_vectorized_only_when_it_can():
    cfg = build_config({}, ["data.num_clients=4", "data.clients_per_round=2", "eval.personalized=false"])
    fed = build_federation(cfg)
    assert fed.executor.name == "vectorized"
    assert choose_executor(fed.algorithm, 1) == "sequential"
