"""Gradient-leakage audit: how much a shared gradient reveals (I2F, spec i2f.md).

- :mod:`~fedtrust.privacy.jacobian`: the gradient map ``g(x) = ∇θ L(x, y)`` and
  the double-backprop products ``J·v`` and ``Jᵀ·u`` of ``J = ∂x ∇θ L(x0)``
  (``dx × dθ``), matrix-free or explicit.
- :mod:`~fedtrust.privacy.i2f`: λmax(JJᵀ) (an eigenvalue, σ₁²), the lower bound
  ``I_lb``, the ridge I2F by conjugate gradients, the exact I2F, and the δ of
  the noise, pruning and eigen-direction defenses.
- :mod:`~fedtrust.privacy.metrics`: MSE, PSNR, SSIM, feature MSE, label
  accuracy, Pearson and Spearman.
- :mod:`~fedtrust.privacy.attacks`: the gradient-inversion attacks on the same
  :class:`GradientMap`: DLG, Inverting Gradients, iDLG labels, FedAvg-update targets.
- :mod:`~fedtrust.privacy.probe`: the per-round leakage probe (``I_lb`` on a
  few fixed training samples) behind the ``leakage`` evaluator.

This package imports no ``fl/`` module; ``fl/update_privacy`` (the clip,
noise and prune defense on shared updates) uses its pruning δ.
"""

from fedtrust.privacy.attacks import AttackResult, dlg, fedavg_target, idlg_label, inverting_gradients, reconstruct
from fedtrust.privacy.i2f import (
    EigResult,
    I2FResult,
    eigen_delta,
    exact_i2f,
    gaussian_delta,
    jacobian_spectrum,
    lambda_max,
    lower_bound,
    pruning_delta,
    ridge_i2f,
)
from fedtrust.privacy.jacobian import DenseJacobian, GradientMap, JacobianOperator, flatten, unflatten

__all__ = [
    "AttackResult",
    "DenseJacobian",
    "EigResult",
    "GradientMap",
    "I2FResult",
    "JacobianOperator",
    "dlg",
    "eigen_delta",
    "exact_i2f",
    "fedavg_target",
    "flatten",
    "gaussian_delta",
    "idlg_label",
    "inverting_gradients",
    "jacobian_spectrum",
    "lambda_max",
    "lower_bound",
    "pruning_delta",
    "reconstruct",
    "ridge_i2f",
    "unflatten",
]
