"""Client-side defenses of the shared update against gradient leakage (config section ``privacy``; issue 18).

A benign client perturbs what it shares before the reply leaves it, so neither the server nor an
eavesdropper sees its exact update. On the shared entries (every floating tensor of the reply that
the round's message also holds, BN running statistics excepted), with Δ = θ_reply − θ_message
flattened into one vector:

1. **pruning** (``privacy.prune`` = p): the ⌊p·d⌋ smallest |Δ_j| are set to 0 (global magnitude
   pruning, the DLG paper's defense, Zhu et al., NeurIPS 2019 §5; I2F spec §3);
2. **clipping** (``privacy.clip`` = C): Δ ← Δ · min(1, C/‖Δ‖₂), the aggregator-side norm clipping
   (:class:`~fedtrust.robust.aggregators.NormClipping`) done client-side;
3. **noise** (``privacy.noise`` = σ): Δ ← Δ + σ·ξ, ξ ~ N(0, I), drawn from the client's own seeded
   stream of the round (same numbers on every executor). With clipping, σ = z·C gives the noise
   multiplier z of DP-FedAvg's Gaussian mechanism (McMahan et al., ICLR 2018); this is local noise
   per client, and no privacy accounting (ε, δ) is done here.

The reply then carries θ_message + Δ. Attackers do not defend (an attack's reply is sent as the
attack made it). BN running statistics are left exact: noise can make a variance negative; they
leak too (the audit's J is taken with the model in eval mode, through its parameters only).
What the perturbation costs in leakage is measured by :mod:`fedtrust.privacy` (``fedtrust audit``
and the ``leakage`` evaluator).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedtrust.fl.sampling import client_generator
from fedtrust.fl.types import ClientContext, Message
from fedtrust.privacy.i2f import pruning_delta

_PRIVACY_STREAM = 5
_EXACT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def shared_keys(message: Message, reply: Message) -> list[str]:
    """The reply's keys the defense perturbs: floating, also in the message with the same shape, not a
    BN running statistic; sorted, so the flat Δ has one layout on every executor."""
    return sorted(k for k, v in reply.arrays.items()
                  if v.is_floating_point() and k in message.arrays and message.arrays[k].shape == v.shape
                  and not k.endswith(_EXACT_BUFFERS))


@dataclass(frozen=True)
class UpdatePrivacy:
    """Section ``privacy``: prune, clip and noise a benign client's update before it is sent."""

    clip: float | None = None
    noise: float = 0.0
    prune: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"privacy.clip must be > 0 (or null: no clipping), got {self.clip}")
        if not self.noise >= 0:
            raise ValueError(f"privacy.noise must be >= 0, got {self.noise}")
        if not 0.0 <= self.prune < 1.0:
            raise ValueError(f"privacy.prune must be in [0, 1), got {self.prune}")

    @property
    def active(self) -> bool:
        """True when any defense is on."""
        return self.clip is not None or self.noise > 0 or self.prune > 0

    def perturb(self, delta: Tensor, round: int, client: int) -> Tensor:
        """The defended update: pruned, clipped, then noised (the module docstring's steps 1-3)."""
        out = delta + pruning_delta(delta, self.prune) if self.prune > 0 else delta
        if self.clip is not None:
            norm = float(out.norm())
            if norm > self.clip:
                out = out * (self.clip / norm)
        if self.noise > 0:
            gen = client_generator(self.seed, round, client, stream=_PRIVACY_STREAM)
            out = out + self.noise * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
        return out

    def protect(self, message: Message, reply: Message, ctx: ClientContext) -> Message:
        """The reply with its shared update defended (meta untouched; other entries as they were)."""
        keys = shared_keys(message, reply)
        if not self.active or not keys:
            return reply
        base = [message.arrays[k].to(reply.arrays[k]) for k in keys]
        delta = torch.cat([(reply.arrays[k] - b).reshape(-1) for k, b in zip(keys, base)])
        new = self.perturb(delta, ctx.round, ctx.client_id)
        arrays = dict(reply.arrays)
        offset = 0
        for k, b in zip(keys, base):
            n = b.numel()
            arrays[k] = b + new[offset:offset + n].view_as(b)
            offset += n
        return Message(arrays, reply.meta)
