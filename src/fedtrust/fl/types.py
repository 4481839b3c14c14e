"""The core types of the message-passing protocol (DESIGN.md "The Algorithm protocol").

This module imports nothing else of ``fedtrust.fl``: executors, the client runtime,
algorithms, attacks and defenses all import from here, so ``fl/`` has no import cycles.

Messages are flat ``dict[str, Tensor]`` with namespaced keys
(``"model/conv1.weight"``) plus JSON-able ``meta`` that carries the sample
weight (``meta["num_examples"]``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

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

    def to(self, device: torch.device | str) -> Message:
        """The same message with every array on ``device`` (arrays already there are shared, not copied)."""
        device = torch.device(device)
        if all(v.device == device for v in self.arrays.values()):
            return self
        return Message({k: v.to(device) for k, v in self.arrays.items()}, self.meta)


def with_prefix(prefix: str, arrays: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{"a": t}`` → ``{"prefix/a": t}``."""
    return {f"{prefix}/{k}": v for k, v in arrays.items()}


@dataclass(frozen=True)
class OptimizerSpec:
    """A client optimizer, rebuilt each round; its state starts fresh unless the plan carries a kept one
    (:attr:`LocalTraining.optimizer_state`, config ``train.keep_optimizer``)."""

    name: str = "sgd"  # "sgd" | "adam"
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    milestones: tuple[float, ...] = ()
    """Decay points within one local training, as fractions of its steps: the lr is multiplied by ``gamma``
    from step ⌊m·T⌋ on for each milestone m (T: the client's local steps). FLIP's attackers decay ×0.1 at
    20 % and 80 % of their epochs (torch's MultiStepLR per epoch, equal when every epoch has as many batches)."""
    gamma: float = 0.1

    def lr_factor(self, step: int, total: int) -> float:
        """The lr multiplier at local step ``step`` (0-based) of ``total``: gamma^(milestones reached)."""
        return self.gamma ** sum(step >= int(m * total) for m in self.milestones)

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
    drop_last: bool = False
    """Drop the final short batch of each pass (a client smaller than one batch keeps its one batch)."""
    views: int = 1
    """Augmented views of each ID image in a batch: 2 adds ``batch["x2"]`` (contrastive objectives)."""
    outliers: Tensor | None = None
    """The client's share of auxiliary outliers (uint8 images); when set, every batch also holds
    ``batch["x_ood"]``, as many outliers as ID images, drawn without replacement per pass."""
    outlier_ratio: float = 1.0
    """Outliers per ID image in a batch (:func:`~fedtrust.fl.local.outlier_count`): 1 as RNA and OE trained
    from scratch, 2 as the fine-tuned baselines (128 ID + 256 outliers)."""
    grad_mask: dict[str, Tensor] | None = None
    """0/1 masks (by trainable parameter name, its shape) multiplied into the gradient before every optimizer
    step: the update stays on the masked coordinates (Neurotoxin's projection, Zhang et al., ICML 2022)."""
    optimizer_state: dict[str, Tensor] | None = None
    """A kept optimizer state to start from (:mod:`fedtrust.fl.optim_state`; empty: fresh). When not None,
    the result carries the final optimizer state (:attr:`TrainResult.optimizer_state`) to keep for the next
    round; None: a fresh optimizer whose state is dropped (the default)."""


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
    optimizer_state: dict[str, Tensor] | None = None
    """The optimizer's final state, when the plan kept one (:attr:`LocalTraining.optimizer_state`)."""
