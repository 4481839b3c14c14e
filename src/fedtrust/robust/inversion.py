"""Trigger inversion (Neural Cleanse / FLIP): the smallest mask and pattern that flip images to a target.

FLIP (Zhang et al., ICLR 2023) hardens benign clients with triggers inverted
from their own model; the primitive is Neural Cleanse's (Wang et al., S&P 2019,
§IV-A, "reverse engineering triggers") as FLIP's code runs it (docs: ``shared/specs/flip.md`` §2
"Inversion primitive"). For trigger ``k`` with raw variables ``(a_k, b_k)``::

    m_k  = tanh(a_k) / 2 + 1/2                 mask, (H, W), shared over channels
    p_k  = tanh(b_k) / 2 + 1/2                 pattern, (C, H, W)
    x'   = (1 − m_k) ⊙ x + m_k ⊙ p_k           stamped input, in [0, 1] when x is
    L    = Σ_k [ CE_k + λ_k · ‖m_k‖₁ ]         CE_k: mean CE(f(normalize(x')), t_k) over trigger k's images

``f`` is the model in eval mode, its tensors detached (no gradient reaches or
changes them); ``normalize`` maps [0, 1] pixels to what ``f`` was trained on.
Adam (lr 0.1, betas (0.5, 0.9), eps 1e-8, as ``torch.optim.Adam``) updates
``(a, b)``; ``hit_k`` is the fraction of trigger k's stamped images that ``f``
classifies as ``t_k`` (the attack accuracy).

**Adaptive λ** (per trigger, start ``lam0`` = 1e-3). Two counters per trigger,
updated after every step from that step's ``hit_k``: ``up`` counts consecutive
steps with ``hit_k ≥ τ_inv`` and ``down`` consecutive steps below it (a step
resets the other counter to 0). When ``up`` reaches ``patience`` (10), λ ← λ·1.5
and ``up`` ← 0; when ``down`` reaches 10, λ ← λ / 1.5^1.5 and ``down`` ← 0. So
with τ_inv met from step 0 on, steps 0–9 use lam0, steps 10–19 use 1.5·lam0, ...
The new λ is used from the next step on.

**Best trigger.** A step whose ``hit_k ≥ τ_inv`` and whose ``‖m_k‖₁`` is below
the best so far becomes the best (mask, pattern and raw ``(a_k, b_k)`` of that
step, i.e. before its update). Each time, ``(a_k, b_k)`` restart from the best
plus U(−0.01, 0.01) noise. GUESS: the restart happens *before* that step's Adam
update, which is then applied with the gradient taken at the best, so an
improving run keeps moving (restarting after the update would throw away every
improving step; ``test_improving_run_keeps_shrinking`` checks this). Adam's
moments are kept across restarts. If ``hit_k`` never reaches τ_inv the returned
mask is all zeros (stamping is then the identity) and ``reached`` is False.

**Start** (spec §7.3: no knowledge of the trigger's location): ``a`` and ``b``
are drawn U(−``init_range``, ``init_range``) from the caller's generator (mask
values in (0.12, 0.88) by default), unless a warm start ``init`` gives the raw
``(a, b)`` of an earlier inversion of the same pair (``Trigger.raw``; FLIP's
per-pair cache). The random start is drawn even when warm-started, so the
noise that follows does not depend on which triggers were warm.

**Layout.** ``K`` triggers are optimised together on a leading axis: one image
batch, a ``group`` index (N,) saying which trigger stamps each image, one forward.
K = 1 is :func:`invert_trigger`; K = 2 is :func:`invert_pair` (FLIP's
``TriggerCombo``: s→t on the source images, t→s on the target's; the loss is
the sum, so with Adam being elementwise the two are exactly two independent
inversions sharing forwards). :func:`inversion_step` is a pure function of
tensors (state, noise, images, a ``logits_fn``) with no host syncs, so it can be
``torch.func.vmap``-ed over a leading client axis with ``functional_call`` in
``logits_fn``; the drivers here run it for one model or vmap it over a batch of jobs.
Every step's noise (used only by restarting triggers) is drawn on the generator's
device before the loop and moved to the images', so the result depends only on the
generator, not on the device.

**Eager steps.** A lone job solved eagerly (on a CPU) takes its gradient with ``torch.autograd`` on a
private copy of the model holding the job's weights (:func:`autograd_gradient`, :func:`_bound_model`), whose
thin convolutions run on ATen's kernels (:data:`ATEN_CONV_MAX_IN_CHANNELS`): 1.1–1.7× the ``torch.func``
step on a CPU, the vmapped and recorded paths keep the pure one.

**Recorded steps.** Being pure and free of host syncs, the step can also be recorded
as a CUDA graph: on a GPU :func:`_run_steps` records it once per shape (the job's
images padded to a multiple of :data:`BUCKET`) and replays it every step, the state
written back in place (:class:`_StaticStep`, :func:`use_cuda_graphs`).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

from fedtrust.errors import ConfigError

Raw = tuple[Tensor, Tensor]
"""The raw variables ``(a, b)`` of one trigger: shapes (H, W) and (C, H, W)."""
LogitsFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class InversionParams:
    """Hyperparameters of one inversion (flip.md §2; FLIP hard-codes them, CIFAR uses ``tau_inv`` 0.85)."""

    lam0: float = 1e-3
    """Initial weight λ of the mask's L1 norm."""
    tau_inv: float = 0.9
    """Attack accuracy a step needs to count as a success (τ_inv)."""
    lr: float = 0.1
    """Adam learning rate on the raw variables (a, b)."""
    betas: tuple[float, float] = (0.5, 0.9)
    eps: float = 1e-8
    patience: int = 10
    """Consecutive successes (failures) before λ goes up (down)."""
    lam_up: float = 1.5
    """λ ← λ · lam_up after ``patience`` successes."""
    lam_down: float = 1.5**1.5
    """λ ← λ / lam_down after ``patience`` failures."""
    restart_noise: float = 0.01
    """Half-width of the uniform noise added to (a, b) when they restart from an improved best."""
    init_range: float = 1.0
    """Random start: a, b ~ U(−init_range, init_range)."""

    def __post_init__(self) -> None:
        checks = {
            "lam0": self.lam0 >= 0, "tau_inv": 0 < self.tau_inv <= 1, "lr": self.lr > 0,
            "betas": all(0 <= b < 1 for b in self.betas) and len(self.betas) == 2, "eps": self.eps > 0,
            "patience": self.patience >= 1, "lam_up": self.lam_up >= 1, "lam_down": self.lam_down >= 1,
            "restart_noise": self.restart_noise >= 0, "init_range": self.init_range >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"invalid inversion params {bad}: {self}")


@dataclass(frozen=True)
class Trigger:
    """An inverted trigger: ``stamp(x) = (1 − mask) ⊙ x + mask ⊙ pattern``.

    ``mask`` (H, W) is all zeros when ``reached`` is False (τ_inv was never met),
    so stamping is then the identity. ``l1`` is ``‖mask‖₁``. ``raw`` is the
    ``(a, b)`` to warm-start the next inversion of the same pair with: the best's
    when reached, else the last step's. ``lam`` is the final λ. ``history`` holds
    per-step tensors (steps,): ``hit`` (attack accuracy), ``l1``, ``ce`` and ``lam``
    (the λ that step used), all taken before the step's update.
    """

    mask: Tensor
    pattern: Tensor
    l1: float
    reached: bool
    raw: Raw
    lam: float
    history: dict[str, Tensor] = field(default_factory=dict, repr=False)

    def stamp(self, x: Tensor) -> Tensor:
        """Stamp images ``x`` (N, C, H, W) or (C, H, W) in [0, 1]."""
        return stamp(x, self.mask, self.pattern)


class TriggerPair(NamedTuple):
    """The two triggers of a symmetric pair: source→target and target→source."""

    s_to_t: Trigger
    t_to_s: Trigger


class InversionState(NamedTuple):
    """Everything one inversion carries between steps (K triggers on the leading axis); a pytree for vmap."""

    a: Tensor  # (K, H, W) raw mask
    b: Tensor  # (K, C, H, W) raw pattern
    m_a: Tensor  # Adam first and second moments of a and b
    v_a: Tensor
    m_b: Tensor
    v_b: Tensor
    t: Tensor  # () Adam steps taken
    lam: Tensor  # (K,) λ for the next step
    up: Tensor  # (K,) consecutive steps with hit ≥ τ_inv
    down: Tensor  # (K,) consecutive steps with hit < τ_inv
    best_l1: Tensor  # (K,) smallest ‖m‖₁ among successful steps; inf until one
    best_a: Tensor  # (K, H, W) raw variables of the best
    best_b: Tensor  # (K, C, H, W)


# ---------------------------------------------------------------- pure pieces


def to_mask(a: Tensor) -> Tensor:
    """m = tanh(a)/2 + 1/2, in (0, 1)."""
    return torch.tanh(a) / 2 + 0.5


def stamp(x: Tensor, mask: Tensor, pattern: Tensor) -> Tensor:
    """x' = (1 − m) ⊙ x + m ⊙ p; ``mask`` broadcasts over channels ((H, W) or (N, 1, H, W))."""
    return (1 - mask) * x + mask * pattern


def init_state(a: Tensor, b: Tensor, lam0: float) -> InversionState:
    """A fresh state from raw ``a`` (K, H, W) and ``b`` (K, C, H, W): λ = lam0, no best yet."""
    k = a.shape[0]
    zeros = torch.zeros(k, dtype=torch.int64, device=a.device)
    return InversionState(
        a, b, torch.zeros_like(a), torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(b),
        torch.zeros((), dtype=a.dtype, device=a.device), torch.full((k,), lam0, dtype=a.dtype, device=a.device),
        zeros, zeros.clone(), torch.full((k,), float("inf"), dtype=a.dtype, device=a.device), a.clone(), b.clone(),
    )


def _objective(raw: Raw, lam: Tensor, logits_fn: LogitsFn, images: Tensor, group: Tensor, target: Tensor):
    """L = Σ_k CE_k + λ_k ‖m_k‖₁ and, as aux, the per-trigger (hit, ‖m‖₁, CE)."""
    a, b = raw
    mask, pattern = to_mask(a), to_mask(b)
    k = a.shape[0]
    slot = group.clamp(max=k - 1)  # padding images (group == K, batched jobs) take any trigger, then count 0
    logits = logits_fn(stamp(images, mask[slot].unsqueeze(1), pattern[slot]))
    member = (group.unsqueeze(1) == torch.arange(k, device=group.device)).to(images.dtype)  # (N, K)
    count = member.sum(0).clamp(min=1)  # sums of 0/1 are exact: hit = 9/10 is the float nearest 0.9, as τ_inv
    ce = (F.cross_entropy(logits, target, reduction="none") @ member) / count
    hit = ((logits.argmax(1) == target).to(images.dtype) @ member) / count
    l1 = mask.sum((1, 2))
    return (ce + lam * l1).sum(), (hit.detach(), l1.detach(), ce.detach())


def functorch_gradient(raw: Raw, lam: Tensor, logits_fn: LogitsFn, images: Tensor, group: Tensor,
                       target: Tensor) -> tuple[Raw, tuple[Tensor, Tensor, Tensor]]:
    """∂L/∂(a, b) of :func:`_objective` and its aux by ``torch.func.grad``: a pure function, so the step can
    be vmapped over jobs and recorded as a CUDA graph."""
    return grad(_objective, has_aux=True)(raw, lam, logits_fn, images, group, target)


def autograd_gradient(raw: Raw, lam: Tensor, logits_fn: LogitsFn, images: Tensor, group: Tensor,
                      target: Tensor) -> tuple[Raw, tuple[Tensor, Tensor, Tensor]]:
    """The same gradient by ``torch.autograd.grad`` on a model called directly: the eager single-job step.

    The same kernels as :func:`functorch_gradient`, so the same numbers: to the bit in float64 and on the
    1-channel models benchmarked (a 3-channel pattern's gradient may differ in its last bit, its broadcast
    summed in another order), without ``torch.func``'s wrapping of every tensor or ``functional_call``'s
    swapping of the weights each step (LeNet on 12 MNIST images: 7.6 → 6.8 ms a step on one CPU thread;
    ``benchmarks/results/inversion_cpu.md``)."""
    a, b = (r.detach().requires_grad_(True) for r in raw)
    with torch.enable_grad():
        loss, aux = _objective((a, b), lam, logits_fn, images, group, target)
        g_a, g_b = torch.autograd.grad(loss, (a, b))
    return (g_a, g_b), aux


def inversion_step(
    state: InversionState, noise: Raw, logits_fn: LogitsFn, images: Tensor, group: Tensor, target: Tensor,
    params: InversionParams, gradient: Callable[..., tuple[Raw, tuple[Tensor, Tensor, Tensor]]] = functorch_gradient,
) -> tuple[InversionState, dict[str, Tensor]]:
    """One step for K triggers: loss and gradient, best and restart, Adam, adaptive λ (module docstring).

    Args:
        state: the current state (K triggers).
        noise: U(−1, 1) draws shaped like ``(state.a, state.b)``, scaled here by ``params.restart_noise``.
        logits_fn: stamped [0, 1] images → logits (normalisation and the model's tensors bound inside).
        images: (N, C, H, W) in [0, 1]; ``group`` (N,) which trigger stamps each; ``target`` (N,) its target.
        gradient: how ∂L/∂(a, b) is taken: :func:`functorch_gradient` (pure: vmap, CUDA graphs) or
            :func:`autograd_gradient` (eager, a model with its own weights in ``logits_fn``).

    Returns:
        the next state and this step's ``hit``, ``l1``, ``ce``, ``lam`` (each (K,)).
    """
    s, p = state, params
    (g_a, g_b), (hit, l1, ce) = gradient((s.a, s.b), s.lam, logits_fn, images, group, target)
    ok = hit >= p.tau_inv
    better = ok & (l1 < s.best_l1)
    ba, bb = better.view(-1, 1, 1), better.view(-1, 1, 1, 1)
    best_l1 = torch.where(better, l1, s.best_l1)
    best_a, best_b = torch.where(ba, s.a, s.best_a), torch.where(bb, s.b, s.best_b)
    a = torch.where(ba, s.a + p.restart_noise * noise[0], s.a)  # restart from the best (this step's) + noise
    b = torch.where(bb, s.b + p.restart_noise * noise[1], s.b)

    t = s.t + 1  # Adam, as torch.optim.Adam (no weight decay, no amsgrad)
    (b1, b2), c1, c2 = p.betas, 1 - p.betas[0] ** t, 1 - p.betas[1] ** t
    m_a, m_b = b1 * s.m_a + (1 - b1) * g_a, b1 * s.m_b + (1 - b1) * g_b
    v_a, v_b = b2 * s.v_a + (1 - b2) * g_a * g_a, b2 * s.v_b + (1 - b2) * g_b * g_b
    a = a - p.lr / c1 * m_a / ((v_a / c2).sqrt() + p.eps)
    b = b - p.lr / c1 * m_b / ((v_b / c2).sqrt() + p.eps)

    up, down = torch.where(ok, s.up + 1, 0), torch.where(ok, 0, s.down + 1)
    raise_, lower = up >= p.patience, down >= p.patience
    lam = torch.where(raise_, s.lam * p.lam_up, torch.where(lower, s.lam / p.lam_down, s.lam))
    up, down = torch.where(raise_, 0, up), torch.where(lower, 0, down)
    nxt = InversionState(a, b, m_a, v_a, m_b, v_b, t, lam, up, down, best_l1, best_a, best_b)
    return nxt, {"hit": hit, "l1": l1, "ce": ce, "lam": s.lam}


# ---------------------------------------------------------------- drivers (one model)


def invert_trigger(
    model: nn.Module, images: Tensor, target: int, steps: int, generator: torch.Generator, *,
    normalize: Callable[[Tensor], Tensor] | None = None, params: InversionParams = InversionParams(),
    init: Raw | None = None,
) -> Trigger:
    """Invert the smallest trigger that makes ``model`` classify ``images`` as ``target``.

    Args:
        model: the classifier; put in eval mode for the inversion, its mode restored after; never changed.
        images: (N, C, H, W) in [0, 1], normally none of class ``target``; the trigger's device and dtype.
        target: the class the trigger should flip to.
        steps: Adam steps, each on all of ``images``.
        generator: the only source of randomness (random start, restart noise).
        normalize: applied to stamped images before the model (identity when None).
        params: hyperparameters.
        init: warm start, the ``raw`` of an earlier :class:`Trigger` of the same pair.
    """
    _check_images(images, "images")
    group = torch.zeros(len(images), dtype=torch.int64, device=images.device)
    targets = torch.full_like(group, target)
    (trig,) = _invert(model, images, group, targets, 1, steps, generator, normalize, params, [init])
    return trig


def invert_pair(
    model: nn.Module, x_s: Tensor, x_t: Tensor, s: int, t: int, steps: int, generator: torch.Generator, *,
    normalize: Callable[[Tensor], Tensor] | None = None, params: InversionParams = InversionParams(),
    init: tuple[Raw | None, Raw | None] | None = None,
) -> TriggerPair:
    """Invert s→t (stamped on ``x_s``) and t→s (on ``x_t``) jointly, each with its own λ (FLIP ``TriggerCombo``).

    ``init`` warm-starts either trigger (``(raw_st, raw_ts)``, either may be None).
    Other arguments as :func:`invert_trigger`.
    """
    _check_images(x_s, "x_s")
    _check_images(x_t, "x_t")
    if x_s.shape[1:] != x_t.shape[1:]:
        raise ConfigError(f"x_s and x_t must share (C, H, W), got {tuple(x_s.shape[1:])} and {tuple(x_t.shape[1:])}")
    images = torch.cat([x_s, x_t])
    group = torch.cat([torch.zeros(len(x_s), dtype=torch.int64), torch.ones(len(x_t), dtype=torch.int64)])
    targets = torch.where(group == 0, t, s)
    inits = list(init) if init is not None else [None, None]
    st, ts = _invert(model, images, group.to(images.device), targets.to(images.device), 2, steps, generator,
                     normalize, params, inits)
    return TriggerPair(st, ts)


def _invert(
    model: nn.Module, images: Tensor, group: Tensor, target: Tensor, k: int, steps: int,
    generator: torch.Generator, normalize: Callable[[Tensor], Tensor] | None, params: InversionParams,
    inits: list[Raw | None],
) -> list[Trigger]:
    weights = {name: v.detach() for name, v in [*model.named_parameters(), *model.named_buffers()]}
    job = InversionJob(model, weights, images, group, target, k, steps, generator, params.lam0, inits,
                       normalize, params)
    return InversionJob.solve_batch([job])[0]


@dataclass(eq=False)
class InversionJob:
    """One inversion of ``k`` triggers on one model, to run alone or batched with others of its shape.

    A :class:`~fedtrust.fl.programs.Request`: jobs with equal :meth:`batch_key` (same architecture ``shell``,
    ``k``, ``steps``, image shape, ``params`` and ``normalize``) run together in :meth:`solve_batch`, one
    ``vmap``-ed :func:`inversion_step` per step over a leading job axis (their weights stacked, their images
    padded to the longest with images no trigger owns). Each job draws its random start and noise from its
    own ``generator`` exactly as it would alone, so a batched job's triggers equal its lone solve up to
    floating-point summation order. ``lam0`` overrides ``params.lam0`` (it may differ within a batch).
    """

    shell: nn.Module
    """The architecture, called as ``functional_call(shell, weights, x)`` in eval mode; never changed."""
    weights: dict[str, Tensor]
    """This job's parameters and buffers, by name (detached)."""
    images: Tensor
    group: Tensor
    target: Tensor
    k: int
    steps: int
    generator: torch.Generator
    lam0: float
    inits: list[Raw | None]
    normalize: Callable[[Tensor], Tensor] | None
    params: InversionParams

    def batch_key(self) -> tuple:
        return (id(self.shell), self.k, self.steps, tuple(self.images.shape[1:]), self.images.dtype,
                self.images.device, self.params, self.normalize)

    @classmethod
    def solve_batch(cls, jobs: list["InversionJob"]) -> list[list[Trigger]]:
        """Each job's ``k`` triggers; jobs must share :meth:`batch_key` (vmapped when there are several)."""
        if not jobs:
            return []
        first = jobs[0]
        if first.steps < 0:
            raise ConfigError(f"steps must be >= 0, got {first.steps}")
        if any(j.batch_key() != first.batch_key() for j in jobs):
            raise ConfigError("inversion jobs solved together must share architecture, k, steps, image shape, "
                              "params and normalize")
        if len({id(j.generator) for j in jobs}) < len(jobs):  # a shared generator: its draws are ordered
            return [t for j in jobs for t in cls.solve_batch_of_one(j)]
        if len(jobs) == 1:
            return cls.solve_batch_of_one(first)
        return _solve_stacked(jobs)

    @staticmethod
    def solve_batch_of_one(job: "InversionJob") -> list[list[Trigger]]:
        a, b = _start(job.k, tuple(job.images.shape[1:]), job.generator, job.images, job.params, job.inits)
        noise = _step_noise(a.shape, b.shape, job.steps, job.generator, job.images)
        images, group, target = job.images, job.group, job.target
        if _static_mode(images.device) is not None:  # one shape per bucket, so recorded steps are reused
            images, group, target = _pad_images(images, group, target, _bucket(len(images)), job.k)
            step, args = _step_fn(job), (job.weights, images, group, target)
        else:  # eager: autograd on a private copy of the model holding the job's weights
            step, args = _bound_step_fn(job), (images, group, target)
        state, hist = _run_steps(step, init_state(a, b, job.lam0), noise, args, job.steps,
                                 ("one", *job.batch_key()), job.shell)
        return [_triggers(state, hist if hist is not None else _no_history(job.k, job.images))]


def _step_fn(job: InversionJob) -> Callable[..., tuple[InversionState, dict[str, Tensor]]]:
    """``(state, noise, weights, images, group, target) -> (state, stats)``: one :func:`inversion_step` with the
    job's architecture, normalisation and params (the same for every job of its :meth:`~InversionJob.batch_key`)."""
    norm = job.normalize if job.normalize is not None else (lambda x: x)
    shell, params = job.shell, job.params

    def one(st: InversionState, noise: Raw, w: dict[str, Tensor], x: Tensor, grp: Tensor, tgt: Tensor):
        return inversion_step(st, noise, lambda z: functional_call(shell, w, (norm(z),)), x, grp, tgt, params)

    return one


def _bound_step_fn(job: InversionJob) -> Callable[..., tuple[InversionState, dict[str, Tensor]]]:
    """``(state, noise, images, group, target) -> (state, stats)``: one :func:`inversion_step` by
    :func:`autograd_gradient` on :func:`_bound_model` (the eager step of a lone job)."""
    model = _bound_model(job.shell, job.weights)
    norm = job.normalize if job.normalize is not None else (lambda x: x)
    params = job.params

    def one(st: InversionState, noise: Raw, x: Tensor, grp: Tensor, tgt: Tensor):
        return inversion_step(st, noise, lambda z: model(norm(z)), x, grp, tgt, params, autograd_gradient)

    return one


def _bound_model(shell: nn.Module, weights: dict[str, Tensor]) -> nn.Module:
    """A copy of ``shell`` in eval mode whose parameters and buffers are ``weights`` (shared, not copied; no
    gradient reaches them), so the shared ``shell`` is never touched."""
    model = copy.deepcopy(shell).eval()
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    if names != set(weights):
        raise ConfigError(f"inversion weights do not fit the model: missing {sorted(names - set(weights))}, "
                          f"unexpected {sorted(set(weights) - names)}")
    for name, value in weights.items():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        if leaf in module._parameters:
            module._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[leaf] = value
    for module in model.modules():
        if _thin_cpu_conv(module):
            module.forward = _AtenConv.bind(module)  # this copy's instance only
    return model


ATEN_CONV_MAX_IN_CHANNELS = 3
"""On a CPU, a lone inversion runs every plain, ungrouped ``nn.Conv2d`` with at most this many input channels
(an image model's first layer) on ATen's kernels instead of oneDNN's (:class:`_AtenConv`). 0: never.

oneDNN's input gradient for such thin convolutions is slow on the CPUs measured (one thread, 12 images, AMD
EPYC): 1.75 ms against ATen's 0.19 for LeNet's 1→20 5×5 conv on 28×28, 1.22 against 0.45 for 3→32 3×3 on
32×32, while wider layers are as fast or faster on oneDNN (32→64 3×3 on 14×14: 0.93 against 1.43), so the
choice is per layer, not global (``benchmarks/inversion_cpu.py``). The numbers differ from oneDNN's by float
rounding only."""


def _thin_cpu_conv(module: nn.Module) -> bool:
    """Whether ``module`` is a plain, zero-padded ``nn.Conv2d`` on the CPU thin enough for :class:`_AtenConv`."""
    return (type(module) is nn.Conv2d and module.weight.device.type == "cpu" and module.padding_mode == "zeros"
            and isinstance(module.padding, tuple) and module.groups == 1
            and module.in_channels <= ATEN_CONV_MAX_IN_CHANNELS
            and torch.backends.mkldnn.is_available() and bool(torch.backends.mkldnn.enabled))


class _AtenConv(torch.autograd.Function):
    """A frozen convolution (no gradient to its weights) whose forward and input gradient run with oneDNN off.

    The switch is torch's global ``torch.backends.mkldnn.enabled``, turned off for the one op and restored."""

    @staticmethod
    def forward(ctx, x: Tensor, conv: nn.Conv2d) -> Tensor:  # type: ignore[override]
        ctx.conv, ctx.shape = conv, x.shape
        with _onednn_off():
            return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        c = ctx.conv
        with _onednn_off():
            return torch.nn.grad.conv2d_input(ctx.shape, c.weight, grad_out, c.stride, c.padding, c.dilation,
                                              c.groups), None

    @staticmethod
    def bind(conv: nn.Conv2d) -> Callable[[Tensor], Tensor]:
        return lambda x: _AtenConv.apply(x, conv)


@contextlib.contextmanager
def _onednn_off():
    was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was


def _solve_stacked(jobs: list[InversionJob]) -> list[list[Trigger]]:
    """Several jobs of one key: one vmapped step over the stacked jobs (:meth:`InversionJob.solve_batch`)."""
    first = jobs[0]
    n = max(len(j.images) for j in jobs)
    if _static_mode(first.images.device) is not None:
        n = _bucket(n)
    padded = [_pad_images(j.images, j.group, j.target, n, first.k) for j in jobs]
    images, group, target = (torch.stack(parts) for parts in zip(*padded))
    weights = {name: torch.stack([j.weights[name] for j in jobs]) for name in first.weights}
    starts = [_start(j.k, tuple(j.images.shape[1:]), j.generator, j.images, j.params, j.inits) for j in jobs]
    state = _stack_states([init_state(a, b, j.lam0) for (a, b), j in zip(starts, jobs)])
    draws = [_step_noise(starts[0][0].shape, starts[0][1].shape, first.steps, j.generator, j.images) for j in jobs]
    noise_a, noise_b = (torch.stack(d, dim=1) for d in zip(*draws))  # (steps, jobs, ...)
    step = torch.func.vmap(_step_fn(first), randomness="error")
    state, hist = _run_steps(step, state, (noise_a, noise_b), (weights, images, group, target), first.steps,
                             ("stacked", *first.batch_key()), first.shell)
    out = []
    for i, job in enumerate(jobs):
        own = InversionState(*(leaf[i] for leaf in state))
        out.append(_triggers(own, {k: v[:, i] for k, v in hist.items()} if hist is not None
                             else _no_history(job.k, job.images)))
    return out


def _pad_images(images: Tensor, group: Tensor, target: Tensor, n: int, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pad a job's images to ``n`` with zero images that no trigger owns (group ``k``: they count nowhere)."""
    extra = n - len(images)
    return (F.pad(images, (0, 0, 0, 0, 0, 0, 0, extra)), F.pad(group, (0, extra), value=k),
            F.pad(target, (0, extra)))


# ---------------------------------------------------------------- the step loop, eager or recorded

STATS = ("hit", "l1", "ce", "lam")
"""The per-step statistics of :func:`inversion_step`, in the order :class:`_StaticStep` stacks them."""
BUCKET = 16
"""Recorded steps pad a job's images to a multiple of this, so a few shapes (graphs) serve every batch."""
GRAPH_CACHE_SIZE = 32
"""Recorded steps kept (least recently used dropped); each holds its static buffers (and CUDA graph)."""
_graphs: "OrderedDict[tuple, _StaticStep]" = OrderedDict()
_cuda_graphs = True


def use_cuda_graphs(enabled: bool) -> None:
    """Whether inversions on a CUDA device replay their step as a CUDA graph (the default) or run it eagerly.

    A step is hundreds of small kernels (a LeNet forward and backward on the pair images of a round's clients,
    vmapped over them) launched from Python through ``torch.func``: eagerly the launches, not the GPU, bound it
    (session 34: FLIP's paper round took 7–8 minutes on an H200). Recorded once per shape and replayed, a step
    is one graph launch and three small copies: 6.5–12.6× faster on an H200, the same masks to the bit
    (benchmarks/results/inversion_graphs.md). The numbers are those of the eager step on that device up to the
    padding of the images (:data:`BUCKET`). Off: every step runs eagerly, as on the CPU."""
    global _cuda_graphs
    _cuda_graphs = bool(enabled)
    _graphs.clear()


def _static_mode(device: torch.device) -> str | None:
    """How :func:`_run_steps` runs on ``device``: ``"cuda-graph"`` (a recorded CUDA graph), or None (eager).
    Tests patch it to ``"replay"`` to run the static-buffer bookkeeping eagerly on the CPU."""
    return "cuda-graph" if device.type == "cuda" and _cuda_graphs else None


def _bucket(n: int) -> int:
    return -(-n // BUCKET) * BUCKET


def _run_steps(
    step: Callable[..., tuple[InversionState, dict[str, Tensor]]], state: InversionState, noise: Raw,
    args: tuple, steps: int, key: tuple, shell: nn.Module,
) -> tuple[InversionState, dict[str, Tensor] | None]:
    """Run ``steps`` steps from ``state`` (``noise`` holds every step's, on axis 0); the final state and the
    per-step statistics (each (steps, ..., K); None for 0 steps). Eager, or through a :class:`_StaticStep`
    recorded for ``key`` and the shapes of ``args`` (:func:`_static_mode`)."""
    if steps == 0:
        return state, None
    mode = _static_mode(state.a.device)
    if mode is None:
        return _eager_steps(step, state, noise, args, steps, shell)
    full = (mode, *key, _shapes(state, args))
    runner = _graphs.pop(full, None)
    if runner is None or runner.shell is not shell:
        try:
            with _eval_mode(shell):
                runner = _StaticStep(step, state, (noise[0][0], noise[1][0]), args, shell, mode)
        except RuntimeError as err:  # a step that cannot be recorded (a host sync in a new model): run eagerly
            warnings.warn(f"could not record the inversion step as a CUDA graph ({err}); running it eagerly "
                          "from now on (fedtrust.robust.inversion.use_cuda_graphs)", RuntimeWarning, stacklevel=2)
            use_cuda_graphs(False)
            return _eager_steps(step, state, noise, args, steps, shell)
    _graphs[full] = runner  # most recently used last
    while len(_graphs) > GRAPH_CACHE_SIZE:
        _graphs.popitem(last=False)
    return runner.run(state, noise, args, steps)


def _eager_steps(step: Callable[..., tuple[InversionState, dict[str, Tensor]]], state: InversionState, noise: Raw,
                 args: tuple, steps: int, shell: nn.Module) -> tuple[InversionState, dict[str, Tensor]]:
    history = []
    with _eval_mode(shell):
        for i in range(steps):
            state, stats = step(state, (noise[0][i], noise[1][i]), *args)
            history.append(stats)
    return state, {key: torch.stack([h[key] for h in history]) for key in STATS}


def _leaves(args: tuple) -> list[Tensor]:
    """The tensors of a step's arguments (tensors, or dicts of them: the weights), in order."""
    out: list[Tensor] = []
    for arg in args:
        out.extend(arg.values() if isinstance(arg, dict) else [arg])
    return out


def _shapes(state: InversionState, args: tuple) -> tuple:
    """What a recorded step is specific to: every buffer's shape, dtype and device, and the weights' names."""
    names = tuple(tuple(arg) for arg in args if isinstance(arg, dict))
    return names, tuple((tuple(x.shape), x.dtype, x.device) for x in [*state, *_leaves(args)])


class _StaticStep:
    """A step on fixed buffers: ``replay()`` runs ``step`` on them and writes the next state back in place.

    On a GPU (mode ``"cuda-graph"``) that body is recorded once as a CUDA graph and each step is one replay;
    mode ``"replay"`` runs the same body eagerly (the bookkeeping, checked on the CPU by the tests). The
    statistics are stacked before the write-back (``lam`` is the step's input λ, a buffer the write-back
    overwrites). The buffers are the recorded graph's memory: every call copies its inputs in and its
    results out."""

    def __init__(self, step: Callable[..., tuple[InversionState, dict[str, Tensor]]], state: InversionState,
                 noise: Raw, args: tuple, shell: nn.Module, mode: str) -> None:
        self.shell = shell  # held, so no other module can take its id (part of the cache key) while cached
        self.state = InversionState(*(x.clone() for x in state))
        self.noise = (noise[0].clone(), noise[1].clone())
        self.args = tuple({n: v.clone() for n, v in a.items()} if isinstance(a, dict) else a.clone() for a in args)

        def body() -> Tensor:
            nxt, stats = step(self.state, self.noise, *self.args)
            out = torch.stack([stats[k] for k in STATS])
            for dst, src in zip(self.state, nxt):
                dst.copy_(src)
            return out

        self.graph = None
        if mode == "cuda-graph":
            with torch.cuda.device(state.a.device):  # the graph's device is the current one when it records
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up off the capture (lazy library set-up), state untouched
                    for _ in range(2):
                        step(self.state, self.noise, *self.args)
                torch.cuda.current_stream().wait_stream(side)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.stats = body()
        else:
            self._body = body

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.stats = self._body()

    def run(self, state: InversionState, noise: Raw, args: tuple, steps: int) -> tuple[InversionState,
                                                                                      dict[str, Tensor]]:
        for dst, src in zip(self.state, state):
            dst.copy_(src)
        for dst, src in zip(_leaves(self.args), _leaves(args)):
            dst.copy_(src)
        hist = self.state.lam.new_empty((steps, len(STATS), *self.state.lam.shape))
        on_device = torch.cuda.device(self.state.a.device) if self.graph is not None else contextlib.nullcontext()
        with _eval_mode(self.shell), on_device:  # a graph replays on the current device's stream
            for i in range(steps):
                self.noise[0].copy_(noise[0][i])
                self.noise[1].copy_(noise[1][i])
                self.replay()
                hist[i].copy_(self.stats)
        final = InversionState(*(x.clone() for x in self.state))
        return final, {k: hist[:, j] for j, k in enumerate(STATS)}


def _stack_states(states: list[InversionState]) -> InversionState:
    return InversionState(*(torch.stack(leaves) for leaves in zip(*states)))


def _no_history(k: int, like: Tensor) -> dict[str, Tensor]:
    """The history of an inversion of 0 steps: (0, K) per statistic."""
    return {key: like.new_zeros(0, k) for key in STATS}


def _triggers(state: InversionState, hist: dict[str, Tensor]) -> list[Trigger]:
    return [_trigger(state, i, {key: v[:, i] for key, v in hist.items()}) for i in range(state.a.shape[0])]


class _eval_mode:
    """Put a module in eval mode for a block, restoring its mode after."""

    def __init__(self, module: nn.Module) -> None:
        self.module, self.was = module, module.training

    def __enter__(self) -> None:
        self.module.eval()

    def __exit__(self, *exc: object) -> None:
        self.module.train(self.was)


def _start(
    k: int, shape: tuple[int, int, int], generator: torch.Generator, like: Tensor, params: InversionParams,
    inits: list[Raw | None],
) -> Raw:
    """Random raw (a, b) for all K triggers, then the warm starts written over theirs."""
    c, h, w = shape
    a = params.init_range * _uniform((k, h, w), generator, like)
    b = params.init_range * _uniform((k, c, h, w), generator, like)
    for i, raw in enumerate(inits):
        if raw is None:
            continue
        ra, rb = raw
        if tuple(ra.shape) != (h, w) or tuple(rb.shape) != (c, h, w):
            raise ConfigError(f"warm start {i} must have shapes ({h}, {w}) and ({c}, {h}, {w}), "
                              f"got {tuple(ra.shape)} and {tuple(rb.shape)}")
        a[i], b[i] = ra.to(like), rb.to(like)
    return a, b


def _step_noise(shape_a: torch.Size, shape_b: torch.Size, steps: int, generator: torch.Generator,
                like: Tensor) -> tuple[Tensor, Tensor]:
    """The restart noise of every step, drawn up front: (steps, *shape_a) and (steps, *shape_b) on ``like``'s
    device and dtype, in the order a per-step draw takes (step 0's a, its b, step 1's a, ...), so the same
    numbers and the same generator state after. One host-to-device copy per inversion instead of two a step:
    on a GPU a copy from pageable memory waits for the device, so per-step draws serialised every step."""
    a = torch.empty((steps, *shape_a), dtype=torch.float32, device=generator.device)
    b = torch.empty((steps, *shape_b), dtype=torch.float32, device=generator.device)
    for i in range(steps):
        a[i] = torch.rand(tuple(shape_a), generator=generator, device=generator.device, dtype=torch.float32)
        b[i] = torch.rand(tuple(shape_b), generator=generator, device=generator.device, dtype=torch.float32)
    return (2 * a - 1).to(like), (2 * b - 1).to(like)


def _uniform(shape: tuple[int, ...] | torch.Size, generator: torch.Generator, like: Tensor) -> Tensor:
    """U(−1, 1) drawn on the generator's device, then moved to ``like``'s device and dtype."""
    u = torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return (2 * u - 1).to(like)


def _trigger(state: InversionState, i: int, history: dict[str, Tensor]) -> Trigger:
    reached = bool(torch.isfinite(state.best_l1[i]))
    if reached:
        a, b = state.best_a[i], state.best_b[i]
        mask, l1 = to_mask(a), float(state.best_l1[i])
    else:
        a, b = state.a[i], state.b[i]
        mask, l1 = torch.zeros_like(a), 0.0
    return Trigger(mask, to_mask(b), l1, reached, (a.clone(), b.clone()), float(state.lam[i]), history)


def _check_images(x: Tensor, name: str) -> None:
    if x.dim() != 4 or len(x) == 0 or not x.is_floating_point():
        raise ConfigError(f"{name} must be a non-empty float tensor (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
