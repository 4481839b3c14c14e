"""Personalized evaluation: unweighted client means, empty local sets, the absent-class mask."""

import pytest
import torch

from fedtrust.evaluation.clients import absent_class_mask, client_metrics


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


def test_predict_all_runs_a_shared_backbone_once_with_the_same_logits():
    """FeatureHeads over one backbone: one features pass per chunk, logits equal to one pass per predictor."""
    from torch import nn

    from fedtrust.evaluation.predict import predict_all, predict_logits
    from fedtrust.models import create_model
    from fedtrust.models.heads import FeatureHead

    torch.manual_seed(0)
    backbone = create_model("cnn", num_classes=3, in_shape=(1, 8, 8), width=4)
    calls = []
    backbone.body.register_forward_hook(lambda *a: calls.append(1))
    heads = {"a": FeatureHead(backbone, nn.Linear(16, 3)), "b": FeatureHead(backbone, nn.Linear(16, 3))}
    other = create_model("cnn", num_classes=3, in_shape=(1, 8, 8), width=4)
    predictors = {"a": heads["a"], "other": other, "b": heads["b"]}
    images = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    norm = lambda x: x.float() / 255  # noqa: E731
    got = predict_all(predictors, images, norm, batch_size=4)
    assert list(got) == ["a", "other", "b"]
    assert len(calls) == 3  # 10 images in chunks of 4: one backbone pass per chunk for both heads
    calls.clear()
    for name, model in predictors.items():
        assert torch.allclose(got[name], predict_logits(model, images, norm, 4), atol=1e-6), name
    assert backbone.training and other.training  # modes restored


def test_client_table_is_an_unweighted_mean_over_non_empty_clients_with_repeats_allowed():
    """Rules out a sample-weighted mean over clients (3/5 here instead of (1/2 + 2/3 + 1/3)/3), counting an
    empty client as 0 instead of leaving it out, and de-duplicating repeated test images."""
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1, 0, 2]), 3).float()
    local = [torch.tensor([0, 1]), torch.tensor([2, 3, 4]), torch.zeros(0, dtype=torch.long), torch.tensor([1, 1, 5])]
    table = client_metrics(lambda k, name: logits[local[k]] if local[k].numel() else None, local, y, 3, ["g"])
    row = table["g"]
    assert row["client_acc"][:2] == pytest.approx([0.5, 2 / 3]) and row["client_acc"][2] is None
    assert row["client_acc"][3] == pytest.approx(1 / 3)
    assert row["client_acc_mean"] == pytest.approx((0.5 + 2 / 3 + 1 / 3) / 3)


def test_eval_metrics_choose_the_evaluators_and_keep_their_numbers():
    """Rules out evaluators that ignore ``eval.metrics`` (ECE still computed when only accuracy is asked
    for) or whose numbers change with the set chosen."""
    import dataclasses

    from fedtrust.errors import ConfigError
    from fedtrust.evaluation import evaluate
    from fedtrust.fl.executor import ClientStore
    from fedtrust.runner.config import build_config
    from fedtrust.runner.federation import build_federation

    fed = build_federation(build_config({}, ["data.num_clients=4", "data.clients_per_round=2"]))
    torch.manual_seed(0)
    state = fed.algorithm.init()
    full = evaluate(fed.algorithm, state, ClientStore(), fed.eval_setup)
    only = evaluate(fed.algorithm, state, ClientStore(), dataclasses.replace(fed.eval_setup, metrics=("accuracy",)))
    assert "ece" in full and "ece" not in only
    assert {k: v for k, v in full.items() if k != "ece"} == only
    cal = evaluate(fed.algorithm, state, ClientStore(), dataclasses.replace(fed.eval_setup, metrics=("calibration",)))
    assert cal == {"ece": full["ece"]}
    with pytest.raises(ConfigError, match="unknown evaluator 'acuracy' .*did you mean accuracy"):
        build_config({}, ["eval.metrics=[acuracy]"])


def test_a_diverged_model_is_evaluated_with_nulls_not_a_crash():
    """Rules out a run that dies at evaluation when its model has diverged (NaN weights, e.g. a defense
    overwhelmed by an attack): the record must still be written, with accuracy and null where a metric
    has no meaning. Seen in benchmarks/byzantine.py (FoolsGold under sign flipping on MNIST)."""
    from fedtrust.evaluation import evaluate
    from fedtrust.fl.executor import ClientStore
    from fedtrust.fl.types import Message
    from fedtrust.runner.config import build_config
    from fedtrust.runner.federation import build_federation
    from fedtrust.runner.rundir import jsonable

    fed = build_federation(build_config({}, ["data.num_clients=4", "data.clients_per_round=2", "eval.ood=[noise]",
                                             "eval.scores=[msp, rn]", "eval.num_ood=50"]))
    torch.manual_seed(0)
    state = fed.algorithm.init()
    broken = Message({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                      for k, v in state.arrays.items()}, state.meta)
    out = evaluate(fed.algorithm, broken, ClientStore(), fed.eval_setup)
    assert 0 <= out["test_acc"] <= 1 and out["ece"] is None
    assert jsonable(out)["test_loss"] is None and "client_acc_mean" in out
