"""A client optimizer's state as flat named tensors, so it can live in the client's persistent state.

``train.keep_optimizer`` keeps each client's optimizer state (SGD momentum buffers, Adam moments and
step count) across rounds. Centralised training (one client, one round per epoch) then runs **one**
optimizer across all epochs, as the papers' code does, instead of restarting Adam every epoch.

The canonical form is the one the vectorised executor's :class:`~fedtrust.fl.stacked_optim.StackedOptimizer`
keeps per client, keyed by field and parameter name:

* SGD with momentum: ``buf/<param>`` (torch's ``momentum_buffer``);
* Adam: ``m/<param>`` (``exp_avg``), ``v/<param>`` (``exp_avg_sq``) and ``step`` (a float64 scalar; every
  trainable parameter steps together).

The functions below translate between that form and a ``torch.optim`` optimizer (the sequential
reference trainer). An empty dict is a fresh optimizer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedtrust.errors import FedTrustError

_TORCH_FIELDS = {"buf": "momentum_buffer", "m": "exp_avg", "v": "exp_avg_sq"}


def split_state(state: dict[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], Tensor | None]:
    """``{"m/w": a, "step": s}`` → ``({"m": {"w": a}}, s)``: per-field tensors by parameter, and the step."""
    fields: dict[str, dict[str, Tensor]] = {}
    step = None
    for key, value in state.items():
        if key == "step":
            step = value
            continue
        field, sep, name = key.partition("/")
        if not sep or field not in _TORCH_FIELDS:
            raise FedTrustError(f"optimizer state key {key!r} is not one of buf/<param>, m/<param>, v/<param>, step")
        fields.setdefault(field, {})[name] = value
    return fields, step


def load_torch_state(optimizer: torch.optim.Optimizer, params: dict[str, Tensor], state: dict[str, Tensor]) -> None:
    """Give ``optimizer`` (over ``params``, by name) the kept ``state``; an empty state leaves it fresh.

    A parameter the state does not cover (or covers with another shape) is an error naming it:
    a kept state belongs to one trainable set.
    """
    if not state:
        return
    fields, step = split_state(state)
    for field, tensors in fields.items():
        for name, value in tensors.items():
            if name not in params or params[name].shape != value.shape:
                raise FedTrustError(f"kept optimizer state '{field}/{name}' does not fit the trainable parameters")
    for name, p in params.items():
        entry: dict[str, Tensor] = {}
        for field, tensors in fields.items():
            if name not in tensors:
                raise FedTrustError(f"kept optimizer state has no '{field}/{name}'; it was kept for other parameters")
            entry[_TORCH_FIELDS[field]] = tensors[name].detach().clone().to(p.device, p.dtype)
        if step is not None:
            entry["step"] = torch.tensor(float(step))
        if entry:
            optimizer.state[p] = entry


def torch_state(optimizer: torch.optim.Optimizer, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """The canonical state of ``optimizer`` over ``params`` (by name), detached copies."""
    out: dict[str, Tensor] = {}
    step = None
    for name, p in params.items():
        entry = optimizer.state.get(p, {})
        for field, key in _TORCH_FIELDS.items():
            if entry.get(key) is not None:
                out[f"{field}/{name}"] = entry[key].detach().clone()
        if "step" in entry:
            step = float(entry["step"])
    if step is not None:
        out["step"] = torch.tensor(step, dtype=torch.float64)
    return out
