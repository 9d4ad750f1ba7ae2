"""Cost model from measurement: what each plan's steps cost on the captured graph.

Every node of the captured graph is timed once (:func:`npu_cache_fx.profile.node_costs`).
A step's cost is the sum over the nodes its graph variant still runs, scaled so
the full graph matches its measured wall time, plus the cache copies. Which
nodes a variant still runs is found the way the passes + DCE find it: region
(or attention) nodes go, their stream outputs are replaced by ``in + cache``
(or a cache read), and every node left without a live user goes too -- so the
dead text-stream tail of a block before a cached range, or norms that only fed
a cached attention, are counted as saved, as they are in the real variant.

The per-step decisions come from :func:`npu_cache_fx.schedule.make_plan`; no
equal-cost assumption anywhere.

Example::

    >>> cm = CostModel.measure(cap, model, seq, flat_inputs, ...)        # doctest: +SKIP
    >>> cm.predict(configs)["predicted_speedup"]                       # doctest: +SKIP
    2.07
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from ..capture import AttentionSite, Capture, Region, attention_sites, block_region
from ..config import CacheConfig
from ..passes.common import is_impure
from ..profile import node_costs, synchronize
from ..schedule import Action, Decision, make_plan, segment_actions
from ..targets import Removal, Target, bind_target, nbytes, resolve_config
from .space import DIT, BlockSeq

__all__ = ["CostModel", "Removal", "live_nodes", "time_calls"]

aten = torch.ops.aten


def live_nodes(gm: fx.GraphModule, removals: Iterable[Removal]) -> FrozenSet[str]:
    """Names of the nodes a variant with these READ rewrites still runs (reverse liveness)."""
    removed: set = set()
    subst: Dict[str, Optional[str]] = {}
    for r in removals:
        removed |= r.nodes
        subst.update(dict(r.subst))
    live: set = set()
    demanded: set = set()
    for node in reversed(list(gm.graph.nodes)):
        name = node.name
        users_live = any(u.name in live for u in node.users)
        if name in removed:
            if name in subst and (users_live or name in demanded) and subst[name] is not None:
                demanded.add(subst[name])
            continue
        if node.op == "output" or is_impure(node) or users_live or name in demanded:
            live.add(name)
    return frozenset(live)


def time_calls(fns: Mapping[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1,
               device: Optional[torch.device] = None, clock: Optional[Callable[[], float]] = None) -> Dict[str, float]:
    """Median seconds per call of each function, interleaved (order alternating per round).

    ``clock`` defaults to process CPU time when torch runs one CPU thread (it measures the
    work and ignores other processes' load), else wall time.
    """
    names = list(fns)
    samples: Dict[str, List[float]] = {n: [] for n in names}
    if clock is None:
        clock = (time.process_time if (device is None or torch.device(device).type == "cpu")
                 and torch.get_num_threads() == 1 else time.perf_counter)
    with torch.no_grad():
        for r in range(warmup + repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                if device is not None:
                    synchronize(device)
                t0 = clock()
                fns[name]()
                if device is not None:
                    synchronize(device)
                if r >= warmup:
                    samples[name].append(clock() - t0)
    return {n: statistics.median(v) for n, v in samples.items()}


def _signature(node: fx.Node) -> Tuple:
    def one(a):
        if isinstance(a, fx.Node):
            val = a.meta.get("val")
            return ("T", tuple(val.shape), str(val.dtype)) if isinstance(val, torch.Tensor) else ("N", str(type(val)))
        if isinstance(a, (list, tuple)):
            return tuple(one(x) for x in a)
        return repr(a)
    return (str(node.target), one(node.args), tuple(sorted((k, one(v)) for k, v in node.kwargs.items())))


def _pool_by_signature(gm: fx.GraphModule, costs: Dict[str, float]) -> Dict[str, float]:
    """Each node's cost := the median over every node running the same op on the same shapes.

    Identical ops on identical shapes cost the same; pooling them removes most of the
    timing noise of a busy machine while keeping every real difference (another op,
    another shape, more matmuls) -- no equal-cost assumption between blocks.
    """
    groups: Dict[Tuple, List[str]] = {}
    for node in gm.graph.nodes:
        if node.name in costs:
            groups.setdefault(_signature(node), []).append(node.name)
    pooled = {}
    for names in groups.values():
        med = statistics.median(costs[n] for n in names)
        pooled.update({n: med for n in names})
    return pooled


@dataclass
class CostModel:
    """Per-node measured costs of one capture, and plan predictions from them.

    Times are seconds per call. ``t_eager``: the plain model's forward;
    ``t_graph``: the captured graph's forward (what a COMPUTE step of the
    optimized module runs); ``t_outside``: the caller's own time per call
    (the sampler loop), the same with or without a cache; ``calls``: forward
    calls per generation (steps x CFG branches).
    """

    cap: Capture
    model: torch.nn.Module
    seq: BlockSeq
    node_cost: Dict[str, float]
    t_graph: float
    t_eager: float
    t_outside: float
    steps: int
    calls: int
    byte_cost: float = 0.0  # seconds per byte of one elementwise pass (cache add / sub / copy)
    measured_plain: Optional[float] = None  # seconds of an uncached generation, when measured
    # ``variant_nodes(configs, decision) -> node names`` of the real rewritten variant; used for every
    # decision when :meth:`verify` finds the liveness analysis and the runtime's DCE disagree.
    variant_nodes: Optional[Callable[[Sequence[CacheConfig], Decision], FrozenSet[str]]] = None
    exact: bool = False
    segments: Tuple[int, ...] = ()  # steps at which another denoiser takes over (schedule.segment_actions)
    verification: List[Dict[str, Any]] = field(default_factory=list)
    _regions: Dict[Tuple, Region] = field(default_factory=dict, repr=False)
    _sites: Dict[Tuple, List[AttentionSite]] = field(default_factory=dict, repr=False)
    _targets: Dict[Tuple, Target] = field(default_factory=dict, repr=False)
    _decision_time: Dict[Tuple, float] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def measure(cls, cap: Capture, model: torch.nn.Module, seq: BlockSeq, flat_inputs: Sequence, *,
                eager_call: Callable[[], Any], t_outside: float, steps: int, calls: int, repeats: int = 3,
                timing_repeats: int = 5, clock: Optional[Callable[[], float]] = None) -> "CostModel":
        names = [n.name for n in cap.gm.graph.nodes if n.op == "call_function"]
        costs = _pool_by_signature(cap.gm, node_costs(cap.gm, flat_inputs, names, repeats=repeats))
        device = next((x.device for x in flat_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
        t = time_calls({"graph": lambda: cap.gm(*flat_inputs), "eager": eager_call}, repeats=timing_repeats,
                       device=device, clock=clock)
        scale = t["graph"] / max(sum(costs.values()), 1e-12)
        costs = {k: v * scale for k, v in costs.items()}
        model_ = cls(cap, model, seq, costs, t["graph"], t["eager"], t_outside, steps, calls)
        model_.byte_cost = model_._elementwise_byte_cost()
        return model_

    def _elementwise_byte_cost(self) -> float:
        per_byte = []
        for node in self.cap.gm.graph.nodes:
            if node.target in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor) and nbytes(node) >= 4096:
                per_byte.append(self.node_cost.get(node.name, 0.0) / nbytes(node))
        return statistics.median(per_byte) if per_byte else 0.0

    # ------------------------------------------------------------------ regions and sites
    def region(self, fqn: str, start: int, end: int) -> Region:
        key = (fqn, start, end)
        if key not in self._regions:
            self._regions[key] = block_region(self.cap, fqn, start, end)
        return self._regions[key]

    def sites(self, fqn: str, start: int, end: int, attention: Optional[str] = None) -> List[AttentionSite]:
        key = (fqn, start, end, attention)
        if key not in self._sites:
            self._sites[key] = attention_sites(self.cap, self.model, fqn, start, end, attention)
        return self._sites[key]

    def target(self, cfg: CacheConfig) -> Target:
        """What ``cfg`` (resolved) does to the capture: the runtime's own :class:`~npu_cache_fx.targets.Target`
        (one per cached range: the forecast changes what a slot keeps, not where the range is)."""
        key = (cfg.method, cfg.blocks, cfg.block_start, cfg.block_end, cfg.attention)
        if key not in self._targets:
            self._targets[key] = bind_target(0, cfg, self.cap, self.model)
        return self._targets[key]

    def removal(self, cfg: CacheConfig) -> Removal:
        return self.target(cfg).removal()

    def stream_bytes(self, cfg: CacheConfig) -> int:
        """Bytes one cache context holds for ``cfg`` (dit: one delta per carried stream), times the
        forecast history (``cfg.history`` values kept per slot: 1 plain, 2 linear, 3 taylor2)."""
        return self.target(cfg).stream_bytes(cfg.history)

    def cache_bytes(self, configs: Sequence[CacheConfig]) -> int:
        return sum(self.stream_bytes(c) for c in self.resolve(configs) if not c.bypass)

    def resolve(self, configs: Sequence[CacheConfig]) -> List[CacheConfig]:
        """Configs with their block list and open ends filled in from the model (as ``optimize`` does)."""
        return [resolve_config(self.model, c) for c in configs]

    # ------------------------------------------------------------------ per-step cost
    def decision_time(self, configs: Sequence[CacheConfig], decision: Decision) -> float:
        """Seconds of one forward whose per-config actions are ``decision``."""
        key = tuple((c.method, c.blocks, c.block_start, c.block_end, c.attention, a)
                    for c, a in zip(configs, decision) if a is not Action.COMPUTE)
        if key in self._decision_time:
            return self._decision_time[key]
        reads = [self.removal(c) for c, a in zip(configs, decision) if a is Action.READ]
        if reads and self.exact and self.variant_nodes is not None:
            live = self.variant_nodes(configs, decision)
            t = sum(v for k, v in self.node_cost.items() if k in live)
        elif reads:
            live = live_nodes(self.cap.gm, reads)
            t = sum(v for k, v in self.node_cost.items() if k in live)
        else:
            t = self.t_graph
        for c, a in zip(configs, decision):
            if a is Action.WRITE:  # delta = out - in, copy into the buffer
                t += 2 * self.byte_cost * self.stream_bytes(c) * (1 if c.method == DIT else 0.5)
            elif a is Action.READ and c.method == DIT:  # in + cached
                t += self.byte_cost * self.stream_bytes(c)
        self._decision_time[key] = t
        return t

    def verify(self, samples: Sequence[Sequence[CacheConfig]]) -> bool:
        """Compare the liveness analysis with the real READ variants of ``samples`` (needs ``variant_nodes``).

        On any disagreement every later decision is costed on the real variant graph
        (``exact = True``): the prediction follows what the runtime actually runs.
        """
        if self.variant_nodes is None:
            return True
        original = {n.name for n in self.cap.gm.graph.nodes}
        for configs in samples:
            configs = self.resolve(configs)
            decision = (Action.READ,) * len(configs)
            try:
                real = frozenset(self.variant_nodes(configs, decision)) & original
            except Exception as err:  # cannot build it: nothing to compare
                self.verification.append({"configs": [c.label for c in configs], "error": str(err)})
                continue
            ideal = live_nodes(self.cap.gm, [self.removal(c) for c in configs])
            row = {"configs": [c.label for c in configs], "ideal_nodes": len(ideal), "variant_nodes": len(real),
                   "ideal_seconds": sum(self.node_cost.get(n, 0.0) for n in ideal),
                   "variant_seconds": sum(self.node_cost.get(n, 0.0) for n in real)}
            self.verification.append(row)
            if real != ideal:
                row["mismatch"] = sorted(real ^ ideal)[:20]
                self.exact = True
        if self.exact:
            self._decision_time.clear()
        return not self.exact

    def saving(self, configs: Sequence[CacheConfig]) -> float:
        """Seconds saved by one step on which every config of ``configs`` reads."""
        return self.t_graph - self.decision_time(configs, (Action.READ,) * len(configs))

    def plain_seconds(self) -> float:
        """An uncached generation: measured when known (it includes what a micro-benchmark of one
        forward misses), else ``calls * (t_eager + t_outside)``."""
        if self.measured_plain is not None:
            return self.measured_plain
        return self.calls * (self.t_eager + self.t_outside)

    def predict(self, configs: Sequence[CacheConfig]) -> Dict[str, Any]:
        """Predicted seconds per generation and speedup of a plan (decisions from make_plan)."""
        resolved = self.resolve(configs)
        decisions = make_plan(resolved).decisions
        if self.segments:
            decisions = list(zip(*(segment_actions(col, self.segments) for col in zip(*decisions))))
        per_step = [self.decision_time(resolved, d) for d in decisions]
        per_context = self.calls / max(self.steps, 1)
        seconds = per_context * sum(per_step) + self.calls * self.t_outside
        return {"seconds": seconds, "predicted_speedup": self.plain_seconds() / seconds, "step_seconds": per_step,
                "reuse_steps": [s for s, d in enumerate(decisions) if Action.READ in d]}

    def summary(self) -> Dict[str, Any]:
        blocks = {}
        for fqn, count in self.seq.lists:
            for i in range(count):
                blocks[f"{fqn}.{i}"] = sum(self.node_cost.get(n, 0.0) for n in self.cap.spans[fqn][i])
        in_blocks = {n for fqn, _ in self.seq.lists for span in self.cap.spans[fqn] for n in span}
        rest = sum(v for k, v in self.node_cost.items() if k not in in_blocks)
        attn = {}
        for fqn, count in self.seq.lists:
            try:
                for s in self.sites(fqn, 0, count):
                    attn[s.fqn] = sum(self.node_cost.get(n, 0.0) for n in s.nodes)
            except Exception:  # a list without attention submodules
                pass
        return {"t_graph": self.t_graph, "t_eager": self.t_eager, "t_outside": self.t_outside,
                "plain_seconds": self.plain_seconds(),
                "calls": self.calls, "steps": self.steps, "block_seconds": blocks, "attention_seconds": attn,
                "non_block_seconds": rest, "byte_cost": self.byte_cost, "exact_variants": self.exact,
                "verification": self.verification}
