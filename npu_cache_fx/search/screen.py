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
from .proxy import FORECAST_ORDERS
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
    # forecast chosen per plan (index into ``forecasts``) and the proxy of every forecast mode
    forecasts: Tuple[str, ...] = ("none",)
    forecast: Optional[np.ndarray] = None
    proxy_by_forecast: Optional[np.ndarray] = None  # (len(forecasts), len(self))

    def __len__(self) -> int:
        return len(self.rng)

    def part(self, i: int) -> Part:
        a, b = self.ranges[self.rng[i]]
        fc = self.forecasts[int(self.forecast[i])] if self.forecast is not None else "none"
        return Part(self.method, a, b, self.schedules[self.sch[i]], self.attention if self.method == ATTN else None,
                    fc)

    def candidate(self, i: int, source: str = "screen") -> Candidate:
        c = Candidate((self.part(i),), self.steps, self.seq, source=source)
        c.predicted_speedup = float(self.speedup[i])
        c.proxy = float(self.proxy[i])
        c.cache_bytes = int(self.nbytes[i])
        if self.proxy_by_forecast is not None and len(self.forecasts) > 1:
            c.notes["proxy_by_forecast"] = {f: float(self.proxy_by_forecast[k, i])
                                            for k, f in enumerate(self.forecasts)}
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


def _schedule_arrays(method: str, schedules: Sequence[Schedule], steps: int, segments: Sequence[int] = ()):
    uniq = dedupe_schedules(method, schedules, steps, segments)
    acts = list(uniq)
    scheds = list(uniq.values())
    reads = np.array([[a is Action.READ for a in act] for act in acts], dtype=bool).reshape(len(acts), steps)
    writes = np.array([[a is Action.WRITE for a in act] for act in acts], dtype=bool).reshape(len(acts), steps)
    refs = np.array([[-1 if r is None else r for r in reference_steps(act)] for act in acts],
                    dtype=int).reshape(len(acts), steps)
    return acts, scheds, reads, writes, refs


def screen(session, method: str, *, schedules: Optional[Sequence[Schedule]] = None,
           block_ranges: Optional[Iterable[Tuple[int, int]]] = None, intervals: Iterable[int] = range(2, 7),
           attention: Optional[str] = None, max_cache_bytes: Optional[int] = None,
           forecasts: Optional[Sequence[str]] = None, forecast_gain: float = 1e-3) -> ScreenTable:
    """Score every (range, schedule) plan of ``method`` with the session's cost model and proxy.

    Each plan is scored for every forecast mode (``forecasts``, default: all the proxy can score,
    i.e. all when the reference run recorded timesteps); a forecast never changes the speed, only
    the memory (``history`` x the plain cache bytes), so each plan keeps the forecast with the
    lowest proxy among those within ``max_cache_bytes`` -- a higher order only when it lowers the
    proxy by more than ``forecast_gain`` (relative).
    """
    from .space import attention_schedules, dit_schedules
    session.prepare()
    cm, px, seq, n = session.cost, session.proxy, session.seq, session.steps_count
    if schedules is None:
        schedules = (dit_schedules if method == DIT else attention_schedules)(n, intervals=intervals)
    acts, scheds, reads, writes, refs = _schedule_arrays(method, schedules, n, session.segments)
    fcs = tuple(px.forecasts() if forecasts is None else [f for f in forecasts if f in px.forecasts()]) or ("none",)
    if fcs[0] != "none":
        fcs = ("none",) + tuple(f for f in fcs if f != "none")
    hist_k = [FORECAST_ORDERS[f] for f in fcs]
    n_r, n_w = reads.sum(1), writes.sum(1)
    n_c = n - n_r - n_w
    rlist = list(block_ranges) if block_ranges is not None else list(ranges(seq.total))
    per_ctx = cm.calls / max(cm.steps, 1)
    cols = {k: [] for k in ("rng", "sch", "seconds", "proxy", "nbytes", "forecast", "pbf")}
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
        pbf = np.stack([px.score_many(matrix, reads, refs) if f == "none"
                        else px.score_forecast(method, a, b, reads, writes, f) for f in fcs])
        choice = np.zeros(len(scheds), dtype=int)
        best = pbf[0].copy()
        for k in range(1, len(fcs)):
            ok = pbf[k] < best * (1.0 - forecast_gain)
            if max_cache_bytes is not None:
                ok &= hist_k[k] * nbytes <= max_cache_bytes
            choice[ok], best[ok] = k, pbf[k][ok]
        cols["proxy"].append(best)
        cols["nbytes"].append(np.array(hist_k, dtype=np.int64)[choice] * nbytes)
        cols["forecast"].append(choice)
        cols["pbf"].append(pbf)
    cat = {k: (np.concatenate(v, axis=-1) if v else np.zeros(0)) for k, v in cols.items()}
    speedup = cm.plain_seconds() / np.maximum(cat["seconds"], 1e-12)
    return ScreenTable(method, n, seq, usable, scheds, acts, cat["rng"].astype(int), cat["sch"].astype(int),
                       cat["seconds"], speedup, cat["proxy"], cat["nbytes"].astype(np.int64),
                       attention if method == ATTN else None, forecasts=fcs,
                       forecast=cat["forecast"].astype(int),
                       proxy_by_forecast=cat["pbf"] if cols["pbf"] else np.zeros((len(fcs), 0)))


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
