"""The message-passing ``Algorithm`` protocol (DESIGN.md "The Algorithm protocol").

An algorithm says what the server sends (``configure``), what a client computes
from that message, its own data and its persistent state (``local_training``
for the declarative, vectorisable path, or ``client_update`` for any Python),
how the server aggregates replies (``aggregate``) and which models evaluation
scores (``predictors``). Executors own the round loop; nothing here knows
which executor runs it.

Messages are flat ``dict[str, Tensor]`` with namespaced keys
(``"model/conv1.weight"``) plus JSON-able ``meta`` that carries the sample
weight (``meta["num_examples"]``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from fedtrust.data.types import ImageSet

if TYPE_CHECKING:
    from fedtrust.fl.context import AlgorithmContext

Batch = dict[str, Tensor]
"""A training batch: ``"x"`` (normalised float images), ``"y"`` (labels), plus
objective-specific entries (e.g. ``"x_ood"``)."""

LossFn = Callable[[nn.Module, Mapping[str, Tensor], Batch, Mapping[str, Tensor]], Tensor]
"""``loss(model, params, batch, ref) -> scalar``.

``model`` is the architecture, already carrying the current parameters (the
sequential trainer trains it in place; the vectorised executor calls it through
``torch.func.functional_call``); ``params`` are the trainable tensors by name,
for terms that need them explicitly (FedProx's proximal term); ``ref`` holds
constant tensors sent by the server (e.g. the global weights)."""


@dataclass
class Message:
    """A flat payload: named tensors plus small JSON-able metadata."""

    arrays: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def prefixed(self, prefix: str) -> dict[str, Tensor]:
        """The arrays under ``prefix + "/"``, with the prefix stripped."""
        p = prefix + "/"
        return {k[len(p):]: v for k, v in self.arrays.items() if k.startswith(p)}


def with_prefix(prefix: str, arrays: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{"a": t}`` → ``{"prefix/a": t}``."""
    return {f"{prefix}/{k}": v for k, v in arrays.items()}


@dataclass(frozen=True)
class OptimizerSpec:
    """A client optimizer, rebuilt fresh each round (its state does not persist across rounds)."""

    name: str = "sgd"  # "sgd" | "adam"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def build(self, params: list[Tensor]) -> torch.optim.Optimizer:
        """The torch optimizer for ``params`` (the sequential reference path)."""
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum,
                                   weight_decay=self.weight_decay, nesterov=self.nesterov)
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=self.betas, eps=self.eps,
                                    weight_decay=self.weight_decay)
        raise ValueError(f"unknown optimizer {self.name!r}")


@dataclass
class LocalTraining:
    """Declarative local training: enough for any executor to run it, vectorised or not.

    Starting from ``init`` (a full state dict of ``model``: parameters and
    buffers), minimise ``loss`` over the parameters named in ``trainable`` with
    ``optimizer`` for ``epochs`` passes (or exactly ``steps`` minibatches when
    set) of ``batch_size`` over the client's data. Parameters not in
    ``trainable`` stay frozen; buffers (BN running statistics) update in train
    mode as usual.
    """

    model: nn.Module
    init: dict[str, Tensor]
    trainable: tuple[str, ...]
    loss: LossFn
    optimizer: OptimizerSpec
    batch_size: int
    epochs: int = 1
    steps: int | None = None
    ref: dict[str, Tensor] = field(default_factory=dict)
    augment: str = "none"
    views: int = 1
    """Augmented views of each ID image in a batch: 2 adds ``batch["x2"]`` (contrastive objectives)."""
    outliers: Tensor | None = None
    """The client's share of auxiliary outliers (uint8 images); when set, every batch also holds
    ``batch["x_ood"]``, as many outliers as ID images, drawn without replacement per pass."""


@dataclass
class ClientContext:
    """What an executor tells a client about the call: who, when, and its RNG."""

    client_id: int
    round: int
    generator: torch.Generator
    device: torch.device


@dataclass
class TrainResult:
    """The outcome of running a :class:`LocalTraining` on one client."""

    state: dict[str, Tensor]
    num_examples: int
    steps: int
    mean_loss: float


class Algorithm:
    """Base class: FedAvg-like defaults; an algorithm overrides only the hooks it needs.

    Subclasses set ``name`` and ``Params`` (a pydantic model of their
    hyper-parameters, validated from the ``algorithm`` config section) and are
    registered with ``@register("algorithm", name)``.
    """

    name: ClassVar[str] = "base"
    personalized: ClassVar[bool] = False
    """True when ``predictors`` depends on the client state (personalized models)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, params: BaseModel, ctx: "AlgorithmContext") -> None:
        self.params = params
        self.ctx = ctx

    @functools.cached_property
    def template(self) -> nn.Module:
        """One architecture instance reused by every local training of this algorithm (weights are overwritten)."""
        return self.ctx.new_model().to(self.ctx.device)

    # ---- server side -------------------------------------------------
    def init(self) -> Message:
        """Round-0 server state: the initial global model under ``"model/"``."""
        return Message(arrays=with_prefix("model", self.ctx.new_model().state_dict()), meta={})

    def configure(self, state: Message, round: int, clients: list[int]) -> dict[int, Message]:
        """What each sampled client receives: by default the global model and this round's lr."""
        payload = Message(arrays={k: v for k, v in state.arrays.items() if k.startswith("model/")},
                          meta={"lr": self.ctx.lr(round), "round": round})
        return {c: payload for c in clients}

    def aggregate(self, state: Message, replies: dict[int, Message], round: int) -> Message:
        """Server update from the clients' replies."""
        raise NotImplementedError

    def predictors(self, state: Message, client_state: Message | None = None) -> dict[str, nn.Module]:
        """Named models to evaluate; the first is the primary one reported as ``test_acc``."""
        model = self.ctx.new_model()
        model.load_state_dict(state.prefixed("model"))
        return {"global": model}

    # ---- client side -------------------------------------------------
    def local_training(self, message: Message, client_state: Message) -> LocalTraining | None:
        """Declarative local training for ``message``; None when the client needs general code."""
        return None

    def finish(self, message: Message, result: TrainResult, client_state: Message) -> tuple[Message, Message]:
        """Turn a finished :class:`LocalTraining` into the reply and the new client state."""
        reply = Message(arrays=with_prefix("model", result.state),
                        meta={"num_examples": result.num_examples, "loss": result.mean_loss, "steps": result.steps})
        return reply, client_state

    def client_update(self, message: Message, data: ImageSet, client_state: Message,
                      ctx: ClientContext) -> tuple[Message, Message]:
        """General client path. The default runs ``local_training`` with the reference trainer."""
        from fedtrust.fl.local import train_locally

        plan = self.local_training(message, client_state)
        if plan is None:
            raise NotImplementedError(f"algorithm {self.name!r} defines neither local_training nor client_update")
        result = train_locally(plan, data, ctx, self.ctx.normalize)
        return self.finish(message, result, client_state)

