"""Extra heads that objectives attach to a backbone (``Objective.wrap_model``).

:class:`ProjectionWrapper` adds the 2-layer projection MLP
``h = Linear(d, d) - ReLU - Linear(d, p)`` on the representation ``z`` that
RNA (Shin & Chung, TMLR 2024; specs/rna.md §1: ``h`` on ID ``z`` only, not
L2-normalised, unused at test time) and PASCL (Wang et al., ICML 2022; spec
§5: the same MLP, L2-normalised by the objective) train alongside the
classifier.

State-dict keys stay stable: the wrapper *adopts* the inner model's child
modules under their own names instead of nesting the model, so a wrapped
model's keys are exactly the backbone's keys (``body.0.0.weight``,
``head.weight``, ...) plus ``projection.*``. Aggregation, BN-moment pooling,
checkpoints of unwrapped models and ``torch.func.functional_call`` address
the same parameters by the same names; the inner model's ``features`` reads
the very module objects the wrapper registers, so swapping a tensor by name
on the wrapper changes what ``features`` computes.
"""

from __future__ import annotations

from torch import Tensor, nn

from fedtrust.errors import ConfigError
from fedtrust.models.base import FedModel, check_int

PROJECTION_DIM = 128  # RNA and PASCL: h maps z to R^128


class FeatureHead(nn.Module):
    """A predictor ``head(backbone.features(x))``: how FedLoGe's three use cases and FedRoD's heads are scored.

    Several predictors of one algorithm may share one ``backbone`` object with
    different heads; evaluation (:func:`fedtrust.evaluation.predict_all`) then
    computes the features once for all of them.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, x: Tensor) -> Tensor:
        return self.backbone.features(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone.features(x))

    def forward_features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, head(z))`` from one pass: what OOD evaluation scores (RN reads ``z``)."""
        z = self.backbone.features(x)
        return z, self.head(z)


def projection_mlp(d: int, out_dim: int = PROJECTION_DIM) -> nn.Sequential:
    """``Linear(d, d) - ReLU - Linear(d, out_dim)``: the projection head of RNA/PASCL (spec §1)."""
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, out_dim))


class ProjectionWrapper(FedModel):
    """A :class:`FedModel` that delegates ``features``/``head`` to ``inner`` and adds ``projection``.

    ``forward(x)`` is unchanged (``head(features(x))``); ``projection(z)`` is
    only called by objectives. ``inner`` must keep its parameters and buffers
    in child modules (every fedtrust backbone does), since only children are
    adopted.

    Args:
        inner: the backbone.
        out_dim: width of the projection's output (128 in RNA and PASCL).

    Raises:
        ConfigError: ``inner`` is not a FedModel, or holds tensors outside its child modules.
    """

    def __init__(self, inner: FedModel, out_dim: int = PROJECTION_DIM) -> None:
        super().__init__()
        if not isinstance(inner, FedModel):
            raise ConfigError(f"a projection head needs a FedModel backbone, got {type(inner).__name__}")
        direct = [*inner._parameters, *inner._buffers]
        if direct:
            raise ConfigError(f"cannot wrap {type(inner).__name__}: tensor {direct[0]!r} is not inside a child module")
        object.__setattr__(self, "inner", inner)  # plain attribute: its children are adopted below instead
        for name, child in inner.named_children():
            self.add_module(name, child)
        self.num_features = inner.num_features
        self.in_shape = inner.in_shape
        self.nonnegative_features = inner.nonnegative_features
        self.projection = projection_mlp(inner.num_features, check_int("projection out_dim", out_dim, 1))

    def features(self, x: Tensor) -> Tensor:
        """The inner model's representation ``z``."""
        return self.inner.features(x)

    def train(self, mode: bool = True) -> "ProjectionWrapper":
        """Set train/eval mode on the wrapper, the adopted children and the inner model itself."""
        super().train(mode)
        self.inner.training = mode
        return self

    def reset_head(self, num_classes: int) -> None:
        """Replace the classifier of both the inner model and the wrapper (they share it)."""
        inner = self.__dict__.get("inner")
        if inner is None:  # called by FedModel machinery before adoption
            super().reset_head(num_classes)
            return
        inner.reset_head(num_classes)
        self.head = inner.head
