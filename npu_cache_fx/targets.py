"""What one cache config does to a captured graph: where it sits, what a read removes, what it stores.

A :class:`Target` is config number ``index`` bound to one capture. One class per method:

* :class:`BlockRangeTarget` (``dit_block_cache``): a block range (:class:`~npu_cache_fx.capture.Region`);
  a read removes the range and each carried stream leaves it as ``in + cache``; it stores one delta per
  stream;
* :class:`AttentionTarget` (``attention_cache``): attention calls
  (:class:`~npu_cache_fx.capture.AttentionSite`); a read removes the calls and everything only feeding
  them; it stores each call's outputs;
* a plain :class:`Target`: nothing to cache for this capture (a bypass config, or blocks this input
  signature does not call).

The runtime rewrites graph variants with :meth:`Target.rewrite` and allocates the slots of
:attr:`Target.slot_bytes`; the search's cost model asks the same objects what a read removes
(:meth:`Target.removal`) and what a cache holds (:meth:`Target.stream_bytes`).

Example::

    >>> cfg = resolve_config(model, CacheConfig(steps_count=28, step_start=4, step_interval=3))  # doctest: +SKIP
    >>> target = bind_target(0, cfg, capture, model)                                            # doctest: +SKIP
    >>> target.removal().nodes, target.stream_bytes()                                           # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .capture import AttentionSite, Capture, Region, attention_sites, block_region, resolve_block_list
from .config import CacheConfig, ConfigError
from .passes import attention_cache_pass, block_cache_pass
from .passes.attention_cache import attention_slot
from .passes.common import RewriteResult, coef_slot, history_slots
from .profile import span_costs
from .schedule import Action
from .shapes import size_hint

__all__ = ["AttentionTarget", "BlockRangeTarget", "Removal", "Target", "bind_target", "check_overlaps", "nbytes",
           "resolve_config"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Removal:
    """What one READ rewrite takes out: ``nodes`` go; ``subst[out] = in`` keeps ``in`` alive for ``out``'s users."""

    nodes: FrozenSet[str]
    subst: Tuple[Tuple[str, Optional[str]], ...] = ()


def nbytes(node: fx.Node) -> int:
    """Bytes of the tensor a node produces (0 for anything else)."""
    val = node.meta.get("val")
    # a dynamic capture: the bytes at the captured example's sizes
    return size_hint(val.numel()) * val.element_size() if isinstance(val, torch.Tensor) else 0


class Target:
    """Config ``index`` bound to one capture, with nothing to cache (the base of the two methods)."""

    sites: Tuple[AttentionSite, ...] = ()  # the attention calls a read skips (attention caches only)

    def __init__(self, index: int, config: CacheConfig) -> None:
        self.index = index
        self.config = config
        self.values: Dict[str, int] = {}  # newest slot -> bytes of one recorded value
        self.first = 0  # graph position of the first rewritten node: rewrites run downstream first

    @property
    def prefix(self) -> str:
        return f"c{self.index}"

    @property
    def slots(self) -> Tuple[str, ...]:
        """The slots a read needs written in this generation (the newest values)."""
        return tuple(self.values)

    @property
    def slot_bytes(self) -> Dict[str, int]:
        """Every slot this target may allocate, forecast history and coefficients included."""
        k = self.config.history
        out = {name: size for slot, size in self.values.items() for name in history_slots(slot, k)}
        if k > 1 and self.values:
            out[coef_slot(self.prefix)] = 4 * k
        return out

    def stream_bytes(self, history: Optional[int] = None) -> int:
        """Bytes one cache context holds for the recorded values, times the forecast ``history`` (values
        kept per slot; default this config's)."""
        return (self.config.history if history is None else history) * sum(self.values.values())

    @property
    def nodes(self) -> FrozenSet[str]:
        """The nodes a read removes."""
        return frozenset()

    def removal(self) -> Removal:
        return Removal(self.nodes)

    def rewrite(self, gm: fx.GraphModule, action: Action) -> Optional[RewriteResult]:
        """Rewrite ``gm`` in place for ``action`` (no DCE, no recompile: the caller runs both once all targets
        are rewritten)."""
        return None


class BlockRangeTarget(Target):
    """``dit_block_cache``: a block range; a read replaces it with ``in + delta`` per carried stream."""

    def __init__(self, index: int, config: CacheConfig, cap: Capture, region: Region) -> None:
        super().__init__(index, config)
        self.region = region
        nodes = cap.nodes()
        order = {name: k for k, name in enumerate(nodes)}
        self.values = {f"{self.prefix}.{s.role}": nbytes(nodes[s.input]) for s in region.streams}
        self.first = min(order[n] for n in region.nodes)

    @property
    def nodes(self) -> FrozenSet[str]:
        return self.region.nodes

    def removal(self) -> Removal:
        return Removal(self.region.nodes, tuple((s.output, s.input) for s in self.region.streams))

    def rewrite(self, gm: fx.GraphModule, action: Action) -> RewriteResult:
        return block_cache_pass(gm, self.region, action, self.prefix, history=self.config.history, dce=False,
                                recompile=False)


class AttentionTarget(Target):
    """``attention_cache``: attention calls; a read replaces each call's outputs with the recorded ones."""

    def __init__(self, index: int, config: CacheConfig, cap: Capture, sites: Sequence[AttentionSite]) -> None:
        super().__init__(index, config)
        self.sites = tuple(sites)
        nodes = cap.nodes()
        order = {name: k for k, name in enumerate(nodes)}
        self.values = {attention_slot(self.prefix, site, k): nbytes(nodes[name])
                       for site in self.sites for k, name in enumerate(site.outputs)}
        self.first = min((order[n] for site in self.sites for n in site.nodes), default=0)

    @property
    def nodes(self) -> FrozenSet[str]:
        return frozenset(n for site in self.sites for n in site.nodes)

    def removal(self) -> Removal:
        return Removal(self.nodes, tuple((o, None) for s in self.sites for o in s.outputs))

    def rewrite(self, gm: fx.GraphModule, action: Action) -> RewriteResult:
        return attention_cache_pass(gm, self.sites, action, self.prefix, history=self.config.history, dce=False,
                                    recompile=False)


def resolve_config(model: torch.nn.Module, cfg: CacheConfig) -> CacheConfig:
    """``cfg`` with its block list found in ``model`` and its open ends filled in (adastep: defaults)."""
    if cfg.method == "adastep":
        return cfg.resolved()
    blocks = resolve_block_list(model, cfg.blocks)
    return cfg.replace(blocks=blocks.fqn).resolved(blocks_count=blocks.count)


def check_overlaps(configs: Sequence[CacheConfig]) -> None:
    """Configs on one block list must cover disjoint ranges (a ConfigError names the two)."""
    for i, a in enumerate(configs):
        for b in configs[i + 1:]:
            if (a.blocks == b.blocks and a.block_start < b.block_end and b.block_start < a.block_end
                    and not a.bypass and not b.bypass):
                raise ConfigError(f"CacheConfig ranges overlap on {a.blocks}: [{a.block_start}, {a.block_end}) "
                                  f"and [{b.block_start}, {b.block_end}); use disjoint block ranges")


def bind_target(index: int, cfg: CacheConfig, cap: Capture, model: torch.nn.Module,
                leaves: Optional[Sequence[Any]] = None) -> Target:
    """Config ``index`` (resolved) located in ``cap``.

    ``leaves`` (the capture's flat inputs) lets an attention cache over ``max_cache_bytes`` keep the calls
    with the highest measured cost per byte; without them the budget is not applied.
    """
    if cfg.bypass:
        return Target(index, cfg)
    spans = cap.spans[cfg.blocks]
    if not any(spans):
        raise ConfigError(f"{cfg.label}: no block of {cfg.blocks} is called in {type(model).__name__}"
                          f".forward for these inputs (no nodes in the captured graph)")
    if not any(spans[cfg.block_start:cfg.block_end]):  # e.g. SD3's skip_layers call: nothing to cache
        log.info("%s: blocks %s[%d:%d] are not called for this input signature; computed as is",
                 cfg.label, cfg.blocks, cfg.block_start, cfg.block_end)
        return Target(index, cfg)
    if cfg.method == "dit_block_cache":
        target = BlockRangeTarget(index, cfg, cap, block_region(cap, cfg.blocks, cfg.block_start, cfg.block_end,
                                                                label=cfg.label))
        total = sum(target.slot_bytes.values())
        if cfg.max_cache_bytes is not None and total > cfg.max_cache_bytes:
            raise ConfigError(f"CacheConfig.max_cache_bytes={cfg.max_cache_bytes}: {cfg.label} needs {total} "
                              "bytes per cache context for these inputs")
        return target
    sites = attention_sites(cap, model, cfg.blocks, cfg.block_start, cfg.block_end, cfg.attention)
    if leaves is not None:
        sites = _fit_budget(cfg, cap, leaves, sites)
    return AttentionTarget(index, cfg, cap, sites)


def _fit_budget(cfg: CacheConfig, cap: Capture, leaves: Sequence[Any],
                sites: List[AttentionSite]) -> List[AttentionSite]:
    """Keep the attention calls that fit ``max_cache_bytes``, highest measured cost per byte first."""
    if cfg.max_cache_bytes is None:
        return sites
    nodes = cap.nodes()
    size = {s.fqn: cfg.history * sum(nbytes(nodes[n]) for n in s.outputs) for s in sites}
    if sum(size.values()) <= cfg.max_cache_bytes:
        return sites
    cost = span_costs(cap.gm, leaves, {s.fqn: s.nodes for s in sites})
    chosen, used = [], 0
    for site in sorted(sites, key=lambda s: -cost[s.fqn] / max(size[s.fqn], 1)):
        if used + size[site.fqn] <= cfg.max_cache_bytes:
            chosen.append(site)
            used += size[site.fqn]
    log.warning("%s: max_cache_bytes=%d fits %d of %d attention calls (%d bytes); cached: %s; computed: %s",
                cfg.label, cfg.max_cache_bytes, len(chosen), len(sites), used,
                [s.fqn for s in chosen], [s.fqn for s in sites if s not in chosen])
    return sorted(chosen, key=lambda s: s.block)
