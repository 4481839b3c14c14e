"""Attacks as wrappers around a client (registry kind ``attack``, config section ``attack``).

An attack is a Flower-mod-shaped middleware around the client runtime
(:class:`fedtrust.fl.runtime.ClientRuntime`; STYLE.md §6): for a client it has
chosen, in a round it attacks, it may change the client's **data**
(:meth:`Attack.poison_data`), its **reply** (:meth:`Attack.poison_reply`), or,
for omniscient attacks, the malicious replies of the whole round from the benign
ones (:meth:`Attack.collude`). Outside its rounds an attacker is a benign client.
The algorithm never knows it is wrapped.

**Omniscient attacks** (ALIE, IPM, min-max, min-sum) read the benign updates of
their round through :meth:`Attack.collude`, which the executor's round loop calls
after the clients replied and before validation and aggregation. That is a
*simulation-only power*: a real attacker on Flower sees no other client's update
(the loop runs it on the server side of every executor, Flower included, to model
the worst case defenses must survive).

Who attacks: ``attack.ids`` (fixed client ids), or ``attack.fraction`` of the
clients drawn once from the run seed. When: every round, or ``attack.rounds``, or
rounds ``attack.from`` … ``attack.to``; an attacker attacks only when the sampler
picks it, unless ``attack.force`` puts every attacker into each attack round
(:func:`fedtrust.fl.sampling.force_clients`: the round keeps its size).

===========  =========================================================  ======================================
name         what a malicious client does                               reference
===========  =========================================================  ======================================
label_flip   trains on y ← K − 1 − y                                    Tolpegin et al., ESORICS 2020
sign_flip    replies θ − s·(θ_i − θ): its honest update reversed        Damaskinos et al., ICML 2018
gaussian     replies θ + N(0, σ² I): a random update                    Blanchard et al., NeurIPS 2017
alie         replies θ + μ − z·σ (benign mean and std, Alg. 3)          Baruch et al., NeurIPS 2019
ipm          replies θ − ε·μ                                            Xie et al., UAI 2019
min_max      replies θ + μ − γ·p, γ max within the benign diameter      Shejwalkar & Houmansadr, NDSS 2021
min_sum      replies θ + μ − γ·p, γ max within the benign sum of dist.  Shejwalkar & Houmansadr, NDSS 2021
===========  =========================================================  ======================================

Updates are taken on the floating entries a reply shares with the message the
client received (θ, the global model); other entries (personal parts, integer
BN counters) are left as the client trained them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from fedtrust.data.types import ImageSet
from fedtrust.errors import ConfigError
from fedtrust.fl.types import ClientContext, Message
from fedtrust.registry import get, register
from fedtrust.robust import byzantine
from fedtrust.robust.types import flatten, unflatten

_ATTACKER_STREAM = 8


@dataclass(frozen=True)
class Targets:
    """Which clients attack and in which rounds (config ``attack.ids``/``fraction``, ``rounds``/``from``/``to``)."""

    clients: frozenset[int]
    rounds: frozenset[int] | None = None
    first: int = 1
    last: int | None = None
    force: bool = False
    """Force the attackers into the sample of each attack round (``attack.force``)."""
    schedule: Mapping[int, frozenset[int]] | None = None
    """Round → the attackers that attack in it (``attack.schedule``: single-shot attacks, one attacker a
    round); when set it alone says who attacks when."""

    def attacks(self, client: int, round: int) -> bool:
        """True when ``client`` is malicious and ``round`` is one of its attack rounds."""
        if client not in self.clients:
            return False
        if self.schedule is not None:
            return client in self.schedule.get(round, frozenset())
        if self.rounds is not None:
            return round in self.rounds
        return round >= self.first and (self.last is None or round <= self.last)

    def last_round(self, rounds: int) -> int | None:
        """The last round (of a run of ``rounds``) in which any client attacks; None when none does."""
        if not self.clients:
            return None
        if self.schedule is not None:
            hit = [r for r, who in self.schedule.items() if r <= rounds and who & self.clients]
        elif self.rounds is not None:
            hit = [r for r in self.rounds if 1 <= r <= rounds]
        else:
            end = rounds if self.last is None else min(self.last, rounds)
            hit = [end] if end >= self.first else []
        return max(hit, default=None)


def choose_attackers(num_clients: int, fraction: float, seed: int) -> list[int]:
    """``round(fraction · N)`` client ids drawn once from the run seed, sorted."""
    k = int(round(fraction * num_clients))
    rng = np.random.default_rng([seed, _ATTACKER_STREAM])
    return sorted(int(c) for c in rng.choice(num_clients, size=k, replace=False))


def shared_keys(message: Message, reply: Message) -> list[str]:
    """Floating entries of ``reply`` that the received ``message`` holds too (the model the update is taken on)."""
    return [k for k, v in reply.arrays.items()
            if v.is_floating_point() and k in message.arrays and message.arrays[k].shape == v.shape]


class Attack:
    """Base class: a benign pass-through. Subclasses override the hooks they need."""

    name: ClassVar[str] = "none"
    omniscient: ClassVar[bool] = False
    changes_data: ClassVar[bool] = False
    """True when :meth:`poison_data` changes the data (the client then runs the general path)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, params: BaseModel, targets: Targets, num_classes: int, num_clients: int) -> None:
        self.params, self.targets = params, targets
        self.num_classes, self.num_clients = num_classes, num_clients

    def attacks(self, client: int, round: int) -> bool:
        return self.targets.attacks(client, round)

    def poison_data(self, data: ImageSet, ctx: ClientContext) -> ImageSet:
        """The data a malicious client trains on (default: its own)."""
        return data

    def poison_reply(self, message: Message, reply: Message, ctx: ClientContext) -> Message:
        """What a malicious client sends instead of ``reply`` (default: ``reply``)."""
        return reply

    rewrites_training: ClassVar[bool] = False
    """True when :meth:`rewrite_plan` changes the attacker's local training (its own lr, epochs, ...)."""

    def rewrite_plan(self, plan: Any, ctx: ClientContext, message: Message, state: dict[str, Tensor]) -> Any:
        """The attacker's own :class:`~fedtrust.fl.types.LocalTraining` for ``message``, given its kept
        ``state`` (default: the benign plan)."""
        return plan

    def observe(self, message: Message, state: dict[str, Tensor], ctx: ClientContext) -> dict[str, Tensor]:
        """An attacker's kept state after a visit (every round it is sampled, attacking or not): the attack's
        memory across rounds, kept on the client (``attack/`` in its persistent state), never on the server.
        Default: none."""
        return state

    def collude(self, state: Message, messages: Mapping[int, Message], replies: dict[int, Message],
                round: int) -> dict[int, Message]:
        """Omniscient attacks: the round's replies with the malicious ones crafted from the benign ones."""
        return replies


def replace_update(message: Message, reply: Message, keys: list[str], delta: Tensor) -> Message:
    """``reply`` with entries ``keys`` set to the received value plus ``delta`` (flattened over ``keys``)."""
    base = {k: message.arrays[k] for k in keys}
    parts = unflatten(delta.to(torch.float64), base, keys)
    arrays = dict(reply.arrays)
    arrays.update({k: (base[k].double() + parts[k].to(base[k].device)).to(base[k].dtype) for k in keys})
    return Message(arrays=arrays, meta=dict(reply.meta))


def honest_delta(message: Message, reply: Message, keys: list[str]) -> Tensor:
    """θ_i − θ over ``keys``, flattened (float64)."""
    return flatten(reply.arrays, keys).double() - flatten(message.arrays, keys).double()


@register("attack", "label_flip")
class LabelFlip(Attack):
    """Label flipping (Tolpegin et al., ESORICS 2020, §4): malicious clients train on y ← K − 1 − y."""

    name = "label_flip"
    changes_data = True

    def poison_data(self, data: ImageSet, ctx: ClientContext) -> ImageSet:
        return ImageSet(data.x, byzantine.flip_labels(data.y, data.num_classes), data.num_classes)


@register("attack", "sign_flip")
class SignFlip(Attack):
    """Sign flipping: the client reverses (and scales by ``scale``) its honest update, θ − s·(θ_i − θ)."""

    name = "sign_flip"

    class Params(Attack.Params):
        scale: float = Field(1.0, gt=0, description="s: the reversed update's scale")

    def poison_reply(self, message: Message, reply: Message, ctx: ClientContext) -> Message:
        keys = shared_keys(message, reply)
        return replace_update(message, reply, keys, byzantine.sign_flip(honest_delta(message, reply, keys),
                                                                        self.params.scale))


@register("attack", "gaussian")
class Gaussian(Attack):
    """Gaussian attack (Blanchard et al., NeurIPS 2017, §5): the client replies θ + N(0, σ² I),
    drawn from its own round generator."""

    name = "gaussian"

    class Params(Attack.Params):
        std: float = Field(1.0, gt=0, description="σ: standard deviation of the random update")

    def poison_reply(self, message: Message, reply: Message, ctx: ClientContext) -> Message:
        keys = shared_keys(message, reply)
        d = int(sum(reply.arrays[k].numel() for k in keys))
        noise = byzantine.gaussian_update((d,), self.params.std, ctx.generator, dtype=torch.float64)
        return replace_update(message, reply, keys, noise)


class Omniscient(Attack):
    """Base of the attacks that craft one malicious update from the round's benign updates.

    Every malicious client of the round sends the same crafted update (as in the
    papers: colluding attackers agree on it). A round with no benign reply (every
    sampled client malicious) leaves the honest replies: there is nothing to estimate from.
    """

    omniscient = True

    def craft(self, benign: Tensor, n_total: int, n_malicious: int) -> Tensor:
        """The malicious update (d,) from the benign ones (m, d)."""
        raise NotImplementedError

    def collude(self, state: Message, messages: Mapping[int, Message], replies: dict[int, Message],
                round: int) -> dict[int, Message]:
        bad = [c for c in sorted(replies) if self.attacks(c, round)]
        good = [c for c in sorted(replies) if c not in bad]
        if not bad or not good:
            return replies
        keys = shared_keys(messages[bad[0]], replies[bad[0]])
        benign = torch.stack([honest_delta(messages[c], replies[c], keys) for c in good])
        crafted = self.craft(benign, len(replies), len(bad))
        out = dict(replies)
        for c in bad:
            out[c] = replace_update(messages[c], replies[c], keys, crafted)
        return out


@register("attack", "alie")
class ALIE(Omniscient):
    """A Little Is Enough (Baruch et al., NeurIPS 2019, Alg. 3): μ − z·σ per coordinate, z from n and f."""

    name = "alie"

    class Params(Attack.Params):
        z: float | None = Field(None, description="z; null: the paper's z^max from the round's n and f")

    def craft(self, benign: Tensor, n_total: int, n_malicious: int) -> Tensor:
        return byzantine.alie(benign, n_total, n_malicious, self.params.z)


@register("attack", "ipm")
class IPM(Omniscient):
    """Inner-product manipulation (Xie et al., UAI 2019, §4): −ε · mean of the benign updates."""

    name = "ipm"

    class Params(Attack.Params):
        epsilon: float = Field(0.5, gt=0, description="ε: scale of the reversed benign mean")

    def craft(self, benign: Tensor, n_total: int, n_malicious: int) -> Tensor:
        return byzantine.ipm(benign, self.params.epsilon)


class _MinMaxParams(Attack.Params):
    perturbation: Literal["std", "unit", "sign"] = Field("std", description="p: std, unit (μ/‖μ‖) or sign")


@register("attack", "min_max")
class MinMax(Omniscient):
    """Min-Max (Shejwalkar & Houmansadr, NDSS 2021, Eq. (3)): μ − γp with the largest γ inside the benign diameter."""

    name = "min_max"
    Params = _MinMaxParams

    def craft(self, benign: Tensor, n_total: int, n_malicious: int) -> Tensor:
        return byzantine.min_max(benign, self.params.perturbation)[0]


@register("attack", "min_sum")
class MinSum(Omniscient):
    """Min-Sum (Shejwalkar & Houmansadr, NDSS 2021, Eq. (4)): μ − γp with the largest γ inside the benign sum of distances."""

    name = "min_sum"
    Params = _MinMaxParams

    def craft(self, benign: Tensor, n_total: int, n_malicious: int) -> Tensor:
        return byzantine.min_sum(benign, self.params.perturbation)[0]


def build_attack(name: str, params: dict[str, Any], *, ids: list[int] | None, fraction: float,
                 rounds: list[int] | None, first: int, last: int | None, num_clients: int, num_classes: int,
                 seed: int, force: bool = False, schedule: Mapping[int, list[int]] | None = None) -> Attack:
    """The configured attack with its targets; ids out of range are a one-line ConfigError."""
    cls = get("attack", name)
    plan = None
    if schedule is not None:
        plan = {int(r): frozenset(int(c) for c in cs) for r, cs in schedule.items()}
        ids = sorted(set().union(*plan.values()))
    if ids is not None:
        bad = [c for c in ids if not 0 <= c < num_clients]
        if bad:
            raise ConfigError(f"config key 'attack.ids': client {bad[0]} is out of range 0..{num_clients - 1}")
        clients = sorted(set(ids))
    else:
        clients = choose_attackers(num_clients, fraction, seed)
    targets = Targets(frozenset(clients), frozenset(rounds) if rounds is not None else None, first, last, force,
                      plan)
    return cls(cls.Params(**params), targets, num_classes, num_clients)
