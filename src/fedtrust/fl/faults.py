"""Client faults injected by config, and the straggler model (config section ``faults``).

Real federations lose clients: a client's code raises, its node goes silent, its
reply arrives corrupted, or it is too slow for the round's deadline. fedtrust's
executors record each such client in the round's metrics (``failed``: client id →
one-line reason) and leave it out of aggregation; the round still aggregates when
at least ``defense.min_replies`` valid replies are left, else it keeps the
previous server state (:class:`~fedtrust.fl.executor.Executor`).

To test and measure that, faults can be injected (:class:`Faults`). Whether client
``k`` fails in round ``r``, and how, is one uniform draw from a generator seeded by
``(seed, r, k)`` alone — not by the round's sample, nor by any RNG the training
uses — so the same clients fail the same way on the sequential, vectorised and
Flower executors (a Flower node makes the draw itself), and after a ``--resume``:

* ``crash`` (probability ``faults.crash``): the client raises before training;
* ``hang`` (``faults.hang``): the client gives no reply within the round's deadline.
  In process the deadline is simulated (the client is reported at once, as if it
  had been waited for); a Flower node really sleeps ``faults.hang_seconds``, past
  ``faults.round_timeout``, and then raises, so the server sees a silent node;
* ``garbage`` (``faults.garbage``): the client trains, keeps its new state, and
  replies garbage of one of ``faults.garbage_kinds`` (drawn with the same
  generator): ``nan`` (its first floating entry all NaN), ``shape`` (its first
  entry one row longer), ``keys`` (its last entry renamed), ``weight``
  (``num_examples`` = −1). Update validation rejects each with its reason.

Crashed, hung and straggling clients do no work: their persistent state stays as it
was (the in-process executors and the Flower node alike).

The straggler model (in process and on Flower's nodes alike, so runs stay
comparable; a deployment's real deadline is ``faults.round_timeout`` on top):
with ``faults.speed`` set, client ``k`` processes ``speed·exp(σz − σ²/2)``
examples a second in round ``r`` (``z`` standard normal from the same per-(seed,
r, k) generator, σ = ``faults.speed_sigma``: a lognormal with mean ``speed``); its
round takes ``work / speed_k`` simulated seconds, ``work`` = the examples its local
training visits (epochs × its data size, or steps × batch size), and past
``faults.round_timeout`` it is dropped as a straggler.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedtrust.errors import FedTrustError
from fedtrust.fl.types import ClientContext, Message

FAULT_KINDS = ("crash", "hang", "garbage")
GARBAGE_KINDS = ("nan", "shape", "keys", "weight")
INJECTED = "injected "
"""Every injected fault's reason starts with this, so a report (or a test) tells it from a genuine failure."""
_STREAM = 0xFA17
"""Salt of the fault generator's seed: its draws never coincide with a client's training generator."""


class ClientFault(FedTrustError):
    """A client failed this round on purpose (an injected fault or the straggler model)."""


def is_injected(reason: str) -> bool:
    """True for the reason of an injected fault or a simulated straggler (not a genuine failure)."""
    return reason.startswith(INJECTED) or reason.startswith("straggler:")


def failure_reason(error: BaseException, limit: int = 300) -> str:
    """What a client raised, on one line: an injected fault's own message, else ``Type: first line``."""
    lines = str(error).strip().splitlines()
    if isinstance(error, ClientFault):
        reason = lines[0] if lines else "injected fault"
    else:
        reason = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"


@dataclass(frozen=True)
class Faults:
    """The ``faults`` config section as a seeded schedule (see the module docstring)."""

    seed: int
    crash: float = 0.0
    hang: float = 0.0
    garbage: float = 0.0
    garbage_kinds: tuple[str, ...] = GARBAGE_KINDS
    hang_seconds: float = 30.0
    round_timeout: float | None = None
    speed: float | None = None
    speed_sigma: float = 0.5
    work: Callable[[int], float] | None = None
    """Examples a client's local training visits in a round (client id → count); the straggler model's work."""

    def __post_init__(self) -> None:
        if self.crash + self.hang + self.garbage > 1 + 1e-9:
            raise FedTrustError(f"faults.crash + faults.hang + faults.garbage = "
                                f"{self.crash + self.hang + self.garbage:g} exceeds 1")
        bad = [k for k in self.garbage_kinds if k not in GARBAGE_KINDS]
        if bad or not self.garbage_kinds:
            raise FedTrustError(f"faults.garbage_kinds: {bad or '[]'} is not a non-empty subset of "
                                f"{list(GARBAGE_KINDS)}")

    @property
    def active(self) -> bool:
        return self.crash + self.hang + self.garbage > 0 or self.speed is not None

    def _draws(self, client: int, round: int) -> np.ndarray:
        """Three uniforms and one normal of client ``client`` in ``round``: fault, garbage kind, speed."""
        rng = np.random.default_rng([self.seed, round, client, _STREAM])
        return np.concatenate([rng.random(2), rng.standard_normal(1)])

    def fault(self, client: int, round: int) -> str | None:
        """``crash``, ``hang``, ``garbage`` or None: what client ``client`` does wrong in ``round``."""
        u = self._draws(client, round)[0]
        for kind, p in zip(FAULT_KINDS, (self.crash, self.hang, self.garbage)):
            if u < p:
                return kind
            u -= p
        return None

    def garbage_kind(self, client: int, round: int) -> str:
        u = self._draws(client, round)[1]
        return self.garbage_kinds[min(int(u * len(self.garbage_kinds)), len(self.garbage_kinds) - 1)]

    def seconds(self, client: int, round: int) -> float | None:
        """Simulated seconds client ``client`` needs in ``round`` (None without the straggler model)."""
        if self.speed is None or self.work is None:
            return None
        z = self._draws(client, round)[2]
        speed = self.speed * math.exp(self.speed_sigma * z - self.speed_sigma ** 2 / 2)
        return self.work(client) / speed

    def before_training(self, ctx: ClientContext) -> None:
        """Raise :class:`ClientFault` when this client crashes, hangs or straggles in this round."""
        kind = self.fault(ctx.client_id, ctx.round)
        if kind == "crash":
            raise ClientFault(f"{INJECTED}crash (faults.crash={self.crash:g})")
        if kind == "hang":
            deadline = f"{self.round_timeout:g} s" if self.round_timeout is not None else "the round's deadline"
            raise ClientFault(f"{INJECTED}hang: no reply within {deadline} (faults.hang={self.hang:g})")
        seconds = self.seconds(ctx.client_id, ctx.round)
        if seconds is not None and self.round_timeout is not None and seconds > self.round_timeout:
            raise ClientFault(f"straggler: needs {seconds:.3g} s, past faults.round_timeout="
                              f"{self.round_timeout:g} s")

    def wait_if_hanging(self, ctx: ClientContext) -> None:
        """On a real node: sleep ``hang_seconds`` when this client hangs, so the server's deadline passes."""
        if self.fault(ctx.client_id, ctx.round) == "hang":
            time.sleep(self.hang_seconds)

    def corrupt(self, reply: Message, ctx: ClientContext) -> Message:
        """``reply`` turned into garbage when this client sends garbage in this round, else ``reply``."""
        if self.fault(ctx.client_id, ctx.round) != "garbage":
            return reply
        return corrupt_reply(reply, self.garbage_kind(ctx.client_id, ctx.round))


def corrupt_reply(reply: Message, kind: str) -> Message:
    """A malformed copy of ``reply`` (``kind`` in :data:`GARBAGE_KINDS`, see the module docstring)."""
    arrays, meta = dict(reply.arrays), dict(reply.meta)
    keys = sorted(arrays)
    if kind == "weight" or not keys:
        meta["num_examples"] = -1
    elif kind == "nan":
        key = next((k for k in keys if arrays[k].is_floating_point()), keys[0])
        arrays[key] = torch.full_like(arrays[key], float("nan")) if arrays[key].is_floating_point() \
            else arrays[key].double().fill_(float("nan"))
    elif kind == "shape":
        key = next((k for k in keys if arrays[k].dim() > 0), keys[0])
        v = arrays[key] if arrays[key].dim() > 0 else arrays[key].reshape(1)
        arrays[key] = torch.cat([v, v[:1]])
    elif kind == "keys":
        arrays[keys[-1] + ".garbage"] = arrays.pop(keys[-1])
    else:
        raise FedTrustError(f"unknown garbage kind {kind!r}; expected one of {list(GARBAGE_KINDS)}")
    return Message(arrays, meta)

