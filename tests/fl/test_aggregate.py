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


def test_pooled_bn_moments_equal_the_statistics_of_the_union():
    from fedtrust.fl.aggregate import pool_bn_moments

    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(30, 4, generator=g) * 2 + 3, torch.randn(10, 4, generator=g) - 1]
    replies = {}
    for k, feats in enumerate(parts):
        arrays = {"model/bn.running_mean": feats.mean(0), "model/bn.running_var": feats.var(0, unbiased=False)}
        replies[k] = Message(arrays, {"num_examples": len(feats)})
    pooled = pool_bn_moments(replies, weighted_mean(replies, "model/"))
    union = torch.cat(parts)
    assert torch.allclose(pooled["model/bn.running_mean"], union.mean(0), atol=1e-5)
    assert torch.allclose(pooled["model/bn.running_var"], union.var(0, unbiased=False), atol=1e-5)
    naive = weighted_mean(replies, "model/")["model/bn.running_var"]
    assert not torch.allclose(naive, union.var(0, unbiased=False), atol=1e-2)  # averaging variances is wrong
