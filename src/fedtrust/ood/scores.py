"""OOD scores: pure functions of ``(logits, features)``, registered under the ``"score"`` kind.

Convention: **every score is "higher = more in-distribution"** (an ID-ness
score). Metrics (``fedtrust.ood.metrics``) take ID-ness scores of the ID and
OOD test sets and handle the OOD-positive conventions themselves. pytorch-ood
and the RNA code return the negation ("OOD score"); do not negate here.

========  ==========================================  ==================================
name      s(x)                                        reference
========  ==========================================  ==================================
msp       max_k softmax(f(x))_k                       Hendrycks & Gimpel, ICLR 2017
maxlogit  max_k f_k(x)                                Hendrycks et al., ICML 2022
energy    T · logsumexp_k(f_k(x) / T), T = 1          Liu et al., NeurIPS 2020 (spec rna.md §5)
rn        ||z(x)||_2                                  Shin & Chung, TMLR 2024 (spec rna.md §1)
========  ==========================================  ==================================

Each score has the signature ``score(logits, features, **params) -> Tensor``
of shape ``(B,)``; ``logits`` is ``(B, C)`` and ``features`` is ``z`` of shape
``(B, d)``. :func:`compute_scores` gets both from one eval-mode pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from fedtrust.registry import get, register


class Score(Protocol):
    """``score(logits, features, **params) -> (B,)`` ID-ness scores (higher = more ID)."""

    def __call__(self, logits: Tensor, features: Tensor, **params: Any) -> Tensor: ...


@register("score", "msp")
def msp(logits: Tensor, features: Tensor | None = None) -> Tensor:
    """Maximum softmax probability ``max_k softmax(f)_k`` (Hendrycks & Gimpel 2017); higher = more ID."""
    return torch.softmax(logits, dim=1).amax(dim=1)


@register("score", "maxlogit")
def maxlogit(logits: Tensor, features: Tensor | None = None) -> Tensor:
    """Maximum logit ``max_k f_k`` (Hendrycks et al. 2022); higher = more ID."""
    return logits.amax(dim=1)


@register("score", "energy")
def energy(logits: Tensor, features: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """Negative free energy ``−E(x; f) = T · logsumexp_k(f_k / T)`` on the **logits** (Liu et al., NeurIPS 2020; spec rna.md §5).

    Higher = more ID. ``T = 1`` by default (spec rna.md §5). The RNA repo's
    ``get_energy_scores`` applies logsumexp to softmax probabilities, which is
    a bug (spec §5, §9.2); this uses the logits.
    """
    return temperature * torch.logsumexp(logits / temperature, dim=1)


@register("score", "rn")
def representation_norm(logits: Tensor | None, features: Tensor) -> Tensor:
    """Representation norm ``s(x) = ||z(x)||_2`` of the features fed to the classifier (RNA, spec rna.md §1).

    Higher = more ID. It is the norm of ``z`` itself (not of the projection
    ``h(z)``), without a log, computed with BN in eval mode (running stats).
    """
    return torch.linalg.vector_norm(features, ord=2, dim=1)


def get_score(name: str) -> Callable[..., Tensor]:
    """The registered score ``name`` (one-line ConfigError listing the valid names otherwise)."""
    return get("score", name)


def _model_device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def forward_in_batches(model: nn.Module, images: Tensor, normalize: Callable[[Tensor], Tensor],
                       batch_size: int) -> tuple[Tensor, Tensor]:
    """``(z, logits)`` of ``model`` in eval mode over uint8 ``images`` (N, C, H, W), in batches.

    One ``model.forward_features_and_logits`` call per batch; the model's
    train/eval mode is restored afterwards. Outputs live on the model's device.
    """
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        parts = [model.forward_features_and_logits(normalize(chunk.to(device))) for chunk in images.split(batch_size)]
    finally:
        model.train(was_training)
    if not parts:
        return torch.empty(0, getattr(model, "num_features", 0)), torch.empty(0, getattr(model, "num_classes", 0))
    return torch.cat([z for z, _ in parts]), torch.cat([f for _, f in parts])


def compute_scores(model: nn.Module, images_uint8: Tensor, normalize: Callable[[Tensor], Tensor],
                   batch_size: int, names: Sequence[str], **params: Any) -> dict[str, Tensor]:
    """Every score in ``names`` for ``images_uint8``, from **one** eval-mode pass of ``model``.

    Args:
        model: a FedModel (anything with ``forward_features_and_logits``).
        images_uint8: uint8 images (N, C, H, W), on any device.
        normalize: uint8 batch -> normalised float batch (the ID data set's normalisation).
        batch_size: evaluation batch size.
        names: registered score names, e.g. ``("msp", "energy", "rn")``.
        **params: per-score keyword arguments keyed by score name, e.g. ``energy={"temperature": 2.0}``.

    Returns:
        ``{name: (N,) float tensor}``, higher = more in-distribution.
    """
    fns = {name: get_score(name) for name in names}  # unknown names fail before the forward pass
    z, logits = forward_in_batches(model, images_uint8, normalize, batch_size)
    return {name: fn(logits, z, **params.get(name, {})) for name, fn in fns.items()}
