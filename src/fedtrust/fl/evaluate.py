"""Evaluation of an algorithm's predictors: global test set and personalized local test sets.

Global: accuracy, loss, per-class accuracy and class-group accuracy on the
balanced test set. Personalized (spec fedloge.md §1/§6): each client is scored
on its own label-matched local test set and the accuracies are averaged
unweighted over clients. Algorithms whose predictors do not depend on the
client state reuse one pass over the test set for every client; a
personalized algorithm's predictors are built per client with that client's
state (:func:`score_client`), wherever that state lives: here, from the
``ClientStore``, or, when the executor keeps it elsewhere (Flower: on the
nodes), through the setup's :data:`ClientEvaluator`, which returns only the
numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedtrust.data.types import ImageSet
from fedtrust.errors import FedTrustError
from fedtrust.fl.executor import ClientStore
from fedtrust.fl.protocol import Algorithm, Message
from fedtrust.metrics.accuracy import group_accuracy, per_class_accuracy
from fedtrust.models.heads import FeatureHead
from fedtrust.ood.metrics import activation_ratio, ece, mean_norm, ood_metrics
from fedtrust.ood.scores import forward_in_batches, get_score


ClientScores = dict[str, tuple[float, float]]
"""One client's personalized scores: predictor name → (accuracy, masked accuracy) on its local test set."""

ClientEvaluator = Callable[[Message, Sequence[int]], dict[int, ClientScores | None]]
"""``(server state, client ids) -> {client id: scores}``: each client's :func:`score_client` with its
own state, computed where that state lives; None for a client that could not be scored."""


@runtime_checkable
class EvaluatesClients(Protocol):
    """An executor that keeps client state away from the server and so scores the clients itself."""

    def evaluate_clients(self, state: Message, clients: Sequence[int]) -> dict[int, ClientScores | None]: ...


@dataclass
class EvalSetup:
    """The fixed parts of evaluation, built once per run."""

    test: ImageSet
    normalize: Callable[[Tensor], Tensor]
    groups: dict[str, list[int]]
    hmt: dict[str, list[int]]
    local_test: Sequence[Tensor] | None
    batch_size: int = 1024
    ood_sets: dict[str, Tensor] = field(default_factory=dict)
    scores: tuple[str, ...] = ("msp",)
    client_evaluator: ClientEvaluator | None = None
    """Scores personalized clients where their state lives (executor=flower: on the nodes);
    None scores them here, from the ``ClientStore``."""


@dataclass
class EvalScores:
    """Per-sample outputs of the primary predictor at one evaluation, for the report's OOD plots.

    :func:`evaluate` fills it when given one (the runner asks at the final
    round only and saves it as ``eval_scores.npz``): the test labels and
    logits, and, when OOD sets are configured, every configured score on the
    ID test set and on each OOD set, the very tensors the ``ood`` metrics
    were computed from (no second forward pass).
    """

    predictor: str = ""
    labels: Tensor | None = None
    logits: Tensor | None = None
    id_scores: dict[str, Tensor] = field(default_factory=dict)
    ood_scores: dict[str, dict[str, Tensor]] = field(default_factory=dict)


@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, normalize: Callable[[Tensor], Tensor],
                   batch_size: int) -> Tensor:
    """Logits of ``model`` in eval mode over uint8 ``images``, in large batches."""
    was_training = model.training
    model.eval()
    out = [model(normalize(chunk)) for chunk in images.split(batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def predict_all(predictors: Mapping[str, nn.Module], images: Tensor, normalize: Callable[[Tensor], Tensor],
                batch_size: int) -> dict[str, Tensor]:
    """Logits of every predictor over ``images`` (:func:`predict_logits` each), in ``predictors``' order.

    Predictors that are :class:`~fedtrust.models.heads.FeatureHead` s over one
    shared backbone object (FedLoGe's universal / global / personalized) run
    that backbone once and apply each head to the same features: the same
    numbers as one pass per predictor, a third of the work.
    """
    out: dict[str, Tensor] = {}
    shared: dict[int, list[str]] = {}
    for name, model in predictors.items():
        if isinstance(model, FeatureHead):
            shared.setdefault(id(model.backbone), []).append(name)
        else:
            out[name] = predict_logits(model, images, normalize, batch_size)
    for names in shared.values():
        heads = [predictors[n] for n in names]
        modes = [m.training for m in heads]
        for m in heads:
            m.eval()
        feats = [heads[0].backbone.features(normalize(chunk)) for chunk in images.split(batch_size)]
        for name, m, mode in zip(names, heads, modes):
            out[name] = torch.cat([m.head(f) for f in feats]) if feats else torch.empty(0)
            m.train(mode)
    return {name: out[name] for name in predictors}


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def global_metrics(logits: Tensor, y: Tensor, num_classes: int, setup: EvalSetup) -> dict[str, Any]:
    """Accuracy, CE loss, per-class and per-group accuracy of one predictor on the test set."""
    pred = logits.argmax(1)
    per_class = per_class_accuracy(pred, y, num_classes)
    return {
        "test_acc": float((pred == y).float().mean()),
        "test_loss": float(F.cross_entropy(logits, y)),
        "class_acc": [_nan_to_none(float(a)) for a in per_class],
        "group_acc": {k: _nan_to_none(v) for k, v in group_accuracy(per_class, setup.groups).items()},
        "hmt_acc": {k: _nan_to_none(v) for k, v in group_accuracy(per_class, setup.hmt).items()},
    }


def ood_evaluation(model: nn.Module, setup: EvalSetup, capture: EvalScores | None = None) -> dict[str, Any]:
    """Detection metrics of every configured score on every OOD test set, plus the RNA diagnostics.

    ``ood["<set>/<score>"]`` holds AUROC, AUPR-in/out and FPR95 in both
    conventions (spec rna.md §4); ``feature_norm`` and ``activation_ratio`` give
    mean ‖z‖ and the fraction of z > 0 on the ID test set and each OOD set.
    With ``capture``, the per-sample scores are also kept there.
    """
    z_id, logits_id = forward_in_batches(model, setup.test.x, setup.normalize, setup.batch_size)
    out: dict[str, Any] = {"ood": {}, "feature_norm": {"id": mean_norm(z_id)},
                           "activation_ratio": {"id": activation_ratio(z_id)}}
    id_scores = {s: get_score(s)(logits_id, z_id) for s in setup.scores}
    if capture is not None:
        capture.id_scores = id_scores
    for set_name, images in setup.ood_sets.items():
        z, logits = forward_in_batches(model, images, setup.normalize, setup.batch_size)
        out["feature_norm"][set_name] = mean_norm(z)
        out["activation_ratio"][set_name] = activation_ratio(z)
        ood_scores = {s: get_score(s)(logits, z) for s in setup.scores}
        if capture is not None:
            capture.ood_scores[set_name] = ood_scores
        for s in setup.scores:
            out["ood"][f"{set_name}/{s}"] = ood_metrics(id_scores[s].cpu(), ood_scores[s].cpu())
    return out


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


def evaluate(algorithm: Algorithm, state: Message, store: ClientStore, setup: EvalSetup,
             capture: EvalScores | None = None) -> dict[str, Any]:
    """All evaluation metrics of the current server state (and client states, if personalized).

    With ``capture``, the primary predictor's per-sample outputs are kept there too (:class:`EvalScores`).
    """
    test = setup.test
    predictors = algorithm.predictors(state)
    names = list(predictors)
    results: dict[str, dict[str, Any]] = {}
    logits_global: dict[str, Tensor] = {}
    all_logits = predict_all(predictors, test.x, setup.normalize, setup.batch_size)
    for name, model in predictors.items():
        logits = all_logits[name]
        results[name] = global_metrics(logits, test.y, test.num_classes, setup)
        results[name]["ece"] = ece(logits, test.y)
        keep = capture if capture is not None and name == names[0] else None
        if keep is not None:
            keep.predictor, keep.labels, keep.logits = name, test.y, logits
        if setup.ood_sets and hasattr(model, "forward_features_and_logits"):
            results[name].update(ood_evaluation(model, setup, keep))
        logits_global[name] = logits

    if setup.local_test is not None:
        local = setup.local_test
        if algorithm.personalized:
            clients = [k for k, idx in enumerate(local) if idx.numel() > 0]
            if setup.client_evaluator is not None:
                scored = setup.client_evaluator(state, clients)
            else:
                scored = {k: score_client(algorithm, state, store.get(k), k, setup) for k in clients}
            table = summarize_clients([scored.get(k) for k in range(len(local))], names)
        else:
            table = client_metrics(lambda k, name: logits_global[name][local[k]] if local[k].numel() else None,
                                   local, test.y, test.num_classes, names)
        for name, extra in table.items():
            results[name].update(extra)

    primary = dict(results[names[0]])
    if len(names) > 1:
        primary["by_predictor"] = results
    return primary
