"""Sigmoid nets of the gradient-leakage literature (I2F, spec i2f.md §3, §6).

Gradient-inversion attacks (DLG, Inverting Gradients) and the I2F audit are
studied on small, smooth, untrained nets: a ReLU net has a piecewise-constant
input Hessian, a sigmoid net a smooth one, so ``J = ∂x ∇θ L`` is informative.

- ``"convnet5"`` (:class:`ConvNet5`): the network the I2F code calls "LeNet"
  (spec §3): four conv5x5 layers of ``width`` (12) channels, padding 2, strides
  2, 2, 1, 1, a sigmoid after each, no pooling; ``z`` is the flattened last map
  (``width * ceil(H/4) * ceil(W/4)`` entries: 588 at 28x28, as the spec's
  Linear 588->10; 48 at 8x8) and the head is one Linear to the classes.
- ``"sigmoid_mlp"`` (:class:`SigmoidMLP`): flatten, then ``Linear -> sigmoid``
  per entry of ``hidden`` (spec §6: 64 -> 32 -> 10 on digits); ``z`` is the
  last hidden layer.

Both take ``init``, the initialization study of spec §3 / §5 (applied to every
conv and linear layer, head included, and again by :meth:`reset_head`):

========== =========================================================================
init       weights and biases
========== =========================================================================
uniform    both U(-0.5, 0.5): the I2F code's default (its ConvNet5)
normal     both N(0, std 0.5). The I2F code's ``normal_init`` meant this but its
           bias branch re-draws the weight, so biases kept PyTorch's default
           (spec §7.8); here biases are drawn too. GUESS: 0.5 is the std, as
           ``torch.nn.init.normal_(w, 0, 0.5)`` reads.
kaiming    ``kaiming_uniform_(w, nonlinearity="sigmoid")``: U(±gain·sqrt(3/fan_in)),
           gain = ``calculate_gain("sigmoid")`` = 1; biases 0 (GUESS: the spec
           does not say how the I2F code set them).
xavier     ``xavier_uniform_(w, gain=calculate_gain("sigmoid"))``:
           U(±gain·sqrt(6/(fan_in + fan_out))); biases 0 (GUESS, as kaiming).
========== =========================================================================

Activations are not in-place and there are no norm layers, so both nets work
under ``torch.func`` transforms (double backprop, vmap) as the audit needs.
The features are sigmoid outputs, so ``z > 0``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fedtrust.errors import ConfigError
from fedtrust.models.base import FedModel, Shape, check_in_shape, check_int
from fedtrust.registry import register

INITS = ("uniform", "normal", "kaiming", "xavier")
UNIFORM_BOUND = 0.5  # "uniform": U(-0.5, 0.5), spec i2f.md §3
NORMAL_STD = 0.5  # "normal": N(0, 0.5), read as the std (GUESS, see the module docstring)
MIN_SIZE = 4  # smallest H, W accepted: below it ConvNet5's 5x5 kernels see mostly padding
CONVNET5_STRIDES = (2, 2, 1, 1)


def check_init(init: object) -> str:
    """``init`` if it is one of :data:`INITS`, else a one-line ConfigError."""
    if init not in INITS:
        raise ConfigError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    return str(init)


@torch.no_grad()
def init_layer(layer: nn.Conv2d | nn.Linear, init: str) -> None:
    """Initialize ``layer``'s weight and bias in place by scheme ``init`` (the table in the module docstring)."""
    w, b = layer.weight, layer.bias
    gain = nn.init.calculate_gain("sigmoid")
    if init == "uniform":
        nn.init.uniform_(w, -UNIFORM_BOUND, UNIFORM_BOUND)
        if b is not None:
            nn.init.uniform_(b, -UNIFORM_BOUND, UNIFORM_BOUND)
        return
    if init == "normal":
        nn.init.normal_(w, 0.0, NORMAL_STD)
        if b is not None:
            nn.init.normal_(b, 0.0, NORMAL_STD)
        return
    if init == "kaiming":
        nn.init.kaiming_uniform_(w, a=0.0, mode="fan_in", nonlinearity="sigmoid")
    elif init == "xavier":
        nn.init.xavier_uniform_(w, gain=gain)
    else:
        raise ConfigError(f"init must be one of {', '.join(INITS)}, got {init!r}")
    if b is not None:
        nn.init.zeros_(b)


class _SigmoidNet(FedModel):
    """Shared by both nets: every conv/linear layer, head included, starts from scheme ``self.init``.

    Subclasses build ``body``, call :meth:`_init_all`, then :meth:`reset_head` (which inits the head).
    """

    init: str

    def _init_all(self) -> None:
        """Initialize every conv and linear layer built so far by ``self.init``."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                init_layer(m, self.init)

    def reset_head(self, num_classes: int) -> None:
        """A fresh ``Linear(num_features, num_classes)`` head, initialized by the model's scheme."""
        super().reset_head(num_classes)
        init_layer(self.head, self.init)


class ConvNet5(_SigmoidNet):
    """I2F's "LeNet": 4 x (conv5x5(width), pad 2, strides 2, 2, 1, 1, sigmoid), flatten (= ``z``), Linear head.

    Args:
        num_classes: number of logits.
        in_shape: ``(C, H, W)`` with ``H, W >= 4``; the flattened size is computed from it.
        width: channels of every conv layer (12 in the spec).
        init: weight and bias scheme, one of :data:`INITS`.
    """

    def __init__(self, num_classes: int, in_shape: Shape, width: int = 12, init: str = "uniform") -> None:
        super().__init__()
        c, h, w = self.in_shape = check_in_shape(in_shape, min_hw=MIN_SIZE)
        width = check_int("width", width, 1)
        self.init = check_init(init)
        layers: list[nn.Module] = []
        for i, stride in enumerate(CONVNET5_STRIDES):
            layers += [nn.Conv2d(c if i == 0 else width, width, kernel_size=5, stride=stride, padding=2), nn.Sigmoid()]
            h, w = _conv5_side(h, stride), _conv5_side(w, stride)
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.num_features = width * h * w
        self._init_all()
        self.reset_head(num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)


class SigmoidMLP(_SigmoidNet):
    """Flatten, then ``Linear -> sigmoid`` per hidden width; ``z`` is the last hidden layer; Linear head.

    Args:
        num_classes: number of logits.
        in_shape: ``(C, H, W)`` with ``H, W >= 4``; the input layer has ``C*H*W`` inputs.
        hidden: hidden widths, at least one (spec i2f.md §6: ``(32,)``, i.e. 64 -> 32 -> 10 on digits).
        init: weight and bias scheme, one of :data:`INITS`.
    """

    def __init__(self, num_classes: int, in_shape: Shape, hidden: Sequence[int] = (32,), init: str = "uniform") -> None:
        super().__init__()
        c, h, w = self.in_shape = check_in_shape(in_shape, min_hw=MIN_SIZE)
        self.init = check_init(init)
        widths = [c * h * w, *(check_int("hidden", n, 1) for n in hidden)]
        layers: list[nn.Module] = [nn.Flatten()]
        for n_in, n_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(n_in, n_out), nn.Sigmoid()]
        self.body = nn.Sequential(*layers)
        self.num_features = widths[-1]
        self._init_all()
        self.reset_head(num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)


def _conv5_side(n: int, stride: int) -> int:
    """Output side of a 5x5 conv with padding 2: ``floor((n + 4 - 5) / stride) + 1`` (``ceil(n / 2)`` at stride 2)."""
    return (n - 1) // stride + 1


def _hidden_tuple(hidden: int | Sequence[int]) -> tuple[int, ...]:
    """``hidden`` as a non-empty tuple: an int is one layer; a list (YAML/CLI) is several."""
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        return (hidden,)
    if isinstance(hidden, (list, tuple)) and hidden:
        return tuple(hidden)
    raise ConfigError(f"hidden must be a positive integer or a non-empty list of them, got {hidden!r}")


@register("model", "convnet5")
def convnet5(num_classes: int, in_shape: Shape, *, width: int = 12, init: str = "uniform") -> ConvNet5:
    """I2F's sigmoid ConvNet5 (``H, W >= 4``); ``z`` has ``width * ceil(H/4) * ceil(W/4)`` entries."""
    return ConvNet5(num_classes, in_shape, width, init)


@register("model", "sigmoid_mlp")
def sigmoid_mlp(num_classes: int, in_shape: Shape, *, hidden: int | Sequence[int] = (32,),
                init: str = "uniform") -> SigmoidMLP:
    """Sigmoid MLP (``H, W >= 4``); ``z`` has ``hidden[-1]`` entries."""
    return SigmoidMLP(num_classes, in_shape, _hidden_tuple(hidden), init)

