"""The reference local trainer: one client, one model, plain torch.optim.

The batch schedule (:func:`local_batches`) is shared with the vectorised
executor, so both draw exactly the same minibatches for a client.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fedtrust.data.augment import augment
from fedtrust.data.types import ImageSet
from fedtrust.fl.protocol import ClientContext, LocalTraining, TrainResult


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


def train_locally(plan: LocalTraining, data: ImageSet, ctx: ClientContext,
                  normalize: Callable[[Tensor], Tensor]) -> TrainResult:
    """Run ``plan`` on ``data`` (the client's own images) and return the trained state.

    Randomness (batch order, augmentation, dropout) comes from ``ctx.generator``
    and a global seed drawn from it, so a client's update is a function of
    (seed, round, client id) alone.
    """
    model = plan.model.to(ctx.device)
    model.load_state_dict(plan.init)
    model.train()
    named = dict(model.named_parameters())
    trainable = {name: named[name] for name in plan.trainable}
    for name, p in named.items():
        p.requires_grad_(name in trainable)
    optimizer = plan.optimizer.build(list(trainable.values()))
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=ctx.generator)))  # dropout etc.
    batches = local_batches(len(data), plan.batch_size, plan.epochs, plan.steps, ctx.generator)
    losses = []
    for idx in batches:
        idx = idx.to(data.x.device)
        x = normalize(augment(data.x[idx], plan.augment, ctx.generator))
        loss = plan.loss(model, trainable, {"x": x, "y": data.y[idx]}, plan.ref)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    for p in named.values():
        p.requires_grad_(True)
    mean_loss = float(torch.stack(losses).mean()) if losses else float("nan")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return TrainResult(state=state, num_examples=len(data), steps=len(batches), mean_loss=mean_loss)
