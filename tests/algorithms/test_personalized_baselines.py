"""Long-tailed / personalized baselines (spec fedloge.md §8, published forms): FedRoD, FedBABU,
FedETF, Ditto, FedRep, FedPer, FedAvg + fine-tuning. Personal state stays on the client."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedtrust.algorithms.fedetf import ETFNet
from fedtrust.algorithms.fedrod import RoDNet
from fedtrust.algorithms.personal import balanced_softmax_ce, log_prior
from fedtrust.fl.executor import ClientStore, SequentialExecutor
from fedtrust.fl.local import client_schedule, train_locally
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


def hand_ce(z, y):
    """Mean cross-entropy written out: mean_i (log Σ_c exp z_ic − z_iy)."""
    return (torch.log(torch.exp(z).sum(dim=1)) - z[torch.arange(len(y)), y]).mean()


def softmax_minus_onehot(z, y):
    """d CE / d z for the mean over the batch: (softmax(z) − onehot(y)) / B."""
    p = torch.exp(z) / torch.exp(z).sum(dim=1, keepdim=True)
    return (p - F.one_hot(y, z.shape[1]).to(z.dtype)) / len(y)


class Linear(nn.Module):
    """A FedModel-contract stub: features(x) = x and a linear head, so logits are exact hand numbers."""

    def __init__(self, d, k):
        super().__init__()
        self.head = nn.Linear(d, k)

    def features(self, x):
        return x

    def forward(self, x):
        return self.head(x)


def set_linear(layer, weight, bias):
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight))
        layer.bias.copy_(torch.as_tensor(bias))


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
    """Alg. 1 lines 5-8: head epochs with the body frozen, THEN body steps with the new head frozen.

    The client's reply and stored head are recomputed on the library's trainer in the paper's order from the
    same client generator and must match exactly; rules out the body phase running before the head phase
    (or on the old head), either phase training the other part, and the head phase ignoring head_epochs.
    """
    fed = federation("algorithm.name=fedrep", "algorithm.head_epochs=2")
    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    msg = algo.configure(state, 1, [0])[0]
    assert algo.local_training(msg, Message(), ctx_of(fed, 0)) is None  # two phases: the general path
    data = fed.data.client(0)
    reply, own = algo.client_update(msg, data, Message(), ctx_of(fed, 0))
    n = len(fed.data.indices[0])
    assert reply.meta["steps"] == 2 * math.ceil(n / 16) + 3  # two head epochs, then train.steps=3 body steps
    assert "model/head.weight" not in reply.arrays

    plan = algo.plan(msg, Message(), ctx_of(fed, 0))
    head_names = tuple(k for k in plan.trainable if k.startswith("head."))
    body_names = tuple(k for k in plan.trainable if not k.startswith("head."))
    assert head_names == ("head.weight", "head.bias") and body_names
    ctx = ctx_of(fed, 0)  # the same generator: phase 1 draws first, phase 2 continues the stream
    head = train_locally(dataclasses.replace(plan, trainable=head_names, epochs=2, steps=None), data, ctx,
                         algo.ctx.normalize)
    body = train_locally(dataclasses.replace(plan, init=head.state, trainable=body_names), data, ctx,
                         algo.ctx.normalize)
    received = msg.prefixed("model")
    for name in body_names:  # phase 1 leaves the body's parameters alone ...
        assert torch.equal(head.state[name], received[name]), name
    for name in head_names:  # ... and phase 2 the new head
        assert torch.equal(body.state[name], head.state[name]), name
        assert not torch.equal(head.state[name], received[name]), name
        assert torch.equal(own.arrays[f"personal/{name}"], head.state[name]), name
    for name in body_names:
        assert not torch.equal(body.state[name], received[name]), name
    for name, v in body.state.items():
        if not name.startswith("head."):
            assert torch.equal(reply.arrays[f"model/{name}"], v), name


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
    """The client replies with FedAvg's update, then fine-tunes the model it RECEIVED on its own data.

    The stored entries are recomputed by a hand-written SGD fine-tune of the received model (ft_lr,
    train.momentum, ft_steps batches drawn from the client's generator after the FedAvg phase) and must
    match; rules out storing the received model untouched, tuning the client's own FedAvg update instead
    of the received model, ignoring ft_lr/ft_steps, and tuning (or keeping) the wrong scope.
    """
    over = [f"algorithm.ft_scope={scope}", "algorithm.ft_steps=6", "algorithm.ft_lr=0.03"]
    fed = federation("algorithm.name=fedavg_ft", *over)
    start, final, store, _ = run(fed, rounds=1)
    own = store.get(next(iter(store.states)))
    expect = keys or {f"personal/{k[len('model/'):]}" for k in start.arrays}  # full: every entry, BN included
    assert set(own.arrays) == expect

    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    msg = algo.configure(state, 1, [0])[0]
    data = fed.data.client(0)
    reply, own = algo.client_update(msg, data, Message(), ctx_of(fed, 0))

    plain = federation()  # FedAvg with the same train section
    ctx = ctx_of(fed, 0)
    avg_reply, _ = plain.algorithm.client_update(msg, data, Message(), ctx)  # advances the generator as FedAvg-FT's
    assert reply.arrays.keys() == avg_reply.arrays.keys()
    assert all(torch.equal(reply.arrays[k], avg_reply.arrays[k]) for k in reply.arrays)

    received = msg.prefixed("model")
    model = copy.deepcopy(algo.template)
    model.load_state_dict(received)
    model.train()
    tuned = [p for n, p in model.named_parameters() if scope == "full" or n.startswith("head.")]
    opt = torch.optim.SGD(tuned, lr=0.03, momentum=0.9)
    sched = dataclasses.replace(plain.algorithm.local_training(msg, Message(), ctx_of(plain, 0)), steps=6)
    for idx in client_schedule(sched, len(data), ctx.generator).batches:
        opt.zero_grad()
        F.cross_entropy(model(algo.ctx.normalize(data.x[idx])), data.y[idx]).backward()
        opt.step()
    for key, v in own.arrays.items():
        name = key[len("personal/"):]
        assert torch.allclose(v.double(), model.state_dict()[name].double(), atol=1e-6), key
        assert not torch.equal(v, received[name]), key  # moved away from the received model

    def client_loss(net):
        with torch.no_grad():
            return float(F.cross_entropy(net.eval()(algo.ctx.normalize(data.x)), data.y))

    got = algo.predictors(state, own)
    assert client_loss(got["personalized"]) < client_loss(got["global"])


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
    assert algo.local_training(msg, Message(), ctx_of(fed, 0)) is None
    reply, own = algo.client_update(msg, fed.data.client(0), Message(), ctx_of(fed, 0))
    assert torch.equal(own.arrays["label_counts"], fed.data.client(0).class_counts().float())
    assert set(own.arrays) == {"label_counts", "p_head/weight", "p_head/bias"}
    assert algo.local_training(msg, own, ctx_of(fed, 0)) is not None
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




def rod_expected(f, g_w, g_b, p_w, p_b, counts, y):
    """FedRoD by hand: CE(g + log n) on the generic logits + CE(g + p) on the personalized ones."""
    g = f @ g_w.T + g_b
    p = f @ p_w.T + p_b
    return hand_ce(g + torch.log(counts.clamp_min(1e-12)), y) + hand_ce(g + p, y)


def test_fedrod_loss_by_hand_balanced_generic_head_plus_personal_head_on_stopped_features():
    """FedRoD Eq. 7 + the personalized loss on a 2-d, 3-class example with hand-set heads.

    Rules out a generic loss without the client's log-prior (plain CE), a personalized loss on p alone
    (without the generic logits), and missing stop-gradients (the personalized term reaching g or the body),
    and a client plan that trains with another loss or prior.
    """
    fed = federation("algorithm.name=fedrod")
    algo = fed.algorithm
    net = RoDNet(Linear(2, 3))
    g_w, g_b = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [0.0, 0.5, -0.5]
    p_w, p_b = [[0.5, 0.0], [0.0, 0.0], [0.0, -1.0]], [0.0, 0.2, 0.0]
    set_linear(net.model.head, g_w, g_b)
    set_linear(net.p_head, p_w, p_b)
    counts = torch.tensor([6.0, 3.0, 1.0])
    x = torch.tensor([[1.0, 2.0], [0.5, -1.0]], requires_grad=True)
    y = torch.tensor([1, 2])
    loss = algo.rod_loss(net, {}, {"x": x, "y": y}, {"log_prior": log_prior(counts)})
    t = torch.tensor
    g = x.detach() @ t(g_w).T + t(g_b)  # [[1, 2.5, 2.5], [0.5, -0.5, -1]]
    p = x.detach() @ t(p_w).T + t(p_b)  # [[0.5, 0.2, -2], [0.25, 0.2, 1]]
    z_generic = g + torch.log(counts)
    expect = hand_ce(z_generic, y) + hand_ce(g + p, y)
    assert torch.allclose(loss, expect, atol=1e-6)
    assert not torch.allclose(loss, hand_ce(g, y) + hand_ce(g + p, y), atol=1e-3)  # the prior matters here
    loss.backward()
    d_generic, d_personal = softmax_minus_onehot(z_generic, y), softmax_minus_onehot(g + p, y)
    assert torch.allclose(net.model.head.weight.grad, d_generic.T @ x.detach(), atol=1e-6)  # g: the generic term only
    assert torch.allclose(net.p_head.weight.grad, d_personal.T @ x.detach(), atol=1e-6)  # p: the personal term only
    assert torch.allclose(x.grad, d_generic @ t(g_w), atol=1e-6)  # the body: the generic term only

    # the client's declarative plan trains that loss with the client's own prior
    torch.manual_seed(0)
    msg = algo.configure(algo.init(), 1, [0])[0]
    client_counts = fed.data.client(0).class_counts().float()
    plan = algo.local_training(msg, Message(arrays={"label_counts": client_counts}), ctx_of(fed, 0))
    assert torch.equal(plan.ref["log_prior"], torch.log(client_counts.clamp_min(1e-12)))
    gen = torch.Generator().manual_seed(1)
    big = RoDNet(Linear(4, 10))
    w = [torch.randn(10, 4, generator=gen), torch.randn(10, generator=gen)]
    pw = [torch.randn(10, 4, generator=gen), torch.randn(10, generator=gen)]
    set_linear(big.model.head, *w)
    set_linear(big.p_head, *pw)
    xb, yb = torch.randn(6, 4, generator=gen), torch.arange(6)
    got = plan.loss(big, {}, {"x": xb, "y": yb}, plan.ref)
    assert torch.allclose(got, rod_expected(xb, *w, *pw, client_counts, yb), atol=1e-5)


def etf_expected(f, proj_w, proj_b, etf, beta, counts, y):
    """FedETF by hand: z = β · (h / ‖h‖) M with h = W_p f + b_p; balanced CE(z + log n, y)."""
    h = f @ proj_w.T + proj_b
    h_hat = h / torch.sqrt((h ** 2).sum(dim=1, keepdim=True))
    return hand_ce(beta * h_hat @ etf + torch.log(counts.clamp_min(1e-12)), y)


def test_fedetf_loss_by_hand_is_balanced_ce_on_beta_times_normalized_projection_times_etf():
    """FedETF §4 on a 2-d, 3-class example: balanced softmax on β·ĥᵀM.

    Rules out a loss without the client's log-prior, logits from the unnormalized projection, a missing
    temperature β, and a plan that trains the fixed ETF or uses another prior.
    """
    fed = federation("algorithm.name=fedetf")
    algo = fed.algorithm
    net = ETFNet(Linear(2, 3), num_classes=3, proj_dim=3, beta_init=2.0)
    set_linear(net.proj, [[1.0, 0.0], [0.0, 2.0], [1.0, -1.0]], [0.0, 0.0, 1.0])
    m = math.sqrt(1.5) * (torch.eye(3) - 1 / 3)  # a 3-class simplex ETF in R^3: unit columns, cosines −1/2
    with torch.no_grad():
        net.etf.copy_(m)
    counts = torch.tensor([1.0, 4.0, 8.0])
    x, y = torch.tensor([[3.0, 1.0], [0.0, -1.0]]), torch.tensor([0, 1])
    loss = algo.local_loss(net, {}, {"x": x, "y": y}, {"log_prior": log_prior(counts)})
    # h = [[3, 2, 3], [0, -2, 2]]; ‖h‖ = [√22, √8]
    h_hat = torch.tensor([[3.0, 2.0, 3.0], [0.0, -2.0, 2.0]]) / torch.tensor([[math.sqrt(22)], [math.sqrt(8)]])
    z = 2.0 * h_hat @ m
    assert torch.allclose(loss, hand_ce(z + torch.log(counts), y), atol=1e-6)
    for wrong in (hand_ce(z, y), hand_ce(2.0 * torch.tensor([[3.0, 2.0, 3.0], [0.0, -2.0, 2.0]]) @ m + torch.log(counts), y),
                  hand_ce(h_hat @ m + torch.log(counts), y)):
        assert not torch.allclose(loss, wrong, atol=1e-3)

    torch.manual_seed(0)
    msg = algo.configure(algo.init(), 1, [0])[0]
    client_counts = fed.data.client(0).class_counts().float()
    plan = algo.plan(msg, Message(arrays={"label_counts": client_counts}), ctx_of(fed, 0))
    assert "etf" not in plan.trainable and "beta" in plan.trainable and "proj.weight" in plan.trainable
    assert torch.equal(plan.ref["log_prior"], torch.log(client_counts.clamp_min(1e-12)))
    gen = torch.Generator().manual_seed(2)
    big = ETFNet(Linear(4, 10), num_classes=10, proj_dim=10, beta_init=1.5)
    pw = [torch.randn(10, 4, generator=gen), torch.randn(10, generator=gen)]
    set_linear(big.proj, *pw)
    etf = torch.randn(10, 10, generator=gen)
    with torch.no_grad():
        big.etf.copy_(etf)
    xb, yb = torch.randn(6, 4, generator=gen), torch.arange(6)
    got = plan.loss(big, {}, {"x": xb, "y": yb}, plan.ref)
    assert torch.allclose(got, etf_expected(xb, *pw, etf, 1.5, client_counts, yb), atol=1e-5)


def test_fedbabu_trains_only_the_body_with_plain_ce_and_the_head_stays_at_its_init():
    """FedBABU Alg. 1: the client's plan trains every parameter except the head, with cross-entropy.

    Rules out training the head during federated training (or freezing part of the body), and a loss other
    than plain CE (e.g. a balanced softmax borrowed from FedRoD/FedETF).
    """
    fed = federation("algorithm.name=fedbabu")
    algo = fed.algorithm
    torch.manual_seed(0)
    msg = algo.configure(algo.init(), 1, [0])[0]
    plan = algo.plan(msg, Message(), ctx_of(fed, 0))
    names = [n for n, _ in plan.model.named_parameters()]
    assert set(plan.trainable) == {n for n in names if not n.startswith("head.")}
    model = copy.deepcopy(plan.model)
    model.load_state_dict(plan.init)
    x, y = algo.ctx.normalize(fed.data.train.x[:8]), fed.data.train.y[:8]
    with torch.no_grad():
        z = model.eval()(x)
    assert torch.allclose(plan.loss(model, {}, {"x": x, "y": y}, plan.ref), hand_ce(z, y), atol=1e-5)

    result = train_locally(plan, fed.data.client(0), ctx_of(fed, 0), algo.ctx.normalize)
    received = msg.prefixed("model")
    for name in names:
        moved = not torch.equal(result.state[name], received[name])
        assert moved == (not name.startswith("head.")), name


def personal_tensors(state):
    """Every floating tensor of a client's state (label counts, personal heads/models); integer BN step
    counters are left out: they count steps, so two of them can be equal by coincidence."""
    return [v for v in state.arrays.values() if v.is_floating_point()]


@pytest.mark.parametrize("name", BASELINES)
def test_personal_state_never_leaves_the_client_by_value(name):
    """No reply tensor, under any key, equals a tensor the client keeps (checked by value, as for FedLoGe).

    Personal tensors still equal to something the server holds (the shared init) are left out: equality
    with them would mean nothing. Rules out a personal head or model sent under a shared name (Ditto
    replying v instead of w, FedRoD's p_k in place of g, FedPer/FedRep/FedBABU's head in a body slot,
    FedAvg-FT's tuned model as the update), on this round or from an earlier visit.
    """
    quick = ["algorithm.head_epochs=1"] if name == "fedrep" else []
    fed = federation(f"algorithm.name={name}", "data.num_clients=6", "data.clients_per_round=3", *quick)
    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    store = ClientStore()
    replies, personal, server = [], [], list(state.arrays.values())
    aggregate = algo.aggregate

    def spy(s, r, rnd):  # the store already holds this round's client states
        replies.extend(v for m in r.values() for v in m.arrays.values())
        personal.extend(t.clone() for c in store.states.values() for t in personal_tensors(c))
        server.extend(s.arrays.values())
        new, metrics = aggregate(s, r, rnd)
        server.extend(new.arrays.values())
        return new, metrics

    algo.aggregate = spy
    SequentialExecutor(algo, fed.data, 0, fed.device, 3).run(state, store, 0, 3)

    def among(t, pool):
        return any(t.shape == u.shape and t.dtype == u.dtype and torch.equal(t, u) for u in pool)

    moved = [t for t in personal if not among(t, server)]
    assert len(store.states) >= 4 and moved
    for c, own in store.states.items():  # every client's personal state moved away from the shared init
        assert any(not among(t, server) for t in personal_tensors(own)), c
    leaked = [tuple(v.shape) for v in replies if among(v, moved)]
    assert not leaked, leaked


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
