"""MindIE-SD's cache search, reimplemented as the baseline (SPEC section 4).

DiT search (MindIE assumes every block costs the same):

* ``s0 = 5`` warm steps, ``A = N - s0``, ``U = A // I`` refresh steps, ``R = A - U`` reuse steps;
  the fewest cached blocks for target speedup ``r`` is
  ``L_min = int(B * (1 - (N/r - s0 - U) / R))``.
* Stage 1 slides a window of ``L_min`` blocks starting at block 1 (block 0 is always
  computed), ``step_start = s0``, and keeps the 3 starts with the lowest MSE of the final output.
* Stage 2 tries, for those starts, lengths ``L_min .. L_min + 7`` and ``step_start`` in
  ``{0, s0}``; the lowest MSE wins. ``step_end`` is left at its default (MindIE's DiT cache
  ignores it).

Choices this reimplementation has to make, and makes explicitly:

* **B for several block lists** (diffusers Flux: 2 double + 6 single blocks): the lists are
  one sequence of ``B = 8`` blocks in execution order; a window crossing the boundary becomes
  two CacheConfigs with the same schedule (equivalent to one range over both).
* **The interval I** is an input of MindIE's search; when not given, the smallest ``I >= 2``
  whose ``L_min`` fits in ``B - 1`` blocks (the window starts at block 1). If none does up to
  ``N - s0``, the interval with the smallest ``L_min`` is used and ``L_min`` clamps to ``B - 1``.
* ``L_min < 1`` clamps to 1. Plans evaluated twice (stage 1's windows reappear in stage 2)
  are run once.

Attention search: ``step_start`` in ``[ceil(0.15 N), floor(0.35 N)]``, ``step_end = N - 2``;
the needed number of reuse steps is ``K = ceil(N (1 - 1/r))`` (attention assumed to be the
whole step cost, as MindIE's equal-cost model has it); per start, the smallest interval
with at least ``K`` reuse steps; the lowest MSE wins. Starts that cannot reach ``K`` even
with the largest interval use it anyway (and say so).

Example::

    >>> mindie_lmin(B=57, N=28, r=2.0, interval=3)
    49
    >>> stage1_windows(B=8, length=6)
    [(1, 7), (2, 8)]
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["S0", "mindie_lmin", "mindie_interval", "stage1_windows", "stage2_candidates", "attention_reuse_count",
           "attention_candidates", "equal_cost_speedup"]

S0 = 5


def mindie_lmin(B: int, N: int, r: float, interval: int, s0: int = S0) -> int:
    """MindIE's minimum number of cached blocks (unclamped)."""
    A = N - s0
    U = A // interval
    R = A - U
    if R <= 0:
        return B + 1  # no reuse step at all: unreachable
    return int(B * (1 - (N / r - s0 - U) / R))


def mindie_interval(B: int, N: int, r: float, s0: int = S0) -> Tuple[int, int, bool]:
    """``(interval, L_min clamped to [1, B-1], reachable)``: the smallest interval whose window fits."""
    best = None
    for interval in range(2, max(N - s0, 2) + 1):
        L = mindie_lmin(B, N, r, interval, s0)
        if L <= B - 1:
            return interval, max(L, 1), True
        if best is None or L < best[1]:
            best = (interval, L)
    interval, _ = best
    return interval, B - 1, False


def stage1_windows(B: int, length: int) -> List[Tuple[int, int]]:
    """Windows of ``length`` blocks starting at block 1: ``[(start, start + length), ...]``."""
    return [(a, a + length) for a in range(1, B - length + 1)]


def stage2_candidates(starts: Sequence[int], B: int, length: int, s0: int = S0) -> List[Tuple[int, int, int]]:
    """``(block_start, block_end, step_start)`` for lengths ``length .. length + 7`` and ``step_start`` in ``{0, s0}``."""
    out = []
    for a in starts:
        for L in range(length, length + 8):
            if a + L > B:
                break
            for ss in (0, s0):
                out.append((a, a + L, ss))
    return out


def attention_reuse_count(N: int, start: int, interval: int, end: Optional[int] = None) -> int:
    """Reuse steps of MindIE's attention cache: ``start < s <= end`` and ``(s - start) % interval != 0``."""
    end = N - 2 if end is None else end
    return sum(1 for s in range(start + 1, end + 1) if (s - start) % interval != 0)


def attention_candidates(N: int, r: float) -> List[Dict[str, int]]:
    """MindIE's attention search space: one ``(step_start, step_interval, step_end)`` per start."""
    need = math.ceil(N * (1 - 1 / r))
    lo, hi = math.ceil(0.15 * N), math.floor(0.35 * N)
    out = []
    for start in range(lo, hi + 1):
        end = N - 2
        if end <= start:
            continue
        chosen, reachable = None, False
        for interval in range(2, end - start + 2):
            if attention_reuse_count(N, start, interval, end) >= need:
                chosen, reachable = interval, True
                break
        if chosen is None:
            chosen = end - start + 1  # the largest useful interval: one refresh, all else reused
        out.append({"step_start": start, "step_interval": chosen, "step_end": end, "reachable": reachable,
                    "needed_reuse_steps": need})
    return out


def equal_cost_speedup(B: int, N: int, reads: int, cached_blocks: int) -> float:
    """MindIE's own speedup estimate of a plan: every block costs the same, nothing else costs."""
    return N * B / ((N - reads) * B + reads * (B - cached_blocks))
