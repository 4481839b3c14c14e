"""Dual batch norm for Split-Mix's dual adversarial training (DAT; spec splitmix.md §4).

:class:`DualBatchNorm` holds two batch norms over the same channels, a clean one and an
adversarial one (the reference code's ``DualNormLayer`` with ``share_affine=False``: its
"noise" BN), each with its own γ/β and its own running statistics. Which one a forward pass
uses is the layer's *route*, a plain Python attribute (never a tensor flag, so the layer works
under ``torch.func.functional_call`` and ``vmap``):

- ``"clean"`` (default): ``cleanBN(x)``, the path clean images train;
- ``"adv"``: ``advBN(x)``, the path adversarial images train (and PGD attacks in DAT);
- a float μ in [0, 1]: the test-time "deep mix" ``(1 − μ)·cleanBN(x) + μ·advBN(x)``, each BN
  already affine-transformed (``--test_adv_lmbd``). μ = 0 and μ = 1 run only the clean and only
  the adversarial BN, so they equal the ``"clean"`` and ``"adv"`` routes exactly and, in train
  mode, move only that BN's running statistics.

:func:`bn_route` sets the route of every :class:`DualBatchNorm` of a module tree for a ``with``
block (:func:`set_bn_route` sets it until changed). Registered as norm kind ``"dual_bn"``, so
``create_model("cnn", ..., norm="dual_bn")`` builds a dual-BN CNN. State-dict keys are
``<layer>.clean.*`` and ``<layer>.adv.*``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from fedtrust.errors import ConfigError
from fedtrust.registry import register

Route = str | float
"""``"clean"``, ``"adv"`` or a mixing weight μ in [0, 1]."""

ROUTES = ("clean", "adv")
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def check_route(route: object) -> Route:
    """``route`` validated: ``"clean"``, ``"adv"`` or a number μ in [0, 1] (returned as a float).

    Raises:
        ConfigError: anything else (one line).
    """
    if isinstance(route, str):
        if route in ROUTES:
            return route
    elif isinstance(route, (int, float)) and not isinstance(route, bool):
        if 0.0 <= float(route) <= 1.0:
            return float(route)
        raise ConfigError(f"dual-BN mix weight μ must be in [0, 1], got {route!r}")
    raise ConfigError(f"unknown dual-BN route {route!r}; valid: 'clean', 'adv' or a float μ in [0, 1]")


class DualBatchNorm(nn.Module):
    """A clean and an adversarial batch norm over ``num_features`` channels, picked by :attr:`route`.

    Args:
        num_features: channels normalised.
        affine: learnable γ/β, separate for each BN.
        dims: 1 (``BatchNorm1d``: FC layers), 2 (``BatchNorm2d``, default) or 3.

    Attributes:
        clean: the clean BN.
        adv: the adversarial ("noise") BN.
        route: ``"clean"``, ``"adv"`` or μ (see the module docstring); set it with :func:`bn_route`.
    """

    def __init__(self, num_features: int, affine: bool = True, dims: int = 2) -> None:
        super().__init__()
        if dims not in _BN:
            raise ConfigError(f"dual_bn dims must be 1, 2 or 3, got {dims!r}")
        self.clean = _BN[dims](num_features, affine=affine)
        self.adv = _BN[dims](num_features, affine=affine)
        self.route: Route = "clean"

    def forward(self, x: Tensor) -> Tensor:
        route = self.route
        if route == "clean" or route == 0.0:
            return self.clean(x)
        if route == "adv" or route == 1.0:
            return self.adv(x)
        return (1.0 - route) * self.clean(x) + route * self.adv(x)

    def extra_repr(self) -> str:
        return f"route={self.route!r}"


def dual_layers(model: nn.Module) -> list[DualBatchNorm]:
    """Every :class:`DualBatchNorm` in ``model``'s module tree, in module order."""
    return [m for m in model.modules() if isinstance(m, DualBatchNorm)]


def has_dual_bn(model: nn.Module) -> bool:
    """True when ``model`` holds at least one :class:`DualBatchNorm` (a route then matters)."""
    return any(isinstance(m, DualBatchNorm) for m in model.modules())


def set_bn_route(model: nn.Module, route: Route) -> list[Route]:
    """Set the route of every :class:`DualBatchNorm` in ``model``; returns their previous routes in order.

    A model without dual BN is left as it is (the route is then irrelevant).

    Raises:
        ConfigError: ``route`` is not ``"clean"``, ``"adv"`` or a μ in [0, 1].
    """
    route = check_route(route)
    layers = dual_layers(model)
    previous = [m.route for m in layers]
    for m in layers:
        m.route = route
    return previous


@contextmanager
def bn_route(model: nn.Module, route: Route) -> Iterator[nn.Module]:
    """``with bn_route(model, "adv"): ...``: every dual BN of ``model`` takes ``route`` inside the block,
    and gets its previous route back on exit (also on an exception). Yields ``model``."""
    layers = dual_layers(model)
    previous = set_bn_route(model, route)
    try:
        yield model
    finally:
        for m, r in zip(layers, previous):
            m.route = r


@register("norm", "dual_bn")
def dual_batch_norm(num_features: int, affine: bool, dims: int = 2) -> nn.Module:
    """Dual BN (clean + adversarial, each with its own γ/β and running stats; spec splitmix.md §4)."""
    return DualBatchNorm(num_features, affine, dims)
