"""The per-step plan: which cache each step writes or reads. Pure Python.

A step's *decision* is one :class:`Action` per config; each distinct decision is
one specialised graph variant. The host looks the decision up per step, so a
step index never enters a graph.

Example::

    >>> from npu_cache_fx.config import CacheConfig
    >>> cfg = CacheConfig(blocks_count=7, steps_count=5, step_start=1, step_interval=2,
    ...                   block_start=2, block_end=6).resolved()
    >>> [a.value for a in config_actions(cfg)]
    ['compute', 'write', 'read', 'write', 'read']
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from .config import CacheConfig, ConfigError

__all__ = ["Action", "Plan", "config_actions", "forecast_coefficients", "make_plan", "segment_actions"]


class Action(enum.Enum):
    COMPUTE = "compute"  # run normally, touch no cache
    WRITE = "write"      # run and record (dit: the range residual; attention: the outputs)
    READ = "read"        # skip the cached computation, use the recorded value

    def __repr__(self) -> str:
        return f"Action.{self.name}"


def _is_refresh(cfg: CacheConfig, s: int) -> bool:
    if cfg.refresh_steps is not None:
        return s in cfg.refresh_steps
    return s >= cfg.step_start and (s - cfg.step_start) % cfg.step_interval == 0


def _dit_raw(cfg: CacheConfig, s: int) -> Action:
    refresh = _is_refresh(cfg, s)
    if refresh:
        return Action.WRITE
    if cfg.step_start <= s <= cfg.step_end:
        return Action.READ
    return Action.COMPUTE


def _attention_raw(cfg: CacheConfig, s: int) -> Action:
    if cfg.step_start < s <= cfg.step_end and not _is_refresh(cfg, s):
        return Action.READ
    if cfg.step_start <= s < cfg.step_end:
        return Action.WRITE
    return Action.COMPUTE


def config_actions(cfg: CacheConfig) -> List[Action]:
    """One action per step for a resolved config.

    Writes whose value no later step reads are dropped (they would cost a copy
    and a variant for nothing); a read with no earlier write computes instead.
    Outputs are identical to MindIE's schedule where MindIE is correct.
    """
    if cfg.steps_count is None or cfg.step_end is None or cfg.block_end is None:
        raise ConfigError("config_actions needs a resolved CacheConfig (call cfg.resolved())")
    n = cfg.steps_count
    if cfg.bypass:
        return [Action.COMPUTE] * n
    raw = _dit_raw if cfg.method == "dit_block_cache" else _attention_raw
    actions = [raw(cfg, s) for s in range(n)]
    last_write = None
    needed = set()
    for s, a in enumerate(actions):
        if a is Action.WRITE:
            last_write = s
        elif a is Action.READ:
            if last_write is None:
                actions[s] = Action.COMPUTE
            else:
                needed.add(last_write)
    return [Action.COMPUTE if a is Action.WRITE and s not in needed else a for s, a in enumerate(actions)]


def segment_actions(actions: Sequence[Action], starts: Sequence[int] = ()) -> List[Action]:
    """The actions a generation split among several denoisers runs: ``starts`` are the steps at which
    another denoiser takes over (Wan 2.2's low-noise expert at its boundary step).

    Each denoiser keeps its own cache, so a READ whose latest WRITE was made before the start of its
    segment computes instead -- what the runtime does for a read of a slot not written in this
    generation. WRITEs stay as planned (a write read only across a boundary is made and not used).

        >>> R, W, C = Action.READ, Action.WRITE, Action.COMPUTE
        >>> [a.value[0] for a in segment_actions([C, W, R, R, W, R], starts=(3,))]
        ['c', 'w', 'r', 'c', 'w', 'r']
    """
    out = list(actions)
    bounds = sorted(s for s in starts if s > 0)
    last_write = None
    for s, a in enumerate(out):
        while bounds and s >= bounds[0]:
            bounds.pop(0)
            last_write = None
        if a is Action.WRITE:
            last_write = s
        elif a is Action.READ and last_write is None:
            out[s] = Action.COMPUTE
    return out


def forecast_coefficients(t: float, nodes: Sequence[float], order: int) -> List[float]:
    """Weights ``c_k`` with ``value(t) ~ sum_k c_k * value(nodes[k])`` (newest node first).

    Lagrange extrapolation through the newest ``min(order, len(nodes))`` distinct
    timesteps, padded with zeros to ``order``: order 1 is plain reuse (``[1]``),
    2 is linear, 3 quadratic (``taylor2``). Exact for values polynomial in ``t``
    of degree below the number of nodes used.

    >>> forecast_coefficients(600.0, [700.0, 800.0], 2)
    [2.0, -1.0]
    >>> forecast_coefficients(600.0, [700.0], 3)
    [1.0, 0.0, 0.0]
    """
    used: List[float] = []
    for node in nodes:
        if len(used) == order:
            break
        if all(node != u for u in used):
            used.append(float(node))
    if not used:
        raise ValueError("forecast_coefficients needs at least one recorded timestep")
    coefs = []
    for k, tk in enumerate(used):
        c = 1.0
        for j, tj in enumerate(used):
            if j != k:
                c *= (t - tj) / (tk - tj)
        coefs.append(c)
    return coefs + [0.0] * (order - len(used))


Decision = Tuple[Action, ...]


@dataclass(frozen=True)
class Plan:
    """Decisions per step for a list of resolved configs sharing ``steps_count``."""

    configs: Tuple[CacheConfig, ...]
    decisions: Tuple[Decision, ...]

    @property
    def steps_count(self) -> int:
        return len(self.decisions)

    @property
    def bypass(self) -> bool:
        return all(a is Action.COMPUTE for d in self.decisions for a in d)

    def decision(self, step: int) -> Decision:
        return self.decisions[step]

    def variants(self) -> List[Decision]:
        """Distinct decisions, in order of first use: one graph variant each."""
        return list(dict.fromkeys(self.decisions))

    def reuse_steps(self) -> List[int]:
        return [s for s, d in enumerate(self.decisions) if Action.READ in d]

    def table(self) -> str:
        head = ["step"] + [c.label for c in self.configs]
        rows = [[str(s)] + [a.value for a in d] for s, d in enumerate(self.decisions)]
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        fmt = lambda r: " | ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
        lines = [fmt(head), "-+-".join("-" * w for w in widths)] + [fmt(r) for r in rows]
        lines.append(f"{len(self.variants())} variant(s); {len(self.reuse_steps())} of "
                     f"{self.steps_count} steps reuse")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def make_plan(configs: Sequence[CacheConfig]) -> Plan:
    """Combine resolved configs into one plan; they must agree on ``steps_count``."""
    configs = tuple(configs)
    if not configs:
        raise ConfigError("at least one CacheConfig is required, got an empty list")
    counts = {c.steps_count for c in configs}
    if len(counts) != 1:
        raise ConfigError(f"CacheConfig.steps_count must be the same for all configs, got {sorted(counts)}")
    per_config = [config_actions(c) for c in configs]
    decisions = tuple(zip(*per_config))
    return Plan(configs, decisions)
