"""The domain_acc evaluator: per-domain accuracy, hand-computed; its error without domains."""

from __future__ import annotations

import pytest
import torch

from fedtrust.data.types import ImageSet
from fedtrust.errors import ConfigError
from fedtrust.evaluation.evaluators import DomainAcc
from fedtrust.evaluation.setup import EvalSetup


def setup_with(domains: torch.Tensor | None, names: tuple[str, ...] = ()) -> EvalSetup:
    y = torch.tensor([0, 1, 1, 0, 2, 2, 1])
    test = ImageSet(torch.zeros(7, 3, 2, 2, dtype=torch.uint8), y, 3, domains, names)
    return EvalSetup(test, lambda x: x.float(), {}, {}, None, metrics=("domain_acc",))


def test_domain_acc_hand_computed():
    """preds 0,1,0 | 0,2,1 | 1 vs labels 0,1,1 | 0,2,2 | 1 over domains a,a,a | b,b,b | c: a 2/3, b 2/3, c 1;
    domain d empty → None. A pooled accuracy (5/7) or ids swapped with names would fail."""
    setup = setup_with(torch.tensor([0, 0, 0, 1, 1, 1, 2]), ("a", "b", "c", "d"))
    pred = torch.tensor([0, 1, 0, 0, 2, 1, 1])
    logits = torch.nn.functional.one_hot(pred, 3).float()
    out = DomainAcc().test_metrics("global", torch.nn.Identity(), logits, setup, None)
    assert out == {"domain_acc": {"a": pytest.approx(2 / 3), "b": pytest.approx(2 / 3), "c": 1.0, "d": None}}


def test_domain_acc_is_logged_per_predictor():
    from fedtrust.evaluation.evaluate import evaluate

    setup = setup_with(torch.tensor([1, 1, 0, 0, 0, 1, 1]), ("x", "y"))

    class Always(torch.nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.c = c

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.full((len(x),), self.c), 3).float()

    class Algo:
        personalized = False

        def predictors(self, state):
            return {"zero": Always(0), "one": Always(1)}

    out = evaluate(Algo(), {}, None, setup)
    # labels on x: 1, 0, 2 → "zero" 1/3, "one" 1/3; on y: 0, 1, 2, 1 → "zero" 1/4, "one" 2/4
    assert out["domain_acc"] == {"x": pytest.approx(1 / 3), "y": pytest.approx(1 / 4)}
    assert out["by_predictor"]["one"]["domain_acc"] == {"x": pytest.approx(1 / 3), "y": pytest.approx(1 / 2)}


def test_domain_acc_without_domains_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as e:
        DomainAcc().check(setup_with(None))
    assert "domains" in str(e.value) and "\n" not in str(e.value)


def test_domain_acc_on_digits_fails_before_any_round():
    from fedtrust.runner.config import build_config
    from fedtrust.runner.federation import build_federation

    with pytest.raises(ConfigError, match="domain_acc needs a data set with domains"):
        build_federation(build_config({}, ["eval.metrics=[accuracy, domain_acc]", "data.num_clients=4",
                                           "data.clients_per_round=2", "model.width=4"]))
