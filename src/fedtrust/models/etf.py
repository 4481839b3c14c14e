"""Simplex equiangular tight frames (ETF) and FedLoGe's sparse SSE-C classifier.

Spec ``fedloge.md`` §3 (Xiao et al., ICLR 2024, "static sparse equiangular
classifier"; reference ``util/etf_methods.py`` of ZackZikaiXiao/FedLoGe):

1. **ETF** (:func:`simplex_etf`): ``P`` (d×K, orthonormal columns) from the QR
   decomposition of ``A ~ U[0, 1)^{d×K}``, then
   ``M = sqrt(K/(K−1)) · P · (I_K − 11ᵀ/K)``. Columns ``m_c`` have unit norm and
   pairwise cosine ``−1/(K−1)``.
2. **Sparsify** (:func:`sparsify`): zero exactly ``⌊s·d·K⌋`` entries chosen
   uniformly at random (``s = 0.6`` in the paper's code; no magnitude criterion).
3. **Refine** (:func:`refine`): Adam on the surviving entries only (pruned ones
   get zero gradient) for the loss
   ``L = Σ_c (‖m_c‖₂ − target)² − mean_c arccos(clamp(max_{c'≠c} cos(m_c, m_c'), ±0.99999))``,
   pulling every column norm to ``target`` (0.1) and pushing each column away
   from its nearest neighbour, which restores near-ETF angles.

:func:`build_sse_c` strings these together and returns the frozen linear
classifier (weight ``Mᵀ``, shape K×d). Every random draw comes from a passed
``torch.Generator``. Nothing here needs a GPU; the refinement of a 512×100
matrix takes about 20 s on one CPU thread.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from fedtrust.errors import ConfigError

COS_CLAMP = 0.99999  # spec §3: arccos(clamp(max cos, ±0.99999))
DEFAULT_REFINE_STEPS = 5000
"""Refinement steps of :func:`build_sse_c`. GUESS: the paper's code runs 10,000
Adam steps. Measured on one CPU thread, 5,000 steps bring the column norms
within 2 % of the 0.1 target and the mean nearest-neighbour angle within 0.3° of
the ETF's (d=128, K=10: 96.33° vs 96.38°, about 4 s; d=512, K=100: 90.31° vs
90.58°, about 20 s); the next 5,000 change the angle by < 0.05°. So 5,000 is the default and
``refine_steps=10000`` reproduces the paper's setting."""

BiasInit = Literal["zero", "random"]


def simplex_etf(d: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """A d×K simplex ETF ``M = sqrt(K/(K−1)) · P (I − 11ᵀ/K)`` (spec §3 step 1).

    ``P`` is the Q factor of ``A ~ U[0,1)^{d×K}`` drawn from ``generator``
    (reduced QR, float64 for accuracy, returned as float32). Needs ``d ≥ K``
    for the orthonormal ``P`` and ``K ≥ 2``.
    """
    if num_classes < 2:
        raise ConfigError(f"a simplex ETF needs at least 2 classes, got {num_classes}")
    if d < num_classes:
        raise ConfigError(f"a simplex ETF needs feature dimension d >= K; got d={d}, K={num_classes}")
    a = torch.rand(d, num_classes, generator=generator, dtype=torch.float64)
    p, _ = torch.linalg.qr(a, mode="reduced")
    k = num_classes
    centering = torch.eye(k, dtype=torch.float64) - torch.full((k, k), 1.0 / k, dtype=torch.float64)
    return (math.sqrt(k / (k - 1)) * p @ centering).float()


def sparsify(m: Tensor, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Zero exactly ``⌊fraction·numel⌋`` entries of ``m`` chosen uniformly at random (spec §3 step 2).

    Returns ``(m * mask, mask)`` where ``mask`` is 1.0 on surviving entries.
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"sparsity fraction must lie in [0, 1), got {fraction!r}")
    n_zero = int(math.floor(fraction * m.numel()))
    order = torch.randperm(m.numel(), generator=generator)
    mask = torch.ones(m.numel(), dtype=m.dtype)
    mask[order[:n_zero]] = 0.0
    mask = mask.view_as(m)
    return m * mask, mask


def column_cosines(m: Tensor) -> Tensor:
    """K×K cosine similarities between the columns of ``m`` (d×K)."""
    unit = m / m.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return unit.T @ unit


def nearest_angles(m: Tensor) -> Tensor:
    """Per column, the angle in radians to its nearest other column: ``arccos(clamp(max_{c'≠c} cos))``."""
    cos = column_cosines(m)
    k = cos.shape[0]
    off = cos.masked_fill(torch.eye(k, dtype=torch.bool, device=cos.device), -2.0)
    return torch.arccos(off.max(dim=1).values.clamp(-COS_CLAMP, COS_CLAMP))


def refine_loss(m: Tensor, target: float) -> Tensor:
    """``Σ_c (‖m_c‖₂ − target)² − mean_c nearest_angle_c`` (spec §3 step 3)."""
    return ((m.norm(dim=0) - target) ** 2).sum() - nearest_angles(m).mean()


def refine(m: Tensor, mask: Tensor, target: float = 0.1, steps: int = DEFAULT_REFINE_STEPS,
           lr: float = 1e-4) -> Tensor:
    """Adam on the entries where ``mask == 1`` minimising :func:`refine_loss` (spec §3 step 3).

    The loss is evaluated on ``w ⊙ mask``, so pruned entries get exactly zero
    gradient and stay zero, as in the reference's gradient masking.
    Deterministic (no randomness).
    """
    w = (m * mask).clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: thread hand-offs cost more than the maths (20x on 2 busy cores)
    try:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            refine_loss(w * mask, target).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return (w * mask).detach()


def build_sse_c(num_features: int, num_classes: int, generator: torch.Generator, *, sparsity: float = 0.6,
                target: float = 0.1, steps: int = DEFAULT_REFINE_STEPS, lr: float = 1e-4,
                bias: BiasInit = "zero") -> nn.Linear:
    """FedLoGe's static sparse equiangular classifier SSE-C (spec §3), frozen.

    ``weight = Mᵀ`` (K×d) with ``M = refine(sparsify(simplex_etf(d, K)))``.

    GUESS (spec §10, bias): the reference leaves the bias at PyTorch's random
    default ``U(−1/√d, 1/√d)``, a class-specific offset that is not small next
    to logits of a 0.1-norm classifier. ``bias="zero"`` (default) keeps SSE-C
    exactly class-symmetric, which is the point of an equiangular classifier;
    ``bias="random"`` reproduces the reference (drawn from ``generator``).
    """
    if bias not in ("zero", "random"):
        raise ConfigError(f"SSE-C bias must be 'zero' or 'random', got {bias!r}")
    m = simplex_etf(num_features, num_classes, generator)
    m, mask = sparsify(m, sparsity, generator)
    m = refine(m, mask, target=target, steps=steps, lr=lr)
    head = nn.Linear(num_features, num_classes)
    with torch.no_grad():
        head.weight.copy_(m.T)
        if bias == "zero":
            head.bias.zero_()
        else:
            bound = 1.0 / math.sqrt(num_features)
            head.bias.copy_(torch.rand(num_classes, generator=generator) * 2 * bound - bound)
    head.requires_grad_(False)
    return head


def etf_angle(num_classes: int) -> float:
    """The simplex ETF angle ``arccos(−1/(K−1))`` in radians (96.38° for K = 10)."""
    return math.acos(-1.0 / (num_classes - 1))
