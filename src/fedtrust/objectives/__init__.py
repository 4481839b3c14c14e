"""Local objectives: composable losses that plug into any algorithm that trains locally.

An objective is called as ``objective(model, batch) -> scalar loss``. It
declares whether it needs auxiliary outliers in the batch (``needs_outliers``)
and its hyper-parameters as a pydantic ``Params`` model (validated from the
``objective`` config section). Issue-specific objectives (LA, OE, RNA, ...)
register here the same way. An objective that works on pixels (``dat``'s PGD)
reads the run's uint8 → input normaliser from ``self.normalize``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from fedtrust.registry import get, register


class Objective:
    """Base class of local objectives."""

    name: ClassVar[str] = "base"
    needs_outliers: ClassVar[bool] = False
    """True when batches must carry ``batch["x_ood"]`` (auxiliary outliers)."""
    num_views: ClassVar[int] = 1
    """2 when batches must carry a second augmented view ``batch["x2"]`` of the ID images."""
    from_pretrained: ClassVar[tuple[str, ...]] = ()
    """Params that accept the value ``"pretrained"``: measured on the ``init_from`` model when the run
    starts (:meth:`pretrained_values`) and recorded as numbers in the resolved config."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, params: BaseModel, num_classes: int, class_counts: Tensor,
                 normalize: Callable[[Tensor], Tensor] | None = None) -> None:
        self.params = params
        self.num_classes = num_classes
        self.class_counts = class_counts
        self.normalize = normalize  # the run's uint8 → model-input map (data.normalize); None: [0, 1] pixels

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The model this objective trains: by default ``model`` itself; an objective that needs
        extra trainable modules (e.g. RNA's projection head) returns a wrapper holding them."""
        return model

    def pretrained_values(self, train_logits: Tensor, train_labels: Tensor,
                          outlier_logits: Tensor | None) -> dict[str, Any]:
        """Values of the params set to ``"pretrained"``, from the ``init_from`` model's logits (eval mode)
        on the whole training set and on the server's outlier pool."""
        return {}

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError


@register("objective", "ce")
class CrossEntropy(Objective):
    """Plain cross-entropy on the model's logits: L = −log softmax(f(x))_y."""

    name = "ce"

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(model(batch["x"]), batch["y"])


def build_objective(name: str, params: dict, num_classes: int, class_counts: Tensor,
                    normalize: Callable[[Tensor], Tensor] | None = None) -> Objective:
    """Instantiate a registered objective from its config (params already validated); ``normalize`` is the
    run's uint8 → input map, for objectives that work on pixels."""
    cls = get("objective", name)
    return cls(cls.Params(**params), num_classes, class_counts, normalize)
