"""The reference local trainer: one client, one model, plain torch.optim.

The batch schedule (:func:`client_schedule`), the augmentation draws
(:func:`draw_step`) and batch assembly (:func:`assemble_batch`) are shared
with the vectorised executor, so both draw exactly the same minibatches,
outliers and augmentations for a client.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fedtrust.data.augment import apply_augment, draw_augment
from fedtrust.data.types import ImageSet
from fedtrust.errors import FedTrustError
from fedtrust.fl.types import Batch, ClientContext, LocalTraining, TrainResult
from fedtrust.fl.sampling import seed_global_rngs


def num_local_steps(n: int, batch_size: int, epochs: int, steps: int | None) -> int:
    """Minibatches a client with ``n`` samples takes: ``steps`` if set, else ``epochs·⌈n/B⌉``."""
    if n == 0:
        return 0
    return steps if steps is not None else epochs * math.ceil(n / batch_size)


def local_batches(n: int, batch_size: int, epochs: int, steps: int | None,
                  generator: torch.Generator) -> list[Tensor]:
    """Index batches into a client's ``n`` samples: a fresh permutation per pass.

    With ``steps`` set, passes repeat until exactly ``steps`` batches are drawn
    (the last pass may stop early). The final batch of a pass may be smaller
    than ``batch_size``.
    """
    total = num_local_steps(n, batch_size, epochs, steps)
    out: list[Tensor] = []
    while len(out) < total:
        perm = torch.randperm(n, generator=generator)
        out.extend(perm.split(batch_size))
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


def client_schedule(plan: LocalTraining, n: int, generator: torch.Generator) -> ClientSchedule:
    """Draw the dropout seed, the ID batches and (if any) the outlier batches of one client."""
    seed_global_rngs(int(torch.randint(0, 2**62, (1,), generator=generator)))  # dropout etc.
    batches = local_batches(n, plan.batch_size, plan.epochs, plan.steps, generator)
    outlier_batches = None
    if plan.outliers is not None:
        outlier_batches = _matching_batches(len(plan.outliers), [len(b) for b in batches], generator)
    return ClientSchedule(batches, outlier_batches)


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


def draw_step(plan: LocalTraining, schedule: ClientSchedule, t: int, width: int,
              generator: torch.Generator) -> dict[str, dict[str, Tensor]]:
    """One client's augmentation draws at step ``t``: ID view(s), then outliers, in that order."""
    if plan.augment == "none":
        return {}
    n = len(schedule.batches[t])
    draws = {"x": draw_augment(plan.augment, n, width, generator)}
    if plan.views == 2:
        draws["x2"] = draw_augment(plan.augment, n, width, generator)
    if schedule.outlier_batches is not None:
        draws["x_ood"] = draw_augment(plan.augment, n, width, generator)
    return draws


def assemble_batch(images: Tensor, labels: Tensor, outliers: Tensor | None, views: int, augment_kind: str,
                   draws: dict[str, dict[str, Tensor]], normalize: Callable[[Tensor], Tensor]) -> Batch:
    """Augment and normalise gathered uint8 images into a training batch.

    ``images``/``outliers`` may hold several clients' samples back to back
    (the vectorised executor); ``draws`` then holds their concatenated draws.
    """

    def view(x: Tensor, key: str) -> Tensor:
        return normalize(apply_augment(x, augment_kind, draws[key]) if key in draws else x)

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


def train_locally(plan: LocalTraining, data: ImageSet, ctx: ClientContext,
                  normalize: Callable[[Tensor], Tensor]) -> TrainResult:
    """Run ``plan`` on ``data`` (the client's own images) and return the trained state.

    Randomness (batch order, outlier order, augmentation, dropout) comes from
    ``ctx.generator`` and a global seed drawn from it, so a client's update is
    a function of (seed, round, client id) alone.
    """
    model = plan.model
    load_state(model, plan.init, ctx.device)
    model.train()
    named = dict(model.named_parameters())
    trainable = {name: named[name] for name in plan.trainable}
    for name, p in named.items():
        p.requires_grad_(name in trainable)
    optimizer = plan.optimizer.build(list(trainable.values()))
    schedule = client_schedule(plan, len(data), ctx.generator)
    losses = []
    for t, idx in enumerate(schedule.batches):
        idx = idx.to(data.x.device)
        draws = draw_step(plan, schedule, t, data.x.shape[-1], ctx.generator)
        outliers = None if plan.outliers is None else plan.outliers[schedule.outlier_batches[t].to(data.x.device)]
        batch = assemble_batch(data.x[idx], data.y[idx], outliers, plan.views, plan.augment, draws, normalize)
        loss = plan.loss(model, trainable, batch, plan.ref)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    for p in named.values():
        p.requires_grad_(True)
    mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return TrainResult(state=state, num_examples=len(data), steps=len(schedule.batches), mean_loss=mean_loss)
