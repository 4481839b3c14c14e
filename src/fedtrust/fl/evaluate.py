"""Evaluation of an algorithm's predictors: global test set and personalized local test sets.

Global: accuracy, loss, per-class accuracy and class-group accuracy on the
balanced test set. Personalized (spec fedloge.md §1/§6): each client is scored
on its own label-matched local test set and the accuracies are averaged
unweighted over clients. Algorithms whose predictors do not depend on the
client state reuse one pass over the test set for every client.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedtrust.data.types import ImageSet
from fedtrust.fl.executor import ClientStore
from fedtrust.fl.protocol import Algorithm, Message
from fedtrust.metrics.accuracy import group_accuracy, per_class_accuracy
from fedtrust.ood.metrics import activation_ratio, ece, mean_norm, ood_metrics
from fedtrust.ood.scores import forward_in_batches, get_score


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


@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, normalize: Callable[[Tensor], Tensor],
                   batch_size: int) -> Tensor:
    """Logits of ``model`` in eval mode over uint8 ``images``, in large batches."""
    was_training = model.training
    model.eval()
    out = [model(normalize(chunk)) for chunk in images.split(batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


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


def ood_evaluation(model: nn.Module, setup: EvalSetup) -> dict[str, Any]:
    """Detection metrics of every configured score on every OOD test set, plus the RNA diagnostics.

    ``ood["<set>/<score>"]`` holds AUROC, AUPR-in/out and FPR95 in both
    conventions (spec rna.md §4); ``feature_norm`` and ``activation_ratio`` give
    mean ‖z‖ and the fraction of z > 0 on the ID test set and each OOD set.
    """
    z_id, logits_id = forward_in_batches(model, setup.test.x, setup.normalize, setup.batch_size)
    out: dict[str, Any] = {"ood": {}, "feature_norm": {"id": mean_norm(z_id)},
                           "activation_ratio": {"id": activation_ratio(z_id)}}
    id_scores = {s: get_score(s)(logits_id, z_id) for s in setup.scores}
    for set_name, images in setup.ood_sets.items():
        z, logits = forward_in_batches(model, images, setup.normalize, setup.batch_size)
        out["feature_norm"][set_name] = mean_norm(z)
        out["activation_ratio"][set_name] = activation_ratio(z)
        for s in setup.scores:
            out["ood"][f"{set_name}/{s}"] = ood_metrics(id_scores[s].cpu(), get_score(s)(logits, z).cpu())
    return out


def absent_class_mask(y_local: Tensor, num_classes: int) -> Tensor:
    """Classes with no image in a client's local test set (spec fedloge.md §5: masked to −∞)."""
    return torch.bincount(y_local, minlength=num_classes) == 0


def client_metrics(logits_of: Callable[[int, str], Tensor | None], local: Sequence[Tensor], y: Tensor,
                   num_classes: int, names: list[str]) -> dict[str, dict[str, Any]]:
    """Per-client accuracy for every predictor, without and with the absent-class mask.

    ``logits_of(k, name)`` gives predictor ``name``'s logits on client k's local
    test set (None when it is empty). The masked variant sets the logits of
    classes absent from the client's local test distribution to −∞ before the
    argmax (applied to every method alike, as the issue asks).
    """
    accs: dict[str, list[float | None]] = {name: [] for name in names}
    masked: dict[str, list[float | None]] = {name: [] for name in names}
    for k, idx in enumerate(local):
        y_k = y[idx]
        absent = absent_class_mask(y_k, num_classes)
        for name in names:
            logits = logits_of(k, name)
            if logits is None:
                accs[name].append(None)
                masked[name].append(None)
                continue
            accs[name].append(float((logits.argmax(1) == y_k).float().mean()))
            hidden = logits.masked_fill(absent.view(1, -1), float("-inf"))
            masked[name].append(float((hidden.argmax(1) == y_k).float().mean()))
    return {name: {"client_acc": accs[name], "client_acc_mean": _mean(accs[name]),
                   "client_acc_masked": masked[name], "client_acc_masked_mean": _mean(masked[name])}
            for name in names}


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def evaluate(algorithm: Algorithm, state: Message, store: ClientStore, setup: EvalSetup) -> dict[str, Any]:
    """All evaluation metrics of the current server state (and client states, if personalized)."""
    test = setup.test
    predictors = algorithm.predictors(state)
    names = list(predictors)
    results: dict[str, dict[str, Any]] = {}
    logits_global: dict[str, Tensor] = {}
    for name, model in predictors.items():
        logits = predict_logits(model, test.x, setup.normalize, setup.batch_size)
        results[name] = global_metrics(logits, test.y, test.num_classes, setup)
        results[name]["ece"] = ece(logits, test.y)
        if setup.ood_sets and hasattr(model, "forward_features_and_logits"):
            results[name].update(ood_evaluation(model, setup))
        logits_global[name] = logits

    if setup.local_test is not None:
        local = setup.local_test
        cache: dict[int, dict[str, nn.Module]] = {}

        def logits_of(k: int, name: str) -> Tensor | None:
            idx = local[k]
            if idx.numel() == 0:
                return None
            if not algorithm.personalized:
                return logits_global[name][idx]
            if k not in cache:  # build client k's predictors once for all names
                cache.clear()
                cache[k] = algorithm.predictors(state, store.get(k))
            return predict_logits(cache[k][name], test.x[idx], setup.normalize, setup.batch_size)

        for name, extra in client_metrics(logits_of, local, test.y, test.num_classes, names).items():
            results[name].update(extra)

    primary = dict(results[names[0]])
    if len(names) > 1:
        primary["by_predictor"] = results
    return primary
