import pytest
import torch

from fedtrust.errors import FedTrustError
from fedtrust.fl.aggregate import weighted_mean
from fedtrust.fl.protocol import Message


def msg(w, n, steps=None):
    arrays = {"model/w": torch.tensor(w, dtype=torch.float32), "model/n": torch.tensor(steps or 0)}
    return Message(arrays, {"num_examples": n})


def test_weighted_mean_hand_worked():
    # (1·[1,2] + 3·[5,6]) / 4 = [4, 5]; integer buffer (0·1 + 4·3)/4 = 3
    out = weighted_mean({0: msg([1.0, 2.0], 1, 0), 1: msg([5.0, 6.0], 3, 4)}, "model/")
    assert torch.allclose(out["model/w"], torch.tensor([4.0, 5.0]))
    assert out["model/n"].dtype == torch.int64 and int(out["model/n"]) == 3


def test_zero_weight_client_is_ignored():
    out = weighted_mean({0: msg([1.0], 0), 1: msg([7.0], 2)}, "model/")
    assert torch.allclose(out["model/w"], torch.tensor([7.0]))


def test_mismatched_keys_name_the_key():
    a = msg([1.0], 1)
    b = Message({"model/v": torch.tensor([1.0]), "model/n": torch.tensor(0)}, {"num_examples": 1})
    with pytest.raises(FedTrustError, match="model/"):
        weighted_mean({0: a, 1: b}, "model/")


def test_mismatched_shapes_and_missing_weight():
    with pytest.raises(FedTrustError, match="shape"):
        weighted_mean({0: msg([1.0], 1), 1: msg([1.0, 2.0], 1)}, "model/")
    bad = Message({"model/w": torch.tensor([1.0]), "model/n": torch.tensor(0)}, {})
    with pytest.raises(FedTrustError, match="client 3"):
        weighted_mean({0: msg([1.0], 1), 3: bad}, "model/")
