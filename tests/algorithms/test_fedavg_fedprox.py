"""FedAvg and FedProx on tiny digits federations: hand-checkable effects, not smoke."""

import pytest
import torch

from fedtrust.fl.executor import ClientStore
from fedtrust.fl.protocol import ClientContext
from fedtrust.registry import names
from fedtrust.runner.config import build_config
from fedtrust.runner.federation import build_federation


def federation(*overrides):
    cfg = build_config({}, ["data.num_clients=4", "data.clients_per_round=4", "data.partition=iid",
                            "train.momentum=0", "eval.personalized=false", *overrides])
    return build_federation(cfg)


def run_round(fed, state, clients):
    algo = fed.algorithm
    messages = algo.configure(state, 1, clients)
    replies = {}
    for c in clients:
        ctx = ClientContext(c, 1, torch.Generator().manual_seed(c), fed.device)
        replies[c], _ = algo.client_update(messages[c], fed.data.client(c), ClientStore().get(c), ctx)
    return replies, algo.aggregate(state, replies, 1)[0]


def test_fedavg_is_the_sample_weighted_mean_of_client_models_bn_included():
    fed = federation("data.partition=dirichlet", "data.alpha=0.3", "data.min_size=5")
    torch.manual_seed(0)
    state = fed.algorithm.init()
    replies, new = run_round(fed, state, [0, 1, 2, 3])
    n = {c: len(fed.data.indices[c]) for c in replies}
    assert len(set(n.values())) > 1  # uneven clients, so weighting matters
    bn_mean = next(k for k in new.arrays if k.endswith("running_mean"))
    for key in ("model/head.weight", bn_mean):
        expect = sum(n[c] * replies[c].arrays[key] for c in replies) / sum(n.values())
        assert torch.allclose(new.arrays[key], expect, atol=1e-6), key
        unweighted = sum(replies[c].arrays[key] for c in replies) / 4
        assert not torch.allclose(new.arrays[key], unweighted, atol=1e-6)


def test_one_client_one_full_batch_step_equals_centralised_sgd():
    fed = federation("data.num_clients=1", "data.clients_per_round=1", "train.steps=1",
                     "train.batch_size=100000", "train.lr=0.1")
    torch.manual_seed(0)
    state = fed.algorithm.init()
    _, new = run_round(fed, state, [0])
    model = fed.algorithm.ctx.new_model()
    model.load_state_dict(state.prefixed("model"))
    model.train()
    x = fed.algorithm.ctx.normalize(fed.data.train.x)
    loss = torch.nn.functional.cross_entropy(model(x), fed.data.train.y)
    loss.backward()
    for name, p in model.named_parameters():
        expect = p.detach() - 0.1 * p.grad
        assert torch.allclose(new.arrays[f"model/{name}"], expect, atol=1e-5), name


def test_fedprox_proximal_term_value_and_effect():
    fed = federation("algorithm.name=fedprox", "algorithm.mu=2.0")
    algo = fed.algorithm
    ref = {"a": torch.zeros(3), "b": torch.ones(2)}
    params = {"a": torch.tensor([1.0, 2.0, 0.0]), "b": torch.tensor([1.0, 3.0])}
    batch = {"x": algo.ctx.normalize(fed.data.train.x[:8]), "y": fed.data.train.y[:8]}
    model = algo.template
    ce = algo.ctx.objective(model, batch)
    # (mu/2)·(1 + 4 + 0 + 0 + 4) = 9
    assert torch.allclose(algo.local_loss(model, params, batch, ref) - ce, torch.tensor(9.0))

    torch.manual_seed(0)
    state = algo.init()
    _, prox_state = run_round(fed, state, [0, 1])
    fed_avg = federation()
    _, avg_state = run_round(fed_avg, state, [0, 1])

    def drift(s):
        return sum(((s.arrays[k] - state.arrays[k]) ** 2).sum() for k in state.arrays
                   if state.arrays[k].is_floating_point() and "running" not in k)

    assert drift(prox_state) < drift(avg_state)


def test_fedprox_with_mu_zero_is_fedavg():
    fed_p = federation("algorithm.name=fedprox", "algorithm.mu=0")
    fed_a = federation()
    torch.manual_seed(0)
    state = fed_a.algorithm.init()
    _, a = run_round(fed_a, state, [0, 2])
    _, p = run_round(fed_p, state, [0, 2])
    for k in a.arrays:
        assert torch.allclose(a.arrays[k].float(), p.arrays[k].float(), atol=1e-6), k


NEEDS = {"isbc": ["data.outliers=noise", "data.num_outliers=64", "algorithm.hidden=16", "algorithm.pool=2"],
         "rna_moments": ["data.outliers=noise", "data.num_outliers=64", "objective.name=rna_no_outliers"],
         "splitmix": ["model.norm=bn_static"], "heterofl": ["model.norm=bn_static"]}
"""What an algorithm cannot run without (IS&BC, RNA variant B: the server's outliers; Split-Mix's rescaled
layers: batch-statistics BN)."""


@pytest.mark.parametrize("name", names("algorithm"))
def test_every_algorithm_trains_one_round_on_digits(name):
    fed = federation(f"algorithm.name={name}", *NEEDS.get(name, []))
    torch.manual_seed(0)
    state = fed.algorithm.init()
    replies, new = run_round(fed, state, [0, 1])
    assert set(replies) == {0, 1}
    changed = [k for k in state.arrays if not torch.equal(state.arrays[k], new.arrays.get(k, state.arrays[k]))]
    assert changed, "a round of training changed nothing"
    assert all(torch.isfinite(v.float()).all() for v in new.arrays.values())
