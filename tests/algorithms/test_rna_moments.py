"""Federated RNA, variant B (spec rna.md §8): mixture moments, the server's OOD moments, the running-stat
recompute, and the effect on digits."""

import pytest
import torch
from torch import nn

from fedtrust.algorithms.rna_moments import ID, OOD
from fedtrust.errors import ConfigError
from fedtrust.fl.executor import ClientStore
from fedtrust.fl.protocol import ClientContext, Message
from fedtrust.models.mixture_bn import (MixtureBatchNorm2d, bn_input_moments, convert_to_mixture, mixture_layers,
                                        mixture_moments, ood_moments)
from fedtrust.runner.config import build_config
from fedtrust.runner.federation import build_federation

BASE = ["data.num_clients=4", "data.clients_per_round=4", "data.partition=iid", "eval.personalized=false",
        "algorithm.name=rna_moments", "objective.name=rna_no_outliers", "data.outliers=noise",
        "data.num_outliers=50", "model.width=8"]


def federation(*overrides):
    return build_federation(build_config({}, [*BASE, *overrides]))


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of an (N, C, H, W) tensor, by the textbook formula."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    mean = flat.mean(dim=1)
    return mean, ((flat - mean[:, None]) ** 2).mean(dim=1)


def test_mixture_moments_are_those_of_the_union_of_two_equal_sets():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 1
    b = torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64) * 0.5 - 3
    mean, var = mixture_moments(*moments(a), *moments(b))
    want_mean, want_var = moments(torch.cat([a, b]))
    assert torch.allclose(mean, want_mean, atol=1e-12)
    assert torch.allclose(var, want_var, atol=1e-12)
    # the naive average of the variances misses the spread of the means
    assert not torch.allclose(0.5 * (moments(a)[1] + moments(b)[1]), want_var, atol=1e-3)


def test_mixture_bn_with_the_ood_halfs_moments_normalises_like_bn_on_the_joint_batch():
    """With the OOD constants equal to the OOD half's moments, variant B's normalisation of the ID rows is
    variant A's (BN on cat(ID, OOD)); its running statistics track the ID rows only."""
    g = torch.Generator().manual_seed(1)
    x_id = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64) + 2
    x_ood = torch.randn(8, 4, 3, 3, generator=g, dtype=torch.float64) * 3
    joint = nn.BatchNorm2d(4).double()
    nn.init.normal_(joint.weight, generator=g)
    nn.init.normal_(joint.bias, generator=g)
    mix = convert_to_mixture(nn.Sequential(nn.BatchNorm2d(4).double()))
    mix[0].load_state_dict(joint.state_dict())
    assert type(mix[0]) is MixtureBatchNorm2d
    want = joint.train()(torch.cat([x_id, x_ood]))[:8]
    with ood_moments(mix, {"0/mean": moments(x_ood)[0], "0/var": moments(x_ood)[1]}):
        got = mix.train()(x_id)
    assert torch.allclose(got, want, atol=1e-10)
    id_only = nn.BatchNorm2d(4).double().train()
    id_only(x_id)
    assert torch.allclose(mix[0].running_mean, id_only.running_mean, atol=1e-12)
    assert torch.allclose(mix[0].running_var, id_only.running_var, atol=1e-12)
    assert mix[0].ood is None  # cleared after the block
    # without constants, or in eval mode, it is nn.BatchNorm2d
    plain = nn.BatchNorm2d(4).double()
    plain.load_state_dict(mix[0].state_dict())
    assert torch.allclose(mix.train()(x_id), plain.train()(x_id), atol=1e-12)
    assert torch.allclose(mix.eval()(x_ood), plain.eval()(x_ood), atol=1e-12)


def test_the_gradient_flows_through_the_batch_moments_not_the_ood_constants():
    x = torch.randn(6, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    mean_o = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    var_o = torch.ones(2, dtype=torch.float64, requires_grad=True)
    mix = convert_to_mixture(nn.Sequential(nn.BatchNorm2d(2, affine=False).double())).train()
    with ood_moments(mix, {"0/mean": mean_o.detach(), "0/var": var_o.detach()}):
        mix(x).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert mean_o.grad is None and var_o.grad is None


def test_bn_input_moments_equal_a_hand_forward_in_chunks_and_stop_early():
    fed = federation()
    model = fed.algorithm.ctx.new_model().double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    x = fed.algorithm.ctx.normalize(fed.algorithm.ctx.outliers).double()
    b = model.body
    layers = mixture_layers(model)
    assert len(layers) == 3
    with torch.no_grad():
        h1 = b[0][0](x)  # conv1: input of BN 1
        h2 = b[1][0](b[0](x))  # conv2 of conv1's eval-mode output (conv, BN, ReLU): input of BN 2
    got = bn_input_moments(model, x, chunk=7)
    for (mean, var), h in zip([got[layers[0]], got[layers[1]]], [h1, h2]):
        want_mean, want_var = moments(h)
        assert torch.allclose(mean, want_mean, atol=1e-9)
        assert torch.allclose(var, want_var, atol=1e-9)
    whole = bn_input_moments(model, x, chunk=10_000)
    for layer in layers:
        assert torch.allclose(whole[layer][0], got[layer][0], atol=1e-12)
    first = bn_input_moments(model, x, layers=[layers[0]], until=layers[0])
    assert torch.allclose(first[layers[0]][1], got[layers[0]][1], atol=1e-12)


def test_the_server_sends_the_moments_of_the_outliers_it_holds_and_no_image():
    """Variant B's OOD moments equal those of the server's outlier images (spec rna.md §8), per layer."""
    fed = federation()
    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    messages = algo.configure(state, 1, [0, 1])
    model = algo.ctx.new_model()
    model.load_state_dict(state.prefixed("model"))
    x = algo.ctx.normalize(algo.ctx.outliers)
    with torch.no_grad():
        h1 = model.eval().body[0][0](x)
    mean, var = moments(h1.double())
    layer = mixture_layers(model)[0]
    msg = messages[0]
    assert torch.allclose(msg.arrays[f"{OOD}{layer}/mean"].double(), mean, atol=1e-5)
    assert torch.allclose(msg.arrays[f"{OOD}{layer}/var"].double(), var, atol=1e-5)
    assert not any(k.startswith("outliers/") for k in msg.arrays)
    image = tuple(algo.ctx.outliers.shape[1:])
    assert not any(tuple(v.shape[-3:]) == image for v in msg.arrays.values() if v.dim() >= 3)
    assert messages[1].arrays.keys() == msg.arrays.keys()


def run_round(fed, state, clients, round=1):
    algo = fed.algorithm
    messages = algo.configure(state, round, clients)
    replies = {}
    for c in clients:
        ctx = ClientContext(c, round, torch.Generator().manual_seed(c), fed.device)
        replies[c], _ = algo.client_update(messages[c], fed.data.client(c), ClientStore().get(c), ctx)
    new, metrics = algo.aggregate(state, replies, round)
    return messages, replies, new, metrics


def test_aggregation_pools_the_clients_id_moments_and_mixes_them_with_the_ood_moments_layer_by_layer():
    fed = federation("train.steps=2")
    algo = fed.algorithm
    torch.manual_seed(0)
    state = algo.init()
    messages, replies, new, metrics = run_round(fed, state, [0, 1, 2])
    layers = mixture_layers(algo.template)
    n = {c: replies[c].meta["num_examples"] for c in replies}
    w = {c: n[c] / sum(n.values()) for c in n}
    # the merged model with the pooled ID moments, as the clients' replies give them
    merged = algo.ctx.new_model().double()
    merged.load_state_dict({k[len("model/"):]: v for k, v in new.arrays.items() if k.startswith("model/")})
    x = algo.ctx.normalize(algo.ctx.outliers).double()
    for i, layer in enumerate(layers):
        mu = {c: replies[c].arrays[f"model/{layer}.running_mean"].double() for c in replies}
        s2 = {c: replies[c].arrays[f"model/{layer}.running_var"].double() for c in replies}
        pooled_mean = sum(w[c] * mu[c] for c in w)
        pooled_var = sum(w[c] * (s2[c] + mu[c] ** 2) for c in w) - pooled_mean ** 2
        assert torch.allclose(new.arrays[f"{ID}{layer}/mean"].double(), pooled_mean, atol=1e-5)
        assert torch.allclose(new.arrays[f"{ID}{layer}/var"].double(), pooled_var, atol=1e-5)
        # OOD moments at layer i through the final model: layers before i already hold their final stats
        ood_mean, ood_var = bn_input_moments(merged, x, layers=[layer])[layer]
        want_mean, want_var = mixture_moments(pooled_mean, pooled_var, ood_mean, ood_var)
        assert torch.allclose(new.arrays[f"model/{layer}.running_mean"].double(), want_mean, atol=1e-4), layer
        assert torch.allclose(new.arrays[f"model/{layer}.running_var"].double(), want_var, atol=1e-4), layer
    assert metrics["rna_moments"]["layers"] == len(layers)
    # next round: clients start from the pooled ID moments, not the mixture statistics
    nxt = algo.configure(new, 2, [0])[0]
    for layer in layers:
        assert torch.equal(nxt.arrays[f"model/{layer}.running_mean"], new.arrays[f"{ID}{layer}/mean"])
        assert not torch.equal(nxt.arrays[f"model/{layer}.running_mean"], new.arrays[f"model/{layer}.running_mean"])


def test_the_client_trains_under_mixture_normalisation_and_tracks_id_moments():
    """One full-batch step of the same client from the same weights: variant B's update differs from
    FedAvg's with ID-only BN (the OOD constants enter the normalisation), while the first BN's running
    statistics, which track the ID batch moments of what enters it, are the same (deeper layers see inputs
    normalised by the mixture, so theirs differ)."""
    common = ["data.num_clients=4", "data.clients_per_round=4", "data.partition=iid", "eval.personalized=false",
              "objective.name=rna_no_outliers", "model.width=8", "train.steps=1", "train.batch_size=1000"]
    fed = federation("train.steps=1", "train.batch_size=1000")
    plain = build_federation(build_config({}, common))
    torch.manual_seed(0)
    state = fed.algorithm.init()
    msg = fed.algorithm.configure(state, 1, [0])[0]

    def update(f, message):
        ctx = ClientContext(0, 1, torch.Generator().manual_seed(0), f.device)
        return f.algorithm.client_update(message, f.data.client(0), ClientStore().get(0), ctx)[0]

    with_ood = update(fed, msg)
    no_ood = update(plain, Message(arrays={k: v for k, v in msg.arrays.items() if k.startswith("model/")},
                                   meta=msg.meta))
    head = next(k for k in no_ood.arrays if k.endswith("head.weight"))
    assert not torch.allclose(with_ood.arrays[head], no_ood.arrays[head], atol=1e-6)
    first, second = mixture_layers(fed.algorithm.template)[:2]
    for stat in ("running_mean", "running_var"):
        key = f"model/{first}.{stat}"
        assert torch.allclose(with_ood.arrays[key], no_ood.arrays[key], atol=1e-6), key
    assert not torch.allclose(with_ood.arrays[f"model/{second}.running_mean"],
                              no_ood.arrays[f"model/{second}.running_mean"], atol=1e-4)


@pytest.mark.parametrize("overrides, message", [
    (["objective.name=rna"], "keeps the outliers on the server"),
    (["data.outliers=null"], "needs the server's outliers"),
    (["model.norm=none"], "needs a model with batch norm"),
])
def test_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        federation(*overrides)
    assert message in str(err.value) and "\n" not in str(err.value)
