"""Adversarial robustness: L∞ PGD on model inputs (:mod:`fedtrust.adversarial.pgd`).

Split-Mix's dual adversarial training (spec splitmix.md §4) is built from three pieces:
:class:`~fedtrust.models.dual_bn.DualBatchNorm` (norm kind ``dual_bn``), the ``dat`` objective
(:mod:`fedtrust.objectives.adversarial`) and the ``robust_acc`` evaluator.
"""

from fedtrust.adversarial.pgd import EPS, STEPS, PGDParams, PixelScale, default_step_size, pgd, pixel_scale

__all__ = ["EPS", "STEPS", "PGDParams", "PixelScale", "default_step_size", "pgd", "pixel_scale"]
