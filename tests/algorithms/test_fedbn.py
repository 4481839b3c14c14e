"""FedBN (Li et al., ICLR 2021) and Split-Mix's local BN (spec splitmix.md §2 ``--lbn``): norm layers stay on
the client, everything else is averaged; personalized evaluation on the client's own domain."""

import pytest
import torch
from torch import nn

import fedtrust
from fedtrust.algorithms.personal import PERSONAL
from fedtrust.errors import ConfigError
from fedtrust.fl.executor import ClientStore
from fedtrust.fl.protocol import ClientContext
from fedtrust.models.norms import norm_state_keys
from fedtrust.runner.config import build_config
from fedtrust.runner.federation import build_federation

DOMAINS = ["data.dataset=digits_domains", "data.partition=domains", "data.num_clients=10",
           "data.clients_per_round=4", "eval.personalized=true"]


def federation(*overrides):
    return build_federation(build_config({}, [*DOMAINS, *overrides]))


def visit(fed, state, client, round, client_state):
    ctx = ClientContext(client, round, torch.Generator().manual_seed(100 * round + client), fed.device)
    message = fed.algorithm.configure(state, round, [client])[client]
    return fed.algorithm.client_update(message, fed.data.client(client), client_state, ctx)


def test_norm_state_keys_are_every_norm_layer_entry_and_nothing_else():
    """Rules out: missing running statistics or num_batches_tracked (they would be averaged), conv/linear
    entries counted as norm ones, and dual BN's halves missed."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4, 2),
                          nn.LayerNorm(2))
    assert norm_state_keys(model) == {"1.weight", "1.bias", "1.running_mean", "1.running_var",
                                      "1.num_batches_tracked", "2.weight", "2.bias", "5.weight", "5.bias"}
    dual = build_federation(build_config({}, ["model.norm=dual_bn"])).algorithm.template
    keys = norm_state_keys(dual)
    assert keys and all(".clean." in k or ".adv." in k for k in keys), sorted(keys)[:4]
    assert not any(k.endswith(".weight") and "conv" in k for k in keys)


def test_fedbn_keeps_norm_layers_on_the_client_and_averages_the_rest():
    """One client, two visits, by hand. Rules out: norm entries in the reply (averaged by the server), a
    second visit that starts from the server's norm layers instead of its own, and a server that moves its
    norm entries (no reply carries them)."""
    fed = federation("algorithm.name=fedbn")
    algo = fed.algorithm
    norm = norm_state_keys(algo.template)
    assert norm and any(k.endswith("running_var") for k in norm)
    torch.manual_seed(0)
    state = algo.init()
    reply, own = visit(fed, state, 1, 1, ClientStore().get(1))
    assert set(reply.arrays) == {f"model/{k}" for k in algo.template.state_dict() if k not in norm}
    kept = {k[len(PERSONAL) + 1:]: v for k, v in own.arrays.items() if k.startswith(PERSONAL + "/")}
    assert set(kept) == norm
    bn = next(k for k in norm if k.endswith("running_mean"))
    assert not torch.equal(kept[bn], state.arrays[f"model/{bn}"]), "the client's BN statistics moved"
    new, _ = algo.aggregate(state, {1: reply}, 1)
    for k in norm:
        assert torch.equal(new.arrays[f"model/{k}"], state.arrays[f"model/{k}"]), k
    conv = next(k for k in reply.arrays if k.endswith("weight") and f"{k[6:]}" not in norm)
    assert torch.equal(new.arrays[conv], reply.arrays[conv]), "one reply: the mean is that reply"
    # the second visit starts from the client's own norm layers, laid over the new global model
    plan = algo.local_training(algo.configure(new, 2, [1])[1], own, None)
    assert torch.equal(plan.init[bn], kept[bn])
    assert torch.equal(plan.init[conv[6:]], new.arrays[conv])
    # its personalized predictor is the global model with its norm layers; a never-sampled client's is the init
    model = algo.predictors(new, own)["personalized"]
    assert torch.equal(model.state_dict()[bn], kept[bn])
    assert torch.equal(algo.predictors(new, None)["personalized"].state_dict()[bn], state.arrays[f"model/{bn}"])


def test_fedbn_needs_norm_layers():
    with pytest.raises(ConfigError, match="fedbn keeps the normalization layers local.*has none"):
        federation("algorithm.name=fedbn", "model.norm=none")


def test_personalized_local_test_sets_lie_in_the_clients_domain_label_matched():
    """On a multi-domain set a client is scored on its own domain's test images (Split-Mix spec §1 "Test
    data"), in proportion to its (domain, class) training counts. Rules out: label-matched sets drawn from
    every domain (a FedBN client would be scored with its BN on foreign domains)."""
    fed = federation()
    train, test = fed.data.train, fed.dataset.test
    k = fed.dataset.num_classes
    for c, idx in enumerate(fed.eval_setup.local_test):
        mine = fed.data.indices[c]
        domains = torch.unique(train.domains[mine])
        assert len(domains) == 1 and torch.unique(test.domains[idx.cpu()]).tolist() == domains.tolist(), c
        n_train, n_test = len(train), len(test)
        want = torch.bincount(train.y[mine], minlength=k) * n_test // n_train
        got = torch.bincount(test.y[idx.cpu()], minlength=k)
        assert torch.equal(got, torch.minimum(want, torch.bincount(test.y[test.domains == domains[0]], minlength=k)))


def test_splitmix_local_bn_keeps_each_bases_norm_layers_on_the_client():
    """Rules out: norm entries replied (and averaged) under local_bn, a base's second visit not starting from
    the client's own norm layers, the client's norm layers of one base applied to another, and evaluation
    that ignores them."""
    fed = federation("algorithm.name=splitmix", "model.norm=bn", "algorithm.rescale_layer=false",
                     "algorithm.local_bn=true", "algorithm.base_ratio=0.25")
    algo = fed.algorithm
    assert algo.personalized
    norm = norm_state_keys(algo.template)
    torch.manual_seed(0)
    state = algo.init()
    message = algo.configure(state, 1, [3])[3]
    bases = message.meta["bases"]
    ctx = ClientContext(3, 1, torch.Generator().manual_seed(3), fed.device)
    reply, own = algo.client_update(message, fed.data.client(3), ClientStore().get(3), ctx)
    assert not any(k.split("/", 1)[1] in norm for k in reply.arrays)
    assert set(reply.arrays) == set(algo.reply_spec(message))
    assert {k for k in own.arrays} == {f"{PERSONAL}/base{i}/{k}" for i in bases for k in norm}
    bn = next(k for k in norm if k.endswith("running_mean"))
    i = bases[0]
    mine = own.arrays[f"{PERSONAL}/base{i}/{bn}"]
    assert not torch.equal(mine, state.arrays[f"base{i}/{bn}"])
    new, _ = algo.aggregate(state, {3: reply}, 1)
    assert torch.equal(new.arrays[f"base{i}/{bn}"], state.arrays[f"base{i}/{bn}"]), "the server's BN never moves"
    plans = algo.local_training(algo.configure(new, 2, [3])[3], own, None)
    again = algo.configure(new, 2, [3])[3].meta["bases"]
    for b, plan in zip(again, plans):
        expect = own.arrays.get(f"{PERSONAL}/base{b}/{bn}", new.arrays[f"base{b}/{bn}"])
        assert torch.equal(plan.init[bn], expect), b
    # evaluation: the client's norm layers on the bases it trained, the server's on the others
    mixed = algo.predictors(new, own)["x1"]
    for b, base in enumerate(mixed.bases):
        expect = own.arrays.get(f"{PERSONAL}/base{b}/{bn}", new.arrays[f"base{b}/{bn}"])
        assert torch.equal(base.state_dict()[bn], expect), b


@pytest.mark.slow
def test_fedbn_beats_fedavg_on_its_own_domain_on_digits_domains(tmp_path, one_thread):
    """FedBN's key effect (Li et al. 2021, §5: feature-shift non-IID): with each client's BN kept local, the
    personalized accuracy on its own domain beats FedAvg's shared BN. Fixed seed, 5 rounds, 10 clients."""
    common = [*DOMAINS, "data.clients_per_round=10", "rounds=5", "eval.every=5", "model.norm=bn",
              "checkpoint_every=0"]
    bn = fedtrust.run(None, [*common, "algorithm.name=fedbn", f"out={tmp_path / 'bn'}"], progress=False,
                      report=False)
    avg = fedtrust.run(None, [*common, f"out={tmp_path / 'avg'}"], progress=False, report=False)
    assert bn.summary["client_acc_mean"] >= avg.summary["client_acc_mean"] + 0.02, (
        bn.summary["client_acc_mean"], avg.summary["client_acc_mean"])
