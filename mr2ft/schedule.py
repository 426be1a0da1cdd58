"""The learning-rate schedule shared by the probe and the fine-tune: linear warm-up, then cosine decay.

One formula, counted in optimizer steps; :func:`build_scheduler` wraps it in a per-step ``LambdaLR`` that scales each
parameter group's own ``lr`` (so layer-wise lr scales are kept).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> float:
    """The lr multiplier at optimizer ``step`` (counted from 0).

    Linear warm-up from ``1 / warmup_steps`` to 1 over ``warmup_steps`` steps, then cosine from 1 down to
    ``min_factor`` at ``total_steps`` (and ``min_factor`` after it).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return min_factor + (1.0 - min_factor) * cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_factor: float = 0.0
) -> Any:
    """A per-step ``LambdaLR`` of :func:`lr_factor`; it scales each group's own ``lr`` and so keeps its lr_scale."""
    fn = functools.partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps, min_factor=min_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


__all__ = ["build_scheduler", "lr_factor"]
