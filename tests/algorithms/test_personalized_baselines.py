"""Long-tailed / personalized baselines (spec fedloge.md §8, published forms): FedRoD, FedBABU,
FedETF, Ditto, FedRep, FedPer, FedAvg + fine-tuning. Personal state stays on the client."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fedtrust.algorithms.personal import balanced_softmax_ce, log_prior
from fedtrust.fl.executor import ClientStore, SequentialExecutor
from fedtrust.fl.protocol import ClientContext, Message
from fedtrust.fl.vectorized import VectorizedExecutor
from fedtrust.models.etf import column_cosines
from fedtrust.runner.config import build_config
from fedtrust.runner.federation import build_federation

BASELINES = ["fedrod", "fedbabu", "fedetf", "ditto", "fedrep", "fedper", "fedavg_ft"]
PERSONAL_PREFIXES = ("personal/", "p_head/", "head_l/", "label_counts")


pytestmark = pytest.mark.usefixtures("one_thread")


def federation(*overrides):
    cfg = build_config({}, ["data.num_clients=12", "data.clients_per_round=3", "data.min_size=10", "train.steps=3",
                            "eval.personalized=false", *overrides])
    return build_federation(cfg)


def run(fed, rounds=2, executor=SequentialExecutor):
    torch.manual_seed(0)
    state = fed.algorithm.init()
    store = ClientStore()
    replies: list[dict[int, Message]] = []
    aggregate = fed.algorithm.aggregate

    def spy(s, r, rnd):
        replies.append(r)
        return aggregate(s, r, rnd)

    fed.algorithm.aggregate = spy
    final = executor(fed.algorithm, fed.data, 0, fed.device, fed.executor.num_sampled).run(state, store, 0, rounds)
    return state, final, store, replies


def ctx_of(fed, c):
    return ClientContext(c, 1, torch.Generator().manual_seed(c), fed.device)


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_trains_keeps_personal_state_home_and_predicts(name):
    fed = federation(f"algorithm.name={name}")
    start, final, store, replies = run(fed)
    assert store.states, "a personalized baseline keeps client state"
    for round_replies in replies:
        for reply in round_replies.values():
            assert not [k for k in reply.arrays if k.startswith(PERSONAL_PREFIXES)], sorted(reply.arrays)
    moved = [k for k in start.arrays if not torch.equal(start.arrays[k], final.arrays[k])]
    assert moved and all(torch.isfinite(v.float()).all() for v in final.arrays.values())
    client = next(iter(store.states))
    x = fed.algorithm.ctx.normalize(fed.data.train.x[:8])
    for who in (None, Message(), store.get(client)):  # global, never sampled, sampled
        preds = fed.algorithm.predictors(final, who)
        assert "personalized" in preds
        for model in preds.values():
            out = model.eval()(x)
            assert out.shape == (8, 10) and torch.isfinite(out).all()


def test_fedper_keeps_the_head_personal_and_the_server_head_at_its_init():
    fed = federation("algorithm.name=fedper")
    start, final, store, replies = run(fed)
    assert all(not k.startswith("model/head.") for r in replies for m in r.values() for k in m.arrays)
    assert torch.equal(final.arrays["model/head.weight"], start.arrays["model/head.weight"])
    own = store.get(next(iter(store.states)))
    assert set(own.arrays) == {"personal/head.weight", "personal/head.bias"}
    model = fed.algorithm.predictors(final, own)["personalized"]
    assert torch.equal(model.head.weight, own.arrays["personal/head.weight"])
    assert not torch.equal(own.arrays["personal/head.weight"], start.arrays["model/head.weight"])


def test_fedrep_trains_the_head_first_then_the_body():
    fed = federation("algorithm.name=fedrep", "algorithm.head_epochs=1")
    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    msg = algo.configure(state, 1, [0])[0]
    assert algo.local_training(msg, Message()) is None  # two phases: the general path
    reply, own = algo.client_update(msg, fed.data.client(0), Message(), ctx_of(fed, 0))
    n = len(fed.data.indices[0])
    assert reply.meta["steps"] == math.ceil(n / 16) + 3  # one head epoch, then train.steps=3 body steps
    assert not torch.equal(own.arrays["personal/head.weight"], state.arrays["model/head.weight"])
    assert not torch.equal(reply.arrays["model/body.0.0.weight"], state.arrays["model/body.0.0.weight"])
    assert "model/head.weight" not in reply.arrays


def test_fedbabu_never_moves_the_head_and_fine_tunes_it_for_personalization():
    fed = federation("algorithm.name=fedbabu")
    start, final, store, replies = run(fed)
    assert all(not k.startswith("model/head.") for r in replies for m in r.values() for k in m.arrays)
    assert torch.equal(final.arrays["model/head.weight"], start.arrays["model/head.weight"])
    own = store.get(next(iter(store.states)))
    assert set(own.arrays) == {"personal/head.weight", "personal/head.bias"}
    assert not torch.equal(own.arrays["personal/head.weight"], start.arrays["model/head.weight"])


@pytest.mark.parametrize("scope,keys", [("full", None), ("head", {"personal/head.weight", "personal/head.bias"})])
def test_fedavg_ft_stores_the_fine_tuned_scope(scope, keys):
    fed = federation("algorithm.name=fedavg_ft", f"algorithm.ft_scope={scope}", "algorithm.ft_steps=2")
    start, final, store, _ = run(fed, rounds=1)
    own = store.get(next(iter(store.states)))
    expect = keys or {f"personal/{k[len('model/'):]}" for k in start.arrays}  # full: every entry, BN included
    assert set(own.arrays) == expect


def test_ditto_global_part_equals_fedavg_and_the_personal_model_feels_the_proximal_pull():
    """Alg. 1 runs w and v side by side on the same batches: w must equal FedAvg's update exactly."""
    runs = {}
    for name, extra in (("fedavg", []), ("ditto0", ["algorithm.name=ditto", "algorithm.lam=0"]),
                        ("ditto", ["algorithm.name=ditto", "algorithm.lam=50"])):
        fed = federation(*extra)
        runs[name] = (fed, run(fed, rounds=1))
    _, (start, avg, _, _) = runs["fedavg"]
    for key in ("ditto0", "ditto"):
        _, (_, final, _, _) = runs[key]
        for k in avg.arrays:
            assert torch.allclose(avg.arrays[k].float(), final.arrays[k].float(), atol=1e-6), k

    def drift(store):
        own = store.get(next(iter(store.states))).prefixed("personal")
        return sum(((own[k] - start.arrays[f"model/{k}"]) ** 2).sum() for k in own if "running" not in k
                   and own[k].is_floating_point())

    assert drift(runs["ditto"][1][2]) < drift(runs["ditto0"][1][2])


def test_ditto_loss_adds_half_lambda_squared_distance_to_the_received_global_model():
    fed = federation("algorithm.name=ditto", "algorithm.lam=2.0")
    algo = fed.algorithm
    batch = {"x": algo.ctx.normalize(fed.data.train.x[:8]), "y": fed.data.train.y[:8]}
    pair = algo.pair
    ref = {"personal.head.bias": torch.zeros(10)}
    params = {"personal.head.bias": torch.full((10,), 0.5)}
    base = algo.ctx.objective(pair.model, batch) + algo.ctx.objective(pair.personal, batch)
    # (λ/2)·10·0.25 = 2.5
    assert torch.allclose(algo.ditto_loss(pair, params, batch, ref) - base, torch.tensor(2.5))


def test_balanced_softmax_is_ce_on_prior_shifted_logits():
    logits = torch.tensor([[1.0, 2.0, 0.0]])
    counts = torch.tensor([10.0, 1.0, 0.0])
    got = balanced_softmax_ce(logits, torch.tensor([0]), log_prior(counts))
    shifted = torch.tensor([[1.0 + math.log(10), 2.0, -27.631]])
    assert torch.allclose(got, F.cross_entropy(shifted, torch.tensor([0])), atol=1e-4)


def test_fedrod_first_visit_records_the_prior_then_trains_declaratively():
    fed = federation("algorithm.name=fedrod")
    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    msg = algo.configure(state, 1, [0])[0]
    assert algo.local_training(msg, Message()) is None
    reply, own = algo.client_update(msg, fed.data.client(0), Message(), ctx_of(fed, 0))
    assert torch.equal(own.arrays["label_counts"], fed.data.client(0).class_counts().float())
    assert set(own.arrays) == {"label_counts", "p_head/weight", "p_head/bias"}
    assert algo.local_training(msg, own) is not None
    never = algo.predictors(state, Message())  # p = 0: personalized == generic
    x = algo.ctx.normalize(fed.data.train.x[:4])
    assert torch.allclose(never["personalized"].eval()(x), never["global"].eval()(x))


def test_fedetf_keeps_the_etf_fixed_and_unsent_and_normalizes_features():
    fed = federation("algorithm.name=fedetf")
    start, final, store, replies = run(fed)
    assert all("model/etf" not in m.arrays for r in replies for m in r.values())
    etf = final.arrays["model/etf"]
    assert torch.equal(etf, start.arrays["model/etf"])
    cos = column_cosines(etf)
    assert torch.allclose(cos[~torch.eye(10, dtype=torch.bool)], torch.full((90,), -1 / 9), atol=1e-5)
    assert not torch.equal(final.arrays["model/beta"], start.arrays["model/beta"])  # learnable temperature
    net = fed.algorithm.predictors(final)["global"].eval()
    x = fed.algorithm.ctx.normalize(fed.data.train.x[:4])
    logits = net(x)  # |logit| <= β·‖ĥ‖·‖m_c‖ = β
    assert (logits.abs() <= final.arrays["model/beta"].abs() + 1e-5).all()
    own = store.get(next(iter(store.states)))
    assert {"personal/proj.weight", "personal/proj.bias", "personal/etf", "label_counts"} == set(own.arrays)




@pytest.mark.parametrize("name", ["fedper", "ditto", "fedrod"])
def test_declarative_baselines_match_on_the_vectorized_executor(name, float64):
    states = []
    for executor in (SequentialExecutor, VectorizedExecutor):
        fed = federation(f"algorithm.name={name}", "data.num_clients=6", "data.clients_per_round=4")
        states.append(run(fed, rounds=2, executor=executor))
    (_, a, sa, _), (_, b, sb, _) = states
    for k in a.arrays:
        assert torch.allclose(a.arrays[k].double(), b.arrays[k].double(), atol=1e-9, rtol=1e-7), k
    for c in sa.states:
        for k, v in sa.states[c].arrays.items():
            assert torch.allclose(v.double(), sb.states[c].arrays[k].double(), atol=1e-9, rtol=1e-7), (c, k)


def test_bad_params_are_one_line_errors():
    from fedtrust.errors import ConfigError

    for bad in (["algorithm.name=ditto", "algorithm.lam=-1"], ["algorithm.name=fedrep", "algorithm.head_epochs=0"],
                ["algorithm.name=fedavg_ft", "algorithm.ft_scope=body"], ["algorithm.name=fedloge", "algorithm.sparsity=1"]):
        with pytest.raises(ConfigError) as err:
            build_config({}, bad)
        assert "\n" not in str(err.value) and bad[1].split("=")[0] in str(err.value)
