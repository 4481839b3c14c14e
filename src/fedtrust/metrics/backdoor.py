"""Backdoor metrics with FLIP's inference-time rejection (spec flip.md §3, §4).

A prediction counts only when its top-1 softmax probability reaches the threshold τ; a refused
prediction counts as **wrong** on clean data (clean accuracy falls) and as **no success** on backdoor
data (ASR falls). τ = 0 accepts everything (plain accuracy and ASR).

* clean accuracy: the fraction of the test set predicted correctly *and* with confidence ≥ τ;
* ASR ("backdoor accuracy" in FLIP): the fraction of non-target-class test images stamped with the full
  trigger that are predicted as the target with confidence ≥ τ;
* rejection rate: the fraction of images refused;
* lifespan (the durability measure of Neurotoxin, Zhang et al., ICML 2022): rounds after the last attack round until the ASR
  falls below twice its pre-attack level.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fedtrust.errors import ConfigError

REFUSED = -1
"""The label :func:`predict_with_rejection` gives a refused prediction (never a class)."""


def _check_tau(tau: float) -> float:
    if not 0.0 <= tau <= 1.0:
        raise ConfigError(f"rejection threshold tau must lie in [0, 1] (a softmax probability), got {tau!r}")
    return float(tau)


def predict_with_rejection(logits: Tensor, tau: float) -> Tensor:
    """Top-1 labels of ``logits`` (N, K), with :data:`REFUSED` where the top-1 softmax probability is below τ."""
    tau = _check_tau(tau)
    conf, pred = torch.softmax(logits.float(), dim=1).max(dim=1)
    return torch.where(conf >= tau, pred, torch.full_like(pred, REFUSED))


def rejection_rate(logits: Tensor, tau: float) -> float:
    """Fraction of rows refused at τ (0 for an empty set)."""
    pred = predict_with_rejection(logits, tau)
    return float((pred == REFUSED).float().mean()) if len(pred) else 0.0


def accuracy_with_rejection(logits: Tensor, labels: Tensor, tau: float) -> float:
    """Clean accuracy at τ: correct **and** accepted, over all rows (a refusal counts as wrong)."""
    pred = predict_with_rejection(logits, tau)
    return float((pred == labels.to(pred.device)).float().mean()) if len(pred) else float("nan")


def attack_success_rate(logits: Tensor, target: int, tau: float = 0.0) -> float:
    """ASR at τ over the logits of stamped non-target images: predicted ``target`` and accepted."""
    pred = predict_with_rejection(logits, tau)
    return float((pred == target).float().mean()) if len(pred) else float("nan")


def lifespan(asr: Mapping[int, float], last_attack_round: int, baseline: float) -> int | None:
    """Rounds after ``last_attack_round`` until the ASR first falls below ``2 · baseline`` (its pre-attack
    level), from the evaluated rounds in ``asr`` (round → ASR). 0 when it is already below at the last attack
    round's evaluation; None when it never falls within the evaluated rounds (the backdoor outlives the run)."""
    for r in sorted(k for k in asr if k >= last_attack_round):
        if asr[r] < 2.0 * baseline:
            return r - last_attack_round
    return None


class RejectingClassifier(nn.Module):
    """A predictor wrapper with FLIP's τ-rejection: ``forward`` returns the inner model's logits unchanged
    (so softmax metrics still work) and :meth:`predict` the labels with :data:`REFUSED` for refusals."""

    def __init__(self, model: nn.Module, tau: float) -> None:
        super().__init__()
        self.model, self.tau = model, _check_tau(tau)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        return predict_with_rejection(self.model(x), self.tau)
