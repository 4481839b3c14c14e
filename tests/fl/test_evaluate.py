"""Personalized evaluation: unweighted client means, empty local sets, the absent-class mask."""

import pytest
import torch

from fedtrust.fl.evaluate import absent_class_mask, client_metrics


def test_client_metrics_hand_worked_with_mask():
    y = torch.tensor([0, 0, 1, 2])
    local = [torch.tensor([0, 1, 2]), torch.tensor([], dtype=torch.long), torch.tensor([3])]
    table = {
        0: torch.tensor([[1.0, 0.0, 5.0], [2.0, 1.0, 0.0], [0.0, 3.0, 1.0]]),  # preds 2,0,1 → 2/3; masked 0,0,1 → 3/3
        2: torch.tensor([[0.0, 4.0, 1.0]]),  # pred 1, label 2 → 0; masked (only class 2 present) → 1
    }
    out = client_metrics(lambda k, name: table.get(k), local, y, 3, ["global"])["global"]
    assert out["client_acc"] == pytest.approx([2 / 3, None, 0.0])
    assert out["client_acc_masked"] == [1.0, None, 1.0]
    assert out["client_acc_mean"] == pytest.approx((2 / 3 + 0.0) / 2)  # unweighted, empty client excluded
    assert out["client_acc_masked_mean"] == 1.0


def test_absent_class_mask():
    assert absent_class_mask(torch.tensor([0, 2, 2]), 4).tolist() == [False, True, False, True]
