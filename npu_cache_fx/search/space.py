"""The search space: block sequences, step schedules and candidate plans.

A model may have several block lists (diffusers Flux: ``transformer_blocks``
then ``single_transformer_blocks``). The search sees them as **one sequence of
B blocks in execution order** (Flux: 2 double + 6 single = 8); a block range
``[a, b)`` of that sequence becomes one :class:`~npu_cache_fx.CacheConfig` per
list it touches, all with the same step schedule. Caching two adjacent ranges
as two configs equals caching their union: ``(in + d1) + d2``.

Example::

    >>> seq = BlockSeq((("transformer_blocks", 2), ("single_transformer_blocks", 6)))
    >>> seq.split(1, 5)
    [('transformer_blocks', 1, 2), ('single_transformer_blocks', 0, 3)]
    >>> Schedule(step_start=4, step_interval=3).label
    's4/i3'
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from ..config import CacheConfig
from ..schedule import Action, config_actions, segment_actions

__all__ = ["BlockSeq", "Part", "Candidate", "Schedule", "dit_schedules", "attention_schedules", "ranges",
           "schedule_actions", "reference_steps"]

DIT = "dit_block_cache"
ATTN = "attention_cache"


@dataclass(frozen=True)
class BlockSeq:
    """Block lists in execution order, seen as one sequence of ``total`` blocks."""

    lists: Tuple[Tuple[str, int], ...]  # (module path, block count)

    @property
    def total(self) -> int:
        return sum(c for _, c in self.lists)

    def offset(self, fqn: str) -> int:
        o = 0
        for name, count in self.lists:
            if name == fqn:
                return o
            o += count
        raise KeyError(fqn)

    def index(self, fqn: str, i: int) -> int:
        return self.offset(fqn) + i

    def locate(self, g: int) -> Tuple[str, int]:
        o = 0
        for name, count in self.lists:
            if g < o + count:
                return name, g - o
            o += count
        raise IndexError(g)

    def name(self, g: int) -> str:
        fqn, i = self.locate(g)
        return f"{fqn}.{i}"

    def split(self, a: int, b: int) -> List[Tuple[str, int, int]]:
        """Global range ``[a, b)`` as ``(list, start, end)`` per list it touches."""
        out, o = [], 0
        for name, count in self.lists:
            lo, hi = max(a, o), min(b, o + count)
            if lo < hi:
                out.append((name, lo - o, hi - o))
            o += count
        return out

    def describe(self) -> str:
        return " + ".join(f"{n}[{c}]" for n, c in self.lists)


@dataclass(frozen=True)
class Schedule:
    """When a cache refreshes and reuses: MindIE's periodic fields, or an explicit refresh set."""

    step_start: int = 0
    step_interval: int = 1
    step_end: Optional[int] = None
    refresh_steps: Optional[Tuple[int, ...]] = None

    def fields(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"step_start": self.step_start}
        if self.refresh_steps is not None:
            out["refresh_steps"] = tuple(self.refresh_steps)
        else:
            out["step_interval"] = self.step_interval
        if self.step_end is not None:
            out["step_end"] = self.step_end
        return out

    @property
    def label(self) -> str:
        end = "" if self.step_end is None else f"/e{self.step_end}"
        if self.refresh_steps is not None:
            return f"s{self.step_start}/r{{{','.join(map(str, self.refresh_steps))}}}{end}"
        return f"s{self.step_start}/i{self.step_interval}{end}"


@dataclass(frozen=True)
class Part:
    """One cached range of the global block sequence with its schedule."""

    method: str  # dit_block_cache | attention_cache
    start: int
    end: int
    schedule: Schedule
    attention: Optional[str] = None
    forecast: str = "none"  # CacheConfig.forecast: none | linear | taylor2 (same speed, more memory)

    def configs(self, seq: BlockSeq, steps_count: int) -> List[CacheConfig]:
        out = []
        for fqn, lo, hi in seq.split(self.start, self.end):
            kw = dict(method=self.method, steps_count=steps_count, blocks=fqn, blocks_count=dict(seq.lists)[fqn],
                      block_start=lo, block_end=hi, **self.schedule.fields())
            if self.method == ATTN and self.attention is not None:
                kw["attention"] = self.attention
            if self.forecast != "none":
                kw["forecast"] = self.forecast
            out.append(CacheConfig(**kw))
        return out

    @property
    def label(self) -> str:
        kind = "dit" if self.method == DIT else "attn"
        fc = "" if self.forecast == "none" else f"~{self.forecast}"
        return f"{kind}[{self.start}:{self.end}]@{self.schedule.label}{fc}"


@dataclass
class Candidate:
    """A plan under consideration, with what the search knows about it.

    ``predicted_*`` come from the cost model and the proxy (no generation run);
    ``mse``/``psnr``/``seconds``/``measured_speedup`` from a full generation;
    ``timed_speedup`` from interleaved repeats against the uncached model.
    """

    parts: Tuple[Part, ...]
    steps_count: int
    seq: BlockSeq
    predicted_speedup: float = float("nan")
    proxy: float = float("nan")
    predicted_mse: Optional[float] = None
    cache_bytes: int = 0
    source: str = "screen"  # screen | refine | mindie-stage1 | mindie-stage2 | mindie-attn
    mse: Optional[float] = None
    psnr: Optional[float] = None
    seconds: Optional[float] = None
    measured_speedup: Optional[float] = None  # single timed generation / median uncached
    timed_speedup: Optional[float] = None     # median of interleaved repeats
    timed_seconds: List[float] = field(default_factory=list)
    notes: Dict[str, Any] = field(default_factory=dict)
    extra: Tuple[CacheConfig, ...] = ()  # configs outside the block/step space (AdaStep rows)
    sampler_steps: Optional[int] = None  # fewer-steps baseline: the plain model with this many steps

    @property
    def method(self) -> str:
        if self.sampler_steps is not None:
            return "fewer_steps"
        methods = {p.method for p in self.parts} | {c.method for c in self.extra}
        return methods.pop() if len(methods) == 1 else "combined"

    @property
    def label(self) -> str:
        labels = [p.label for p in self.parts] + [f"{c.method}[th={c.threshold:g}]" for c in self.extra]
        if self.sampler_steps is not None:
            labels.append(f"plain@{self.sampler_steps}/{self.steps_count} steps")
        return " + ".join(labels)

    @property
    def key(self) -> Tuple:
        if not self.extra and self.sampler_steps is None:
            return tuple(self.parts)
        return tuple(self.parts) + tuple(self.extra) + (("sampler_steps", self.sampler_steps),)

    def configs(self) -> List[CacheConfig]:
        return [c for p in self.parts for c in p.configs(self.seq, self.steps_count)] + list(self.extra)

    @property
    def evaluated(self) -> bool:
        return self.mse is not None

    @property
    def speedup(self) -> Optional[float]:
        """Measured speedup: the median of interleaved repeats against the uncached model (None if not timed).

        The single timed run of the quality evaluation (``measured_speedup``) is never reported as a
        speedup: it is one run against the median of uncached runs that may include a slow first one.
        """
        return self.timed_speedup

    def row(self) -> Dict[str, Any]:
        from .report import config_to_json
        return {
            "label": self.label, "method": self.method, "source": self.source,
            "config": config_to_json(self.configs()),
            "predicted_speedup": self.predicted_speedup, "proxy": self.proxy, "predicted_mse": self.predicted_mse,
            "cache_bytes": self.cache_bytes, "mse": self.mse, "psnr": self.psnr, "seconds": self.seconds,
            "measured_speedup": self.measured_speedup, "timed_speedup": self.timed_speedup,
            "timed_seconds": list(self.timed_seconds), **({"notes": self.notes} if self.notes else {}),
        }


# ----------------------------------------------------------------------------- enumeration
def ranges(total: int, min_len: int = 1) -> Iterator[Tuple[int, int]]:
    for a in range(total):
        for b in range(a + min_len, total + 1):
            yield a, b


def dit_schedules(steps: int, intervals: Iterable[int] = range(2, 7), starts: Optional[Iterable[int]] = None,
                  ends: Optional[Iterable[int]] = None) -> List[Schedule]:
    """Periodic DiT schedules with at least one reuse step (``step_end`` always explicit)."""
    out = []
    starts = range(0, steps - 1) if starts is None else starts
    for s in starts:
        for i in intervals:
            for e in (range(s + 1, steps) if ends is None else ends):
                if e <= s or e >= steps:
                    continue
                out.append(Schedule(s, i, e))
    return out


def attention_schedules(steps: int, intervals: Iterable[int] = range(2, 7),
                        starts: Optional[Iterable[int]] = None, ends: Optional[Iterable[int]] = None) -> List[Schedule]:
    return dit_schedules(steps, intervals, starts, ends)


def _probe_config(method: str, sched: Schedule, steps: int) -> CacheConfig:
    return CacheConfig(method=method, steps_count=steps, blocks_count=1, block_start=0, block_end=1,
                       **sched.fields()).resolved()


def schedule_actions(method: str, sched: Schedule, steps: int, segments: Sequence[int] = ()) -> List[Action]:
    """The schedule's per-step actions, from :func:`npu_cache_fx.schedule.config_actions`; ``segments``:
    the steps at which another denoiser takes over (:func:`npu_cache_fx.schedule.segment_actions`)."""
    return segment_actions(config_actions(_probe_config(method, sched, steps)), segments)


def reference_steps(actions: Sequence[Action]) -> List[Optional[int]]:
    """For each READ step the step whose cached value it reads (the latest WRITE before it)."""
    out, last = [], None
    for s, a in enumerate(actions):
        if a is Action.WRITE:
            last = s
        out.append(last if a is Action.READ else None)
    return out


def dedupe_schedules(method: str, schedules: Iterable[Schedule], steps: int,
                     segments: Sequence[int] = ()) -> Dict[Tuple[Action, ...], Schedule]:
    """Distinct action sequences (many ``(start, interval, end)`` give the same plan); first schedule wins."""
    out: Dict[Tuple[Action, ...], Schedule] = {}
    for sched in schedules:
        acts = tuple(schedule_actions(method, sched, steps, segments))
        if Action.READ in acts and acts not in out:
            out[acts] = sched
    return out


def replace_schedule(part: Part, sched: Schedule) -> Part:
    return dataclasses.replace(part, schedule=sched)


def product_parts(*groups: Sequence[Part]) -> Iterator[Tuple[Part, ...]]:
    return itertools.product(*groups)
