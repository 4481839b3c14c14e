"""Parameters and MACs (spec splitmix.md §6; models/cost.py), against hand counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedtrust.models import create_model
from fedtrust.models.cost import model_cost
from fedtrust.models.ensemble import MixedModel
from fedtrust.models.slimmable import SlimNet


def test_tiny_conv_linear_net_matches_hand_count() -> None:
    """conv3x3 2->3 (pad 1) on a 2x5x5 input: 5*5 outputs * 3 channels * (2*9) MACs = 1350; Linear 75->4: 300.
    Params: 2*3*9 + 3 + 75*4 + 4 = 361. Rules out reporting FLOPs (3300), counting the batch of 2 the
    counter runs (3300), or counting biases, ReLU and BN as MACs."""
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(75, 4))
    net.train()
    assert model_cost(net, (2, 5, 5)) == (361 + 6, 1350 + 300)  # + BN's 6 affine parameters
    assert net.training  # the mode is restored


def test_digitnet_macs_match_hand_count() -> None:
    """DigitModel on 3x28x28: conv1 28*28*64*3*25, conv2 14*14*64*64*25, conv3 7*7*128*64*25, fc1 6272*2048,
    fc2 2048*512, head 512*10. Works with batch-statistics BN1d (the counter runs a batch of 2, not 1)."""
    macs = 28 * 28 * 64 * 3 * 25 + 14 * 14 * 64 * 64 * 25 + 7 * 7 * 128 * 64 * 25 + 6272 * 2048 + 2048 * 512 + 512 * 10
    torch.manual_seed(0)
    assert model_cost(create_model("digitnet", 10, (3, 28, 28), norm="bn_static"), (3, 28, 28)) == (14_219_210, macs)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_mixed_model_costs_n_bases(n: int) -> None:
    """Spec §2: a mixed model of n bases costs n times one base (params and MACs), ~ w r P vs w^2 P slimmed."""
    torch.manual_seed(0)
    bases = [create_model("digitnet", 10, (3, 28, 28), width_ratio=1 / 8, norm="bn_static") for _ in range(n)]
    params, macs = model_cost(bases[0], (3, 28, 28))
    assert model_cost(MixedModel(bases), (3, 28, 28)) == (n * params, n * macs)


@pytest.mark.parametrize("width", [1 / 8, 1 / 2])
@pytest.mark.parametrize(("name", "shape"), [("digitnet", (3, 28, 28)), ("preresnet18", (3, 32, 32))])
def test_slim_view_costs_its_sub_net(name: str, shape: tuple[int, int, int], width: float) -> None:
    """A SlimNet at width w costs what the standalone width-w model costs (§6: the active slice), not the full
    model it holds; slicing itself adds no MACs."""
    torch.manual_seed(0)
    full = create_model(name, 10, shape, norm="bn_static")
    sub = create_model(name, 10, shape, norm="bn_static", width_ratio=width)
    slim_cost = model_cost(SlimNet(full, width), shape)
    assert slim_cost == model_cost(sub, shape)
    full_params, full_macs = model_cost(full, shape)
    assert slim_cost[0] < full_params and slim_cost[1] < full_macs
