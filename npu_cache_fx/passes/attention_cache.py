"""Attention cache: store attention outputs (write) or replace the attention call by them (read).

On a read step every output of each cached attention call becomes a
``cache_read``; dead-code elimination then removes the call and everything that
only fed it (its norms, Q/K/V projections, rotary application). Calls with
several outputs (joint attention returning ``(hidden, encoder)``) are cached whole.

Example::

    >>> sites = attention_sites(capture, model, "transformer_blocks", 0, 2)   # doctest: +SKIP
    >>> attention_cache_pass(gm, sites, "read", slot_prefix="attn").modified  # doctest: +SKIP
    True
"""

from __future__ import annotations

from typing import Sequence, Union

import torch.fx as fx

from ..capture import AttentionSite
from ..schedule import Action
from .common import RewriteResult, cache_action, eliminate_dead_code, emit_cache_read, emit_cache_write

__all__ = ["attention_cache_pass", "attention_slot"]


def attention_slot(prefix: str, site: AttentionSite, k: int) -> str:
    return f"{prefix}.{site.fqn}.{k}"


def attention_cache_pass(gm: fx.GraphModule, sites: Sequence[AttentionSite], mode: Union[Action, str],
                         slot_prefix: str, *, history: int = 1, dce: bool = True,
                         recompile: bool = True) -> RewriteResult:
    """Rewrite the attention calls ``sites`` of ``gm`` in place for ``mode``: ``Action.WRITE`` or
    ``Action.READ`` (or ``"write"`` / ``"read"``). ``rewritten`` of the result: the outputs rewritten.

    ``history > 1`` (forecasting): keep the last ``history`` outputs and read
    ``sum_k coef[k] * output_k`` with host-computed coefficients.
    ``dce=False`` / ``recompile=False``: the caller runs the dead-code elimination / ``gm.recompile()``
    once, after its last rewrite.
    """
    mode = cache_action(mode, "attention_cache_pass").value
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    removed = set()
    rewritten = 0
    for site in sites:
        for k, name in enumerate(site.outputs):
            if name not in nodes:  # an earlier rewrite left this output dead
                continue
            out = nodes[name]
            slot = attention_slot(slot_prefix, site, k)
            rewritten += 1
            if mode == "write":
                emit_cache_write(graph, out, slot, history)
            else:
                order = {n: i for i, n in enumerate(graph.nodes)}
                outside = [u for u in out.users if u.name not in site.nodes]
                with graph.inserting_before(min(outside, key=order.__getitem__)):
                    cached = emit_cache_read(graph, out, slot, history, slot_prefix)
                out.replace_all_uses_with(cached, delete_user_cb=lambda user: user.name not in site.nodes)
                removed |= site.nodes
    if mode == "read" and dce:
        eliminate_dead_code(gm, pure=removed, recompile=recompile)
    elif recompile:
        gm.recompile()
    return RewriteResult(gm, bool(sites), rewritten)
