"""What an algorithm is built with: the model factory, data facts and training settings."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from fedtrust.fl.defense import Defense, server_generator
from fedtrust.fl.types import OptimizerSpec


@dataclass
class LocalSchedule:
    """Client-side training settings shared by every algorithm (config section ``train``)."""

    optimizer: OptimizerSpec
    batch_size: int
    epochs: int = 1
    steps: int | None = None
    augment: str = "none"
    drop_last: bool = False
    outlier_ratio: float = 1.0
    keep_optimizer: bool = False
    """Keep each client's optimizer state across rounds (config ``train.keep_optimizer``)."""
    trainable: tuple[str, ...] | None = None
    """Name patterns of the parameters local training updates (config ``train.trainable``); None: all."""


@dataclass
class AlgorithmContext:
    """Everything an :class:`~fedtrust.fl.protocol.Algorithm` needs besides its own params.

    ``new_model(**overrides)`` builds a freshly initialised model of the configured
    architecture under the caller's RNG; keyword overrides replace the builder's
    arguments (``width``, ``norm``, ...), so an algorithm can build nets of several
    widths from the registry;
    ``class_counts`` are the global training class counts (the prior π of logit
    adjustment; revealing them discloses only counts); ``lr(round)`` is the
    client learning rate of a round under the configured schedule;
    ``normalize`` maps uint8 images to the model's float input.
    """

    new_model: Callable[..., nn.Module]
    num_classes: int
    class_counts: Tensor
    objective: Callable[..., Tensor]
    schedule: LocalSchedule
    lr: Callable[[int], float]
    normalize: Callable[[Tensor], Tensor]
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    outliers: Tensor | None = None
    """The server's pool of auxiliary outliers (uint8 images), when the objective needs them."""
    defense: Defense = dataclasses.field(default_factory=Defense)
    """How the server aggregates what the algorithm averages (config section ``defense``)."""
    budgets: tuple[float, ...] | None = None
    """Each client's maximum model width in (0, 1], indexed by client id (config section ``budget``,
    Split-Mix spec §1); None: no budgets, every client may train the full model."""

    def generator(self, round: int, stream: int = 0) -> torch.Generator:
        """The server's seeded RNG of ``round`` (and an algorithm-chosen ``stream``): server-side
        randomness comes from here, never from the global RNG."""
        return server_generator(self.seed, round, 1000 + stream)

    def outlier_shares(self, round: int, clients: list[int]) -> dict[int, Tensor]:
        """Each sampled client's share of the outlier pool this round (spec rna.md §8, variant A).

        GUESS: the pool is permuted with a generator seeded by (seed, round) and
        cut into equal disjoint slices, one per sampled client; a client cycles
        through its slice with a fresh permutation per pass. One client (the
        centralised case) gets the whole pool, reshuffled each round.
        """
        if self.outliers is None:
            return {}
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, 4, round]).generate_state(1)[0]))
        perm = torch.randperm(len(self.outliers), generator=g).to(self.outliers.device)
        size = max(1, len(perm) // max(len(clients), 1))
        return {c: self.outliers[perm[(i * size) % len(perm):(i * size) % len(perm) + size]]
                for i, c in enumerate(sorted(clients))}

    def optimizer(self, lr: float) -> OptimizerSpec:
        """The configured client optimizer at learning rate ``lr``."""
        return dataclasses.replace(self.schedule.optimizer, lr=lr)
