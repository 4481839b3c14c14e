"""Backbones: ``create_model(name, num_classes, in_shape, **options)``.

Every model is a :class:`~fedtrust.models.base.FedModel` (``features``,
``head``, ``num_features``) registered under the ``"model"`` kind, one family
per file (STYLE §2, after timm):

========== ============================================== ==========================
name        architecture                                   options
========== ============================================== ==========================
cnn         3-layer conv3x3 CNN, GAP (digits, MNIST)       width, norm, bn_affine, width_ratio, rescale_*
digitnet    Split-Mix DigitModel, FC-512 features          norm, bn_affine, width_ratio, rescale_*
cnn2        McMahan et al. 2017 CNN, FC-512 features       hidden
lenet       DBA/FLIP MnistNet, FC-500 features (>= 16 px)  (none)
convnet5    I2F's sigmoid 4-conv5x5 net (leakage audit)    width, init
sigmoid_mlp sigmoid MLP (leakage audit)                    hidden, init
resnet18    CIFAR ResNet-18                                norm, bn_affine, bn_affine_shortcut
resnet34    CIFAR ResNet-34                                norm, bn_affine, bn_affine_shortcut
preresnet18 HeteroFL pre-activation ResNet-18              norm, bn_affine, width_ratio, rescale_*
wrn         WideResNet, WRN-16-4 by default                depth, widen_factor, dropout, norm, bn_affine
wrn40_2     WRN-40-2                                       dropout, norm, bn_affine
========== ============================================== ==========================

A builder's keyword-only parameters are its options (:func:`model_options`).
``rescale_*`` is ``rescale_init`` and ``rescale_layer`` (:mod:`fedtrust.models.width`).
Not registered, built from models: :class:`~fedtrust.models.ensemble.MixedModel`
(Split-Mix's mixed model) and :class:`~fedtrust.models.slimmable.SlimNet`
(a full model run at a smaller width).
"""

from __future__ import annotations

import inspect
from typing import Any

from fedtrust.errors import ConfigError
from fedtrust.models import cnn, digitnet, dual_bn, preresnet, resnet, sigmoid, wrn  # noqa: F401  (importing registers the families)
from fedtrust.models.base import FedModel, Shape, check_in_shape, check_int
from fedtrust.models.norms import NormFactory
from fedtrust.registry import get

__all__ = ["FedModel", "NormFactory", "create_model", "model_options"]


def model_options(name: str) -> dict[str, Any]:
    """The options model ``name`` accepts, with their defaults, in declaration order."""
    params = inspect.signature(get("model", name)).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def create_model(name: str, num_classes: int, in_shape: Shape, **kwargs: Any) -> FedModel:
    """Build registered model ``name`` for ``num_classes`` classes and ``(C, H, W)`` inputs.

    Options whose value is ``None`` are dropped, so an unset config field keeps
    the builder's default. The model is initialised from the caller's global
    torch RNG (seed it first for reproducible weights).

    Raises:
        ConfigError: unknown name, unknown option, bad option value or an input
            shape the model cannot take; the message is one line.
    """
    builder = get("model", name)
    options = {k: v for k, v in kwargs.items() if v is not None}
    valid = model_options(name)
    unknown = [k for k in options if k not in valid]
    if unknown:
        raise ConfigError(f"model {name!r} has no option {unknown[0]!r}; valid: {', '.join(valid) or 'none'}")
    try:
        check_int("num_classes", num_classes, 1)
        return builder(num_classes, check_in_shape(in_shape), **options)
    except ConfigError as err:
        raise ConfigError(f"model {name!r}: {err}") from None
