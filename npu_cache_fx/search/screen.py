"""Cheap screening: every (block range x schedule) plan scored without running a generation.

For each range the cost model gives the seconds of a READ and of a WRITE step
(measured node costs, exact dead-code effects) and the proxy gives the error
matrix ``M[s, r]``; for each distinct schedule the plan's actions (from
:func:`npu_cache_fx.schedule.config_actions`) give the READ steps and the step
each one reads from. Predicted speedup and proxy of all plans are then array
operations -- tens of thousands of plans per second.

Example::

    >>> table = screen(session, "dit_block_cache")               # doctest: +SKIP
    >>> table.candidate(table.order(target=2.0)[0]).label        # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..schedule import Action
from .space import ATTN, DIT, Candidate, Part, Schedule, dedupe_schedules, ranges, reference_steps

__all__ = ["ScreenTable", "screen", "pick_diverse"]

log = logging.getLogger(__name__)


@dataclass
class ScreenTable:
    """Columns over all screened plans: ``rng[i]`` (range index), ``sch[i]`` (schedule index), ..."""

    method: str
    steps: int
    seq: object
    ranges: List[Tuple[int, int]]
    schedules: List[Schedule]
    actions: List[Tuple[Action, ...]]
    rng: np.ndarray
    sch: np.ndarray
    seconds: np.ndarray
    speedup: np.ndarray
    proxy: np.ndarray
    nbytes: np.ndarray
    attention: Optional[str] = None
    meta: Dict[str, object] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rng)

    def part(self, i: int) -> Part:
        a, b = self.ranges[self.rng[i]]
        return Part(self.method, a, b, self.schedules[self.sch[i]], self.attention if self.method == ATTN else None)

    def candidate(self, i: int, source: str = "screen") -> Candidate:
        c = Candidate((self.part(i),), self.steps, self.seq, source=source)
        c.predicted_speedup = float(self.speedup[i])
        c.proxy = float(self.proxy[i])
        c.cache_bytes = int(self.nbytes[i])
        return c

    def eligible(self, target: float, max_cache_bytes: Optional[int] = None) -> np.ndarray:
        ok = self.speedup >= target
        if max_cache_bytes is not None:
            ok &= self.nbytes <= max_cache_bytes
        return np.nonzero(ok)[0]

    def order(self, target: float, max_cache_bytes: Optional[int] = None) -> np.ndarray:
        """Indices of plans predicted to reach ``target`` (within the memory budget), best proxy first."""
        idx = self.eligible(target, max_cache_bytes)
        return idx[np.lexsort((-self.speedup[idx], self.proxy[idx]))]

    def pareto(self, max_cache_bytes: Optional[int] = None) -> np.ndarray:
        """Indices on the (higher speedup, lower proxy) front."""
        idx = np.arange(len(self)) if max_cache_bytes is None else np.nonzero(self.nbytes <= max_cache_bytes)[0]
        idx = idx[np.lexsort((self.proxy[idx], -self.speedup[idx]))]
        front, best = [], np.inf
        for i in idx:
            if self.proxy[i] < best:
                front.append(i)
                best = self.proxy[i]
        return np.array(front, dtype=int)


def _schedule_arrays(method: str, schedules: Sequence[Schedule], steps: int):
    uniq = dedupe_schedules(method, schedules, steps)
    acts = list(uniq)
    scheds = list(uniq.values())
    reads = np.array([[a is Action.READ for a in act] for act in acts], dtype=bool).reshape(len(acts), steps)
    writes = np.array([[a is Action.WRITE for a in act] for act in acts], dtype=bool).reshape(len(acts), steps)
    refs = np.array([[-1 if r is None else r for r in reference_steps(act)] for act in acts],
                    dtype=int).reshape(len(acts), steps)
    return acts, scheds, reads, writes, refs


def screen(session, method: str, *, schedules: Optional[Sequence[Schedule]] = None,
           block_ranges: Optional[Iterable[Tuple[int, int]]] = None, intervals: Iterable[int] = range(2, 7),
           attention: Optional[str] = None) -> ScreenTable:
    """Score every (range, schedule) plan of ``method`` with the session's cost model and proxy."""
    from .space import attention_schedules, dit_schedules
    session.prepare()
    cm, px, seq, n = session.cost, session.proxy, session.seq, session.steps_count
    if schedules is None:
        schedules = (dit_schedules if method == DIT else attention_schedules)(n, intervals=intervals)
    acts, scheds, reads, writes, refs = _schedule_arrays(method, schedules, n)
    n_r, n_w = reads.sum(1), writes.sum(1)
    n_c = n - n_r - n_w
    rlist = list(block_ranges) if block_ranges is not None else list(ranges(seq.total))
    per_ctx = cm.calls / max(cm.steps, 1)
    cols = {k: [] for k in ("rng", "sch", "seconds", "proxy", "nbytes")}
    usable = []
    for ri, (a, b) in enumerate(rlist):
        part = Part(method, a, b, scheds[0] if scheds else Schedule(), attention if method == ATTN else None)
        cfgs = cm.resolve(part.configs(seq, n))
        try:
            t_read = cm.decision_time(cfgs, (Action.READ,) * len(cfgs))
            t_write = cm.decision_time(cfgs, (Action.WRITE,) * len(cfgs))
            matrix = px.dit_matrix(a, b) if method == DIT else px.attention_matrix(a, b)
            nbytes = cm.cache_bytes(cfgs)
        except Exception as err:  # e.g. a range that cannot be cached as a delta
            log.debug("skipping %s: %s", part.label, err)
            continue
        usable.append((a, b))
        seconds = per_ctx * (n_c * cm.t_graph + n_w * t_write + n_r * t_read) + cm.calls * cm.t_outside
        cols["rng"].append(np.full(len(scheds), len(usable) - 1))
        cols["sch"].append(np.arange(len(scheds)))
        cols["seconds"].append(seconds)
        cols["proxy"].append(px.score_many(matrix, reads, refs))
        cols["nbytes"].append(np.full(len(scheds), nbytes))
    cat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in cols.items()}
    speedup = cm.plain_seconds() / np.maximum(cat["seconds"], 1e-12)
    return ScreenTable(method, n, seq, usable, scheds, acts, cat["rng"].astype(int), cat["sch"].astype(int),
                       cat["seconds"], speedup, cat["proxy"], cat["nbytes"].astype(np.int64),
                       attention if method == ATTN else None)


def pick_diverse(table: ScreenTable, order: Sequence[int], k: int, exclude: Sequence[Tuple] = (),
                 per_family: int = 1) -> List[int]:
    """The first ``k`` of ``order`` with at most ``per_family`` plans per (block range, interval).

    The proxy ranks families of plans well but is noisy between near-identical plans of one
    family (start or end shifted by a step); one plan per family spends the full runs on
    genuinely different plans, so a proxy error on one does not sink the whole short list.
    """
    picked: List[int] = []
    families: Dict[Tuple, int] = {}
    seen = set(exclude)
    for i in order:
        if len(picked) >= k:
            break
        p = table.part(int(i))
        if (p,) in seen:
            continue
        fam = (p.start, p.end, p.schedule.step_interval)
        if families.get(fam, 0) >= per_family:
            continue
        families[fam] = families.get(fam, 0) + 1
        picked.append(int(i))
    return picked
