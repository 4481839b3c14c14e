"""Client sampling: which clients take part in a round, reproducible from (seed, round)."""

from __future__ import annotations

import math

import numpy as np
import torch

_SAMPLE_STREAM = 1
_CLIENT_STREAM = 2


def clients_per_round(spec: int | float, num_clients: int) -> int:
    """An int is a count; a float in (0, 1] is a fraction of ``num_clients`` (at least one client)."""
    if isinstance(spec, float):
        return max(1, int(math.floor(spec * num_clients + 1e-9)))
    return min(int(spec), num_clients)


def sample_clients(num_clients: int, k: int, seed: int, round: int) -> list[int]:
    """``k`` distinct client ids drawn uniformly without replacement, sorted."""
    rng = np.random.default_rng([seed, _SAMPLE_STREAM, round])
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


def client_generator(seed: int, round: int, client: int) -> torch.Generator:
    """The torch RNG of one client in one round (STYLE.md rule 7)."""
    state = np.random.SeedSequence([seed, _CLIENT_STREAM, round, client]).generate_state(2, dtype=np.uint32)
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
