"""Non-uniform schedules: move the reuse steps of a periodic plan under the same cost budget.

A plan's cost depends on its range and on how many steps read (each READ step
costs the same); *which* steps read only changes the error. Starting from
periodic plans, hill climbing swaps one READ step with one non-READ step
(best improvement of the proxy, all pairs scored at once with numpy) until no
swap helps. Every state keeps the same number of READ steps, so the predicted
time is unchanged (up to the cache-write copies). The result is expressed as
``CacheConfig(refresh_steps=...)``.

Example::

    >>> reads = hill_climb(matrix, weights, start_reads)          # doctest: +SKIP
    >>> reads_to_schedule(reads)                                  # doctest: +SKIP
    Schedule(step_start=3, step_interval=1, step_end=25, refresh_steps=(3, 5, 8, ...))
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from ..schedule import Action
from .space import Schedule

__all__ = ["hill_climb", "reads_to_schedule", "score_reads"]


def _refs(reads: np.ndarray) -> np.ndarray:
    """For (M, N) bool READ masks: the step each step would read from (latest non-READ step before it)."""
    m, n = reads.shape
    idx = np.broadcast_to(np.arange(n), (m, n))
    last = np.maximum.accumulate(np.where(~reads, idx, -1), axis=1)  # latest non-read at or before s
    ref = np.full((m, n), -1)
    ref[:, 1:] = last[:, :-1]
    return ref


def score_reads(matrix: np.ndarray, weights: np.ndarray, reads: np.ndarray) -> np.ndarray:
    """Proxy of (M, N) READ masks (a READ with no earlier non-READ step is invalid: +inf)."""
    reads = np.atleast_2d(reads)
    ref = _refs(reads)
    n = reads.shape[1]
    vals = matrix[np.arange(n)[None, :], np.clip(ref, 0, n - 1)]
    invalid = (reads & (ref < 0)).any(1)
    out = (np.square(vals * weights[None, :]) * reads).sum(1)
    out[invalid] = np.inf
    return out


def hill_climb(matrix: np.ndarray, weights: np.ndarray, reads: Sequence[bool], max_iters: int = 200,
               window: int = 0) -> Tuple[np.ndarray, float]:
    """Best-improvement swaps of a READ and a non-READ step; ``window > 0`` limits swaps to that distance."""
    cur = np.array(reads, dtype=bool)
    best = float(score_reads(matrix, weights, cur)[0])
    for _ in range(max_iters):
        on = np.nonzero(cur)[0]
        off = np.nonzero(~cur)[0]
        off = off[off > 0]
        pairs = [(i, j) for i in on for j in off if not window or abs(i - j) <= window]
        if not pairs:
            break
        trial = np.repeat(cur[None, :], len(pairs), axis=0)
        ii = np.array([p[0] for p in pairs])
        jj = np.array([p[1] for p in pairs])
        trial[np.arange(len(pairs)), ii] = False
        trial[np.arange(len(pairs)), jj] = True
        scores = score_reads(matrix, weights, trial)
        k = int(np.argmin(scores))
        if not scores[k] < best * (1 - 1e-9):
            break
        cur, best = trial[k], float(scores[k])
    return cur, best


def reads_to_schedule(reads: Sequence[bool]) -> Schedule:
    """READ mask -> ``Schedule`` with an explicit refresh set (see :class:`CacheConfig` ``refresh_steps``)."""
    reads = np.asarray(reads, dtype=bool)
    on = np.nonzero(reads)[0]
    if on.size == 0:
        raise ValueError("no READ step")
    start = int(on[0]) - 1
    if start < 0:
        raise ValueError("step 0 cannot read: nothing was written before it")
    end = int(on[-1])
    refresh = tuple(int(s) for s in range(start, end + 1) if not reads[s])
    return Schedule(step_start=start, step_interval=1, step_end=end, refresh_steps=refresh)


def actions_to_reads(actions: Sequence[Action]) -> np.ndarray:
    return np.array([a is Action.READ for a in actions], dtype=bool)
