"""Adversarial-training objectives, registered under ``"objective"``.

``dat``: Split-Mix's dual adversarial training (Hong et al., ICLR 2022; spec splitmix.md §4), after
Madry et al. (ICLR 2018) adversarial training. Per batch:

1. clean forward through the clean BN (route ``"clean"``, train mode): ``CE_c = CE(f(x), y)``;
2. ``x_adv`` = L∞ PGD (:func:`~fedtrust.adversarial.pgd.pgd`; eps 8/255, 7 steps, random start, [0, 1]
   pixels) against the adversarial-BN path (route ``"adv"``) in **eval** mode, detached;
3. adversarial forward through the adversarial BN (train mode): ``CE_a = CE(f(x_adv), y)``;
4. ``L = (1 − λ)·CE_c + λ·CE_a`` (λ = ``lam``, the reference's ``--adv_lmbd``).

On a model without :class:`~fedtrust.models.dual_bn.DualBatchNorm` the routes do nothing and the same
loss is FedAvg+AT (spec §4 baseline: one BN, the λ-mixed loss). A term whose weight is 0 is not computed
(λ = 0 is plain CE, and runs no PGD); λ = 1 trains only the adversarial path.

The inputs are normalised images (``batch["x"]``); PGD works on the pixels behind them through the
objective's ``normalize`` (the run's ``data.normalize``, handed over by ``build_objective``; None: the
inputs are [0, 1] pixels). It is written for ``torch.func``, so ``dat`` runs on both executors: the
vectorised one differentiates it under ``vmap(grad(...))`` (PGD's input gradient is a nested
``torch.func.grad``). Its random start draws from the global RNG, which both executors seed per client
and round (as for dropout), so runs are reproducible; the two executors draw different starts.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fedtrust.adversarial.pgd import Normalizer, PGDParams, pgd, pixel_scale
from fedtrust.models.dual_bn import bn_route
from fedtrust.objectives import Objective
from fedtrust.registry import register


def adversarial_inputs(model: nn.Module, x: Tensor, y: Tensor, params: PGDParams,
                       normalizer: Normalizer = None) -> Tensor:
    """PGD inputs against ``model``'s adversarial-BN path in eval mode (spec §4), detached; ``model``'s
    train/eval mode and BN routes are restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with bn_route(model, "adv"):
            return pgd(model, x, y, eps=params.eps, steps=params.steps, step_size=params.step_size,
                       random_start=params.random_start, normalizer=normalizer)
    finally:
        model.train(was_training)


@register("objective", "dat")
class DualAdversarialTraining(Objective):
    """DAT: ``(1 − λ)·CE(f_clean(x), y) + λ·CE(f_adv(x_adv), y)`` (spec splitmix.md §4; Madry et al. 2018).

    ``f_clean``/``f_adv``: the model with every dual BN on route ``"clean"``/``"adv"``; ``x_adv``: PGD on
    ``f_adv`` in eval mode. With one BN per layer: FedAvg+AT.
    """

    name = "dat"

    class Params(Objective.Params, PGDParams):
        lam: float = Field(0.5, ge=0.0, le=1.0, description="λ, weight of the adversarial CE (--adv_lmbd; sweeps 0.5)")

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        x, y, lam = batch["x"], batch["y"], self.params.lam
        loss = x.new_zeros(())
        if lam < 1.0:
            with bn_route(model, "clean"):
                loss = loss + (1.0 - lam) * F.cross_entropy(model(x), y)
        if lam > 0.0:
            normalizer = None if self.normalize is None else pixel_scale(self.normalize, x.shape[-3], x.device)
            x_adv = adversarial_inputs(model, x, y, self.params, normalizer)
            with bn_route(model, "adv"):
                loss = loss + lam * F.cross_entropy(model(x_adv), y)
        return loss
