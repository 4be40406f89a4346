"""Learning rate as a pure function of the step (so a resumed run needs no scheduler state)."""

from __future__ import annotations

import math

from snapopt.train.options import OptimOptions


def lr_at(step: int, total: int, o: OptimOptions) -> float:
    """``step`` counts from 0. Linear warm-up, then constant or cosine down to ``min_lr_ratio``."""
    if o.warmup_steps and step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return o.lr
    span = max(1, total - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
