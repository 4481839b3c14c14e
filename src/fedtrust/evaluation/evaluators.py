"""Evaluators: what is measured of a predictor, registered under the ``"evaluator"`` kind (``eval.metrics``).

An evaluator turns one predictor's outputs into named metrics. :func:`~fedtrust.evaluation.evaluate.evaluate`
runs the predictors once over the test set and hands each configured evaluator the model and its
logits; evaluators that need more (OOD sets, attacks, widths) run their own passes.

============  ===========================================================================  =================
name          metrics (per predictor)                                                      needs
============  ===========================================================================  =================
accuracy      ``test_acc``, ``test_loss``, ``class_acc``, ``group_acc``, ``hmt_acc``; with   —
              personalized evaluation on, ``client_acc`` (+ masked, means) per client
calibration   ``ece`` (15 equal-width confidence bins; null for a diverged model)            —
ood           ``ood`` (AUROC, AUPR-in/out, FPR95 per OOD set and score), ``feature_norm``,  ``eval.ood``
              ``activation_ratio``
backdoor      ``asr``; with τ > 0 also ``asr_tau``, ``acc_tau`` and ``rejected`` (clean,    a ``backdoor``
              backdoor) under FLIP's rejection (spec flip.md §3, §4)                       attack
domain_acc    ``domain_acc``: accuracy per domain name of a multi-domain set               domains
cost          ``cost``: ``params`` and ``macs`` of one test input (flop counter)            —
leakage       ``leakage``: the I2F lower bound I_lb = ‖Jδ‖/λmax(JJᵀ) of a few fixed test        —
              probes (δ = σ·ξ, σ = ``eval.leakage_sigma``; spec i2f.md §1): mean, min, per
              probe, and the seconds it took (:mod:`fedtrust.privacy.probe`)
robust_acc    ``robust``: clean and PGD accuracy per dual-BN mix μ (``mu``, ``clean_acc``,        —
              ``robust_acc`` lists; one entry, μ null, without dual BN; spec splitmix.md §4),
              attack settings ``eval.robust``
============  ===========================================================================  =================

The next systems add theirs here (per-width accuracy).
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedtrust.adversarial.robust import robust_accuracy
from fedtrust.errors import ConfigError
from fedtrust.evaluation.setup import EvalScores, EvalSetup
from fedtrust.evaluation.predict import predict_logits
from fedtrust.metrics.accuracy import group_accuracy, per_class_accuracy
from fedtrust.metrics.backdoor import accuracy_with_rejection, attack_success_rate, rejection_rate
from fedtrust.ood.metrics import activation_ratio, ece, mean_norm, ood_metrics
from fedtrust.ood.scores import forward_in_batches, get_score
from fedtrust.privacy.probe import probe_indices, probe_risk
from fedtrust.registry import register


class Evaluator:
    """Base class: ``test_metrics`` gives one predictor's metrics on the global test set."""

    name: ClassVar[str] = "base"
    per_client: ClassVar[bool] = False
    """True when the evaluator also scores each client on its local test set (personalized evaluation)."""

    def check(self, setup: EvalSetup) -> None:
        """Raise a one-line ConfigError if this evaluator cannot measure ``setup`` (called once, before round 1)."""

    def test_metrics(self, name: str, model: nn.Module, logits: Tensor, setup: EvalSetup,
                     capture: EvalScores | None) -> dict[str, Any]:
        raise NotImplementedError


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


@register("evaluator", "accuracy")
class Accuracy(Evaluator):
    """Accuracy, CE loss, per-class and per-group accuracy (many/medium/few, head/middle/tail) on the
    balanced test set; group accuracy is the nan-mean of its classes' accuracies. With personalized
    evaluation on, also each client's accuracy on its local test set (:mod:`fedtrust.evaluation.clients`)."""

    name = "accuracy"
    per_client = True

    def test_metrics(self, name: str, model: nn.Module, logits: Tensor, setup: EvalSetup,
                     capture: EvalScores | None) -> dict[str, Any]:
        y = setup.test.y
        pred = logits.argmax(1)
        per_class = per_class_accuracy(pred, y, setup.test.num_classes)
        return {
            "test_acc": float((pred == y).float().mean()),
            "test_loss": float(F.cross_entropy(logits, y)),
            "class_acc": [_nan_to_none(float(a)) for a in per_class],
            "group_acc": {k: _nan_to_none(v) for k, v in group_accuracy(per_class, setup.groups).items()},
            "hmt_acc": {k: _nan_to_none(v) for k, v in group_accuracy(per_class, setup.hmt).items()},
        }


def domain_accuracy(pred: Tensor, y: Tensor, domains: Tensor, domain_names: tuple[str, ...]) -> dict[str, float | None]:
    """Accuracy of ``pred`` on the test samples of each domain, by domain name (None for a domain without samples)."""
    correct = (pred == y).to(torch.float64)
    k = len(domain_names)
    hits = torch.zeros(k, dtype=torch.float64, device=pred.device).index_add_(0, domains, correct)
    counts = torch.bincount(domains, minlength=k).to(torch.float64)
    return {n: (float(hits[d] / counts[d]) if counts[d] > 0 else None) for d, n in enumerate(domain_names)}


@register("evaluator", "domain_acc")
class DomainAcc(Evaluator):
    """Test accuracy per domain of a multi-domain set (``digits_domains``, ``fedbn_digits``, ``domainnet``, ...):
    ``domain_acc`` = {domain name: accuracy}, per predictor (Split-Mix spec §6, per-domain accuracy; Fig. 6).
    A set without domains is a one-line ConfigError before the first round."""

    name = "domain_acc"

    def check(self, setup: EvalSetup) -> None:
        if setup.test.domains is None:
            raise ConfigError("eval.metrics: domain_acc needs a data set with domains (digits_domains, "
                              "mnist_domains, fashion_mnist_domains, fedbn_digits, domainnet)")

    def test_metrics(self, name: str, model: nn.Module, logits: Tensor, setup: EvalSetup,
                     capture: EvalScores | None) -> dict[str, Any]:
        self.check(setup)
        test = setup.test
        return {"domain_acc": domain_accuracy(logits.argmax(1), test.y, test.domains, test.domain_names)}


@register("evaluator", "cost")
class Cost(Evaluator):
    """What a predictor costs at inference: ``cost`` = {``params``, ``macs``} for one test input, MACs counted by
    ``torch.utils.flop_counter`` (:func:`fedtrust.models.cost.model_cost`; Split-Mix spec §6, Table 1's MACs and
    #params per width). Measured once per predictor name and architecture, then reused."""

    name = "cost"

    def __init__(self) -> None:
        self._seen: dict[tuple[str, int], dict[str, int]] = {}

    def test_metrics(self, name: str, model: nn.Module, logits: Tensor, setup: EvalSetup,
                     capture: EvalScores | None) -> dict[str, Any]:
        from fedtrust.models.cost import model_cost

        key = (name, sum(p.numel() for p in model.parameters()))
        if key not in self._seen:
            params, macs = model_cost(model, tuple(setup.test.x.shape[1:]))
            self._seen[key] = {"params": int(params), "macs": int(macs)}
        return {"cost": dict(self._seen[key])}


@register("evaluator", "calibration")
class Calibration(Evaluator):
    """Expected calibration error of the softmax confidences (Guo et al., ICML 2017, Eq. 3; 15 bins)."""

    name = "calibration"

    def test_metrics(self, name: str, model: nn.Module, logits: Tensor, setup: EvalSetup,
                     capture: EvalScores | None) -> dict[str, Any]:
        if not bool(torch.isfinite(logits).all()):  # a diverged model: no confidences to bin (null, not a crash)
            return {"ece": None}
        return {"ece": ece(logits, setup.test.y)}


@register("evaluator", "ood")
class OOD(Evaluator):
    """Detection metrics of every configured score on every OOD test set, plus the RNA diagnostics.

    ``ood["<set>/<score>"]`` holds AUROC, AUPR-in/out and FPR95 in both conventions (spec rna.md §4);
    ``feature_norm`` and ``activation_ratio`` give mean ‖z‖ and the fraction of z > 0 on the ID test set
    and each OOD set. Nothing without OOD sets (``eval.ood``) or for a predictor without features.
    With ``capture``, the per-sample scores are kept for the report. With ``setup.ood_model`` set
    (``eval.ood_model=init_from``), that model is scored instead of the predictor.
    """

    name = "ood"

    def test_metrics(self, name: str, model: nn.Module, logits: Tensor, setup: EvalSetup,
                     capture: EvalScores | None) -> dict[str, Any]:
        model = setup.ood_model if setup.ood_model is not None else model
        if not setup.ood_sets or not hasattr(model, "forward_features_and_logits"):
            return {}
        z_id, logits_id = forward_in_batches(model, setup.test.x, setup.normalize, setup.batch_size)
        out: dict[str, Any] = {"ood": {}, "feature_norm": {"id": mean_norm(z_id)},
                               "activation_ratio": {"id": activation_ratio(z_id)}}
        id_scores = {s: get_score(s)(logits_id, z_id) for s in setup.scores}
        if capture is not None:
            capture.id_scores = id_scores
        for set_name, images in setup.ood_sets.items():
            z, logits_ood = forward_in_batches(model, images, setup.normalize, setup.batch_size)
            out["feature_norm"][set_name] = mean_norm(z)
            out["activation_ratio"][set_name] = activation_ratio(z)
            ood_scores = {s: get_score(s)(logits_ood, z) for s in setup.scores}
            if capture is not None:
                capture.ood_scores[set_name] = ood_scores
            for s in setup.scores:
                finite = bool(torch.isfinite(id_scores[s]).all() and torch.isfinite(ood_scores[s]).all())
                out["ood"][f"{set_name}/{s}"] = (ood_metrics(id_scores[s].cpu(), ood_scores[s].cpu()) if finite
                                                 else None)  # a diverged model: null, not a crash
        return out


def backdoor_asr(model: nn.Module, setup: EvalSetup) -> float | None:
    """ASR (τ = 0) of ``model`` on the setup's backdoor test set; None without a backdoor attack."""
    if setup.backdoor is None:
        return None
    images, target = setup.backdoor
    return _nan_to_none(attack_success_rate(predict_logits(model, images, setup.normalize, setup.batch_size), target))


@register("evaluator", "backdoor")
class Backdoor(Evaluator):
    """Attack success rate of a backdoor (``asr``: stamped non-target test images predicted as the target), and
    with FLIP's rejection threshold τ (``eval.reject_tau`` > 0): ``asr_tau`` and ``acc_tau`` count only
    predictions whose top-1 softmax probability reaches τ (a refusal is wrong on clean data, no success on
    backdoor data), and ``rejected`` gives the refused fractions (spec flip.md §3, §4). Nothing without a
    backdoor attack."""

    name = "backdoor"

    def test_metrics(self, name: str, model: nn.Module, logits: Tensor, setup: EvalSetup,
                     capture: EvalScores | None) -> dict[str, Any]:
        if setup.backdoor is None:
            return {}
        images, target = setup.backdoor
        bd_logits = predict_logits(model, images, setup.normalize, setup.batch_size)
        out: dict[str, Any] = {"asr": _nan_to_none(attack_success_rate(bd_logits, target))}
        tau = setup.reject_tau
        if tau > 0:
            out.update(asr_tau=_nan_to_none(attack_success_rate(bd_logits, target, tau)),
                       acc_tau=_nan_to_none(accuracy_with_rejection(logits, setup.test.y, tau)),
                       rejected={"clean": rejection_rate(logits, tau), "backdoor": rejection_rate(bd_logits, tau)})
        return out


@register("evaluator", "leakage")
class Leakage(Evaluator):
    """Gradient-leakage risk over rounds (issue 18): the I2F lower bound of ``eval.leakage_probes`` fixed
    test samples (the first of each class in turn), each shared alone as g0 + σ·ξ (:func:`probe_risk`).

    ``leakage`` = {``i2f_lb``: mean over probes, ``i2f_lb_min``: the riskiest probe's, ``lambda_max``: mean
    λmax(JJᵀ), ``sigma``, ``probes``: per probe (index, label, i2f_lb, lambda_max, jdelta = ‖Jδ‖,
    grad_norm = ‖g0‖, seconds), ``seconds``: the evaluator's total cost}. Smaller I_lb: an attacker can get closer
    to the sample. Null for a model with non-finite weights."""

    name = "leakage"

    def test_metrics(self, name: str, model: nn.Module, logits: Tensor, setup: EvalSetup,
                     capture: EvalScores | None) -> dict[str, Any]:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params or not all(bool(torch.isfinite(p).all()) for p in params):
            return {"leakage": None}
        start = time.perf_counter()
        idx = probe_indices(setup.test.y, setup.leakage_probes)
        device = params[0].device
        x = setup.normalize(setup.test.x[idx].to(device))
        risks = probe_risk(model, x, setup.test.y[idx].to(device), setup.leakage_sigma, indices=idx)
        values = [r.i2f_lb for r in risks]
        return {"leakage": {"i2f_lb": sum(values) / len(values), "i2f_lb_min": min(values),
                            "lambda_max": sum(r.lambda_max for r in risks) / len(risks),
                            "sigma": setup.leakage_sigma, "probes": [r.as_dict() for r in risks],
                            "seconds": time.perf_counter() - start}}


@register("evaluator", "robust_acc")
class RobustAccuracy(Evaluator):
    """Split-Mix's SA/RA (spec splitmix.md §4; Madry et al., ICLR 2018): white-box L∞ PGD against the
    predictor with every dual BN mixing ``(1 − μ)·clean + μ·adv``, for each μ of ``eval.robust.mus``, on a
    seeded subset of at most ``eval.robust.num_samples`` test images (:func:`robust_accuracy`).

    ``robust`` = {``eps``, ``steps``, ``step_size`` (pixel units), ``samples``, ``mu``, ``clean_acc``,
    ``robust_acc``}, the last three aligned lists; a predictor without dual BN gets one entry (μ null).
    Null for a model with non-finite weights."""

    name = "robust_acc"

    def test_metrics(self, name: str, model: nn.Module, logits: Tensor, setup: EvalSetup,
                     capture: EvalScores | None) -> dict[str, Any]:
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            return {"robust": None}
        return {"robust": robust_accuracy(model, setup.test.x, setup.test.y, setup.normalize, setup.robust,
                                          setup.batch_size)}
