"""Client sampling: which clients take part in a round, reproducible from (seed, round)."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection

import numpy as np
import torch

from fedtrust.registry import register

_SAMPLE_STREAM = 1
_CLIENT_STREAM = 2
_FORCE_STREAM = 3

Sampler = Callable[[int, int, int, int], list[int]]
"""``sampler(num_clients, k, seed, round) -> sorted client ids`` (registry kind ``sampler``, ``data.sampler``)."""


def clients_per_round(spec: int | float, num_clients: int) -> int:
    """An int is a count; a float in (0, 1] is a fraction of ``num_clients`` (at least one client)."""
    if isinstance(spec, float):
        return max(1, int(math.floor(spec * num_clients + 1e-9)))
    return min(int(spec), num_clients)


@register("sampler", "uniform")
def sample_clients(num_clients: int, k: int, seed: int, round: int) -> list[int]:
    """``k`` distinct client ids drawn uniformly without replacement from a generator seeded by
    (seed, round), sorted (McMahan et al. 2017, Alg. 1: a random set S_t of m clients)."""
    rng = np.random.default_rng([seed, _SAMPLE_STREAM, round])
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


def force_clients(sampled: list[int], forced: Collection[int], seed: int, round: int) -> list[int]:
    """``sampled`` with the ``forced`` clients in it (an attack forcing its clients into its rounds),
    the round's size unchanged: forced clients the sampler missed replace sampled non-forced ones,
    drawn from a generator seeded by (seed, round). When more clients are forced than the round
    holds, a seeded draw of them fills it. Sorted."""
    k = len(sampled)
    forced = sorted(set(forced))
    rng = np.random.default_rng([seed, _FORCE_STREAM, round])
    if len(forced) >= k:
        return sorted(int(c) for c in rng.choice(forced, size=k, replace=False))
    others = [c for c in sampled if c not in set(forced)]
    keep = rng.choice(len(others), size=k - len(forced), replace=False) if others else []
    return sorted([*forced, *(others[i] for i in keep)])


def client_generator(seed: int, round: int, client: int, stream: int = _CLIENT_STREAM) -> torch.Generator:
    """The torch RNG of one client in one round (STYLE.md rule 7); another ``stream`` gives an independent
    one for another purpose (the update defense's noise)."""
    state = np.random.SeedSequence([seed, stream, round, client]).generate_state(2, dtype=np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


def seed_global_rngs(seed: int) -> None:
    """Seed the default generators that unseeded ops (dropout) draw from: the CPU one and, once
    initialised, CUDA's (all devices) and MPS's.

    Same effect as ``torch.manual_seed`` for any run whose device is initialised, at a
    hundredth of its cost: ``torch.manual_seed`` also queues a lazy seeding of every
    accelerator backend that is not initialised, capturing a Python stack trace each time
    (~1 ms a call, once per client and round).
    """
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        torch.mps.manual_seed(seed)
