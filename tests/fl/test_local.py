"""The sequential trainer's fast paths give exactly what the plain torch calls give."""

import pytest
import torch
from torch import nn

from fedtrust.fl.local import load_state
from fedtrust.fl.sampling import seed_global_rngs
from fedtrust.models import create_model


def _state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_load_state_equals_load_state_dict_buffers_included():
    torch.manual_seed(0)
    source = create_model("cnn", 10, (1, 8, 8))
    source.train()
    source(torch.randn(16, 1, 8, 8))  # move BN running statistics and the batch counter off their init
    state = _state_of(source)
    torch.manual_seed(1)
    target = create_model("cnn", 10, (1, 8, 8))
    load_state(target, state, torch.device("cpu"))
    for k, v in target.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert int(target.state_dict()["body.0.1.num_batches_tracked"]) == 1
    # the copy is a copy: changing the source state afterwards does not reach the model
    first = next(iter(state))
    state[first].add_(1.0)
    assert not torch.equal(target.state_dict()[first], state[first])


def test_load_state_rejects_a_state_of_another_model_like_load_state_dict():
    model = create_model("cnn", 10, (1, 8, 8))
    other = _state_of(create_model("cnn", 7, (1, 8, 8)))  # same keys, head of another shape
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_state(model, other, torch.device("cpu"))
    missing = _state_of(model)
    missing.pop(next(iter(missing)))
    with pytest.raises(RuntimeError, match="Missing key"):
        load_state(model, missing, torch.device("cpu"))


def test_seed_global_rngs_reproduces_dropout_like_manual_seed():
    x = torch.ones(1000)
    torch.manual_seed(123)
    reference = nn.functional.dropout(x, 0.5)
    seed_global_rngs(123)
    assert torch.equal(nn.functional.dropout(x, 0.5), reference)
    seed_global_rngs(124)
    assert not torch.equal(nn.functional.dropout(x, 0.5), reference)
