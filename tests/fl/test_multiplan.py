"""Several plans per client on one batch schedule (Split-Mix's base nets), on every in-process executor.

A toy algorithm keeps two nets of different widths (built with ``ctx.new_model(width=...)``); even
clients train both, odd clients only the second, each plan on the same minibatches. The vectorised
executor groups (client, plan) jobs by shape, so the second net of every client trains in one group
while the first trains in a group of the even clients only; in float64 it equals the sequential
reference, which trains a client's plans side by side.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from fedtrust.algorithms.fedavg import FedAvg
from fedtrust.errors import FedTrustError
from fedtrust.fl.executor import ClientStore, SequentialExecutor
from fedtrust.fl.local import train_locally
from fedtrust.fl.types import ClientContext, LocalTraining, Message, TrainResult, with_prefix
from fedtrust.fl.vectorized import VectorizedExecutor
from fedtrust.runner.config import build_config
from fedtrust.runner.federation import build_federation

WIDTHS = (4, 8)


class TwoBases(FedAvg):
    """Toy: base j is a `cnn` of width WIDTHS[j]; client c trains bases {0, 1} if c is even, else {1}."""

    name = "two_bases_test"

    def __init__(self, params: Any, ctx: Any) -> None:
        super().__init__(params, ctx)
        self.bases = [ctx.new_model(width=w).to(ctx.device) for w in WIDTHS]

    def init(self) -> Message:
        arrays: dict[str, torch.Tensor] = {}
        for j, w in enumerate(WIDTHS):
            arrays.update(with_prefix(f"base{j}", self.ctx.new_model(width=w).state_dict()))
        return Message(arrays, {})

    def trains(self, client: int) -> list[int]:
        return [0, 1] if client % 2 == 0 else [1]

    def configure(self, state: Message, round: int, clients: list[int]) -> dict[int, Message]:
        return {c: Message({k: v for k, v in state.arrays.items() if k.split("/")[0] in {f"base{j}" for j in
                            self.trains(c)}}, {"lr": self.ctx.lr(round), "bases": self.trains(c)}) for c in clients}

    def reply_spec(self, message: Message) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (tuple(v.shape), v.dtype) for k, v in message.arrays.items()}

    def local_training(self, message: Message, client_state: Message, ctx: ClientContext) -> list[LocalTraining]:
        base = super().local_training(Message(message.arrays, message.meta), client_state, ctx)
        return [dataclasses.replace(base, model=self.bases[j], init=message.prefixed(f"base{j}"),
                                    trainable=tuple(n for n, _ in self.bases[j].named_parameters()))
                for j in message.meta["bases"]]

    def finish(self, message: Message, result: list[TrainResult], client_state: Message,
               ctx: ClientContext) -> tuple[Message, Message]:
        arrays: dict[str, torch.Tensor] = {}
        for j, r in zip(message.meta["bases"], result):
            arrays.update(with_prefix(f"base{j}", r.state))
        return Message(arrays, {"num_examples": result[0].num_examples, "loss": result[0].mean_loss}), client_state

    def aggregate(self, state: Message, replies: dict[int, Message], round: int) -> tuple[Message, dict]:
        metrics: dict = {}
        for j in range(len(WIDTHS)):
            carrying = {c: r for c, r in replies.items() if f"base{j}/head.bias" in r.arrays}
            if carrying:
                state, m = self.ctx.defense.merge(state, carrying, [f"base{j}"], round)
                metrics.update(m)
        return state, metrics

    def predictors(self, state: Message, client_state: Message | None = None) -> dict[str, torch.nn.Module]:
        net = self.ctx.new_model(width=WIDTHS[1])
        net.load_state_dict(state.prefixed("base1"))
        return {"base1": net}


def federation():
    fed = build_federation(build_config({}, ["data.num_clients=6", "data.clients_per_round=4", "train.steps=5",
                                             "data.augment=crop_flip", "eval.personalized=false"]))
    fed.algorithm = TwoBases(FedAvg.Params(), fed.algorithm.ctx)
    return fed


def run(executor_cls, sizes: list[tuple[int, int]] | None = None):
    fed = federation()
    torch.manual_seed(0)
    state = fed.algorithm.init()
    executor = executor_cls(fed.algorithm, fed.data, 0, fed.device, 4)
    if sizes is not None:
        real = executor._train_group

        def spy(members):
            sizes.append((members[0].slot if members[0].plan.model is fed.algorithm.bases[1] else 0, len(members)))
            return real(members)

        executor._train_group = spy
    return state, executor.run(state, ClientStore(), 0, 2)


def test_two_plans_per_client_equal_sequential_in_float64_and_train_grouped_by_base(float64, one_thread):
    """Rules out plans of one client drawing separate batch schedules (the vectorised jobs would then see
    other batches than the sequential reference), jobs grouped per client instead of per base, and a
    finish that pairs results with the wrong plans."""
    sizes: list[tuple[int, int]] = []
    start, seq = run(SequentialExecutor)
    _, vec = run(VectorizedExecutor, sizes)
    assert seq.arrays.keys() == vec.arrays.keys() == start.arrays.keys()
    for k in seq.arrays:
        assert torch.allclose(seq.arrays[k].double(), vec.arrays[k].double(), atol=1e-9, rtol=1e-7), k
    for j in range(2):
        assert not torch.equal(seq.arrays[f"base{j}/head.weight"], start.arrays[f"base{j}/head.weight"]), j
    groups = sorted(n for _, n in sizes)
    assert 4 in groups and max(groups) == 4 and len(sizes) == 4  # per round: base1 of 4 clients, base0 of the evens


def test_side_by_side_plans_see_the_same_minibatches_as_one_plan_alone(float64, one_thread):
    """Rules out a second plan consuming the client's generator (drawing its own batches or augmentation):
    each of two plans must train exactly as it would alone."""
    fed = federation()
    algo = fed.algorithm
    torch.manual_seed(0)
    msg = algo.configure(algo.init(), 1, [0])[0]
    plans = algo.local_training(msg, Message(), ClientContext(0, 1, torch.Generator(), fed.device))
    data = fed.data.client(0)
    both = train_locally(plans, data, ClientContext(0, 1, torch.Generator().manual_seed(7), fed.device), algo.ctx.normalize)
    for j, plan in enumerate(plans):
        alone = train_locally(plan, data, ClientContext(0, 1, torch.Generator().manual_seed(7), fed.device),
                              algo.ctx.normalize)
        for k, v in alone.state.items():
            assert torch.equal(both[j].state[k], v), (j, k)


def test_plans_that_disagree_on_the_schedule_are_an_error():
    """Rules out silently training the second plan on the first plan's batch size."""
    fed = federation()
    algo = fed.algorithm
    torch.manual_seed(0)
    msg = algo.configure(algo.init(), 1, [0])[0]
    a, b = algo.local_training(msg, Message(), ClientContext(0, 1, torch.Generator(), fed.device))
    with pytest.raises(FedTrustError, match="plan 1 has batch_size=3 and plan 0 16"):
        train_locally([a, dataclasses.replace(b, batch_size=3)], fed.data.client(0),
                      ClientContext(0, 1, torch.Generator(), fed.device), algo.ctx.normalize)
