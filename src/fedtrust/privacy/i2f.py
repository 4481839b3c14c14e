"""The inversion influence function (I2F, Zhang, Hong et al., NeurIPS 2023; spec i2f.md §1, §3, §7).

A client shares ``g0 + δ``. Linearizing a perfect gradient-matching attacker
around ``x0`` (implicit function theorem) gives its reconstruction error

    Δx(δ) ≈ (JJᵀ)⁻¹ J δ,        I2F(δ; x0) = ‖(JJᵀ)⁻¹ J δ‖₂                    (spec §1)

with ``J = ∂x ∇θ L(x0)`` of shape ``dx × dθ`` (the convention of
:mod:`fedtrust.privacy.jacobian`), the L2 norm over the whole input tensor, in
normalized input space (spec §7.5). Small I2F = the attacker recovers ``x0``
closely = more leakage. This module computes

- :func:`lambda_max`: λmax(JJᵀ), the largest **eigenvalue** of ``JJᵀ``, i.e.
  the **square** of J's largest singular value σ₁ (spec §7.2: the I2F code logs
  σ₁ as "MaxEigenValue" in one script and σ₁² in the bound; here it is always
  σ₁²), by Lanczos or power iteration on the parameter-space operator
  ``v ↦ Jᵀ(Jv)`` (same nonzero spectrum, spec §1 ``I2F_lb``);
- :func:`lower_bound`: ``I_lb(δ) = ‖Jδ‖₂ / λmax(JJᵀ) ≤ I2F(δ)`` (spec §1);
- :func:`ridge_i2f`: ``‖(JJᵀ + εI)⁻¹ J δ‖₂`` by conjugate gradients on the
  input-space operator ``u ↦ J(Jᵀu) + εu`` (the code's ``compute_exact_bound``
  minimizes the same quadratic by plain gradient descent, spec §1, §7.3);
- :func:`exact_i2f`: the ε = 0 value from the explicit J (small inputs);
- δ builders for the defenses of spec §3: :func:`gaussian_delta`,
  :func:`pruning_delta`, :func:`eigen_delta`.

With ``J = U S Vᵀ`` (thin SVD), ``(JJᵀ)⁻¹Jδ = U S⁻¹ Vᵀ δ``, so ``I2F(c·v_k) =
c / σ_k`` along the k-th right singular vector (eigenvector of ``JᵀJ``) and
``I_lb ≤ ridge I2F ≤ I2F``: these identities are what the tests check.

Parameter-space vectors (δ, v) are flat ``(dθ,)`` or a batch ``(k, dθ)``; the
batch is solved at once (vmapped products, per-column CG steps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fedtrust.privacy.jacobian import DenseJacobian, JacobianOperator


@dataclass(frozen=True)
class EigResult:
    """λmax(JJᵀ) = σ₁(J)² (an eigenvalue, not a singular value) and how it was found.

    Attributes:
        value: the largest eigenvalue of ``JJᵀ`` (equivalently of ``JᵀJ``).
        vector: its unit eigenvector of ``JᵀJ``, flat ``(dθ,)`` (J's top right singular vector).
        iterations: operator applications ``v ↦ Jᵀ(Jv)`` used.
        converged: whether the residual test passed before ``max_iter``.
    """

    value: float
    vector: Tensor
    iterations: int
    converged: bool


@dataclass(frozen=True)
class I2FResult:
    """An I2F value and the predicted reconstruction error Δx behind it.

    Attributes:
        value: ``‖Δx‖₂`` over the whole input, ``()`` for one δ or ``(k,)`` for a batch.
        vector: ``Δx`` itself, x-shaped (``(k, *x_shape)`` for a batch); attacks are compared with its direction.
        iterations: CG iterations (0 for the dense solve).
        residual: relative residual of the solved system, ``‖A Δx − Jδ‖ / ‖Jδ‖`` per δ.
    """

    value: Tensor
    vector: Tensor
    iterations: int
    residual: Tensor


# ------------------------------------------------------------ helpers


def _batch(delta: Tensor, dtheta: int) -> tuple[Tensor, bool]:
    """``delta`` as ``(k, dθ)`` and whether it was a single vector."""
    if delta.ndim == 1 and delta.numel() == dtheta:
        return delta[None], True
    if delta.ndim == 2 and delta.shape[1] == dtheta:
        return delta, False
    raise ValueError(f"δ must be flat (dθ,) or (k, dθ) with dθ = {dtheta}, got shape {tuple(delta.shape)}")


def _jv_flat(op: JacobianOperator, v: Tensor) -> Tensor:
    """``J·v`` for ``v`` of shape ``(k, dθ)`` as ``(k, dx)``."""
    return op.jv(v).reshape(v.shape[0], op.dx)


def _jtu_flat(op: JacobianOperator, u: Tensor) -> Tensor:
    """``Jᵀ·u`` for ``u`` of shape ``(k, dx)`` as ``(k, dθ)``."""
    return op.jtu(u.reshape(u.shape[0], *op.x_shape))


def _as_matrix(jac: DenseJacobian | Tensor) -> Tensor:
    return jac.matrix if isinstance(jac, DenseJacobian) else jac


# ------------------------------------------------------------ λmax


def lambda_max(op: JacobianOperator, *, tol: float = 1e-10, max_iter: int = 500,
               method: Literal["lanczos", "power"] = "lanczos",
               generator: torch.Generator | None = None) -> EigResult:
    """λmax(JJᵀ) = σ₁(J)², the largest **eigenvalue** of ``JJᵀ`` (spec §1 ``I2F_lb``, §7.2), matrix-free.

    Iterates on the parameter-space operator ``A v = Jᵀ(J v)`` (``dθ × dθ``,
    the I2F code's LinearOperator; its nonzero eigenvalues are those of
    ``JJᵀ``), in the operator's dtype (build the :class:`GradientMap` in
    float64). Both methods stop when the Ritz pair ``(λ, q)`` has residual
    ``‖A q − λ q‖ ≤ tol · λ`` (the eigenvalue error is then about
    ``residual² / gap``), unlike the code's power iteration, which never stops
    early (spec §7.10).

    - ``"lanczos"`` (default): Lanczos with full reorthogonalization; the
      residual of the top Ritz pair is ``β_k |s_k|``. It also stops on an
      invariant subspace (``rank J ≤ dx`` steps at most in exact arithmetic).
    - ``"power"``: power iteration with the Rayleigh quotient; converges as
      ``(λ₂/λ₁)^k``, slower when the top two eigenvalues are close.

    Args:
        op: J through its products (:class:`GradientMap` or :class:`DenseJacobian`).
        tol: relative residual tolerance.
        max_iter: most operator applications.
        generator: seeds the random start vector (the global RNG when None).
    """
    q = torch.randn(op.dtheta, generator=generator, dtype=op.dtype, device=op.device)
    q = q / q.norm()

    def apply(v: Tensor) -> Tensor:
        return _jtu_flat(op, _jv_flat(op, v[None]))[0]

    if method == "power":
        return _power(apply, q, tol, max_iter)
    if method == "lanczos":
        return _lanczos(apply, q, tol, max_iter)
    raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")


def _power(apply: Callable[[Tensor], Tensor], q: Tensor, tol: float, max_iter: int) -> EigResult:
    lam = 0.0
    for it in range(1, max_iter + 1):
        w = apply(q)
        lam = float(q @ w)  # Rayleigh quotient, q unit
        residual = float((w - lam * q).norm())
        norm = w.norm()
        if residual <= tol * abs(lam) or norm == 0:
            return EigResult(lam, q, it, True)
        q = w / norm
    return EigResult(lam, q, max_iter, False)


def _lanczos(apply: Callable[[Tensor], Tensor], q: Tensor, tol: float, max_iter: int) -> EigResult:
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0  # largest |Ritz value| so far, for the breakdown test
    for it in range(1, max_iter + 1):
        w = apply(basis[-1])
        alpha = float(basis[-1] @ w)
        alphas.append(alpha)
        Q = torch.stack(basis)
        for _ in range(2):  # full reorthogonalization, twice ("twice is enough")
            w = w - Q.T @ (Q @ w)
        beta = float(w.norm())
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T = T + torch.diag(off, 1) + torch.diag(off, -1)
        theta, S = torch.linalg.eigh(T)
        lam, s = float(theta[-1]), S[:, -1]
        scale = max(scale, abs(lam))
        residual = beta * abs(float(s[-1]))
        breakdown = beta <= 1e-14 * max(scale, 1e-300)
        if residual <= tol * abs(lam) or breakdown or it == max_iter:
            vector = s.to(Q.dtype) @ Q
            return EigResult(lam, vector / vector.norm(), it, residual <= tol * abs(lam) or breakdown)
        betas.append(beta)
        basis.append(w / beta)
    raise AssertionError("unreachable")


# ------------------------------------------------------------ bounds and I2F


def lower_bound(op: JacobianOperator, delta: Tensor, lam_max: float | EigResult | None = None) -> Tensor:
    """``I_lb(δ) = ‖Jδ‖₂ / λmax(JJᵀ)`` (spec §1), with λmax the **eigenvalue** σ₁² (:func:`lambda_max`).

    A lower bound of the (ε = 0) I2F for every δ, since ``(JJᵀ)⁻¹ ⪰ I / λmax``
    on the range of J. It does not bound the ridge I2F: with ε > 0 each
    direction is scaled by ``σ_i / (σ_i² + ε)``, which can fall below ``σ_i / σ₁²``.

    Args:
        op: J through its products.
        delta: flat ``(dθ,)`` or ``(k, dθ)``.
        lam_max: λmax(JJᵀ) if already known (a float or :class:`EigResult`); computed by Lanczos when None.

    Returns:
        ``()`` for one δ, ``(k,)`` for a batch.
    """
    d, single = _batch(delta, op.dtheta)
    lam = lambda_max(op) if lam_max is None else lam_max
    lam_value = lam.value if isinstance(lam, EigResult) else float(lam)
    out = _jv_flat(op, d).norm(dim=1) / lam_value
    return out[0] if single else out


def ridge_i2f(op: JacobianOperator, delta: Tensor, eps: float = 1.0, *, tol: float = 1e-10,
              max_iter: int | None = None) -> I2FResult:
    """Ridge I2F ``‖(JJᵀ + εI)⁻¹ J δ‖₂`` by conjugate gradients (spec §1 ``compute_exact_bound``, §7.3).

    Solves ``(JJᵀ + εI) Δx = Jδ`` with CG on the input-space operator
    ``u ↦ J(Jᵀu) + εu`` (``dx × dx``, symmetric positive definite for ε > 0),
    from ``Δx = 0``, each column of a batch with its own step sizes; stops when
    every column has ``‖r‖ ≤ tol · ‖Jδ‖``. The I2F code minimizes the same
    quadratic ``½‖JᵀΔx − δ‖² + ½ε‖Δx‖²`` by plain gradient descent (lr 0.01,
    ≤ 2000 steps) and reports the norm; CG reaches the minimizer in at most
    ``dx`` steps in exact arithmetic. The code's default is ε = 1 (sweep
    {0.1, 1, 10}); the value can be far below the exact I2F when σ_min(J)² ≪ ε
    (spec §7.3), and never exceeds it. ε = 0 works only for full-row-rank J;
    use :func:`exact_i2f` there.

    Args:
        op: J through its products.
        delta: flat ``(dθ,)`` or ``(k, dθ)``.
        eps: the ridge ε ≥ 0.
        tol: relative residual tolerance.
        max_iter: most CG iterations (default ``max(2·dx, 100)``).
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    d, single = _batch(delta, op.dtheta)
    b = _jv_flat(op, d)
    b_norm = b.norm(dim=1)
    max_iter = max_iter if max_iter is not None else max(2 * op.dx, 100)

    def apply(u: Tensor) -> Tensor:
        return _jv_flat(op, _jtu_flat(op, u)) + eps * u

    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(dim=1)
    it = 0
    while it < max_iter and bool((rs.sqrt() > tol * b_norm).any()):
        it += 1
        ap = apply(p)
        pap = (p * ap).sum(dim=1)
        alpha = torch.where(pap > 0, rs / torch.where(pap > 0, pap, 1.0), 0.0)
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        rs_new = (r * r).sum(dim=1)
        beta = torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, 1.0), 0.0)
        p = r + beta[:, None] * p
        rs = rs_new
    residual = (b - apply(x)).norm(dim=1) / torch.where(b_norm > 0, b_norm, 1.0)
    return _result(op, x, it, residual, single)


def exact_i2f(jac: DenseJacobian | Tensor, delta: Tensor, eps: float = 0.0, *,
              rcond: float | None = None) -> I2FResult:
    """I2F ``‖(JJᵀ)⁻¹ J δ‖₂`` (spec §1; ε = 0) from the explicit J, for small inputs; ridge when ``eps > 0``.

    ε = 0: ``Δx`` is the minimum-norm least-squares solution of ``Jᵀ Δx = δ``
    (``torch.linalg.lstsq``, SVD-based driver ``gelsd``), which is
    ``(JJᵀ)⁺ J δ = (Jᵀ)⁺ δ``: exactly ``(JJᵀ)⁻¹ J δ`` when J has full row rank
    (``JJᵀ`` invertible), and the pseudo-inverse solution when ``JJᵀ`` is
    singular, singular values below ``rcond · σ₁`` counting as zero
    (``rcond`` None: torch's default, machine eps · max(dx, dθ)). Solving on
    ``Jᵀ`` rather than ``JJᵀ`` avoids squaring J's condition number.

    ε > 0: ``torch.linalg.solve(JJᵀ + εI, Jδ)`` (the dense reference of :func:`ridge_i2f`).

    Args:
        jac: J (``dx × dθ``) as a :class:`DenseJacobian` or a matrix; x-shaped outputs are flat ``(dx,)``.
        delta: flat ``(dθ,)`` or ``(k, dθ)``.
        eps: ridge ε ≥ 0.
        rcond: the pseudo-inverse cutoff relative to σ₁ (ε = 0 only).
    """
    J = _as_matrix(jac)
    op = DenseJacobian(J)
    d, single = _batch(delta, J.shape[1])
    b = d @ J.T  # (k, dx)
    gram = J @ J.T
    if eps > 0:
        x = torch.linalg.solve(gram + eps * torch.eye(J.shape[0], dtype=J.dtype, device=J.device), b.T).T
    elif eps == 0:
        x = torch.linalg.lstsq(J.T, d.T, rcond=rcond, driver="gelsd" if J.device.type == "cpu" else None).solution.T
    else:
        raise ValueError(f"eps must be >= 0, got {eps}")
    b_norm = b.norm(dim=1)
    residual = (x @ gram + eps * x - b).norm(dim=1) / torch.where(b_norm > 0, b_norm, 1.0)
    return _result(op, x, 0, residual, single)


def _result(op: JacobianOperator, x: Tensor, iterations: int, residual: Tensor, single: bool) -> I2FResult:
    value = x.norm(dim=1)
    vector = x.reshape(x.shape[0], *op.x_shape)
    if single:
        return I2FResult(value[0], vector[0], iterations, residual[0])
    return I2FResult(value, vector, iterations, residual)


# ------------------------------------------------------------ spectrum and δ builders


def jacobian_spectrum(jac: DenseJacobian | Tensor) -> tuple[Tensor, Tensor]:
    """J's singular values σ (descending, ``(r,)``, ``r = min(dx, dθ)``) and right singular vectors ``(r, dθ)``.

    The rows of the second are the eigenvectors of ``JᵀJ`` (parameter space)
    with eigenvalues σ², which are also the nonzero eigenvalues of ``JJᵀ``; so
    ``λmax(JJᵀ) = σ[0]²`` (spec §7.2). Dense SVD: small inputs only.
    """
    _, s, vh = torch.linalg.svd(_as_matrix(jac), full_matrices=False)
    return s, vh


def gaussian_delta(g: Tensor, sigma: float, generator: torch.Generator | None = None) -> Tensor:
    """Gaussian-noise defense δ = σ·ξ, ξ ~ N(0, I) shaped as ``g`` (spec §3, §6.4).

    GUESS: σ is the noise standard deviation on the shared gradient itself
    (spec §6.4's ``g0 + σ·ξ``); the I2F code's "var" knob (1e-3 default) is
    σ² and its extra "energy" factor is not reproduced.
    """
    return sigma * torch.randn(g.shape, generator=generator, dtype=g.dtype, device=g.device)


def pruning_delta(g: Tensor, ratio: float) -> Tensor:
    """Global magnitude pruning at ratio p: zero every ``|g| ≤ t_p``, δ = pruned − g (spec §3).

    ``t_p`` is the ``⌊p·n⌋``-th smallest ``|g|`` over all ``n`` entries (per
    row of a ``(k, dθ)`` batch), so at least a fraction p is zeroed (more only
    on ties); the spec's ``quantile_p(|g|)`` up to one entry of interpolation,
    and it works at any size (``torch.quantile`` stops at 2²⁴ entries).
    ``p = 0`` (or ``⌊p·n⌋ = 0``) prunes nothing: δ = 0.

    Args:
        g: the flat gradient ``(dθ,)`` or a batch ``(k, dθ)``.
        ratio: p in [0, 1].
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1], got {ratio}")
    n = g.shape[-1]
    k = int(ratio * n)
    if k == 0:
        return torch.zeros_like(g)
    mag = g.abs()
    threshold = mag.kthvalue(k, dim=-1, keepdim=True).values
    return torch.where(mag <= threshold, -g, torch.zeros_like(g))


def eigen_delta(jac: DenseJacobian | Tensor, k: int | Sequence[int], c: float = 5.0) -> Tensor:
    """δ = c·v_k along the k-th eigenvector of ``JᵀJ`` (0 = the largest eigenvalue), spec §1, §3, §6.5.

    ``v_k`` is J's k-th right singular vector (unit norm, sign arbitrary), so
    ``I2F(c·v_k) = c / σ_k`` with σ_k the singular value (= c/√λ_k). The I2F
    code uses c = 5 and eigsh's ascending order; here index 0 is the largest.

    Returns:
        ``(dθ,)`` for an int ``k``, ``(len(k), dθ)`` for a sequence.
    """
    _, vh = jacobian_spectrum(jac)
    if isinstance(k, int):
        return c * vh[k]
    return c * vh[list(k)]
