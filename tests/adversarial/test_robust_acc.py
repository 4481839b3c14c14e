"""The ``robust_acc`` evaluator (fedtrust.adversarial.robust; spec splitmix.md §4): SA/RA per dual-BN mix μ."""

from __future__ import annotations

import pytest

from fedtrust.adversarial.robust import RobustEvalParams, robust_accuracy
from fedtrust.errors import ConfigError
from fedtrust.evaluation.predict import predict_logits
from fedtrust.evaluation.setup import EvalSetup
from fedtrust.models.dual_bn import bn_route, dual_layers
from fedtrust.registry import get
from fedtrust.runner.config import build_config

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(steps=3, num_samples=120)


def _accuracy(model, digits, norm, route, idx=None) -> float:
    x, y = (digits.test.x, digits.test.y) if idx is None else (digits.test.x[idx], digits.test.y[idx])
    with bn_route(model, route):
        return float((predict_logits(model, x, norm, 512).argmax(1) == y).float().mean())


def test_robust_is_below_clean_and_the_mix_is_applied(dual_cnn, digits, norm) -> None:
    """RA ≤ SA for every μ, PGD bites (RA < SA somewhere), and μ = 0 / 1 score the clean / adversarial BN:
    rules out μ ignored (the evaluator attacking and scoring one route for every μ)."""
    params = RobustEvalParams(mus=[0.0, 0.5, 1.0], num_samples=None, steps=3)
    out = robust_accuracy(dual_cnn, digits.test.x, digits.test.y, norm, params)
    assert out["mu"] == [0.0, 0.5, 1.0] and out["samples"] == len(digits.test.y)
    assert all(r <= c for r, c in zip(out["robust_acc"], out["clean_acc"]))
    assert min(c - r for r, c in zip(out["robust_acc"], out["clean_acc"])) > 0.05
    assert out["clean_acc"][0] == pytest.approx(_accuracy(dual_cnn, digits, norm, "clean"))
    assert out["clean_acc"][2] == pytest.approx(_accuracy(dual_cnn, digits, norm, "adv"))
    assert out["clean_acc"][0] != out["clean_acc"][2], "the two BNs must differ for this test to mean something"
    assert not dual_cnn.training and [m.route for m in dual_layers(dual_cnn)] == ["clean"] * 3


def test_eps_zero_gives_robust_equal_clean(dual_cnn, bn_cnn, digits, norm) -> None:
    params = RobustEvalParams(eps=0.0, mus=[0.0, 0.8], **FAST)
    for model in (dual_cnn, bn_cnn):
        out = robust_accuracy(model, digits.test.x, digits.test.y, norm, params)
        assert out["robust_acc"] == out["clean_acc"]


def test_single_bn_model_logs_one_entry(bn_cnn, digits, norm) -> None:
    out = robust_accuracy(bn_cnn, digits.test.x, digits.test.y, norm, RobustEvalParams(**FAST))
    assert out["mu"] == [None] and len(out["clean_acc"]) == len(out["robust_acc"]) == 1
    assert out["robust_acc"][0] < out["clean_acc"][0]


def test_seeded_reruns_give_the_same_numbers(dual_cnn, digits, norm) -> None:
    """The subset and the random starts come from the seed: a rerun is identical, another seed is not
    (the subset changes), and a μ's numbers do not depend on the other μ of the list."""
    params = RobustEvalParams(mus=[0.2, 0.5], **FAST)
    a = robust_accuracy(dual_cnn, digits.test.x, digits.test.y, norm, params)
    b = robust_accuracy(dual_cnn, digits.test.x, digits.test.y, norm, params)
    assert a == b and a["samples"] == 120
    c = robust_accuracy(dual_cnn, digits.test.x, digits.test.y, norm, params.model_copy(update={"seed": 1}))
    assert (c["clean_acc"], c["robust_acc"]) != (a["clean_acc"], a["robust_acc"])
    alone = robust_accuracy(dual_cnn, digits.test.x, digits.test.y, norm, params.model_copy(update={"mus": [0.5]}))
    assert alone["robust_acc"] == a["robust_acc"][1:]


def test_registered_evaluator_reads_eval_robust(dual_cnn, digits, norm) -> None:
    setup = EvalSetup(digits.test, norm, {}, {}, None, robust=RobustEvalParams(mus=[1.0], **FAST))
    logits = predict_logits(dual_cnn, digits.test.x, norm, 512)
    out = get("evaluator", "robust_acc")().test_metrics("global", dual_cnn, logits, setup, None)
    assert out["robust"]["mu"] == [1.0] and out["robust"]["steps"] == 3 and out["robust"]["samples"] == 120
    cfg = build_config({}, ["eval.metrics=[accuracy, robust_acc]", "eval.robust.mus=[0, 0.5]", "eval.robust.eps=0.1"])
    assert cfg.eval.robust.mus == [0.0, 0.5] and cfg.eval.robust.eps == 0.1


@pytest.mark.parametrize(("override", "key"), [("eval.robust.mus=[0, 1.5]", "eval.robust.mus"),
                                               ("eval.robust.eps=-0.01", "eval.robust.eps"),
                                               ("eval.robust.mus=[]", "eval.robust.mus")])
def test_bad_settings_are_one_line_config_errors(override, key) -> None:
    with pytest.raises(ConfigError, match=key) as err:
        build_config({}, [override])
    assert "\n" not in str(err.value)


def test_direct_call_checks_mu_and_eps(dual_cnn, digits, norm) -> None:
    for params, match in [(RobustEvalParams.model_construct(**RobustEvalParams(**FAST).model_dump() | {"mus": [2.0]}),
                           r"μ must be in \[0, 1\]"),
                          (RobustEvalParams.model_construct(**RobustEvalParams(**FAST).model_dump() | {"eps": -1.0}),
                           "eps must be >= 0")]:
        with pytest.raises(ConfigError, match=match):
            robust_accuracy(dual_cnn, digits.test.x, digits.test.y, norm, params)
