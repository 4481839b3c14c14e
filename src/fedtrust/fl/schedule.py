"""Client learning-rate schedules across rounds (config ``train.lr_schedule``)."""

from __future__ import annotations

import math


def lr_at(round: int, rounds: int, base: float, schedule: str, lr_min: float = 0.0,
          step_rounds: int = 10, gamma: float = 0.1) -> float:
    """The client lr of 1-based ``round``.

    constant: base. cosine: lr_min + (base − lr_min)·(1 + cos(π·(r−1)/R))/2.
    step: base·γ^⌊(r−1)/step_rounds⌋. exponential: base·γ^(r−1).
    """
    t = round - 1
    if schedule == "constant":
        return base
    if schedule == "cosine":
        return lr_min + (base - lr_min) * (1 + math.cos(math.pi * t / max(rounds, 1))) / 2
    if schedule == "step":
        return base * gamma ** (t // step_rounds)
    if schedule == "exponential":
        return base * gamma ** t
    raise ValueError(f"unknown lr schedule {schedule!r}")
