"""Model size and inference cost: parameters and MACs per example (spec splitmix.md §6, Table 1's columns).

MACs are measured, not hand-computed: one eval-mode forward of a batch of 2
under :class:`torch.utils.flop_counter.FlopCounterMode`, whose conv and
matmul FLOPs are 2 per multiply-accumulate, so ``MACs = FLOPs / 2 / 2``
(Split-Mix counts with thop on a batch of 2 and halves, §6; a batch of 2
also lets batch-statistics BN run). Only convolutions and matrix products
count (thop's ``conv``/``linear`` MACs; biases, norms, activations and
pooling are free).

Parameters: ``sum(p.numel())`` over the model's parameters (buffers such as
BN running statistics do not count), or, for a
:class:`~fedtrust.models.slimmable.SlimNet`, those of its width-w sub-net
(§6 "model size = parameter count of the active state_dict slice"). A
:class:`~fedtrust.models.ensemble.MixedModel` of n bases costs the sum of its
bases.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

COST_BATCH = 2


def count_params(model: nn.Module) -> int:
    """Parameters of ``model`` (of the active sub-net for a SlimNet)."""
    active = getattr(model, "num_active_params", None)
    if isinstance(active, int):
        return active
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, in_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one eval-mode forward of one ``in_shape`` example (measured on a batch of 2)."""
    ref = next(iter(model.parameters()), None)
    x = torch.zeros(COST_BATCH, *in_shape, dtype=ref.dtype if ref is not None else torch.float32,
                    device=ref.device if ref is not None else None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // (2 * COST_BATCH)


def model_cost(model: nn.Module, in_shape: tuple[int, ...]) -> tuple[int, int]:
    """``(params, macs)`` of ``model`` on one ``in_shape = (C, H, W)`` input (spec §6; see the module docstring)."""
    return count_params(model), count_macs(model, in_shape)
