"""Timestep optimisation: AdaStep's skip rule and the fewer-steps baseline. Pure Python.

AdaStep (MindIE-SD) skips the whole model on step ``t`` -- reusing the previous
model output -- iff ``|(d_t + d_{t-2})/2 - d_{t-1}| <= d_{t-1} * thr`` with
``d_t = mean|x_t - x_{t-1}|`` over the model's latent input. ``thr`` decays by
``decay`` per evaluation; at most ``max_skip_steps`` consecutive skips; the
first three steps (no ``d_{t-2}`` yet) and the last step always compute.

Example::

    >>> rule = AdaStepRule(threshold=0.1, max_skip_steps=1, decay=1.0, steps_count=8)
    >>> [rule.decide(d) for d in [None, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]
    [False, False, False, True, False, True, False, False]
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

__all__ = ["AdaStepRule", "fewer_steps_for"]


class AdaStepRule:
    """Per-generation AdaStep state; call :meth:`decide` once per step, in order."""

    def __init__(self, threshold: float, max_skip_steps: int, decay: float, steps_count: int):
        self.threshold0 = threshold
        self.max_skip_steps = max_skip_steps
        self.decay = decay
        self.steps_count = steps_count
        self.reset()

    def reset(self) -> None:
        self.threshold = self.threshold0
        self.diffs: List[float] = []      # d_1, d_2, ... (d_0 does not exist)
        self.skips: List[bool] = []       # decision per step
        self.evaluations = 0

    @property
    def consecutive_skips(self) -> int:
        n = 0
        for skipped in reversed(self.skips):
            if not skipped:
                break
            n += 1
        return n

    def decide(self, d: Optional[float], vote: Optional[Callable[[bool], bool]] = None) -> bool:
        """Record ``d_t`` for the next step (None at step 0) and return whether that step is skipped.

        ``vote`` turns this process's proposal into the decision every rank takes
        (e.g. an all-reduce); the recorded decision is the voted one.
        """
        step = len(self.skips)
        if step > 0:
            if d is None or not math.isfinite(d):
                raise ValueError(f"AdaStepRule.decide needs a finite d_t at step {step}, got {d!r}")
            self.diffs.append(float(d))
        skip = False
        if 3 <= step < self.steps_count - 1 and self.max_skip_steps > 0:
            self.threshold *= self.decay
            self.evaluations += 1
            if self.consecutive_skips < self.max_skip_steps:
                d_t, d_1, d_2 = self.diffs[-1], self.diffs[-2], self.diffs[-3]
                skip = abs((d_t + d_2) / 2 - d_1) <= d_1 * self.threshold
        if vote is not None:
            skip = bool(vote(skip))
        self.skips.append(skip)
        return skip


def fewer_steps_for(speedup: float, steps: int) -> int:
    """Steps of the plain sampler that cost ``1/speedup`` of ``steps``: the baseline at equal compute."""
    if speedup <= 0:
        raise ValueError(f"speedup must be > 0, got {speedup}")
    return max(1, int(round(steps / speedup)))
