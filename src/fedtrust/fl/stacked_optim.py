"""SGD and Adam on parameters stacked along a leading client axis.

Each client keeps its own optimizer state (momentum buffers, Adam moments and
step count) in row k of the stacked tensors. The arithmetic follows
``torch.optim``'s single-tensor implementations operation by operation, so a
vectorised client matches the sequential reference to float tolerance. A step
may update only some rows (clients that have a batch at this step): the
others are left untouched.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedtrust.fl.optim_state import split_state
from fedtrust.fl.types import OptimizerSpec


class StackedOptimizer:
    """Per-client SGD (momentum, Nesterov, L2 weight decay) or Adam over stacked parameters."""

    def __init__(self, spec: OptimizerSpec, params: dict[str, Tensor], num_clients: int) -> None:
        if spec.name not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {spec.name!r}")
        self.spec, self.params = spec, params
        self.steps = torch.zeros(num_clients, dtype=torch.float64)
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        if spec.name == "sgd":
            self.state = {"buf": zeros} if spec.momentum else {}
        else:
            self.state = {"m": zeros, "v": {k: torch.zeros_like(v) for k, v in params.items()}}

    def load_row(self, row: int, state: dict[str, Tensor]) -> None:
        """Start client ``row`` from a kept optimizer state (:mod:`fedtrust.fl.optim_state`'s canonical form)."""
        fields, step = split_state(state)
        for field, tensors in fields.items():
            if field not in self.state:
                raise ValueError(f"kept optimizer state has '{field}/...' entries, which {self.spec.name} "
                                 f"(momentum {self.spec.momentum}) does not keep")
            for name, value in tensors.items():
                if name not in self.state[field] or self.state[field][name].shape[1:] != value.shape:
                    raise ValueError(f"kept optimizer state '{field}/{name}' does not fit the trainable parameters")
                self.state[field][name][row] = value.to(self.state[field][name].device)
        if step is not None:
            self.steps[row] = float(step)

    def row_state(self, row: int) -> dict[str, Tensor]:
        """Client ``row``'s optimizer state in the canonical form (copies)."""
        out = {f"{field}/{name}": v[row].clone() for field, tensors in self.state.items() for name, v in tensors.items()}
        if self.spec.name == "adam":
            out["step"] = self.steps[row].clone()
        return out

    def step(self, grads: dict[str, Tensor], rows: Tensor | None, lr_factor: Tensor | None = None) -> None:
        """Apply one step with ``grads`` (stacked over ``rows``, or over all clients when None); ``lr_factor``
        (one per row stepped) multiplies the lr (the spec's milestones), None: the plain lr."""
        if rows is None:
            self.steps += 1
        else:
            self.steps[rows.cpu()] += 1
        t = self.steps if rows is None else self.steps[rows.cpu()]
        for name, g in grads.items():
            p = self.params[name] if rows is None else self.params[name][rows]
            state = {k: (v[name] if rows is None else v[name][rows]) for k, v in self.state.items()}
            lr: float | Tensor = self.spec.lr
            if lr_factor is not None:
                lr = (self.spec.lr * lr_factor).to(p.dtype).to(p.device).view((-1,) + (1,) * (p.dim() - 1))
            new_p = self._sgd(p, g, state, lr) if self.spec.name == "sgd" else self._adam(p, g, state, t, lr)
            if rows is None:
                self.params[name].copy_(new_p)
                for k, v in self.state.items():
                    v[name].copy_(state[k])
            else:
                self.params[name][rows] = new_p
                for k, v in self.state.items():
                    v[name][rows] = state[k]

    def _sgd(self, p: Tensor, g: Tensor, state: dict[str, Tensor], lr: float | Tensor) -> Tensor:
        s = self.spec
        if s.weight_decay:
            g = g.add(p, alpha=s.weight_decay)
        if s.momentum:
            # torch starts the buffer at the first gradient; with dampening 0, μ·0 + g is the same.
            buf = state["buf"].mul(s.momentum).add(g)
            state["buf"] = buf
            g = g.add(buf, alpha=s.momentum) if s.nesterov else buf
        return p - lr * g if isinstance(lr, Tensor) else p.add(g, alpha=-lr)

    def _adam(self, p: Tensor, g: Tensor, state: dict[str, Tensor], t: Tensor, lr: float | Tensor) -> Tensor:
        s = self.spec
        b1, b2 = s.betas
        if s.weight_decay:
            g = g.add(p, alpha=s.weight_decay)
        m = state["m"].lerp(g, 1 - b1)
        v = state["v"].mul(b2).addcmul(g, g, value=1 - b2)
        state["m"], state["v"] = m, v
        shape = (-1,) + (1,) * (p.dim() - 1)
        bc1 = (1 - b1 ** t).to(p.dtype).view(shape).to(p.device)
        bc2_sqrt = ((1 - b2 ** t) ** 0.5).to(p.dtype).view(shape).to(p.device)
        denom = (v.sqrt() / bc2_sqrt).add(s.eps)
        return p - (lr / bc1) * (m / denom)
