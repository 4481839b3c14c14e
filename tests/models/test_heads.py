"""ProjectionWrapper (fedtrust.models.heads): stable state-dict keys, delegation, torch.func, modes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

from fedtrust.errors import ConfigError
from fedtrust.models import create_model
from fedtrust.models.heads import ProjectionWrapper


def _pair(name: str = "cnn") -> tuple[torch.nn.Module, ProjectionWrapper]:
    torch.manual_seed(0)
    inner = create_model(name, 4, (1, 8, 8), bn_affine=False) if name == "cnn" else create_model(name, 4, (1, 8, 8))
    return inner, ProjectionWrapper(inner)


@pytest.mark.parametrize("name", ["cnn", "cnn2", "resnet18"])
def test_keys_are_the_backbone_keys_plus_projection(name: str) -> None:
    inner, wrapped = _pair(name)
    inner_keys = list(inner.state_dict())
    keys = list(wrapped.state_dict())
    assert [k for k in keys if not k.startswith("projection.")] == inner_keys
    assert [k for k in keys if k.startswith("projection.")] == [
        "projection.0.weight", "projection.0.bias", "projection.2.weight", "projection.2.bias"]
    assert wrapped.projection[0].in_features == inner.num_features and wrapped.projection[2].out_features == 128
    x = torch.randn(3, 1, 8, 8)
    inner.eval(), wrapped.eval()
    assert torch.equal(wrapped(x), inner(x))
    z, logits = wrapped.forward_features_and_logits(x)
    assert torch.equal(z, inner.features(x)) and wrapped.num_classes == 4


def test_functional_call_swaps_what_features_reads() -> None:
    _, wrapped = _pair()
    x = torch.randn(2, 1, 8, 8)
    wrapped.eval()
    state = {k: torch.zeros_like(v) if k == "head.bias" else v for k, v in wrapped.state_dict().items()}
    state["body.0.0.weight"] = state["body.0.0.weight"] * 2
    out = functional_call(wrapped, state, (x,))
    assert not torch.allclose(out, wrapped(x))
    wrapped.load_state_dict(state)
    assert torch.allclose(out, wrapped(x), atol=1e-6)


def test_modes_copies_and_head_reset_stay_shared() -> None:
    inner, wrapped = _pair()
    wrapped.eval()
    assert not inner.training and not inner.body[0][1].training
    wrapped.train()
    assert inner.training and inner.body[0][1].training
    clone = copy.deepcopy(wrapped)
    assert clone.inner.body is clone.body and clone.body is not wrapped.body
    wrapped.reset_head(7)
    assert wrapped.head is inner.head and wrapped.num_classes == 7


def test_wrapping_a_plain_module_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="FedModel"):
        ProjectionWrapper(torch.nn.Linear(2, 2))  # type: ignore[arg-type]
