"""The learning-rate schedule: linear warm-up, then constant, or a cosine or linear decay to a floor.

A pure function of the optimizer step, so that a scheduler's whole state is its step count: a resumed run (and each
federated client, whose optimizer and scheduler state is kept per client) continues on the same curve bitwise.
"""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["constant", "cosine", "linear"]


def lr_factor(step: int, warmup: int, total: int, kind: Schedule, floor: float) -> float:
    """The multiplier of the base lr at optimizer step ``step`` (0-based) of ``total``.

    Warm-up takes ``warmup`` steps, from ``1 / warmup`` up to 1; the decay then reaches ``floor`` at the last step
    (``total - 1``) and stays there.
    """
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup + 1) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return floor + (1.0 - floor) * shape
