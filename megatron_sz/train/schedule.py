"""Learning-rate schedule: linear warm-up, then cosine, linear or constant decay.

The learning rate is a pure function of the step index, so a resumed job needs nothing but
its step counter to continue the schedule exactly (no scheduler state to save).
"""
from __future__ import annotations

import math


def lr_at(step: int, *, total_steps: int, lr: float, min_lr: float = 0.0, warmup_steps: int = 0,
          decay: str = "cosine") -> float:
    """Learning rate of 0-based ``step`` of a run of ``total_steps`` steps.

    Warm-up is linear from lr/warmup_steps (step 0) to lr (step warmup_steps-1); then
    the rate decays from lr to min_lr at the last step.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if decay == "constant":
        return lr
    span = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if decay == "linear":
        return lr - (lr - min_lr) * progress
    if decay == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown decay {decay!r}; expected cosine, linear or constant")


def lr_for(step: int, *, total_steps: int, optim) -> float:
    """``lr_at`` with the fields of a ``recipe.OptimSpec``."""
    return lr_at(step, total_steps=total_steps, lr=optim.lr, min_lr=optim.min_lr,
                 warmup_steps=optim.warmup_steps, decay=optim.decay)
