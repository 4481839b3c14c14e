"""FLIP's τ-rejection and the backdoor metrics (spec flip.md §3, §4) on hand-built logits."""

from __future__ import annotations

import math

import pytest
import torch

from fedtrust.errors import ConfigError
from fedtrust.metrics.backdoor import (REFUSED, RejectingClassifier, accuracy_with_rejection, attack_success_rate,
                                       lifespan, predict_with_rejection, rejection_rate)

# softmax top-1 probabilities: row 0 ≈ 0.79 (class 0), row 1 0.6 (class 1), row 2 1/3 (a three-way tie: argmax 0),
# row 3 2/3 (class 2)
LOGITS = torch.tensor([[2.0, 0.0, 0.0],
                       [0.0, math.log(3.0), math.log(1.0)],   # p = (0.2, 0.6, 0.2)
                       [1.0, 1.0, 1.0],                         # p = 1/3 each: argmax 0
                       [0.0, 0.0, math.log(4.0)]])              # p = (1/6, 1/6, 2/3)


def test_rejection_refuses_exactly_the_rows_below_tau():
    conf = torch.softmax(LOGITS, 1).max(1).values
    assert torch.allclose(conf, torch.tensor([math.exp(2) / (math.exp(2) + 2), 0.6, 1 / 3, 2 / 3]))
    assert predict_with_rejection(LOGITS, 0.0).tolist() == [0, 1, 0, 2]
    assert predict_with_rejection(LOGITS, 0.4).tolist() == [0, 1, REFUSED, 2]
    assert predict_with_rejection(LOGITS, 0.65).tolist() == [0, REFUSED, REFUSED, 2]
    assert predict_with_rejection(LOGITS, 0.6).tolist() == [0, 1, REFUSED, 2], "confidence equal to τ is accepted"
    assert rejection_rate(LOGITS, 0.65) == 0.5


def test_a_refused_prediction_counts_as_wrong_on_clean_data():
    labels = torch.tensor([0, 1, 0, 1])  # rows 0, 1, 2 correct without rejection; row 3 wrong
    assert accuracy_with_rejection(LOGITS, labels, 0.0) == 0.75
    assert accuracy_with_rejection(LOGITS, labels, 0.4) == 0.5   # row 2 (correct but unsure) refused
    assert accuracy_with_rejection(LOGITS, labels, 0.65) == 0.25


def test_asr_counts_only_accepted_target_predictions():
    assert attack_success_rate(LOGITS, target=2, tau=0.0) == 0.25
    assert attack_success_rate(LOGITS, target=0, tau=0.0) == 0.5
    assert attack_success_rate(LOGITS, target=0, tau=0.4) == 0.25  # the uncertain row-2 "success" is refused
    assert attack_success_rate(LOGITS, target=2, tau=0.7) == 0.0


def test_lifespan_counts_rounds_until_asr_is_below_twice_its_pre_attack_level():
    asr = {10: 0.05, 12: 0.95, 14: 0.9, 16: 0.4, 18: 0.09, 20: 0.05}
    assert lifespan(asr, last_attack_round=14, baseline=0.05) == 4   # round 18: 0.09 < 0.10
    assert lifespan(asr, last_attack_round=12, baseline=0.2) == 6    # round 16: 0.4 is not < 0.4; round 18 is
    assert lifespan(asr, last_attack_round=14, baseline=0.01) is None  # never below 0.02
    assert lifespan({14: 0.01}, last_attack_round=14, baseline=0.05) == 0


def test_rejecting_classifier_keeps_logits_and_refuses_in_predict():
    model = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    wrapped = RejectingClassifier(model, tau=0.4)
    assert torch.equal(wrapped(LOGITS), LOGITS)
    assert wrapped.predict(LOGITS).tolist() == [0, 1, REFUSED, 2]


@pytest.mark.parametrize("tau", [-0.1, 1.5])
def test_tau_outside_zero_one_is_a_config_error(tau):
    with pytest.raises(ConfigError, match="tau must lie in \\[0, 1\\]"):
        predict_with_rejection(LOGITS, tau)
