"""Logits of predictors over a test set, in large batches, with a shared backbone run once."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from fedtrust.models.heads import FeatureHead


@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, normalize: Callable[[Tensor], Tensor],
                   batch_size: int) -> Tensor:
    """Logits of ``model`` in eval mode over uint8 ``images``, in large batches."""
    was_training = model.training
    model.eval()
    out = [model(normalize(chunk)) for chunk in images.split(batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def predict_all(predictors: Mapping[str, nn.Module], images: Tensor, normalize: Callable[[Tensor], Tensor],
                batch_size: int) -> dict[str, Tensor]:
    """Logits of every predictor over ``images`` (:func:`predict_logits` each), in ``predictors``' order.

    Predictors that are :class:`~fedtrust.models.heads.FeatureHead` s over one
    shared backbone object (FedLoGe's universal / global / personalized) run
    that backbone once and apply each head to the same features: the same
    numbers as one pass per predictor, a third of the work.
    """
    out: dict[str, Tensor] = {}
    shared: dict[int, list[str]] = {}
    for name, model in predictors.items():
        if isinstance(model, FeatureHead):
            shared.setdefault(id(model.backbone), []).append(name)
        else:
            out[name] = predict_logits(model, images, normalize, batch_size)
    for names in shared.values():
        heads = [predictors[n] for n in names]
        modes = [m.training for m in heads]
        for m in heads:
            m.eval()
        feats = [heads[0].backbone.features(normalize(chunk)) for chunk in images.split(batch_size)]
        for name, m, mode in zip(names, heads, modes):
            out[name] = torch.cat([m.head(f) for f in feats]) if feats else torch.empty(0)
            m.train(mode)
    return {name: out[name] for name in predictors}
