"""A model cut at a split point: the frozen front a client runs, the back stages the server trains.

Uses the :meth:`~fedtrust.models.base.FedModel.stages` contract, so it works for every model that
names its stages (``cnn``, ResNets, WRNs) and ignores the family otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from fedtrust.errors import ConfigError
from fedtrust.models.base import FedModel, Stage


@dataclass(frozen=True)
class Split:
    """``model`` cut after stage ``at``: ``front`` runs the stages up to and including it, ``back`` the rest."""

    model: FedModel
    at: str
    front_stages: tuple[Stage, ...]
    back_stages: tuple[Stage, ...]

    def front(self, x: Tensor) -> Tensor:
        """The split point's feature map of ``x`` (normalized model input)."""
        for stage in self.front_stages:
            x = stage.forward(x)
        return x

    def back(self, h: Tensor) -> list[Tensor]:
        """The output of every back stage, in order, from the split point's feature map ``h``."""
        outs = []
        for stage in self.back_stages:
            h = stage.forward(h)
            outs.append(h)
        return outs

    def keys(self, stages: tuple[Stage, ...]) -> list[str]:
        """The ``state_dict`` keys (parameters and buffers) the given stages own."""
        prefixes = tuple(m + "." for s in stages for m in s.modules)
        return [k for k in self.model.state_dict() if k.startswith(prefixes)]

    @property
    def front_keys(self) -> list[str]:
        return self.keys(self.front_stages)

    @property
    def back_keys(self) -> list[str]:
        return self.keys(self.back_stages)

    def back_parameters(self) -> list[nn.Parameter]:
        owned = set(self.back_keys)
        return [p for name, p in self.model.named_parameters() if name in owned]


def split_model(model: nn.Module, at: str | None = None) -> Split:
    """``model`` cut after stage ``at`` (None: the model's ``default_split``); one-line errors for a model
    without stages, an unknown stage, or the last stage (which would leave no back)."""
    if not isinstance(model, FedModel):
        raise ConfigError(f"model {type(model).__name__} is not a fedtrust backbone; it has no split points")
    stages = model.stages()
    names = [s.name for s in stages]
    at = at if at is not None else model.default_split
    if at not in names[:-1]:
        raise ConfigError(f"split point {at!r} is not a stage of {type(model).__name__} before its last; "
                          f"expected one of {', '.join(names[:-1])}")
    i = names.index(at) + 1
    return Split(model, at, tuple(stages[:i]), tuple(stages[i:]))
