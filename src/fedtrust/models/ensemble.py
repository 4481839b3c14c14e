"""Split-Mix's mixed model of width w (Hong et al., ICLR 2022; spec splitmix.md §2 "Mixed model of width w").

:class:`MixedModel` holds ``n = w / r`` independent base nets (each with its
own parameters, BN and head; Split-Mix takes ``base_idxs[0:n]``, the first
``n`` in index order) and outputs the **mean of their logits**.

As a :class:`~fedtrust.models.base.FedModel`:

- ``features(x)`` is the concatenation ``[z_1, ..., z_n]`` of the bases'
  features (``num_features = sum_i d_i``);
- ``head`` is :class:`MeanHead`, a parameter-free view of the bases' heads
  computing ``(1/n) sum_i head_i(z_i)`` on that concatenation, which equals
  ``head(z) = W z + b`` with ``W = [W_1 ... W_n] / n`` and ``b = mean_i b_i``.
  So ``forward(x) == head(features(x)) == mean_i base_i(x)``.

Parameters and state-dict keys are the bases' under ``bases.<i>.``; training
the mixed model jointly is *not* Split-Mix (each base learns as a standalone
classifier, spec §3): train the bases and mix them for prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedtrust.errors import ConfigError
from fedtrust.models.base import FedModel


class MeanHead(nn.Module):
    """``(1/n) sum_i head_i(z_i)`` on ``z = [z_1, ..., z_n]``: the mixed model's head, a view of the bases' heads."""

    def __init__(self, mixed: MixedModel) -> None:
        super().__init__()
        object.__setattr__(self, "mixed", mixed)  # plain attribute: no second path to the bases' parameters

    @property
    def in_features(self) -> int:
        return self.mixed.num_features

    @property
    def out_features(self) -> int:
        return self.mixed.bases[0].num_classes

    def forward(self, z: Tensor) -> Tensor:
        bases = self.mixed.bases
        parts = z.split([b.num_features for b in bases], dim=1)
        return torch.stack([b.head(p) for b, p in zip(bases, parts)]).mean(dim=0)


class MixedModel(FedModel):
    """The mean-of-logits ensemble of ``bases`` (spec §2); see the module docstring.

    Args:
        bases: one or more FedModels with the same ``in_shape`` and ``num_classes``.

    Raises:
        ConfigError: no bases, a base that is not a FedModel, or bases of different input shape or classes.
    """

    def __init__(self, bases: Sequence[FedModel]) -> None:
        super().__init__()
        bases = list(bases)
        if not bases:
            raise ConfigError("a mixed model needs at least one base net")
        for i, b in enumerate(bases):
            if not isinstance(b, FedModel):
                raise ConfigError(f"base {i} of a mixed model is {type(b).__name__}, not a FedModel")
            if b.in_shape != bases[0].in_shape or b.num_classes != bases[0].num_classes:
                raise ConfigError(f"base {i} of a mixed model has input {b.in_shape} and {b.num_classes} classes, "
                                  f"base 0 {bases[0].in_shape} and {bases[0].num_classes}")
        self.bases = nn.ModuleList(bases)
        self.in_shape = bases[0].in_shape
        self.num_features = sum(b.num_features for b in bases)
        self.nonnegative_features = all(b.nonnegative_features for b in bases)
        object.__setattr__(self, "_head_view", MeanHead(self))

    @property
    def head(self) -> nn.Module:  # type: ignore[override]
        """The mean of the bases' heads on the concatenated features (:class:`MeanHead`)."""
        try:
            return self.__dict__["_head_view"]
        except KeyError:
            raise AttributeError("head") from None

    def features(self, x: Tensor) -> Tensor:
        """``[z_1, ..., z_n]``: the bases' features concatenated, shape ``(B, num_features)``."""
        return torch.cat([b.features(x) for b in self.bases], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """The mean of the bases' logits (Split-Mix's mixed-model output)."""
        return self.head(self.features(x))

    def reset_head(self, num_classes: int) -> None:
        """Give every base a fresh head with ``num_classes`` outputs."""
        for b in self.bases:
            b.reset_head(num_classes)
