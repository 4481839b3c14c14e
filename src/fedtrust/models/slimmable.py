"""Channel-prefix (slimmable) sub-nets: HeteroFL, SHeteroFL and FedRolex (spec splitmix.md §5).

One full-width model (a :class:`~fedtrust.models.width.ScalableModel`: ``cnn``,
``digitnet``, ``preresnet18``) holds every sub-net. The sub-net of width
``w`` is the model built with ``width_ratio = w`` (:meth:`~fedtrust.models.width.ScalableModel.at_width`)
whose every hidden layer keeps ``ceil(w C)`` of its ``C`` channels:

- HeteroFL / SHeteroFL (§5): the first ``ceil(w C)`` channels (``offset=0``);
- FedRolex (Alam et al., *FedRolex: Model-Heterogeneous Federated Learning
  with Rolling Sub-Model Extraction*, NeurIPS 2022, §3): a cyclic window that
  rolls with the round, channels ``(offset + j) mod C`` for ``j < ceil(w C)``
  (:func:`window`); ``offset`` is the round index. Over any ``C - ceil(w C) + 1``
  consecutive offsets every channel of a layer is used; offsets ``0, k, 2k,
  ...`` (``k = ceil(w C)``) tile the layer in ``ceil(1/w)`` windows. Every
  *channel*, not every weight: in a ``C -> C`` layer both windows roll
  together, so a width-``w`` sub-net never holds the weights linking channels
  more than ``k`` apart (wider clients do). FedRolex's code rolls the other
  way (``torch.roll``: start ``-offset mod C``); the paper's Eq. and this
  module start at ``offset mod C``, the same set of windows.

The first layer's input channels and the head's outputs are never sliced (the
sub-net has the same ``in_shape`` and ``num_classes``). A layer the sub-net
keeps whole uses the identity order whatever the offset (a permutation of a
whole layer would compute the same function). BN γ/β (and running statistics)
are sliced like the channels they normalise.

Server side, on state dicts (pure functions):

- :func:`slice_indices` ``(model, w, offset) -> {key: (idx_dim0, idx_dim1, ...)}``;
- :func:`extract` ``(full_state, indices)`` the sub-net's state dict;
- :func:`embed` ``(sub_state, indices, into)`` full-shaped tensors, the sub-net's
  entries written over ``into``'s; :func:`coverage` the boolean masks of the
  entries a sub-net covers. SHeteroFL's element-wise mean (§5: each entry
  averaged over the clients whose slice covers it, untouched entries keep their
  old value) is then, per key, with weights ``p_i``::

      num = sum_i p_i * embed(sub_i, idx_i, zeros)[k];  den = sum_i p_i * coverage(idx_i, full)[k]
      new[k] = where(den > 0, num / den, old[k])

Client side, :class:`SlimNet` runs the full model at width ``w`` by slicing
its own parameters at forward time (narrow/cat views, no in-place op on a
parameter, no host sync), so it works under ``torch.func.functional_call``
and ``vmap``, and gradients reach exactly the covered entries of the full
parameters. :func:`submodel` builds the standalone width-``w`` model holding
the extracted weights (what a HeteroFL client trains).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

from fedtrust.errors import ConfigError
from fedtrust.models.base import FedModel, check_bool
from fedtrust.models.width import ScalableModel, check_width

Indices = dict[str, tuple[Tensor, ...]]
"""Per state key, one int64 index tensor per dimension: the full tensor's entries the sub-net uses, in its order."""

Segments = tuple[tuple[int, int], ...]
"""Contiguous runs ``(start, length)`` of one dimension's indices; ``()`` means the whole dimension."""


def window(size: int, keep: int, offset: int = 0) -> Tensor:
    """The channels a sub-net keeps of a layer with ``size`` channels: ``(offset + arange(keep)) mod size``.

    ``offset=0`` is HeteroFL's prefix; FedRolex rolls ``offset`` with the round (Alam et al. 2022, §3).
    A layer kept whole (``keep == size``) is ``arange(size)`` for every offset.
    """
    if not 1 <= keep <= size:
        raise ConfigError(f"a window keeps 1..{size} channels, got {keep}")
    if keep == size:
        return torch.arange(size)
    return (offset + torch.arange(keep)) % size


def _check_model(model: object) -> ScalableModel:
    if not isinstance(model, ScalableModel):
        raise ConfigError(f"model {type(model).__name__} has no width_ratio; slimmable models: cnn, digitnet, preresnet18")
    return model


def _check_offset(offset: object) -> int:
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise ConfigError(f"offset must be an integer (the FedRolex round), got {offset!r}")
    return offset


def _meta_submodel(model: ScalableModel, width: float, **overrides: Any) -> ScalableModel:
    """The width-``width`` model on the meta device: its shapes, no memory, no RNG draws."""
    with torch.device("meta"):
        return model.at_width(width, **overrides)


def _indices(model: ScalableModel, sub: nn.Module, offset: int) -> Indices:
    full_state, sub_state = model.state_dict(), sub.state_dict()
    if list(full_state) != list(sub_state):
        raise ConfigError(f"{type(model).__name__} changes its state keys with the width; cannot slice it")
    blocks = model.channel_blocks()
    out: Indices = {}
    for key, t in full_state.items():
        dims = []
        for d, (size, keep) in enumerate(zip(t.shape, sub_state[key].shape)):
            g = blocks.get(key, {}).get(d, 1)
            channels = window(size // g, keep // g, offset)
            dims.append((channels[:, None] * g + torch.arange(g)).reshape(-1))
        out[key] = tuple(dims)
    return out


def slice_indices(model: FedModel, width: float, offset: int = 0) -> Indices:
    """Per state key of the full ``model``, the index per dimension that its width-``width`` sub-net uses.

    Prefixes of ``ceil(width * C)`` channels for ``offset=0`` (HeteroFL, spec §5), FedRolex's rolling
    cyclic windows otherwise (:func:`window`). Every key of ``model.state_dict()`` is present
    (0-dim buffers such as ``num_batches_tracked`` with an empty tuple).

    Raises:
        ConfigError: ``model`` is not width-scalable, ``width`` not in (0, 1], ``offset`` not an int.
    """
    model = _check_model(model)
    width = check_width("width", width)
    return _indices(model, _meta_submodel(model, width), _check_offset(offset))


def _is_whole(idx: Tensor, size: int) -> bool:
    return idx.numel() == size and torch.equal(idx.cpu(), torch.arange(size))


def extract(full_state: Mapping[str, Tensor], indices: Indices) -> dict[str, Tensor]:
    """The sub-net's state dict: ``full_state[key]`` restricted to ``indices[key]``, as new tensors."""
    out = {}
    for key, idx in indices.items():
        t = full_state[key]
        if t.dim() != len(idx):
            raise ConfigError(f"state key {key!r} has {t.dim()} dims, its indices {len(idx)}")
        for d, i in enumerate(idx):
            if not _is_whole(i, t.shape[d]):
                t = t.index_select(d, i.to(t.device))
        out[key] = t.clone() if t is full_state[key] else t
    return out


def embed(sub_state: Mapping[str, Tensor], indices: Indices, into: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Full-shaped tensors: ``into[key]`` with the entries ``indices[key]`` covers replaced by ``sub_state[key]``.

    Out of place (``into`` is not modified). Keys of ``into`` without indices are returned unchanged.
    """
    out = dict(into)
    for key, idx in indices.items():
        base, sub = into[key], sub_state[key]
        if base.dim() == 0:
            out[key] = sub.to(device=base.device, dtype=base.dtype, copy=True)
            continue
        grid = torch.meshgrid(*(i.to(base.device) for i in idx), indexing="ij")
        out[key] = base.index_put(grid, sub.to(device=base.device, dtype=base.dtype))
    return out


def coverage(indices: Indices, full_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per key, a bool mask of ``full_state[key]``'s shape: True where the sub-net of ``indices`` has an entry."""
    out = {}
    for key, idx in indices.items():
        full = full_state[key]
        mask = torch.zeros(full.shape, dtype=torch.bool, device=full.device)
        if full.dim() == 0:
            out[key] = mask | True
            continue
        grid = torch.meshgrid(*(i.to(full.device) for i in idx), indexing="ij")
        out[key] = mask.index_put(grid, torch.ones((), dtype=torch.bool, device=full.device))
    return out


def submodel(model: FedModel, width: float, offset: int = 0) -> ScalableModel:
    """The standalone width-``width`` model holding ``extract(model.state_dict(), slice_indices(...))``.

    What a HeteroFL / FedRolex client trains; it draws nothing from the RNG. Same mode as ``model``.
    """
    model = _check_model(model)
    width = check_width("width", width)
    sub = _meta_submodel(model, width)
    state = extract(model.state_dict(), _indices(model, sub, _check_offset(offset)))
    sub.load_state_dict(state, assign=True)
    return sub.train(model.training)


def _segments(idx: Tensor, size: int) -> Segments:
    """``idx`` as contiguous runs; ``()`` when it is the whole dimension in order."""
    values = idx.tolist()
    if values == list(range(size)):
        return ()
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][0] + runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return tuple((a, n) for a, n in runs)


def _take(t: Tensor, plan: tuple[Segments, ...]) -> Tensor:
    """``t`` restricted by ``plan``: narrow views, concatenated where a window wraps around."""
    for d, runs in enumerate(plan):
        if runs:
            parts = [t.narrow(d, a, n) for a, n in runs]
            t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=d)
    return t


class _Call(nn.Module):
    """Calls ``getattr(m, method)`` in ``forward``, so ``functional_call`` can run any method of ``m``."""

    def __init__(self, m: nn.Module, method: str) -> None:
        super().__init__()
        self.m = m
        self.method = method

    def forward(self, x: Tensor) -> Any:
        return getattr(self.m, self.method)(x)


class _SlicedHead(nn.Module):
    """The head of a :class:`SlimNet`: the full head's weight restricted to the kept features."""

    def __init__(self, slim: SlimNet, in_features: int, out_features: int) -> None:
        super().__init__()
        object.__setattr__(self, "slim", slim)
        self.in_features, self.out_features = in_features, out_features

    def forward(self, z: Tensor) -> Tensor:
        head = self.slim._modules["head"]
        plans = self.slim._plans
        return F.linear(z, _take(head.weight, plans["head.weight"]),
                        None if head.bias is None else _take(head.bias, plans["head.bias"]))


class SlimNet(FedModel):
    """A full-width model run as its width-``width`` sub-net (spec splitmix.md §5), with the full model's tensors.

    The wrapper adopts ``model``'s child modules under their own names (as
    :class:`~fedtrust.models.heads.ProjectionWrapper`), so its state-dict keys
    are the full model's, an optimizer over its parameters trains the full
    model, and ``functional_call(slim, full_tensors, (x,))`` works. On each
    call it slices every tensor (:func:`slice_indices`) and runs the
    width-``width`` architecture (built on the meta device, never holding
    data) on the slices. Equal to ``submodel(model, width, offset)``'s output.

    ``head`` is a view that slices the full head's weight to the kept features,
    so ``forward(x) == head(features(x))`` and ``num_features = ceil(width * C)``.

    Running statistics: with tracked BN (``norm="bn"``), a training-mode call
    updates the full model's running statistics of the kept channels in place
    when the window is a prefix (narrow views); a wrapped FedRolex window works
    on copies and its updates are lost. HeteroFL and Split-Mix use ``bn_static``.

    Args:
        model: the full model (``cnn``, ``digitnet``, ``preresnet18``).
        width: w in (0, 1].
        offset: FedRolex's roll (the round index); 0 for HeteroFL's prefix.
        rescale_layer: SHeteroFL's "slim outputs divided by the width ratio during training" (§5): hidden
            conv/FC outputs divided by ``width`` in training mode. ``None``: the full model's own option.
    """

    def __init__(self, model: FedModel, width: float, *, offset: int = 0, rescale_layer: bool | None = None) -> None:
        super().__init__()
        model = _check_model(model)
        direct = [*model._parameters, *model._buffers]
        if direct:
            raise ConfigError(f"cannot slim {type(model).__name__}: tensor {direct[0]!r} is not inside a child module")
        self.width = check_width("width", width)
        self.offset = _check_offset(offset)
        overrides = {} if rescale_layer is None else {"rescale_layer": check_bool("rescale_layer", rescale_layer)}
        sub = _meta_submodel(model, self.width, **overrides)
        full_state = model.state_dict()
        indices = _indices(model, sub, self.offset)
        object.__setattr__(self, "full", model)  # plain attribute: its children are adopted below instead
        for name, child in model.named_children():
            self.add_module(name, child)
        self._plans = {k: tuple(_segments(i, n) for i, n in zip(idx, full_state[k].shape)) for k, idx in indices.items()}
        self._calls = {m: _Call(sub, m) for m in ("forward", "features", "forward_features_and_logits")}
        object.__setattr__(self, "sub", sub)
        object.__setattr__(self, "_head_view", _SlicedHead(self, sub.num_features, sub.num_classes))
        self.num_features = sub.num_features
        self.in_shape = model.in_shape
        self.nonnegative_features = model.nonnegative_features
        self.train(model.training)

    @property
    def head(self) -> nn.Module:  # type: ignore[override]
        """The full head sliced to the kept features (a view, no own parameters)."""
        try:
            return self.__dict__["_head_view"]
        except KeyError:
            raise AttributeError("head") from None

    @property
    def num_active_params(self) -> int:
        """Parameters of the width-``width`` sub-net (spec §6 "model size": the active slice)."""
        return sum(p.numel() for p in self.sub.parameters())

    def sliced_state(self) -> dict[str, Tensor]:
        """The sub-net's tensors, sliced from the (possibly ``functional_call``-swapped) full ones."""
        tensors = dict(self.named_parameters())
        tensors.update(self.named_buffers())
        return {k: _take(tensors[k], plan) for k, plan in self._plans.items()}

    def _run(self, method: str, x: Tensor) -> Any:
        state = {f"m.{k}": v for k, v in self.sliced_state().items()}
        return functional_call(self._calls[method], state, (x,))

    def forward(self, x: Tensor) -> Tensor:
        return self._run("forward", x)

    def features(self, x: Tensor) -> Tensor:
        return self._run("features", x)

    def forward_features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._run("forward_features_and_logits", x)

    def train(self, mode: bool = True) -> SlimNet:
        """Set train/eval mode on the adopted children, the full model and the sub-net's architecture."""
        super().train(mode)
        self.full.training = mode
        self.sub.train(mode)
        return self

    def reset_head(self, num_classes: int) -> None:
        """A SlimNet's head is a view of the full model's: reset that one, then build a new SlimNet."""
        raise ConfigError("reset the full model's head and build a new SlimNet; a SlimNet's head is a view")
