"""Gradient-inversion attacks on a shared gradient: DLG, Inverting Gradients, iDLG labels (spec i2f.md §2, §6).

The attacker holds the model θ (eval mode), the shared gradient ``g`` (flat
``(dθ,)`` in ``named_parameters`` order, or parameter-shaped) and, usually,
the labels (spec §2: the I2F code gives the true label). It searches an input
``x̂`` whose gradient ``∇θL(x̂, y)`` matches ``g``:

    x̂ = argmin_x  R(∇θL(x, y), g) + tv·TV(x)

``∇θL`` comes from :class:`~fedtrust.privacy.jacobian.GradientMap` (``torch.func``
over a ``functional_call``), so it stays differentiable in ``x̂`` (double
backprop) and the model is neither changed nor given ``.grad``.

==========  =========================================================================================
objective   ``R`` (spec §2)
==========  =========================================================================================
``"l2"``    DLG (Zhu et al. 2019): ``Σ_layers ‖∇θL(x̂) − g‖²``, a sum over all parameters
``"sim"``   Inverting Gradients (Geiping et al. 2020, Eq. 4, global form): ``1 − ⟨∇θL(x̂), g⟩ /
            (‖∇θL(x̂)‖·‖g‖)`` over all layers concatenated (the spec's code; Geiping sums per layer)
==========  =========================================================================================

:func:`reconstruct` is the one loop (restarts, Adam or L-BFGS, optional
signed gradients, box, step schedule, TV prior); :func:`dlg` and
:func:`inverting_gradients` are its two presets. :func:`idlg_label` recovers
the label of a batch of one (Zhao et al. 2020), and :func:`fedavg_target`
turns a client's multi-step FedAvg update into a gradient-like target
(Geiping §5). Everything runs in the dtype of the model's parameters (float64
for exact work) and is deterministic given the ``torch.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad
from torch.nn import functional as F

from fedtrust.errors import ConfigError, DataError
from fedtrust.privacy.jacobian import GradientMap, LossFn, flatten

OBJECTIVES = ("l2", "sim")
OPTIMIZERS = ("adam", "lbfgs")
DEFAULT_LR = {"adam": 0.1, "lbfgs": 1.0}  # spec §2's Adam lr 0.1; L-BFGS with a line search starts at step 1
MILESTONES = (3 / 8, 5 / 8, 7 / 8)  # IG's MultiStepLR at T//2.667, T//1.6, T//1.142 (spec §2), γ = 0.1
LBFGS_STEP_ITERS = 20  # inner L-BFGS iterations per outer step (torch's max_iter default)


@dataclass(frozen=True)
class AttackResult:
    """A reconstruction and how well its gradient matches the target.

    Attributes:
        x: the chosen reconstruction ``x̂`` (shape ``x_shape``), detached: the restart with the lowest loss.
        loss: its final gradient-matching loss ``R`` (without the TV term; ``inf`` if it diverged).
        labels: the labels used (given, or recovered by :func:`idlg_label`).
        restart_losses: final ``R`` of every restart, ``(restarts,)``.
        best: index of the chosen restart.
    """

    x: Tensor
    loss: float
    labels: Tensor
    restart_losses: Tensor
    best: int


# ------------------------------------------------------------ target and labels


def trainable(model: nn.Module) -> dict[str, Tensor]:
    """θ: the parameters with ``requires_grad``, by name, in ``named_parameters`` order (the flat layout of ``g``)."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def flat_target(model: nn.Module, g: Tensor | Sequence[Tensor] | Mapping[str, Tensor]) -> Tensor:
    """The shared gradient as a flat ``(dθ,)`` vector; a one-line DataError if its size or shapes do not fit θ."""
    params = trainable(model)
    dtheta = sum(p.numel() for p in params.values())
    if isinstance(g, Mapping):
        missing = [k for k in params if k not in g or g[k].shape != params[k].shape]
        if missing or len(g) != len(params):
            raise DataError(f"gradient dict must hold exactly the trainable parameters with their shapes; "
                            f"mismatch at {missing[:3] or sorted(set(g) - set(params))[:3]}")
        g = [g[k] for k in params]
    if not isinstance(g, Tensor):
        shapes = [tuple(t.shape) for t in g]
        if shapes != [tuple(p.shape) for p in params.values()]:
            raise DataError(f"gradient tensors have shapes {shapes[:3]}..., expected the trainable parameters' shapes")
        g = flatten(g)
    if g.ndim != 1 or g.numel() != dtheta:
        raise DataError(f"flat gradient must have shape ({dtheta},), got {tuple(g.shape)}")
    return g.detach()


def idlg_label(model: nn.Module, g: Tensor | Sequence[Tensor] | Mapping[str, Tensor]) -> Tensor:
    """The label of a batch of one from its cross-entropy gradient (iDLG, Zhao et al. 2020, §3), shape ``(1,)``.

    Rule: for a final ``Linear`` layer ``logits = W z + b`` and ``L = CE``,
    ``∂L/∂W_i = (p_i − 1[i = c]) · z``, so the row sums are
    ``s_i = (p_i − 1[i = c]) · Σz``: ``p_c − 1 < 0`` and ``p_i > 0`` otherwise,
    hence exactly the true row has the **sign that differs from all others**
    (it is the one negative entry when ``Σz > 0``, always the case for sigmoid
    or ReLU features). The last layer's weight is the last 2-D trainable
    parameter. If no single sign differs (``Σz = 0`` or rounding), the argmin
    of ``s`` is returned (Zhao et al.'s code). Exact for B = 1 only: with a
    batch-mean over B > 1 several rows can be negative (not supported here).
    """
    flat = flat_target(model, g)
    params = trainable(model)
    offset, weight = 0, None
    for p in params.values():
        if p.ndim == 2:
            weight = (offset, p.shape)
        offset += p.numel()
    if weight is None:
        raise ConfigError("iDLG needs a final Linear layer: the model has no 2-D trainable parameter")
    start, shape = weight
    rows = flat[start:start + shape[0] * shape[1]].reshape(shape).sum(dim=1)
    negative = rows < 0
    if int(negative.sum()) == 1:
        return negative.nonzero()[0]
    if int(negative.sum()) == rows.numel() - 1:
        return (~negative).nonzero()[0]
    return rows.argmin().reshape(1)


def fedavg_target(model: nn.Module, x: Tensor, y: Tensor, lr: float, steps: int,
                  loss_fn: LossFn = F.cross_entropy) -> Tensor:
    """A client's FedAvg update as a gradient-like attack target (Geiping et al. 2020, §5), flat ``(dθ,)``.

    The client runs ``steps`` full-batch plain SGD steps ``θ ← θ − lr·∇θL(x, y)``
    (no momentum, no weight decay) from the model's θ; the target is
    ``−(θ_after − θ_before) / (lr · steps)``, the mean gradient along the path.
    For ``steps = 1`` it is exactly ``g(x)``; for more steps attacking it as
    if it were ``∇θL`` at the starting θ is an **approximation** (Geiping
    attack the update by unrolling the steps; we do not). The model is not changed.
    """
    if lr <= 0 or steps < 1:
        raise ConfigError(f"fedavg_target needs lr > 0 and steps >= 1, got lr={lr}, steps={steps}")
    start = {k: p.detach() for k, p in trainable(model).items()}
    fixed = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))

    def loss(params: dict[str, Tensor]) -> Tensor:
        return loss_fn(functional_call(model, {**fixed, **params}, (x,)), y)

    params = dict(start)
    for _ in range(steps):
        step = grad(loss)(params)
        params = {k: params[k] - lr * step[k] for k in params}
    return -(flatten(params) - flatten(start)) / (lr * steps)


# ------------------------------------------------------------ objectives


def matching_loss(g_hat: Tensor, g: Tensor, objective: str) -> Tensor:
    """``R(ĝ, g)`` of spec §2: ``"l2"`` = ``‖ĝ − g‖²`` (sum), ``"sim"`` = ``1 − cos(ĝ, g)`` (global)."""
    if objective == "l2":
        return (g_hat - g).pow(2).sum()
    if objective == "sim":
        return 1 - (g_hat @ g) / (g_hat.norm() * g.norm()).clamp_min(torch.finfo(g.dtype).tiny)
    raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")


def total_variation(x: Tensor) -> Tensor:
    """Anisotropic TV of an image batch ``(B, C, H, W)``: mean ``|Δ_h x|`` + mean ``|Δ_w x|`` (Geiping's prior)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


# ------------------------------------------------------------ the loop


def reconstruct(model: nn.Module, g: Tensor | Sequence[Tensor] | Mapping[str, Tensor], x_shape: Sequence[int],
                labels: Tensor | None = None, *, objective: Literal["l2", "sim"] = "l2",
                optimizer: Literal["adam", "lbfgs"] = "adam", lr: float | None = None, iterations: int = 1000,
                restarts: int = 1, init: Tensor | None = None, generator: torch.Generator | None = None,
                signed: bool = False, box: tuple[float, float] | None = None, schedule: bool = False,
                tv: float = 0.0, loss_fn: LossFn = F.cross_entropy,
                optimizer_options: Mapping[str, Any] | None = None) -> AttackResult:
    """Gradient inversion ``x̂ = argmin R(∇θL(x, y), g) + tv·TV(x)`` with restarts (spec §2, §6.6).

    Each restart starts from ``init`` or ``N(0, 1)`` in model-input space drawn
    from ``generator``, runs ``iterations`` optimizer steps, and is scored by its
    final matching loss ``R`` (no TV); the restart with the lowest ``R`` is kept
    (a NaN counts as ``inf``), as spec §6.6 prescribes.

    Args:
        model: maps ``x`` to logits; used as is (put it in ``eval()``, spec §2), never modified.
        g: the shared gradient, flat ``(dθ,)`` or parameter-shaped (:func:`flat_target`).
        x_shape: shape of the input batch ``(B, *input)``.
        labels: ``(B,)`` class indices; None recovers them by :func:`idlg_label` (B = 1 only).
        objective: ``"l2"`` (DLG) or ``"sim"`` (Inverting Gradients), spec §2.
        optimizer: ``"adam"`` (one step per iteration) or ``"lbfgs"`` (``torch.optim.LBFGS``, strong-Wolfe
            line search; one iteration = one ``step`` of up to 20 inner iterations, unless
            ``optimizer_options`` sets ``max_iter``).
        lr: step size; None = 0.1 for Adam (spec §2), 1.0 for L-BFGS.
        iterations: optimizer steps per restart (T).
        restarts: independent runs; the one with the lowest final ``R`` is returned.
        init: the start, ``x_shape`` (every restart starts there) or ``(restarts, *x_shape)`` (one each);
            None draws ``N(0, 1)`` from ``generator``.
        generator: seeds the random starts (the global RNG when None).
        signed: feed Adam ``sign(∇x̂R)`` instead of ``∇x̂R`` (Inverting Gradients).
        box: ``(lo, hi)``: clamp ``x̂`` after every step; ``((0 − m)/s, (1 − m)/s)`` for data normalized by m, s.
        schedule: MultiStepLR, γ = 0.1 at 3/8, 5/8, 7/8 of T (Inverting Gradients, spec §2).
        tv: weight of the total-variation prior (images ``(B, C, H, W)`` only); spec §2's code uses 0.
        loss_fn: the client's loss ``L(logits, y)``; batch-mean cross-entropy (spec §1).
        optimizer_options: extra keyword arguments of the torch optimizer. L-BFGS defaults here to
            ``tolerance_grad = tolerance_change = 0`` (run the whole budget): torch's absolute defaults
            (1e-7, 1e-9) stop before the first step when ``R`` is small (measured: at σ = 1e-5 noise on
            digits ``R ≈ 2e-7`` and x̂ stayed at its start). torch also skips curvature pairs with
            ``yᵀs ≤ 1e-10``, so on very small ``R`` L-BFGS slows towards steepest descent.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if iterations < 1 or restarts < 1:
        raise ConfigError(f"iterations and restarts must be >= 1, got {iterations} and {restarts}")
    if signed and optimizer != "adam" or schedule and optimizer != "adam":
        raise ConfigError("signed gradients and the step schedule need optimizer='adam'")
    x_shape = tuple(int(n) for n in x_shape)
    if tv and len(x_shape) != 4:
        raise ConfigError(f"the TV prior needs images (B, C, H, W), got x_shape {x_shape}")
    if box is not None and not box[0] < box[1]:
        raise ConfigError(f"box must be (lo, hi) with lo < hi, got {box}")
    target = flat_target(model, g)
    dtype = target.dtype
    labels = _labels(model, target, labels, x_shape[0])
    starts = _starts(init, x_shape, restarts, generator, dtype, target.device)
    gmap = GradientMap(model, starts[0], labels, dtype=dtype, loss_fn=loss_fn)
    lr = DEFAULT_LR[optimizer] if lr is None else lr

    def objective_fn(x: Tensor) -> tuple[Tensor, Tensor]:
        match = matching_loss(gmap.grad(x), target, objective)
        return (match + tv * total_variation(x) if tv else match), match

    finals, xs = [], []
    for start in starts:
        x = _run(objective_fn, start, optimizer, lr, iterations, signed, box, schedule, dict(optimizer_options or {}))
        with torch.enable_grad():
            final = objective_fn(x)[1].detach()
        finals.append(torch.where(torch.isnan(final), torch.inf, final))
        xs.append(x)
    losses = torch.stack(finals)
    best = int(losses.argmin())
    return AttackResult(xs[best], float(losses[best]), labels, losses, best)


def _labels(model: nn.Module, target: Tensor, labels: Tensor | None, batch: int) -> Tensor:
    if labels is None:
        if batch != 1:
            raise ConfigError(f"iDLG label recovery supports a batch of one; pass labels for B = {batch}")
        return idlg_label(model, target)
    if labels.shape != (batch,) or labels.is_floating_point():
        raise DataError(f"labels must be integer class indices of shape ({batch},), got {labels.dtype} "
                        f"{tuple(labels.shape)}")
    return labels


def _starts(init: Tensor | None, x_shape: tuple[int, ...], restarts: int, generator: torch.Generator | None,
            dtype: torch.dtype, device: torch.device) -> Tensor:
    """The ``(restarts, *x_shape)`` starting points."""
    if init is None:
        return torch.randn((restarts, *x_shape), generator=generator, dtype=dtype, device=device)
    init = init.detach().to(dtype)
    if tuple(init.shape) == x_shape:
        return init.expand(restarts, *x_shape)
    if tuple(init.shape) == (restarts, *x_shape):
        return init
    raise DataError(f"init must have shape {x_shape} or ({restarts}, *{x_shape}), got {tuple(init.shape)}")


def _run(objective_fn: Callable[[Tensor], tuple[Tensor, Tensor]], start: Tensor, optimizer: str, lr: float,
         iterations: int, signed: bool, box: tuple[float, float] | None, schedule: bool,
         options: dict[str, Any]) -> Tensor:
    """One restart: ``iterations`` optimizer steps from ``start``; returns the detached final ``x̂``."""
    x = start.clone().requires_grad_(True)
    if optimizer == "lbfgs":
        options.setdefault("line_search_fn", "strong_wolfe")
        options.setdefault("tolerance_grad", 0.0)  # torch's absolute 1e-7 / 1e-9 stop at once when R is tiny
        options.setdefault("tolerance_change", 0.0)
        opt: torch.optim.Optimizer = torch.optim.LBFGS([x], lr=lr, **options)
    else:
        opt = torch.optim.Adam([x], lr=lr, **options)
    milestones = sorted({max(1, int(iterations * m)) for m in MILESTONES})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1) if schedule else None

    def closure() -> Tensor:
        opt.zero_grad()
        total = objective_fn(x)[0]
        (gx,) = torch.autograd.grad(total, x)
        x.grad = gx.sign() if signed else gx
        return total.detach()

    with torch.enable_grad():
        for _ in range(iterations):
            opt.step(closure)
            if box is not None:
                with torch.no_grad():
                    x.clamp_(*box)
            if sched is not None:
                sched.step()
    return x.detach()


# ------------------------------------------------------------ presets


def dlg(model: nn.Module, g: Tensor | Sequence[Tensor] | Mapping[str, Tensor], x_shape: Sequence[int],
        labels: Tensor | None = None, *, optimizer: Literal["adam", "lbfgs"] = "adam", lr: float | None = None,
        iterations: int = 1000, restarts: int = 1, init: Tensor | None = None,
        generator: torch.Generator | None = None, optimizer_options: Mapping[str, Any] | None = None) -> AttackResult:
    """DLG (Zhu et al. 2019; spec §2 ``l2``): ``R = Σ ‖∇θL(x̂) − g‖²``, plain gradients, no box, fixed lr.

    Spec §2's code runs Adam at lr 0.1 with the true label; the original DLG
    used L-BFGS (``optimizer="lbfgs"``) with learned soft labels (not done
    here: labels are given or recovered by iDLG). See :func:`reconstruct`.
    """
    return reconstruct(model, g, x_shape, labels, objective="l2", optimizer=optimizer, lr=lr, iterations=iterations,
                       restarts=restarts, init=init, generator=generator, optimizer_options=optimizer_options)


def inverting_gradients(model: nn.Module, g: Tensor | Sequence[Tensor] | Mapping[str, Tensor],
                        x_shape: Sequence[int], labels: Tensor | None = None, *, mean: float = 0.0, std: float = 1.0,
                        lr: float = 0.1, iterations: int = 1000, restarts: int = 1, tv: float = 0.0,
                        init: Tensor | None = None, generator: torch.Generator | None = None) -> AttackResult:
    """Inverting Gradients (Geiping et al. 2020, Eq. 4; spec §2 ``sim``) as in the I2F code.

    Global cosine distance ``1 − cos(∇θL(x̂), g)`` over all layers, Adam fed
    ``sign(∇x̂R)``, ``x̂`` clamped to ``[(0 − m)/s, (1 − m)/s]`` after every step
    (``mean`` m, ``std`` s of the data normalization; 0 and 1 for raw [0, 1]
    inputs), MultiStepLR γ = 0.1 at 3/8, 5/8, 7/8 of T, TV weight ``tv``
    (spec's code: 0; Geiping: > 0). See :func:`reconstruct`.
    """
    if std <= 0:
        raise ConfigError(f"std must be > 0, got {std}")
    box = ((0.0 - mean) / std, (1.0 - mean) / std)
    return reconstruct(model, g, x_shape, labels, objective="sim", optimizer="adam", lr=lr, iterations=iterations,
                       restarts=restarts, init=init, generator=generator, signed=True, box=box, schedule=True, tv=tv)
