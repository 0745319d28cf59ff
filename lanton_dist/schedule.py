"""Learning-rate schedule: linear warm-up, then cosine decay to ``min_ratio`` of the peak."""
from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak rate at ``step`` (0-based: the rate used by the (step+1)-th update)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(opt: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A standard ``LambdaLR`` applying :func:`warmup_cosine` to every param group's ``lr``."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup_steps, total_steps, min_ratio))
