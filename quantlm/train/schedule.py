"""Learning-rate and weight-decay schedules of DESIGN section 7, as pure functions of the step.

FloatLM: linear warm-up, then cosine decay from the peak to ``min_ratio * peak``; constant weight decay.
TriLM: linear warm-up, then linear decay to ``min_ratio`` of the peak; the peak itself drops from its first
to its second value at 50% of training, and weight decay is removed from 2/3 of training on.
The batch is constant in tokens, so fractions of steps are fractions of tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    family: str
    total_steps: int
    warmup_steps: int
    peak_lr: tuple[float, float]  # (first half, second half); equal for a FloatLM
    weight_decay: float
    min_ratio: float = 0.1

    @property
    def lr_drop_step(self) -> int:
        """First step (0-based) of the TriLM's second-half peak LR."""
        return math.ceil(self.total_steps / 2)

    @property
    def wd_off_step(self) -> int:
        """First step (0-based) at which the TriLM trains without weight decay."""
        return math.ceil(2 * self.total_steps / 3)

    def _decay_progress(self, step: int) -> float:
        span = max(1, self.total_steps - self.warmup_steps)
        return min(1.0, max(0.0, (step - self.warmup_steps) / span))

    def lr(self, step: int) -> float:
        """LR used by optimizer step ``step`` (0-based)."""
        if self.family == "trilm":
            peak = self.peak_lr[0] if step < self.lr_drop_step else self.peak_lr[1]
        else:
            peak = self.peak_lr[0]
        if step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        p = self._decay_progress(step)
        if self.family == "trilm":
            factor = 1.0 - (1.0 - self.min_ratio) * p
        else:
            factor = self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
        return peak * factor

    def wd(self, step: int) -> float:
        if self.family == "trilm" and step >= self.wd_off_step:
            return 0.0
        return self.weight_decay


def schedule_for(recipe) -> Schedule:
    return Schedule(
        family=recipe.family_name, total_steps=recipe.total_steps(), warmup_steps=recipe.warmup_steps,
        peak_lr=recipe.peak_lrs(), weight_decay=recipe.weight_decay, min_ratio=recipe.min_lr_ratio,
    )
