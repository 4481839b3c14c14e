"""Personalized evaluation (spec fedloge.md §1/§6): each client scored on its own label-matched local
test set, the accuracies averaged unweighted over clients. The one implementation of per-client accuracy.

A personalized algorithm's predictors are built per client with that client's state
(:func:`score_client`), wherever that state lives: in the ``ClientStore``, or, when the executor keeps
it elsewhere (Flower: on the nodes), through the setup's ``client_evaluator``, which returns only the
numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from fedtrust.errors import FedTrustError
from fedtrust.evaluation.predict import predict_all
from fedtrust.evaluation.setup import ClientScores, EvalSetup
from fedtrust.fl.protocol import Algorithm, Message


def absent_class_mask(y_local: Tensor, num_classes: int) -> Tensor:
    """Classes with no image in a client's local test set (spec fedloge.md §5: masked to −∞)."""
    return torch.bincount(y_local, minlength=num_classes) == 0


def local_scores(logits: Tensor, y_k: Tensor, absent: Tensor) -> tuple[float, float]:
    """(accuracy, masked accuracy) of one predictor's ``logits`` on one client's local test labels ``y_k``.

    The masked variant sets the logits of the ``absent`` classes (those not in
    the client's local test distribution, :func:`absent_class_mask`) to −∞
    before the argmax (spec fedloge.md §5; applied to every method alike).
    """
    hidden = logits.masked_fill(absent.view(1, -1), float("-inf"))
    return float((logits.argmax(1) == y_k).float().mean()), float((hidden.argmax(1) == y_k).float().mean())


def client_metrics(logits_of: Callable[[int, str], Tensor | None], local: Sequence[Tensor], y: Tensor,
                   num_classes: int, names: list[str]) -> dict[str, dict[str, Any]]:
    """Per-client accuracy for every predictor, without and with the absent-class mask.

    ``logits_of(k, name)`` gives predictor ``name``'s logits on client k's local
    test set (None when it is empty); see :func:`local_scores`.
    """
    scores: list[ClientScores] = []
    for k, idx in enumerate(local):
        y_k = y[idx]
        absent = absent_class_mask(y_k, num_classes)
        row: ClientScores = {}
        for name in names:
            logits = logits_of(k, name)
            if logits is not None:
                row[name] = local_scores(logits, y_k, absent)
        scores.append(row)
    return summarize_clients(scores, names)


def summarize_clients(scores: Sequence[ClientScores | None], names: list[str]) -> dict[str, dict[str, Any]]:
    """Per predictor: the clients' accuracies in client order (None where a client has no score) and their
    unweighted means over the clients that have one (spec fedloge.md §1/§6)."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        accs = [row[name][0] if row and name in row else None for row in scores]
        masked = [row[name][1] if row and name in row else None for row in scores]
        out[name] = {"client_acc": accs, "client_acc_mean": _mean(accs),
                     "client_acc_masked": masked, "client_acc_masked_mean": _mean(masked)}
    return out


def score_client(algorithm: Algorithm, state: Message, client_state: Message, client: int,
                 setup: EvalSetup) -> ClientScores | None:
    """Client ``client``'s predictors, built with its own state, scored on its local test set.

    What :func:`evaluate` computes per client for a personalized algorithm, and
    what a Flower node computes for its own client (``client_state`` never
    leaves it). None when the local test set is empty.
    """
    if setup.local_test is None:
        raise FedTrustError("personalized evaluation is off (eval.personalized=false): no local test sets")
    idx = setup.local_test[client]
    if idx.numel() == 0:
        return None
    y_k = setup.test.y[idx]
    absent = absent_class_mask(y_k, setup.test.num_classes)
    x_k = setup.test.x[idx]
    logits = predict_all(algorithm.predictors(state, client_state), x_k, setup.normalize, setup.batch_size)
    return {name: local_scores(out, y_k, absent) for name, out in logits.items()}


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
