"""DualBatchNorm and its routes (fedtrust.models.dual_bn; spec splitmix.md §4)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from fedtrust.errors import ConfigError
from fedtrust.models import create_model
from fedtrust.models.dual_bn import DualBatchNorm, bn_route, dual_layers, has_dual_bn, set_bn_route
from fedtrust.models.norms import NormFactory
from fedtrust.runner.config import build_config


pytestmark = pytest.mark.usefixtures("one_thread")
def _distinct_layer(dims: int = 2) -> DualBatchNorm:
    """A dual BN whose two halves differ in γ, β and running stats (eval mode)."""
    torch.manual_seed(0)
    layer = DualBatchNorm(3, affine=True, dims=dims)
    with torch.no_grad():
        for bn in (layer.clean, layer.adv):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return layer.eval()


def test_mu_zero_and_one_are_the_clean_and_adv_paths_exactly_and_half_is_the_average() -> None:
    """Rules out swapped routes, a mix weight applied the wrong way round and a shared affine."""
    layer = _distinct_layer()
    x = torch.randn(4, 3, 5, 5)
    clean, adv = layer.clean(x), layer.adv(x)
    assert not torch.allclose(clean, adv)
    for route, expected in [("clean", clean), ("adv", adv), (0.0, clean), (1.0, adv), (0, clean), (1, adv)]:
        with bn_route(layer, route):
            assert torch.equal(layer(x), expected), route
    with bn_route(layer, 0.5):
        assert torch.allclose(layer(x), 0.5 * (clean + adv), atol=1e-6)
    with bn_route(layer, 0.2):
        assert torch.allclose(layer(x), 0.8 * clean + 0.2 * adv, atol=1e-6)


def test_each_route_trains_only_its_own_running_stats() -> None:
    """Rules out one shared set of running statistics, and μ = 0 / 1 touching the other BN."""
    layer = DualBatchNorm(3, affine=True).train()
    start = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    for route, moved, kept in [("clean", "clean", "adv"), (1.0, "adv", "clean")]:
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        with bn_route(layer, route):
            layer(x)
        after = layer.state_dict()
        for stat in ("running_mean", "running_var", "num_batches_tracked"):
            assert not torch.equal(after[f"{moved}.{stat}"], before[f"{moved}.{stat}"]), (route, stat)
            assert torch.equal(after[f"{kept}.{stat}"], before[f"{kept}.{stat}"]), (route, stat)
    assert not torch.equal(layer.clean.running_mean, start["clean.running_mean"])


def test_bn_route_sets_every_layer_and_restores_on_exit() -> None:
    model = create_model("cnn", 10, (1, 8, 8), width=4, norm="dual_bn")
    layers = dual_layers(model)
    assert len(layers) == 3 and has_dual_bn(model) and not has_dual_bn(nn.Linear(2, 2))
    with bn_route(model, "adv"):
        assert [m.route for m in layers] == ["adv"] * 3
    assert [m.route for m in layers] == ["clean"] * 3
    with pytest.raises(RuntimeError):
        with bn_route(model, 0.3):
            raise RuntimeError
    assert [m.route for m in layers] == ["clean"] * 3
    assert set_bn_route(model, 0.8) == ["clean"] * 3 and [m.route for m in layers] == [0.8] * 3


def test_dual_bn_cnn_from_the_registry() -> None:
    model = create_model("cnn", 10, (1, 8, 8), width=4, norm="dual_bn")
    keys = set(model.state_dict())
    assert {"body.0.1.clean.weight", "body.0.1.adv.weight", "body.0.1.adv.running_var"} <= keys
    assert model.body[0][0].bias is None, "BN follows the conv: no conv bias"
    assert isinstance(NormFactory("dual_bn")(6), DualBatchNorm)
    assert build_config({}, ["model.norm=dual_bn"]).model.params()["norm"] == "dual_bn"
    fc = DualBatchNorm(5, affine=False, dims=1)
    assert fc(torch.randn(4, 5)).shape == (4, 5) and fc.clean.weight is None


def test_routes_under_functional_call_and_vmap() -> None:
    """The route is a Python attribute: vmapped functional calls over two weight sets follow it."""
    model = create_model("cnn", 10, (1, 8, 8), width=4, norm="dual_bn").eval()
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        other = create_model("cnn", 10, (1, 8, 8), width=4, norm="dual_bn")
        with torch.no_grad():
            for m in dual_layers(other):
                m.adv.weight.uniform_(0.5, 2.0)
                m.adv.running_mean.normal_()
        states.append(other.eval())
    stacked = {k: torch.stack([s.state_dict()[k] for s in states]) for k in model.state_dict()}
    x = torch.randn(6, 1, 8, 8)
    for route in ("clean", "adv", 0.5):
        with bn_route(model, route):
            out = vmap(lambda t: functional_call(model, t, (x,)))(stacked)
        for i, s in enumerate(states):
            with bn_route(s, route):
                assert torch.allclose(out[i], s(x), atol=1e-5), route


@pytest.mark.parametrize(("route", "match"), [("noise", "unknown dual-BN route"), (1.5, r"μ must be in \[0, 1\]"),
                                              (-0.1, r"μ must be in \[0, 1\]"), (True, "unknown dual-BN route")])
def test_bad_routes_are_one_line_config_errors(route, match) -> None:
    model = create_model("cnn", 10, (1, 8, 8), width=4, norm="dual_bn")
    with pytest.raises(ConfigError, match=match) as err:
        with bn_route(model, route):
            pass
    assert "\n" not in str(err.value)
    assert [m.route for m in dual_layers(model)] == ["clean"] * 3
    with pytest.raises(ConfigError, match="dims must be 1, 2 or 3"):
        DualBatchNorm(4, True, dims=4)
