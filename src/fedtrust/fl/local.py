"""The reference local trainer: one client, one model, plain torch.optim.

The batch schedule (:func:`client_schedule`), the augmentation draws
(:func:`draw_step`) and batch assembly (:func:`assemble_batch`) are shared
with the vectorised executor, so both draw exactly the same minibatches,
outliers and augmentations for a client.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedtrust.data.augment import apply_augment, draw_augment
from fedtrust.data.types import ImageSet
from fedtrust.errors import FedTrustError
from fedtrust.fl.optim_state import load_torch_state, torch_state
from fedtrust.fl.types import Batch, ClientContext, LocalTraining, TrainResult
from fedtrust.fl.sampling import seed_global_rngs


def num_local_steps(n: int, batch_size: int, epochs: int, steps: int | None, drop_last: bool = False) -> int:
    """Minibatches a client with ``n`` samples takes: ``steps`` if set, else ``epochs`` times the batches
    of one pass, ``⌈n/B⌉`` (or ``⌊n/B⌋`` with ``drop_last``, at least 1: see :func:`local_batches`)."""
    if n == 0:
        return 0
    if steps is not None:
        return steps
    return epochs * (max(1, n // batch_size) if drop_last else math.ceil(n / batch_size))


def local_batches(n: int, batch_size: int, epochs: int, steps: int | None,
                  generator: torch.Generator, drop_last: bool = False) -> list[Tensor]:
    """Index batches into a client's ``n`` samples: a fresh permutation per pass.

    With ``steps`` set, passes repeat until exactly ``steps`` batches are drawn
    (the last pass may stop early). The final batch of a pass may be smaller
    than ``batch_size``; ``drop_last`` drops it (RNA's loaders, spec rna.md §2),
    except that a client with fewer than ``batch_size`` samples keeps its one
    short batch per pass, so it still trains (a federated choice: zero steps
    would send back the global model with the client's full sample weight).
    """
    total = num_local_steps(n, batch_size, epochs, steps, drop_last)
    out: list[Tensor] = []
    while len(out) < total:
        perm = torch.randperm(n, generator=generator)
        batches = perm.split(batch_size)
        if drop_last and len(batches) > 1 and len(batches[-1]) < batch_size:
            batches = batches[:-1]
        out.extend(batches)
    return out[:total]


@dataclass
class ClientSchedule:
    """A client's whole draw for one local training, made up front from its generator.

    ``batches[t]`` indexes the client's ID samples; ``outlier_batches[t]`` its
    outlier share (same sizes). Drawing everything first, in a fixed order, is
    what lets the vectorised executor reproduce the sequential trainer.
    """

    batches: list[Tensor]
    outlier_batches: list[Tensor] | None
    draws: list[dict[str, dict[str, Tensor]]] = field(default_factory=list)
    """``draws[t]``: the augmentation draws of step t (:func:`draw_step`), when drawn up front."""


def client_schedule(plan: LocalTraining, n: int, generator: torch.Generator, width: int | None = None) -> ClientSchedule:
    """Draw the dropout seed, the ID batches, (if any) the outlier batches and, given the image
    ``width``, every step's augmentation draws of one client, in that order.

    Drawing the augmentation up front consumes the generator exactly as drawing it at each step
    would (nothing else draws in between), so both give the same numbers; up front, several plans
    of one client (and the vectorised executor's jobs) share one schedule.
    """
    seed_global_rngs(int(torch.randint(0, 2**62, (1,), generator=generator)))  # dropout etc.
    batches = local_batches(n, plan.batch_size, plan.epochs, plan.steps, generator, plan.drop_last)
    outlier_batches = None
    if plan.outliers is not None:
        sizes = [outlier_count(len(b), plan.outlier_ratio) for b in batches]
        outlier_batches = _matching_batches(len(plan.outliers), sizes, generator)
    schedule = ClientSchedule(batches, outlier_batches)
    if width is not None:
        schedule.draws = [draw_step(plan, schedule, t, width, generator) for t in range(len(batches))]
    return schedule


SCHEDULE_FIELDS = ("batch_size", "epochs", "steps", "drop_last", "augment", "views", "outlier_ratio")


def outlier_count(id_count: int, ratio: float) -> int:
    """Outliers beside ``id_count`` ID images in a batch: ``round(ratio·id_count)``, at least 1 (the
    fine-tuned OE baselines take 2 per ID image, 256 beside 128; spec rna.md §5)."""
    return max(1, round(ratio * id_count))


def plan_list(plan: LocalTraining | list[LocalTraining]) -> list[LocalTraining]:
    """A client's plans as a list (one plan, or the several that share its batch schedule)."""
    return plan if isinstance(plan, list) else [plan]


def check_shared_schedule(plans: list[LocalTraining]) -> LocalTraining:
    """The first of several plans that share one batch schedule; plans that disagree on the schedule
    (batch size, epochs, steps, drop_last, augmentation, views, outliers) are an error naming the field."""
    if not plans:
        raise FedTrustError("local_training returned an empty list of plans; expected at least one")
    first = plans[0]
    for j, other in enumerate(plans[1:], 1):
        for name in SCHEDULE_FIELDS:
            if getattr(other, name) != getattr(first, name):
                raise FedTrustError(f"plans of one client share one batch schedule, but plan {j} has "
                                    f"{name}={getattr(other, name)!r} and plan 0 {getattr(first, name)!r}")
        if (other.outliers is None) != (first.outliers is None) or (
                other.outliers is not None and other.outliers is not first.outliers):
            raise FedTrustError(f"plans of one client share one batch schedule, but plan {j} has other outliers")
    return first


def _matching_batches(n: int, sizes: list[int], generator: torch.Generator) -> list[Tensor]:
    """Batches of the given sizes from passes of fresh permutations over ``n`` items."""
    if n == 0:
        raise FedTrustError("the objective needs outliers but the client's outlier share is empty")
    stream: list[Tensor] = []
    needed = sum(sizes)
    while sum(len(p) for p in stream) < needed:
        stream.append(torch.randperm(n, generator=generator))
    flat = torch.cat(stream)[:needed]
    return list(flat.split(sizes))


SECOND_VIEW_AUGMENT = "crop"
"""The augmentation of the second view ``x2`` when the plan's is ``none`` (digits)."""


def view_augment(augment: str, key: str) -> str:
    """The augmentation of batch entry ``key`` (``x``, ``x2``, ``x_ood``) under the plan's ``augment``.

    The plan's, except that the second view of a two-view objective is augmented with
    :data:`SECOND_VIEW_AUGMENT` when the plan's is ``none``: PASCL's two views must differ (with no
    augmentation both views are the same image and its contrastive term has nothing to contrast);
    ``x`` and ``x_ood`` stay un-augmented then.
    """
    return SECOND_VIEW_AUGMENT if key == "x2" and augment == "none" else augment


def draw_step(plan: LocalTraining, schedule: ClientSchedule, t: int, width: int,
              generator: torch.Generator) -> dict[str, dict[str, Tensor]]:
    """One client's augmentation draws at step ``t``: ID view(s), then outliers, in that order.

    Only augmented entries get a draw (:func:`view_augment`); ``none`` with one view draws nothing.
    """
    n = len(schedule.batches[t])
    sizes = {"x": n, "x2": n}
    if schedule.outlier_batches is not None:
        sizes["x_ood"] = len(schedule.outlier_batches[t])
    keys = ["x", *(["x2"] if plan.views == 2 else []), *(["x_ood"] if schedule.outlier_batches is not None else [])]
    return {key: draw_augment(view_augment(plan.augment, key), sizes[key], width, generator) for key in keys
            if view_augment(plan.augment, key) != "none"}


def assemble_batch(images: Tensor, labels: Tensor, outliers: Tensor | None, views: int, augment_kind: str,
                   draws: dict[str, dict[str, Tensor]], normalize: Callable[[Tensor], Tensor]) -> Batch:
    """Augment and normalise gathered uint8 images into a training batch.

    ``images``/``outliers`` may hold several clients' samples back to back
    (the vectorised executor); ``draws`` then holds their concatenated draws.
    Each entry is augmented as :func:`view_augment` says, with its draw.
    """

    def view(x: Tensor, key: str) -> Tensor:
        return normalize(apply_augment(x, view_augment(augment_kind, key), draws[key]) if key in draws else x)

    batch = {"x": view(images, "x"), "y": labels}
    if views == 2:
        batch["x2"] = view(images, "x2")
    if outliers is not None:
        batch["x_ood"] = view(outliers, "x_ood")
    return batch


def load_state(model: torch.nn.Module, state: dict[str, Tensor], device: torch.device) -> None:
    """``model.to(device).load_state_dict(state)``, without their per-call overhead.

    The client loop reloads one template model for every client, so the common case (model
    already on ``device``, ``state`` with exactly its keys and shapes) copies tensor by tensor;
    anything else goes through ``load_state_dict``, which raises its usual error.
    """
    own = model.state_dict(keep_vars=True)
    device = torch.device(device)
    if any(t.device != device for t in own.values()):
        model.to(device)
        own = model.state_dict(keep_vars=True)
    if own.keys() != state.keys() or any(own[k].shape != state[k].shape for k in own):
        model.load_state_dict(state)
        return
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(state[k])


def train_locally(plan: LocalTraining | list[LocalTraining], data: ImageSet, ctx: ClientContext,
                  normalize: Callable[[Tensor], Tensor]) -> TrainResult | list[TrainResult]:
    """Run ``plan`` on ``data`` (the client's own images) and return the trained state.

    Given several plans (a list), they train side by side on one batch schedule: the same
    minibatches, outliers and augmentations, each plan its own step on each batch, in list
    order (Split-Mix's base nets); one result per plan comes back, in order.

    Randomness (batch order, outlier order, augmentation, dropout) comes from
    ``ctx.generator`` and a global seed drawn from it, so a client's update is
    a function of (seed, round, client id) alone.
    """
    plans = plan_list(plan)
    first = check_shared_schedule(plans)
    schedule = client_schedule(first, len(data), ctx.generator, data.x.shape[-1])
    models = _distinct_models(plans)
    trainers = [_PlanTrainer(p, m, ctx.device) for p, m in zip(plans, models)]
    for t, idx in enumerate(schedule.batches):
        idx = idx.to(data.x.device)
        outliers = None if first.outliers is None else first.outliers[schedule.outlier_batches[t].to(data.x.device)]
        batch = assemble_batch(data.x[idx], data.y[idx], outliers, first.views, first.augment, schedule.draws[t],
                               normalize)
        for trainer in trainers:
            trainer.step(batch, activate=len(trainers) > 1, position=(t, len(schedule.batches)))
    results = [trainer.finish(len(data), len(schedule.batches)) for trainer in trainers]
    return results if isinstance(plan, list) else results[0]


def _distinct_models(plans: list[LocalTraining]) -> list[torch.nn.Module]:
    """Each plan's model; a module object two plans share is copied, since the trainer trains in place."""
    seen: set[int] = set()
    models = []
    for p in plans:
        models.append(p.model if id(p.model) not in seen else copy.deepcopy(p.model))
        seen.add(id(p.model))
    return models


class _PlanTrainer:
    """One plan's model, trainable parameters and optimizer on the reference path."""

    def __init__(self, plan: LocalTraining, model: torch.nn.Module, device: torch.device) -> None:
        self.plan, self.model = plan, model
        load_state(model, plan.init, device)
        self.ref = {k: v.to(device) for k, v in plan.ref.items()}
        model.train()
        self.named = dict(model.named_parameters())
        self.trainable = {name: self.named[name] for name in plan.trainable}
        for name, p in self.named.items():
            p.requires_grad_(name in self.trainable)
        self.optimizer = plan.optimizer.build(list(self.trainable.values()))
        if plan.optimizer_state:
            load_torch_state(self.optimizer, self.trainable, plan.optimizer_state)
        self.losses: list[Tensor] = []

    def step(self, batch: Batch, activate: bool = False, position: tuple[int, int] = (0, 1)) -> None:
        """One step on ``batch``; ``position`` = (step, total steps) for the spec's lr milestones."""
        spec = self.plan.optimizer
        if spec.milestones:
            for group in self.optimizer.param_groups:
                group["lr"] = spec.lr * spec.lr_factor(*position)
        if activate:  # several plans: set this plan's trainable flags again before its step
            for name, p in self.named.items():
                p.requires_grad_(name in self.trainable)
        loss = self.plan.loss(self.model, self.trainable, batch, self.ref)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for name, mask in (self.plan.grad_mask or {}).items():
            if self.trainable[name].grad is not None:
                self.trainable[name].grad.mul_(mask.to(self.trainable[name].grad))
        self.optimizer.step()
        self.losses.append(loss.detach())

    def finish(self, num_examples: int, steps: int) -> TrainResult:
        for p in self.named.values():
            p.requires_grad_(True)
        mean_loss = float(torch.stack(self.losses).mean()) if self.losses else float("nan")
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        kept = None if self.plan.optimizer_state is None else torch_state(self.optimizer, self.trainable)
        return TrainResult(state=state, num_examples=num_examples, steps=steps, mean_loss=mean_loss,
                           optimizer_state=kept)
