"""Choosing a model's trainable parameters by name pattern (config ``train.trainable``).

PASCL's stage 2 (Wang et al., ICML 2022; spec rna.md §5) fine-tunes "only the BN and FC layers"; FedBABU
and FedRep-style schedules train a part of the model. A pattern is an ``fnmatch`` glob over
``named_parameters()`` names (``head.*``, ``layer4.*``), or the token ``<norm>``: every parameter of a
normalisation layer (BatchNorm, GroupNorm, LayerNorm, InstanceNorm), whose positional names
(``body.0.1.weight``) differ from one architecture to the next.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

from fedtrust.errors import ConfigError

NORM = "<norm>"
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that belong to normalisation layers (affine γ/β; none when non-affine)."""
    return {f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() if isinstance(module, NORM_TYPES)
            for name, _ in module.named_parameters(recurse=False)}


def select_parameters(model: nn.Module, patterns: Sequence[str]) -> tuple[str, ...]:
    """The names of ``model``'s parameters that match any of ``patterns``, in model order.

    A pattern that matches nothing is a one-line :class:`ConfigError` naming it and some parameter
    names (a typo must not silently freeze the whole model). ``<norm>`` matching nothing is allowed:
    a model with non-affine BN has no norm parameters, and its running statistics still update in
    train mode.
    """
    names = [n for n, _ in model.named_parameters()]
    norms = norm_parameter_names(model)
    chosen: set[str] = set()
    for pattern in patterns:
        hits = norms if pattern == NORM else {n for n in names if fnmatch.fnmatchcase(n, pattern)}
        if not hits and pattern != NORM:
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(f"config key 'train.trainable': pattern {pattern!r} matches no parameter of "
                              f"{type(model).__name__} (names: {shown}; or {NORM} for normalisation layers)")
        chosen |= hits
    if not chosen:
        raise ConfigError(f"config key 'train.trainable': {list(patterns)} selects no parameter; expected at "
                          f"least one trainable parameter")
    return tuple(n for n in names if n in chosen)
