"""Leakage risk of a model at a few probe samples: the I2F lower bound, cheap enough to chart every evaluation.

For each probe (one sample, batch of 1, the model in eval mode, float64), with g0 = ∇θ L(x0, y) and
the reference perturbation δ = σ·ξ, ξ ~ N(0, I) drawn from a seed fixed per probe (so the chart
moves with the model, not with the draw):

    I_lb = ‖Jδ‖₂ / λmax(JJᵀ)            (spec i2f.md §1; λmax the eigenvalue σ₁², by Lanczos)

a lower bound on how far the best gradient-inversion attacker's reconstruction of x0 lands from x0
when the client shares g0 + δ (model-input space, L2 over the whole input). Smaller means riskier;
for Gaussian δ it is linear in σ in expectation, so σ sets the scale, not the ranking over rounds.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from fedtrust.privacy.i2f import gaussian_delta, lambda_max, lower_bound
from fedtrust.privacy.jacobian import GradientMap

_PROBE_STREAM = 0x12F


@dataclass(frozen=True)
class ProbeRisk:
    """One probe's leakage risk (module docstring): ``i2f_lb`` = ``jdelta`` / ``lambda_max``."""

    index: int
    label: int
    i2f_lb: float
    lambda_max: float
    jdelta: float
    grad_norm: float
    seconds: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def probe_indices(labels: Tensor, n: int) -> list[int]:
    """``n`` fixed probe indices: the first sample of each class in class order, then each class's second,
    and so on (fewer when the set is smaller)."""
    by_class = [torch.nonzero(labels == c).flatten().tolist() for c in sorted(set(labels.tolist()))]
    out: list[int] = []
    depth = 0
    while len(out) < n and any(depth < len(ids) for ids in by_class):
        out += [ids[depth] for ids in by_class if depth < len(ids)][:n - len(out)]
        depth += 1
    return out


def batch_risk(model: nn.Module, x: Tensor, y: Tensor, delta: Tensor | float, *, generator: torch.Generator | None = None,
               tol: float = 1e-6, max_iter: int = 200) -> tuple[float, float, float, Tensor]:
    """``(I_lb, λmax, ‖Jδ‖, g0)`` of the batch ``(x, y)`` shared as g0 + δ, the model as it is (put it in eval
    mode), float64. ``delta`` is the flat δ, or a float σ for δ = σ·ξ drawn from ``generator`` after the
    Lanczos start vector (:func:`~fedtrust.privacy.i2f.gaussian_delta`)."""
    gmap = GradientMap(model, x, y, dtype=torch.float64)
    g0 = gmap.grad()
    eig = lambda_max(gmap, tol=tol, max_iter=max_iter, generator=generator)
    d = gaussian_delta(g0, float(delta), generator) if not isinstance(delta, Tensor) else delta.to(g0)
    lb = float(lower_bound(gmap, d, eig))
    return lb, eig.value, lb * eig.value, g0


def probe_risk(model: nn.Module, x: Tensor, y: Tensor, sigma: float, *, indices: list[int] | None = None,
               seed: int = 0, tol: float = 1e-6, max_iter: int = 200) -> list[ProbeRisk]:
    """I_lb of each sample of ``x`` (normalized model input, ``(n, *input)``) with label ``y``, one at a time.

    The model is audited in eval mode on a float64 copy of its trainable parameters (it is not changed,
    and its mode is restored). ``indices`` only label the results (default 0..n−1) and seed each probe's
    ξ, so a probe's draw is the same at every evaluation. Lanczos stops at relative Ritz residual ``tol``
    (λmax then has relative error about tol²·λ/gap).
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x holds {x.shape[0]} samples but y {y.shape[0]} labels")
    indices = list(range(x.shape[0])) if indices is None else indices
    was_training = model.training
    model.eval()
    try:
        out = []
        for i, index in enumerate(indices):
            start = time.perf_counter()
            gen = torch.Generator(device=x.device).manual_seed(seed * 1_000_003 + _PROBE_STREAM + index)
            lb, lam, jdelta, g0 = batch_risk(model, x[i:i + 1], y[i:i + 1], sigma, generator=gen, tol=tol,
                                             max_iter=max_iter)
            out.append(ProbeRisk(index, int(y[i]), lb, lam, jdelta, float(g0.norm()), time.perf_counter() - start))
        return out
    finally:
        model.train(was_training)
