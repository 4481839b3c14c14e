"""Robust accuracy under white-box L∞ PGD, per dual-BN mix μ (spec splitmix.md §4, Madry et al. 2018).

For each μ the model's dual BNs output ``(1 − μ)·cleanBN(x) + μ·advBN(x)`` (Split-Mix's test-time
"deep mix", ``--test_adv_lmbd``); the attack is PGD **against that μ-mixed model** (its gradients go
through the mix), in eval mode. SA (clean accuracy) and RA (accuracy on the PGD images) are measured
on the same test images. A model without dual BN has no μ: one entry, ``mu = None``.

Reproducible: the test subset and every PGD random start come from ``torch.Generator`` s seeded by
``seed`` (a fresh one per μ, so a μ's numbers do not depend on the other μ in the list).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from fedtrust.adversarial.pgd import PGDParams, check_pgd, pgd, pixel_scale
from fedtrust.models.dual_bn import bn_route, check_route, has_dual_bn

MUS = (0.0, 0.2, 0.5, 0.8, 1.0)
"""The μ the Split-Mix AT sweeps test (spec §4)."""


class RobustEvalParams(PGDParams):
    """Settings of the ``robust_acc`` evaluator (config section ``eval.robust``)."""

    mus: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=lambda: list(MUS), min_length=1,
        description="dual-BN mix weights μ to test (each in [0, 1]); ignored for a model without dual BN")
    num_samples: int | None = Field(
        1000, ge=1, description="attack at most this many test images (a seeded random subset); null: all. "
                                "GUESS: the reference attacks the whole test set; PGD-7 on CPU makes a cap useful")
    seed: int = Field(0, ge=0, description="seeds the test subset and PGD's random starts")


def _generator(seed: int, stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """An RNG seeded by (seed, stream): stream 0 picks the subset, 1 + round(1000·μ) draws μ's random starts."""
    return torch.Generator(device=device).manual_seed(int(np.random.SeedSequence([seed, stream]).generate_state(1)[0]))


def subset_indices(n: int, num_samples: int | None, seed: int) -> Tensor:
    """Sorted indices of a seeded random subset of ``num_samples`` of ``n`` test images (all when None or ≥ n)."""
    if num_samples is None or num_samples >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=_generator(seed, 0))[:num_samples].sort().values


def _device(model: nn.Module, fallback: torch.device) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else fallback


def robust_accuracy(model: nn.Module, images: Tensor, labels: Tensor, normalize: Callable[[Tensor], Tensor],
                    params: RobustEvalParams, batch_size: int = 1024) -> dict[str, Any]:
    """SA and RA of ``model`` per μ under PGD (spec §4).

    Args:
        model: a module returning logits (dual-BN or not; an ensemble averaging logits works too).
        images: uint8 test images ``(N, C, H, W)``.
        labels: their labels.
        normalize: the uint8 → input map (``EvalSetup.normalize``); PGD's ε-ball and [0, 1] box hold on
            the pixels behind it.
        params: the attack, the μ list, the subset cap and the seed.
        batch_size: images per attack batch.

    Returns:
        ``{"eps", "steps", "step_size", "samples", "mu": [...], "clean_acc": [...], "robust_acc": [...]}``,
        lists aligned with ``mu`` (``[None]`` for a model without dual BN). The model's train/eval mode
        and BN routes are restored.
    """
    alpha = check_pgd(params.eps, params.steps, params.step_size)
    mus: list[float | None] = [check_route(float(m)) for m in params.mus] if has_dual_bn(model) else [None]
    device = _device(model, images.device)
    idx = subset_indices(len(images), params.num_samples, params.seed).to(images.device)
    x_all, y_all = images[idx], labels[idx]
    scale = pixel_scale(normalize, images.shape[1], device)
    out: dict[str, Any] = {"eps": params.eps, "steps": params.steps, "step_size": alpha, "samples": len(idx),
                           "mu": mus, "clean_acc": [], "robust_acc": []}
    was_training = model.training
    model.eval()
    try:
        for i, mu in enumerate(mus):
            gen = _generator(params.seed, 1 if mu is None else 1 + round(1000 * mu), device)
            clean = robust = 0
            with bn_route(model, "clean" if mu is None else mu):
                for xb, yb in zip(x_all.split(batch_size), y_all.split(batch_size)):
                    x, y = normalize(xb.to(device)), yb.to(device)
                    x_adv = pgd(model, x, y, eps=params.eps, steps=params.steps, step_size=alpha,
                                random_start=params.random_start, normalizer=scale, generator=gen)
                    with torch.no_grad():
                        clean += int((model(x).argmax(1) == y).sum())
                        robust += int((model(x_adv).argmax(1) == y).sum())
            n = max(len(idx), 1)
            out["clean_acc"].append(clean / n)
            out["robust_acc"].append(robust / n)
    finally:
        model.train(was_training)
    return out
