"""Pieces the personalized / long-tailed algorithms share (FedPer, FedRep, FedBABU, FedAvg-FT,
FedETF, FedRoD, Ditto, FedLoGe): head splitting, personal state in the client store, label
priors, balanced softmax, local fine-tuning, and small predictor modules.

Personal state lives in the executor's per-client store (DESIGN "client keeps") under
namespaced keys and never enters a reply:

- ``"personal/<model state name>"``: entries that override the global model for client k's
  personalized predictor (FedPer/FedRep head, FedBABU/FedAvg-FT fine-tuned parts, Ditto's
  whole personal model, FedETF's fine-tuned projection).
- ``"label_counts"``: the client's training label histogram (float, K), the prior of
  balanced softmax (FedRoD, FedETF) and of FedLoGe's absent-class mask. It is computed on
  the client from its own labels and, like everything in the client state, stays there.

Algorithms whose client needs data-dependent set-up (the label histogram) return ``None``
from ``local_training`` on a client's first visit, so every executor falls back to
``client_update`` for that one call; from the second visit on they are declarative.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fedtrust.algorithms.fedavg import FedAvg
from fedtrust.data.types import ImageSet
from fedtrust.errors import ConfigError
from fedtrust.fl.local import train_locally
from fedtrust.fl.protocol import Batch, ClientContext, LocalTraining, Message, TrainResult, with_prefix
from fedtrust.models.heads import FeatureHead  # noqa: F401  (re-exported: the algorithms' predictors)

PERSONAL = "personal"
LABEL_COUNTS = "label_counts"
HEAD = "head."


# --------------------------------------------------------------------------- state helpers


def is_head(name: str) -> bool:
    """True for the classifier's entries of a FedModel state dict (``head.weight``, ``head.bias``)."""
    return name.startswith(HEAD)


def split_state(state: Mapping[str, Tensor], personal: Callable[[str], bool]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(shared, personal)`` parts of a state dict by the predicate ``personal(name)``."""
    shared = {k: v for k, v in state.items() if not personal(k)}
    own = {k: v for k, v in state.items() if personal(k)}
    return shared, own


def personal_overrides(client_state: Message | None) -> dict[str, Tensor]:
    """The ``"personal/"`` entries of a client state (empty for a client never sampled)."""
    return client_state.prefixed(PERSONAL) if client_state is not None else {}


def module_state(arrays: Mapping[str, Tensor], prefixes: Iterable[str]) -> dict[str, Tensor]:
    """Message keys ``"<sub>/<name>"`` → module state keys ``"<sub>.<name>"`` for the given submodules."""
    out = {}
    for p in prefixes:
        out.update({f"{p}.{k[len(p) + 1:]}": v for k, v in arrays.items() if k.startswith(p + "/")})
    return out


def message_arrays(state: Mapping[str, Tensor], prefixes: Iterable[str]) -> dict[str, Tensor]:
    """Module state keys ``"<sub>.<name>"`` → message keys ``"<sub>/<name>"`` for the given submodules."""
    out = {}
    for p in prefixes:
        out.update({f"{p}/{k[len(p) + 1:]}": v for k, v in state.items() if k.startswith(p + ".")})
    return out


# --------------------------------------------------------------------------- label priors


def label_counts(data: ImageSet) -> Tensor:
    """The client's training label histogram as float32 ``(K,)``."""
    return data.class_counts().float()


def with_label_counts(client_state: Message, data: ImageSet) -> Message:
    """``client_state`` plus the client's label histogram under ``"label_counts"`` (once)."""
    if LABEL_COUNTS in client_state.arrays:
        return client_state
    return Message(arrays={**client_state.arrays, LABEL_COUNTS: label_counts(data)}, meta=dict(client_state.meta))


def log_prior(counts: Tensor) -> Tensor:
    """``log n_c`` of a label histogram; classes the client lacks get ``log 1e-12`` (≈ −27.6).

    GUESS: the references use ``log 0 = −inf``; a finite floor gives the same
    softmax (exp(−27.6) ≈ 1e-12) without inf arithmetic in any executor.
    """
    return torch.log(counts.clamp_min(1e-12))


def balanced_softmax_ce(logits: Tensor, y: Tensor, prior: Tensor) -> Tensor:
    """Balanced softmax cross-entropy (Ren et al., NeurIPS 2020, Eq. 4): CE(z + log n, y).

    ``prior`` is :func:`log_prior` of the client's label counts; the loss
    trains ``z`` to estimate the label-balanced posterior (FedRoD Eq. 7, FedETF §4.2).
    """
    return F.cross_entropy(logits + prior, y)


# --------------------------------------------------------------------------- modules


def split_backbone(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """``(backbone, head)``: the model's own linear head is taken out (replaced by Identity).

    The backbone keeps ``features(x)``; callers give the head a new role (FedLoGe's
    global head G) or drop it (FedETF). Errors in one line when ``model`` does not
    follow the FedModel contract (``features`` + linear ``head``).
    """
    head = getattr(model, "head", None)
    if not callable(getattr(model, "features", None)) or not isinstance(head, nn.Linear):
        raise ConfigError(f"model {type(model).__name__} must expose features(x) and a linear head (the FedModel contract)")
    model.head = nn.Identity()
    return model, head


def fresh_copy(template: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """A copy of ``template`` carrying ``state`` (no RNG is consumed, unlike building a new model)."""
    model = copy.deepcopy(template)
    model.load_state_dict(dict(state))
    return model


# --------------------------------------------------------------------------- fine-tuning


class FineTuneParams(FedAvg.Params):
    """Local fine-tuning for personalization (FedBABU §3, FedAvg-FT, FedETF's local adaptation)."""

    ft_epochs: int = Field(1, ge=1, description="fine-tuning epochs over the client's data")
    ft_steps: int | None = Field(None, ge=1, description="fine-tuning minibatches; overrides ft_epochs when set")
    ft_lr: float | None = Field(None, gt=0, description="fine-tuning learning rate; null: train.lr (undecayed)")


def run_phase(plan: LocalTraining, data: ImageSet, ctx: ClientContext, normalize: Callable[[Tensor], Tensor],
              **changes: object) -> TrainResult:
    """Run ``plan`` with some fields replaced (``trainable``, ``epochs``, ``loss``, ...) on the
    reference trainer; multi-phase clients (FedRep, fine-tuning) chain these."""
    return train_locally(dataclasses.replace(plan, **changes), data, ctx, normalize)


class PersonalizedAvg(FedAvg):
    """FedAvg whose model splits into shared entries (averaged) and personal ones (kept on the client).

    Hooks a variant overrides: :meth:`is_personal` (which state entries never leave
    the client: FedPer's head), :meth:`trainable` (FedBABU freezes the head) and
    :meth:`local_loss`. The declarative plan starts from the global model with the
    client's personal entries laid over it; :meth:`finish` replies with the shared
    entries only and stores the personal ones under ``"personal/"``.
    """

    personalized = True

    def is_personal(self, name: str) -> bool:
        """State entries that stay on the client (none for FedAvg)."""
        return False

    def is_fixed(self, name: str) -> bool:
        """State entries nobody trains (a frozen head, a fixed ETF): never re-sent in replies."""
        return False

    def trainable(self, model: nn.Module) -> tuple[str, ...]:
        """Parameters trained locally: all of them by default."""
        return tuple(name for name, _ in model.named_parameters())

    def plan(self, message: Message, client_state: Message, ctx: ClientContext) -> LocalTraining:
        """The round's local training of this client (declarative)."""
        base = super().local_training(message, client_state, ctx)
        own = {k: v for k, v in personal_overrides(client_state).items() if self.is_personal(k)}
        return dataclasses.replace(base, init={**base.init, **own}, trainable=self.trainable(base.model))

    def local_training(self, message: Message, client_state: Message, ctx: ClientContext) -> LocalTraining | None:
        return self.plan(message, client_state, ctx)

    def finish(self, message: Message, result: TrainResult, client_state: Message,
               ctx: ClientContext) -> tuple[Message, Message]:
        state = {k: v for k, v in result.state.items() if not self.is_fixed(k)}
        shared, own = split_state(state, self.is_personal)
        reply = Message(arrays=with_prefix("model", shared),
                        meta={"num_examples": result.num_examples, "loss": result.mean_loss, "steps": result.steps})
        arrays = {**client_state.arrays, **with_prefix(PERSONAL, own)}
        return reply, Message(arrays=arrays, meta=dict(client_state.meta))

    def client_update(self, message: Message, data: ImageSet, client_state: Message,
                      ctx: ClientContext) -> tuple[Message, Message]:
        result = train_locally(self.plan(message, client_state, ctx), data, ctx, self.ctx.normalize)
        return self.finish(message, result, client_state, ctx)

    def aggregate(self, state: Message, replies: dict[int, Message], round: int) -> tuple[Message, dict[str, Any]]:
        return self.ctx.defense.merge(state, replies, ["model"], round, self.params.bn_aggregation)

    def personalized_model(self, state: Message, client_state: Message | None) -> nn.Module:
        """The global model with the client's ``"personal/"`` entries laid over it."""
        return fresh_copy(self.template, {**state.prefixed("model"), **personal_overrides(client_state)})

    def predictors(self, state: Message, client_state: Message | None = None) -> dict[str, nn.Module]:
        return {"global": fresh_copy(self.template, state.prefixed("model")),
                "personalized": self.personalized_model(state, client_state)}


class FineTuned(PersonalizedAvg):
    """Personalization by local fine-tuning of the global model (FedAvg-FT, FedBABU, FedETF).

    The client trains as its parent says and replies; then it fine-tunes the model it
    *received* this round (the current global model) on its own data for
    ``ft_epochs`` (or ``ft_steps``) on the parameters :meth:`finetune_names` names,
    with :meth:`finetune_loss`, and stores the tuned entries under ``"personal/"``.

    GUESS (protocol): the papers fine-tune the *final* global model at evaluation time;
    ``predictors`` cannot see client data, so each client fine-tunes whenever it is
    sampled and evaluation uses its latest tuned entries (a client never sampled is
    scored with the global model). Fine-tuning is a second training phase on a
    different parameter set, so this client is the general path (``client_update``),
    and ``local_training`` returns ``None`` for every executor.
    """

    def finetune_names(self, model: nn.Module) -> tuple[str, ...]:
        """Parameters the fine-tuning trains."""
        raise NotImplementedError

    def finetune_keep(self, name: str) -> bool:
        """State entries stored as the personal model after fine-tuning (default: the tuned parameters)."""
        return name in self._ft_names

    @functools.cached_property
    def _ft_names(self) -> frozenset[str]:
        return frozenset(self.finetune_names(self.template))

    def finetune_loss(self, model: nn.Module, params: dict[str, Tensor], batch: Batch,
                      ref: dict[str, Tensor]) -> Tensor:
        """The fine-tuning loss: the configured objective (cross-entropy by default)."""
        return self.ctx.objective(model, batch)

    declarative = False

    def local_training(self, message: Message, client_state: Message, ctx: ClientContext) -> LocalTraining | None:
        return None

    def finetune(self, message: Message, data: ImageSet, client_state: Message, ctx: ClientContext) -> dict[str, Tensor]:
        """Fine-tune the received global model; returns the entries to store as personal."""
        base = FedAvg.local_training(self, message, client_state, ctx)
        p = self.params
        # GUESS: the undecayed client lr; the round's decayed lr (→ 0 at the end of a cosine
        # schedule) would make the last rounds' fine-tuning, the one evaluation sees, a no-op.
        lr = p.ft_lr if p.ft_lr is not None else self.ctx.lr(1)
        result = run_phase(base, data, ctx, self.ctx.normalize, trainable=self.finetune_names(base.model),
                           loss=self.finetune_loss, optimizer=self.ctx.optimizer(lr), epochs=p.ft_epochs,
                           steps=p.ft_steps, ref={})
        return {k: v for k, v in result.state.items() if self.finetune_keep(k)}

    def client_update(self, message: Message, data: ImageSet, client_state: Message,
                      ctx: ClientContext) -> tuple[Message, Message]:
        reply, client_state = super().client_update(message, data, client_state, ctx)
        tuned = self.finetune(message, data, client_state, ctx)
        arrays = {**client_state.arrays, **with_prefix(PERSONAL, tuned)}
        return reply, Message(arrays=arrays, meta=dict(client_state.meta))
