"""The eager path: the same cache semantics applied around the blocks' forward, no graph.

``optimize()`` falls back to it when ``torch.export`` cannot capture a model
(e.g. data-dependent ``.tolist()`` in its forward). The runtime still owns the
step counter, contexts and the plan; each step it drives one
:class:`~npu_cache_fx.agent.CacheAgent` per config (``begin_step``) and wraps
the blocks' (or attention modules') ``forward`` only for the duration of the call.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from .agent import CacheAgent
from .capture import _choose_attention, _walk_back
from .config import CacheConfig
from .schedule import Decision

__all__ = ["EagerPath"]

log = logging.getLogger(__name__)


def _order_by_dataflow(block: torch.nn.Module, kwargs: Dict[str, Any]) -> Optional[str]:
    """Export just this block (the model as a whole could not be) and pair its outputs by dataflow."""
    try:
        with torch.no_grad():
            gm = torch.export.export(block, (), dict(kwargs), strict=False).module()
    except Exception:
        return None
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    region = frozenset(n.name for n in nodes)
    inputs = frozenset(n.name for n in gm.graph.nodes if n.op == "placeholder")
    (flat,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
    if len(flat) != 2:
        return None
    first = _walk_back(flat[0], None, region, inputs)
    return {"hidden_states": "hidden_first", "encoder_hidden_states": "encoder_first"}.get(
        first.name if first is not None else "")


def _pair_outputs(agent: CacheAgent, block: torch.nn.Module, kwargs: Dict[str, Any], out) -> None:
    """Set the agent's output order from the first two-output result of a block.

    By dataflow on an export of the single block when that works; otherwise by
    shape, and where shapes are equal by the smaller residual ``out - in``.
    """
    hidden, encoder = kwargs["hidden_states"], kwargs.get("encoder_hidden_states")
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(encoder, torch.Tensor)):
        return
    a, b = out
    order = _order_by_dataflow(block, kwargs)
    if order is None and a.shape != b.shape:
        order = "hidden_first" if a.shape == hidden.shape else "encoder_first"
    if order is None:
        straight = (a - hidden).abs().mean() + (b - encoder).abs().mean()
        swapped = (a - encoder).abs().mean() + (b - hidden).abs().mean()
        order = "hidden_first" if straight <= swapped else "encoder_first"
        log.warning("%s: pairing its (hidden, encoder) outputs by residual size (no dataflow available): %s",
                    type(block).__name__, order)
    agent.output_order = order


class EagerPath:
    """CacheAgents around a model's blocks, driven by the optimized module's plan."""

    def __init__(self, model: torch.nn.Module, configs: Sequence[CacheConfig], reason: str):
        self.model = model
        self.configs = list(configs)
        self.reason = reason
        # one agent per (config, attention child): each counts blocks_count calls per step
        self.agents: List[List[CacheAgent]] = []
        self.children: List[List[Optional[str]]] = []
        self._paired: Dict[int, bool] = {}
        for cfg in self.configs:
            if cfg.method == "attention_cache":
                names = _choose_attention(model, f"{cfg.blocks}.{cfg.block_start}", cfg.attention) \
                    if cfg.block_end > cfg.block_start else []
            else:
                names = [None]
            self.children.append(list(names))
            self.agents.append([CacheAgent(cfg) for _ in names])

    @contextlib.contextmanager
    def _wrapped(self, i: int, agent: CacheAgent, child: Optional[str]) -> Iterator[None]:
        blocks = self.model.get_submodule(self.configs[i].blocks)
        modules = [blk if child is None else getattr(blk, child) for blk in blocks]
        saved = []
        forward_of: Dict[int, Any] = {}
        for mod in modules:
            orig = mod.forward
            if child is None:
                sig = inspect.signature(orig)

                def forward(*args, _orig=orig, _sig=sig, **kwargs):
                    bound = _sig.bind(*args, **kwargs).arguments
                    hidden = bound.pop("hidden_states")
                    if i not in self._paired and "encoder_hidden_states" in bound:
                        def first(*a, _mod=mod, **k):
                            out = _orig(*a, **k)
                            self._paired[i] = True
                            _mod.forward = _orig  # export the plain block, not this wrapper
                            try:
                                _pair_outputs(agent, _mod, dict(bound, hidden_states=hidden), out)
                            finally:
                                _mod.forward = forward_of[id(_mod)]
                            return out
                        return agent.apply(first, hidden_states=hidden, **bound)
                    return agent.apply(_orig, hidden_states=hidden, **bound)
            else:
                def forward(*args, _orig=orig, **kwargs):
                    return agent.apply(_orig, *args, **kwargs)
            mod.forward = forward
            forward_of[id(mod)] = forward
            saved.append((mod, orig))
        try:
            yield
        finally:
            for mod, orig in saved:
                mod.forward = orig

    def run(self, kwargs: Dict[str, Any], decision: Decision, context: str, step: int,
            timestep: Optional[float]) -> Any:
        with contextlib.ExitStack() as stack:
            for i, (agents, children) in enumerate(zip(self.agents, self.children)):
                for agent, child in zip(agents, children):
                    stack.enter_context(agent.cache_context(context))
                    agent.begin_step(step, decision[i], timestep)
                    stack.enter_context(self._wrapped(i, agent, child))
            return self.model(**kwargs)

    def reset(self) -> None:
        for agents in self.agents:
            for agent in agents:
                agent.reset()
