"""Split points (FedModel.stages, fedtrust.models.split): the front and back of a model cut for IS&BC.

Reference: the model's own ``features`` and ``forward``; a cut anywhere must give them back exactly, and
the front/back key sets must partition the body's state.
"""

from __future__ import annotations

import pytest
import torch

from fedtrust.errors import ConfigError
from fedtrust.models import create_model
from fedtrust.models.split import split_model

MODELS = [("cnn", (1, 8, 8), {}), ("cnn", (3, 32, 32), {"width": 8}), ("resnet18", (3, 32, 32), {}),
          ("wrn", (3, 32, 32), {"depth": 10, "widen_factor": 1}),
          ("preresnet18", (3, 16, 16), {"width_ratio": 0.25}),
          ("preresnet18", (3, 16, 16), {"width_ratio": 0.25, "norm": "bn_static", "rescale_layer": True})]


@pytest.mark.parametrize("name, shape, options", MODELS)
def test_every_cut_gives_the_model_back(name: str, shape, options) -> None:
    """front then back then global pooling is ``features`` (and the head on it ``forward``) at every split
    point, in eval mode. Rules out a stage that skips a module (the max-pool, WRN's final BN-ReLU) or runs
    one twice."""
    torch.manual_seed(0)
    model = create_model(name, 5, shape, **options).eval()
    x = torch.randn(2, *shape)
    names = [s.name for s in model.stages()]
    assert model.default_split in names[:-1]
    for at in names[:-1]:
        split = split_model(model, at)
        z = split.back(split.front(x))[-1].mean(dim=(2, 3))
        torch.testing.assert_close(z, model.features(x))
        torch.testing.assert_close(model.head(z), model(x))


@pytest.mark.parametrize("name, shape, options", MODELS)
def test_front_and_back_keys_partition_the_body(name: str, shape, options) -> None:
    """Every state entry but the head's belongs to exactly one side, and the front's are exactly those the
    front's computation depends on (perturbing a back key leaves the front's output unchanged)."""
    model = create_model(name, 5, shape, **options).eval()
    split = split_model(model)
    front, back = set(split.front_keys), set(split.back_keys)
    body = {k for k in model.state_dict() if not k.startswith("head.")}
    assert front and back and not front & back and front | back == body
    x = torch.randn(2, *shape)
    before = split.front(x)
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if name_ in back:
                p.add_(1.0)
    torch.testing.assert_close(split.front(x), before)
    assert {id(p) for p in split.back_parameters()} == {id(p) for n, p in model.named_parameters() if n in back}


def test_default_splits_follow_the_spec() -> None:
    """ResNet after layer2 (front: stem, layer1, layer2), WRN after group2, cnn after conv1."""
    assert split_model(create_model("resnet18", 10, (3, 32, 32))).at == "layer2"
    assert [s.name for s in split_model(create_model("resnet18", 10, (3, 32, 32))).back_stages] == ["layer3", "layer4"]
    assert split_model(create_model("wrn", 10, (3, 32, 32), depth=10, widen_factor=1)).at == "group2"
    assert split_model(create_model("cnn", 10, (1, 8, 8))).at == "conv1"
    assert split_model(create_model("preresnet18", 10, (3, 32, 32), width_ratio=0.125)).at == "layer2"


@pytest.mark.parametrize("model, at, match", [
    (("cnn", 10, (1, 8, 8)), "conv3", "before its last; expected one of conv1, conv2"),
    (("cnn", 10, (1, 8, 8)), "layer9", "is not a stage"),
    (("cnn2", 10, (1, 28, 28)), None, "has no split points"),
    (("digitnet", 10, (1, 28, 28)), None, "has no split points"),
])
def test_bad_split_points_are_one_line_errors(model, at, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        split_model(create_model(*model), at)
