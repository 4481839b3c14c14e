"""Evaluation of an algorithm's predictors by the configured evaluators (``eval.metrics``)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from fedtrust.evaluation.clients import client_metrics, score_client, summarize_clients
from fedtrust.evaluation.evaluators import Evaluator
from fedtrust.evaluation.predict import predict_all
from fedtrust.evaluation.setup import EvalScores, EvalSetup
from fedtrust.fl.executor import ClientStore
from fedtrust.fl.protocol import Algorithm, Message
from fedtrust.registry import get


def evaluators(names: tuple[str, ...] | list[str]) -> list[Evaluator]:
    """The registered evaluators ``names``, in order (an unknown name is a one-line ConfigError)."""
    return [get("evaluator", n)() for n in names]


def evaluate(algorithm: Algorithm, state: Message, store: ClientStore, setup: EvalSetup,
             capture: EvalScores | None = None) -> dict[str, Any]:
    """Every configured metric of the current server state (and client states, if personalized).

    The predictors run once over the test set; each evaluator then measures each predictor. The
    first predictor is the primary one: its metrics are the record's top level, and with several
    predictors every one's metrics are under ``by_predictor``. With ``capture``, the primary
    predictor's per-sample outputs are kept there too (:class:`EvalScores`).
    """
    test = setup.test
    chosen = evaluators(setup.metrics)
    predictors = {n: m.to(test.x.device) for n, m in algorithm.predictors(state).items()}  # built on the CPU
    names = list(predictors)
    results: dict[str, dict[str, Any]] = {}
    all_logits = predict_all(predictors, test.x, setup.normalize, setup.batch_size)
    for name, model in predictors.items():
        keep = capture if capture is not None and name == names[0] else None
        if keep is not None:
            keep.predictor, keep.labels, keep.logits = name, test.y, all_logits[name]
        results[name] = {}
        for ev in chosen:
            results[name].update(ev.test_metrics(name, model, all_logits[name], setup, keep))

    if setup.local_test is not None and any(ev.per_client for ev in chosen):
        for name, extra in _client_table(algorithm, state, store, setup, all_logits, names).items():
            results[name].update(extra)

    primary = dict(results[names[0]])
    if len(names) > 1:
        primary["by_predictor"] = results
    return primary


def _client_table(algorithm: Algorithm, state: Message, store: ClientStore, setup: EvalSetup,
                  all_logits: dict[str, Tensor], names: list[str]) -> dict[str, dict[str, Any]]:
    """Each client's accuracy per predictor: its own predictors (personalized) or the global ones."""
    local, test = setup.local_test, setup.test
    assert local is not None
    if algorithm.personalized:
        clients = [k for k, idx in enumerate(local) if idx.numel() > 0]
        if setup.client_evaluator is not None:
            scored = setup.client_evaluator(state, clients)
        else:
            scored = {k: score_client(algorithm, state, store.get(k), k, setup) for k in clients}
        return summarize_clients([scored.get(k) for k in range(len(local))], names)
    return client_metrics(lambda k, name: all_logits[name][local[k]] if local[k].numel() else None,
                          local, test.y, test.num_classes, names)
