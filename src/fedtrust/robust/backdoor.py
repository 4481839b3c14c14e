"""Backdoor attacks (registry kind ``attack``): poisoned local data, and model replacement by scaling.

``backdoor``: a malicious client stamps a trigger (:mod:`fedtrust.robust.triggers`) on a fraction of its
training images and relabels them to the target class (all-to-one), trains as the algorithm says, and
optionally scales its update, ``θ + γ·(θ_i − θ)`` (model replacement, Bagdasaryan et al., AISTATS 2020,
Eq. 3: γ = n/η makes the global model the attacker's; FLIP's single-shot attack uses γ = 100 = 10/0.1,
spec flip.md §1; ``scale: replace`` sets γ = n/η from the run's config, :func:`replacement_scale`). With
the ``dba`` trigger (Xie et al., ICLR 2020) the i-th attacker (in id order) stamps only piece i, and the
test trigger is the union of all pieces; ``pixel`` and ``blend`` triggers are stamped whole by every
attacker.

GUESS (poisoned fraction): FLIP's code stamps the first ``poisoning_per_batch`` images of every batch
(20 of 64, 31 %). Here ``poison_fraction`` of the client's images, drawn from its round generator, are
stamped before its local training, so a batch holds that fraction in expectation; every executor runs the
same draw (the data change sends the client down the general path).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from fedtrust.data.types import ImageSet
from fedtrust.errors import ConfigError
from fedtrust.fl.types import ClientContext, LocalTraining, Message
from fedtrust.registry import register
from fedtrust.robust.attacks import Attack, honest_delta, replace_update, shared_keys
from fedtrust.robust.triggers import DBATrigger, Stamper, build_trigger, poison_fraction


PREV = "prev"
REPLACE = "replace"


def replacement_scale(clients_per_round: int, server_lr: float) -> float:
    """Model replacement's γ = n/η (Bagdasaryan et al., AISTATS 2020, Eq. 3): with the server's update
    G + (η/n)·Σ_i Δ_i, an attacker that sends γ·Δ_a while the benign updates roughly cancel moves the global
    model by Δ_a, onto its own model. Exact for the unweighted mean (``defense.uniform``); under a
    sample-weighted mean the attacker's weight is its share of the samples instead of 1/n."""
    return clients_per_round / server_lr


def neurotoxin_mask(message: Message, state: dict[str, Tensor], trainable: tuple[str, ...],
                    top_fraction: float) -> dict[str, Tensor] | None:
    """Neurotoxin's gradient mask (Zhang et al., ICML 2022, Alg. 1): 0 on the ``top_fraction`` of coordinates
    with the largest benign update, 1 elsewhere, so the backdoor lives where benign training rarely writes
    and lasts longer. The benign update is estimated on the attacker's side as the change of the global
    model since its previous visit (``state["prev/…"]``, kept on the client); None (no mask) on a first visit.

    GUESS: the paper ranks the coordinates of the benign gradient; with only the global models an attacker
    sees, their difference over its last visit stands for it (the whole round's aggregated update).
    """
    by_name = {k.split("/", 1)[1]: k for k in message.arrays if "/" in k}
    keys = [(name, by_name[name]) for name in trainable if name in by_name and f"{PREV}/{by_name[name]}" in state]
    if not keys:
        return None
    deltas = {name: (message.arrays[k].double() - state[f"{PREV}/{k}"].double()).abs() for name, k in keys}
    flat = torch.cat([d.flatten() for d in deltas.values()])
    k = max(1, int(round(top_fraction * flat.numel())))
    threshold = torch.topk(flat, k).values[-1]
    return {name: (d < threshold).to(message.arrays[key].dtype) for (name, key), d in zip(keys, deltas.values())}


@register("attack", "backdoor")
class Backdoor(Attack):
    """Trigger-stamped, relabelled local data (BadNets / DBA / blended) plus optional update scaling γ."""

    name = "backdoor"
    changes_data = True

    class Params(Attack.Params):
        trigger: Literal["dba", "pixel", "blend"] = Field("dba", description="trigger kind: dba (each attacker "
                                                                            "its piece), pixel, blend")
        rects: list[tuple[int, int, int, int]] | None = Field(
            None, description="(row, col, height, width) rectangles: the pixel trigger, or dba's pieces "
                              "(null: the preset for the image size)")
        value: float = Field(1.0, ge=0.0, le=1.0, description="pixel value of pixel/dba triggers, in [0, 1]")
        alpha: float = Field(0.2, gt=0.0, le=1.0, description="blend ratio of the blend trigger")
        target: int = Field(2, ge=0, description="the class poisoned images are relabelled to (all-to-one)")
        poison_fraction: float = Field(0.3125, ge=0.0, le=1.0, description="fraction of the attacker's images "
                                                                           "stamped and relabelled (FLIP: 20/64)")
        scale: float | str = Field(
            1.0, description="γ > 0: reply θ + γ·(θ_i − θ); `replace`: model replacement's γ = n/η, with n = "
            "data.clients_per_round and η = defense.server_lr of the run (resolved when the run builds the attack)")
        norm_bound: float | None = Field(None, gt=0.0, description="constrain-and-scale: the scaled update is "
                                                                   "projected onto this L2 ball (null: none)")
        lr: float | None = Field(None, gt=0.0, description="the attacker's own local lr (null: the benign one)")
        epochs: int | None = Field(None, ge=1, description="the attacker's own local epochs (null: benign)")
        momentum: float | None = Field(None, ge=0.0, lt=1.0, description="the attacker's own SGD momentum")
        weight_decay: float | None = Field(None, ge=0.0, description="the attacker's own weight decay")
        lr_milestones: list[float] | None = Field(None, description="the attacker's lr decay points, as fractions "
                                                  "of its local steps (FLIP: [0.2, 0.8], x lr_gamma each)")
        lr_gamma: float = Field(0.1, gt=0.0, le=1.0, description="the attacker's lr decay factor at each milestone")
        neurotoxin: float | None = Field(None, gt=0.0, lt=1.0, description="Neurotoxin: the fraction of "
                                         "coordinates the benign update moves most, which the attacker's "
                                         "gradient leaves alone (null: off)")

        @field_validator("scale", mode="before")
        @classmethod
        def _gamma_or_replace(cls, v: Any) -> float | str:
            if v == REPLACE:
                return v
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"expected a number γ > 0 or '{REPLACE}'")
            return float(v)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.params.scale == REPLACE:
            raise ConfigError("config key 'attack.scale': 'replace' is resolved by the run (γ = "
                              "data.clients_per_round / defense.server_lr); pass a number when building the "
                              "attack directly (see replacement_scale)")
        if any(not 0.0 < m < 1.0 for m in self.params.lr_milestones or ()):
            raise ConfigError(f"config key 'attack.lr_milestones': fractions of the local steps in (0, 1), got "
                              f"{self.params.lr_milestones}")
        if self.params.target >= self.num_classes:
            raise ConfigError(f"config key 'attack.target': {self.params.target} is not a class (0.."
                              f"{self.num_classes - 1})")
        self._order = {c: i for i, c in enumerate(sorted(self.targets.clients))}

    def trigger(self, image_shape: tuple[int, ...]) -> Any:
        """The configured trigger for images of ``image_shape`` (C, H, W)."""
        p = self.params
        if p.trigger == "blend":
            return build_trigger("blend", image_shape, alpha=p.alpha)
        params: dict[str, Any] = {"value": p.value}
        if p.rects is not None:
            params["rects" if p.trigger == "pixel" else "pieces"] = [tuple(r) for r in p.rects]
        elif p.trigger == "pixel":
            raise ConfigError("config key 'attack.rects': the pixel trigger needs its rectangles "
                              "[[row, col, height, width], ...]")
        return build_trigger(p.trigger, image_shape, **params)

    def test_trigger(self, image_shape: tuple[int, ...]) -> Stamper:
        """The trigger stamped on test images for the ASR: the union of the DBA pieces, else the trigger."""
        trig = self.trigger(image_shape)
        return trig.union() if isinstance(trig, DBATrigger) else trig

    def client_trigger(self, client: int, image_shape: tuple[int, ...]) -> Stamper:
        """What attacker ``client`` stamps: its own DBA piece (by its rank among the attackers), else the trigger."""
        trig = self.trigger(image_shape)
        return trig.piece(self._order.get(client, 0)) if isinstance(trig, DBATrigger) else trig

    def poison_data(self, data: ImageSet, ctx: ClientContext) -> ImageSet:
        """``poison_fraction`` of the images (drawn from the client's round generator) stamped and relabelled."""
        n = len(data)
        count = poison_fraction(n, self.params.poison_fraction)
        chosen = torch.randperm(n, generator=ctx.generator)[:count].to(data.x.device)
        stamper = self.client_trigger(ctx.client_id, tuple(data.x.shape[1:]))
        x, y = data.x.clone(), data.y.clone()
        x[chosen] = stamper.stamp(x[chosen])
        y[chosen] = self.params.target
        return ImageSet(x, y, data.num_classes)

    def rewrite_plan(self, plan: LocalTraining, ctx: ClientContext, message: Message,
                     state: dict[str, Tensor]) -> LocalTraining:
        """The attacker's own local training: the benign plan with ``lr``/``epochs``/``momentum``/
        ``weight_decay`` replaced where set, and ``lr_milestones`` (FLIP's attackers: SGD lr 0.05, 10 epochs,
        ×0.1 at 20 % and 80 %, spec flip.md §1)."""
        p = self.params
        spec = plan.optimizer
        spec = dataclasses.replace(spec, **{k: v for k, v in (("lr", p.lr), ("momentum", p.momentum),
                                                               ("weight_decay", p.weight_decay)) if v is not None})
        if p.lr_milestones is not None:
            spec = dataclasses.replace(spec, milestones=tuple(p.lr_milestones), gamma=p.lr_gamma)
        changes: dict[str, Any] = {"optimizer": spec}
        if p.epochs is not None:
            changes.update(epochs=p.epochs, steps=None)
        if p.neurotoxin is not None:
            changes["grad_mask"] = neurotoxin_mask(message, state, plan.trainable, p.neurotoxin)
        return dataclasses.replace(plan, **changes)

    @property
    def rewrites_training(self) -> bool:
        p = self.params
        return any(v is not None for v in (p.lr, p.epochs, p.momentum, p.weight_decay, p.neurotoxin,
                                           p.lr_milestones))

    def observe(self, message: Message, state: dict[str, Tensor], ctx: ClientContext) -> dict[str, Tensor]:
        """Neurotoxin: remember the global model of this visit (``prev/…``), whose change by the next visit
        estimates the benign update. Nothing kept otherwise."""
        if self.params.neurotoxin is None:
            return state
        return {f"{PREV}/{k}": v.detach().clone() for k, v in message.arrays.items() if v.is_floating_point()}

    def poison_reply(self, message: Message, reply: Message, ctx: ClientContext) -> Message:
        """The trained reply, its update scaled by γ, then (constrain-and-scale, Bagdasaryan et al. 2020 §4)
        projected onto the ``norm_bound`` ball; unchanged for γ = 1 without a bound."""
        p = self.params
        if p.scale == 1.0 and p.norm_bound is None:
            return reply
        keys = shared_keys(message, reply)
        delta = p.scale * honest_delta(message, reply, keys)
        if p.norm_bound is not None:
            delta = delta * min(1.0, p.norm_bound / max(float(delta.norm()), 1e-12))
        return replace_update(message, reply, keys, delta)
