"""Batch norm under the ID + OOD mixture without OOD images: federated RNA, variant B (spec rna.md §8).

In centralized RNA every training batch is ``cat(ID, OOD)`` with equal counts, so each BN layer normalises
with the moments of that union. In variant B the outliers stay on the server: the server forwards them and
sends each BN layer's OOD moments ``(μ_o, σ_o²)``, and the client normalises its ID batch with the moments
of the equal-weight union of its batch and the server's outliers,

    μ = ½(μ_b + μ_o),    σ² = ½(σ_b² + σ_o²) + ¼(μ_b − μ_o)²                          (spec rna.md §8)

(the biased variance of a union of two equal-size sets with these moments), where the OOD moments are
constants: the gradient path through the outliers' activations is lost, the one through the client's batch
moments is kept. :class:`MixtureBatchNorm2d` does this when :func:`ood_moments` has set its constants, and is
``nn.BatchNorm2d`` otherwise (eval mode, or no constants). Its running statistics track the client's **ID**
batch moments, so the server can pool them over clients and mix them with its own OOD moments
(:func:`fedtrust.algorithms.rna_moments`).

:func:`bn_input_moments` measures, per BN layer, the per-channel mean and biased variance of what enters it
when images go through a model in eval mode, exactly (float64 sums over chunks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn

from fedtrust.errors import ConfigError

MEAN, VAR = "mean", "var"


def mixture_moments(mean_a: Tensor, var_a: Tensor, mean_b: Tensor, var_b: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of the equal-weight union of two sets with the given per-channel moments
    (spec rna.md §8): ``μ = ½(μ_a + μ_b)``, ``σ² = ½(σ_a² + σ_b²) + ¼(μ_a − μ_b)²``."""
    return 0.5 * (mean_a + mean_b), 0.5 * (var_a + var_b) + 0.25 * (mean_a - mean_b) ** 2


class MixtureBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, in train mode with OOD constants set (:func:`ood_moments`), normalises with
    the ID-batch / OOD mixture moments (module docstring) and tracks the ID batch moments in its running
    statistics. Same parameters, buffers and state-dict keys as ``nn.BatchNorm2d``."""

    ood: tuple[Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.ood is None:
            return super().forward(x)
        mean_b = x.mean(dim=(0, 2, 3))
        var_b = x.var(dim=(0, 2, 3), unbiased=False)
        mean, var = mixture_moments(mean_b, var_b, *self.ood)
        if self.track_running_stats:
            n = x.numel() // x.shape[1]
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(m * mean_b.detach())
                self.running_var.mul_(1 - m).add_(m * var_b.detach() * (n / max(n - 1, 1)))
                self.num_batches_tracked.add_(1)
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def mixture_layers(model: nn.Module) -> list[str]:
    """Names of the BN layers variant B treats (2-D batch norms with running statistics), in module order,
    which for the backbones of :mod:`fedtrust.models` is the forward order."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]


def convert_to_mixture(model: nn.Module) -> nn.Module:
    """Replace, in place, every 2-D batch norm with running statistics by a :class:`MixtureBatchNorm2d`
    holding the same tensors; returns ``model``. The state dict keeps its keys."""
    for name in mixture_layers(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bn = getattr(parent, child)
        if type(bn) is MixtureBatchNorm2d:
            continue
        new = MixtureBatchNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                                 track_running_stats=True).to(bn.running_mean.device, bn.running_mean.dtype)
        new.load_state_dict(bn.state_dict())
        new.train(bn.training)
        setattr(parent, child, new)
    return model


def moment_key(layer: str, which: str) -> str:
    """The key of one layer's moment in a message or in a ``ref`` dict: ``"<layer>/mean"``, ``"<layer>/var"``."""
    return f"{layer}/{which}"


@contextlib.contextmanager
def ood_moments(model: nn.Module, moments: Mapping[str, Tensor], prefix: str = "") -> Iterator[None]:
    """Set the OOD constants of every :class:`MixtureBatchNorm2d` of ``model`` from
    ``moments[prefix + "<layer>/mean" | "/var"]`` for the duration of the block (also inside ``vmap``: the
    tensors may be batched). A layer without its moments is a one-line error."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MixtureBatchNorm2d)]
    try:
        for name, m in layers:
            keys = prefix + moment_key(name, MEAN), prefix + moment_key(name, VAR)
            if keys[0] not in moments or keys[1] not in moments:
                raise ConfigError(f"no OOD moments {keys[0]!r} for BN layer {name!r}; the server sends one "
                                  f"mean and variance per BN layer")
            m.ood = (moments[keys[0]], moments[keys[1]])
        yield
    finally:
        for _, m in layers:
            m.ood = None


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the measured layer is reached."""


def bn_input_moments(model: nn.Module, images: Tensor, transform: Callable[[Tensor], Tensor] | None = None,
                     layers: list[str] | None = None, chunk: int = 1024,
                     until: str | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-channel mean and biased variance of the input of each BN layer in ``layers`` (default: every
    :func:`mixture_layers`) when ``images`` go through ``model`` in eval mode, exact over the whole set
    (float64 sums over chunks of ``chunk``; ``transform`` maps a chunk to model inputs, e.g. the run's
    normalisation of uint8 images). With ``until``, the forward stops once that layer's input is measured
    (the layers after it are not run)."""
    layers = mixture_layers(model) if layers is None else layers
    sums: dict[str, list[Tensor]] = {}
    handles = []

    def hook(name: str):
        def pre(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().double()
            s = sums.setdefault(name, [x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1]), x.new_zeros(())])
            s[0] += x.sum(dim=(0, 2, 3))
            s[1] += (x * x).sum(dim=(0, 2, 3))
            s[2] += x.numel() // x.shape[1]
            if name == until:
                raise _Stop
        return pre

    for name in layers:
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook(name)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(images), chunk):
                try:
                    part = images[i:i + chunk]
                    model(transform(part) if transform is not None else part)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    out = {}
    for name in layers:
        if name not in sums:
            raise ConfigError(f"BN layer {name!r} saw no input in a forward pass; cannot measure its moments")
        total, sq, n = sums[name]
        mean = total / n
        out[name] = (mean, (sq / n - mean * mean).clamp_min(0))
    return out
