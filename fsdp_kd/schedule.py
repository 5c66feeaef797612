"""The learning rate at each step: a linear warmup from 0, then one entry of `LR_SCHEDULES`."""

from __future__ import annotations

import math
from dataclasses import dataclass


def cosine_with_min_lr(lr: float, min_lr_ratio: float, progress: float) -> float:
    """Cosine from lr down to min_lr_ratio·lr over the steps after warmup (`progress` from 0 to 1)."""
    floor = min_lr_ratio * lr
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def constant_with_warmup(lr: float, min_lr_ratio: float, progress: float) -> float:
    return lr


LR_SCHEDULES = {"cosine_with_min_lr": cosine_with_min_lr, "constant_with_warmup": constant_with_warmup}


@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup over `warmup_ratio` of the steps, then `LR_SCHEDULES[scheduler]`."""
    lr: float
    warmup_ratio: float
    scheduler: str
    min_lr_ratio: float

    @classmethod
    def of(cls, cfg) -> LRSchedule:
        return cls(cfg.learning_rate, cfg.lr_warmup_ratio, cfg.lr_scheduler, cfg.min_lr_ratio)

    def at(self, step: int, total_steps: int) -> float:
        """A pure function of the step, so a resumed run needs no scheduler state to continue exactly."""
        warmup = math.ceil(self.warmup_ratio * total_steps)
        if step < warmup:
            return self.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return LR_SCHEDULES[self.scheduler](self.lr, self.min_lr_ratio, progress)
