"""``train.keep_optimizer``: a client's optimizer state (momentum, Adam moments, step) lives across rounds.

The centralised presets run one client for as many rounds as epochs; with the optimizer kept, that is one
torch optimizer over all epochs (checked exactly, in float64), not Adam restarted every epoch. The
vectorised executor keeps the same state per client as the sequential trainer.
"""

from __future__ import annotations

import pytest
import torch

from fedtrust.errors import ConfigError, FedTrustError
from fedtrust.fl.executor import ClientStore, SequentialExecutor
from fedtrust.fl.local import client_schedule
from fedtrust.fl.optim_state import load_torch_state, torch_state
from fedtrust.fl.protocol import ClientContext, Message, OptimizerSpec
from fedtrust.fl.sampling import client_generator
from fedtrust.fl.stacked_optim import StackedOptimizer
from fedtrust.fl.vectorized import VectorizedExecutor
from fedtrust.runner.config import build_config
from fedtrust.runner.federation import build_federation

pytestmark = pytest.mark.usefixtures("one_thread")

CENTRAL = ["data.imbalance_ratio=10", "data.num_clients=1", "data.clients_per_round=1", "data.partition=iid", "eval.personalized=false",
           "train.batch_size=64", "executor=sequential"]


def _one_optimizer_reference(fed, start: Message, epochs: int) -> dict[str, torch.Tensor]:
    """E epochs of ONE torch optimizer (lr set per epoch by the schedule) over the batches the run's client
    draws each round: what a centralised training loop does."""
    alg = fed.algorithm
    model = alg.ctx.new_model()
    model.load_state_dict(start.prefixed("model"))
    model.train()
    optimizer = alg.ctx.schedule.optimizer.build(list(model.parameters()))
    data = fed.data.client(0)
    for epoch in range(1, epochs + 1):
        for group in optimizer.param_groups:
            group["lr"] = alg.ctx.lr(epoch)
        ctx = ClientContext(0, epoch, client_generator(fed.config.seed, epoch, 0), torch.device("cpu"))
        plan = alg.local_training(alg.configure(start, epoch, [0])[0], Message(), ctx)
        schedule = client_schedule(plan, len(data), ctx.generator, data.x.shape[-1])
        for idx in schedule.batches:
            batch = {"x": alg.ctx.normalize(data.x[idx]), "y": data.y[idx]}
            loss = alg.ctx.objective(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("optim", [["train.optimizer=adam", "train.lr=0.003", "train.momentum=0",
                                    "train.weight_decay=0.0005"],
                                   ["train.optimizer=sgd", "train.lr=0.05", "train.momentum=0.9", "train.nesterov=true"]],
                         ids=["adam", "sgd-nesterov"])
def test_centralised_rounds_equal_one_optimizer_across_epochs(optim, float64):
    epochs = 3
    overrides = CENTRAL + optim + [f"rounds={epochs}", "train.lr_schedule=cosine"]
    fed = build_federation(build_config({}, overrides + ["train.keep_optimizer=true"]))
    torch.manual_seed(0)
    start = fed.algorithm.init()
    store = ClientStore()
    got = SequentialExecutor(fed.algorithm, fed.data, fed.config.seed, fed.device, 1).run(start, store, 0, epochs)
    want = _one_optimizer_reference(fed, start, epochs)
    for k, v in want.items():
        assert torch.equal(got.arrays[f"model/{k}"], v), k
    assert any(k.startswith("optim/") for k in store.get(0).arrays), "the kept state is not in the client store"

    fresh = build_federation(build_config({}, overrides))  # the optimizer rebuilt every round: not the same
    restarted = SequentialExecutor(fresh.algorithm, fresh.data, 0, fresh.device, 1).run(start, ClientStore(), 0, epochs)
    assert any(not torch.equal(restarted.arrays[f"model/{k}"], v) for k, v in want.items()), \
        "restarting the optimizer each round gave the same weights: the test cannot tell the two apart"


@pytest.mark.parametrize("optim", [["train.optimizer=adam", "train.lr=0.005", "train.weight_decay=0.0001"],
                                   ["train.momentum=0.9", "train.weight_decay=0.001"]], ids=["adam", "sgd-momentum"])
def test_vectorized_keeps_the_same_optimizer_state_as_sequential(optim, float64):
    """6 clients, 4 a round, 3 rounds: clients come back and start from their kept state on both executors."""
    cfg = build_config({}, ["data.num_clients=6", "data.clients_per_round=4", "data.alpha=0.3", "data.min_size=20",
                            "eval.personalized=false", "train.keep_optimizer=true", *optim])
    fed = build_federation(cfg)
    torch.manual_seed(0)
    state = fed.algorithm.init()
    stores = ClientStore(), ClientStore()
    a = SequentialExecutor(fed.algorithm, fed.data, cfg.seed, fed.device, 4).run(state, stores[0], 0, 3)
    b = VectorizedExecutor(fed.algorithm, fed.data, cfg.seed, fed.device, 4).run(state, stores[1], 0, 3)
    for k in a.arrays:
        assert torch.allclose(a.arrays[k], b.arrays[k], atol=1e-9, rtol=1e-7), k
    assert stores[0].states.keys() == stores[1].states.keys() and len(stores[0].states) == 6
    for c, kept in stores[0].states.items():
        other = stores[1].states[c].arrays
        assert kept.arrays.keys() == other.keys(), c
        for k, v in kept.arrays.items():
            assert torch.allclose(v.double(), other[k].double(), atol=1e-9, rtol=1e-7), (c, k)


def test_torch_and_stacked_state_round_trip():
    """Adam's moments and step survive torch → canonical → stacked → canonical → torch, and the next step
    from the loaded state equals the uninterrupted optimizer's."""
    torch.manual_seed(0)
    w = torch.randn(3, 2, requires_grad=True)
    spec = OptimizerSpec(name="adam", lr=0.1)
    opt = spec.build([w])
    for _ in range(3):
        opt.zero_grad()
        (w ** 3).sum().backward()
        opt.step()
    kept = torch_state(opt, {"w": w})
    assert set(kept) == {"m/w", "v/w", "step"} and float(kept["step"]) == 3.0

    stacked = StackedOptimizer(spec, {"w": w.detach().clone().unsqueeze(0).repeat(2, 1, 1)}, 2)
    stacked.load_row(1, kept)
    again = stacked.row_state(1)
    assert all(torch.equal(again[k].to(kept[k].dtype), kept[k]) for k in kept)
    assert float(stacked.row_state(0)["step"]) == 0.0, "row 0 was not given a state"

    w2 = w.detach().clone().requires_grad_(True)
    opt2 = spec.build([w2])
    load_torch_state(opt2, {"w": w2}, again)
    for o, p in ((opt, w), (opt2, w2)):
        o.zero_grad()
        (p ** 3).sum().backward()
        o.step()
    assert torch.equal(w, w2)


def test_a_kept_state_for_other_parameters_is_a_clear_error():
    w = torch.zeros(2, requires_grad=True)
    opt = OptimizerSpec(name="adam").build([w])
    with pytest.raises(FedTrustError, match="'m/other'"):
        load_torch_state(opt, {"w": w}, {"m/other": torch.zeros(2), "step": torch.tensor(1.0)})
    with pytest.raises(FedTrustError, match="not one of"):
        load_torch_state(opt, {"w": w}, {"momentum/w": torch.zeros(2)})


def test_keep_optimizer_on_an_algorithm_that_does_not_support_it_is_a_config_error():
    with pytest.raises(ConfigError, match="keep_optimizer is not supported by algorithm 'fedloge'.*fedavg"):
        build_federation(build_config({}, ["algorithm.name=fedloge", "train.keep_optimizer=true"]))
