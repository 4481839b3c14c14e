"""Learning-rate milestones inside one local training (FLIP's attackers: ×0.1 at 20 % and 80 % of their
steps): the reference trainer against SGD written out by hand, and the vectorised executor against the
sequential one in float64 (clients of different sizes reach their milestones at different steps)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fedtrust.algorithms.fedavg import FedAvg
from fedtrust.data.types import ImageSet
from fedtrust.fl.executor import ClientStore, SequentialExecutor
from fedtrust.fl.local import local_batches, train_locally
from fedtrust.fl.types import ClientContext, LocalTraining, OptimizerSpec
from fedtrust.fl.vectorized import VectorizedExecutor
from fedtrust.runner.config import build_config
from fedtrust.runner.federation import build_federation


def test_lr_factor_counts_the_milestones_reached():
    spec = OptimizerSpec(lr=0.5, milestones=(0.2, 0.8), gamma=0.1)
    assert [spec.lr_factor(t, 10) for t in range(10)] == pytest.approx([1, 1, .1, .1, .1, .1, .1, .1, .01, .01])
    assert OptimizerSpec().lr_factor(7, 10) == 1.0


def test_reference_trainer_decays_the_lr_at_the_milestones(float64):
    """10 steps of plain SGD on a linear model: steps 0–1 at lr, 2–7 at lr/10, 8–9 at lr/100, by hand.
    Rules out milestones ignored, counted in epochs of another length, or applied one step late."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (20, 1, 2, 2), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (20,), generator=g)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    init = {k: v.clone() for k, v in model.state_dict().items()}

    def loss(m, params, batch, ref):
        return F.cross_entropy(m(batch["x"]), batch["y"])

    spec = OptimizerSpec(lr=0.5, milestones=(0.2, 0.8))
    plan = LocalTraining(model, init, ("1.weight", "1.bias"), loss, spec, batch_size=4, epochs=2)
    norm = lambda t: t / 255.0  # noqa: E731
    got = train_locally(plan, ImageSet(x, y, 3), ClientContext(0, 1, torch.Generator().manual_seed(3), "cpu"), norm)

    gen = torch.Generator().manual_seed(3)
    torch.randint(0, 2**62, (1,), generator=gen)  # the trainer's first draw: the dropout seed
    batches = local_batches(20, 4, 2, None, gen)
    assert len(batches) == 10
    w = {k: v.clone().requires_grad_(True) for k, v in init.items()}
    for t, idx in enumerate(batches):
        out = norm(x[idx].double()).flatten(1) @ w["1.weight"].T + w["1.bias"]
        gw, gb = torch.autograd.grad(F.cross_entropy(out, y[idx]), (w["1.weight"], w["1.bias"]))
        lr = 0.5 * spec.lr_factor(t, 10)
        with torch.no_grad():
            w["1.weight"] -= lr * gw
            w["1.bias"] -= lr * gb
    assert torch.allclose(got.state["1.weight"], w["1.weight"].detach(), atol=1e-12)
    assert torch.allclose(got.state["1.bias"], w["1.bias"].detach(), atol=1e-12)


class DecayingFedAvg(FedAvg):
    """FedAvg whose clients decay their lr ×0.1 at 30 % and 70 % of their local steps."""

    name = "decaying_fedavg_test"

    def local_training(self, message, client_state, ctx):
        plan = super().local_training(message, client_state, ctx)
        return dataclasses.replace(plan, optimizer=dataclasses.replace(plan.optimizer, milestones=(0.3, 0.7)))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_vectorized_milestones_equal_sequential_in_float64(float64, one_thread, optimizer):
    cfg = build_config({}, ["data.num_clients=6", "data.clients_per_round=4", "data.alpha=0.3", "data.min_size=20",
                            "eval.personalized=false", "train.epochs=2", "train.momentum=0.9",
                            f"train.optimizer={optimizer}", "train.lr=0.02"])
    fed = build_federation(cfg)
    algo = DecayingFedAvg(fed.algorithm.params, fed.algorithm.ctx)
    plain = fed.algorithm
    assert len({len(i) for i in fed.data.indices}) > 1, "clients must be uneven"
    torch.manual_seed(0)
    start = algo.init()
    a = SequentialExecutor(algo, fed.data, cfg.seed, fed.device, 4).run(start, ClientStore(), 0, 2)
    b = VectorizedExecutor(algo, fed.data, cfg.seed, fed.device, 4).run(start, ClientStore(), 0, 2)
    c = SequentialExecutor(plain, fed.data, cfg.seed, fed.device, 4).run(start, ClientStore(), 0, 2)
    for k in a.arrays:
        assert torch.allclose(a.arrays[k], b.arrays[k], atol=1e-9, rtol=1e-7), k
    assert any(not torch.allclose(a.arrays[k], c.arrays[k]) for k in a.arrays if a.arrays[k].is_floating_point()), \
        "the milestones changed nothing"
