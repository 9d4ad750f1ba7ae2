"""DiT block cache: rewrite a block range for a refresh (write) or a reuse (read) step.

* ``write``: the range runs; for every carried stream ``delta = out - in`` goes to
  ``cache_write(delta, "<prefix>.<role>")``.
* ``read``: the range is gone; every stream leaves it as ``in + cache_read(...)``.
  Side inputs (temb, rotary embeddings, masks) pass through untouched.

Example::

    >>> region = block_region(capture, "transformer_blocks", 1, 3)          # doctest: +SKIP
    >>> block_cache_pass(gm, region, "read", slot_prefix="dit0").modified  # doctest: +SKIP
    True
"""

from __future__ import annotations

from typing import Union

import torch
import torch.fx as fx
from ..capture import Region
from ..schedule import Action
from .common import (CACHE_WRITES, RewriteResult, cache_action, eliminate_dead_code, emit_cache_read, emit_cache_write,
                     set_val)

__all__ = ["block_cache_pass"]

aten = torch.ops.aten


def block_cache_pass(gm: fx.GraphModule, region: Region, mode: Union[Action, str], slot_prefix: str,
                     *, history: int = 1, dce: bool = True, recompile: bool = True) -> RewriteResult:
    """Rewrite ``region`` of ``gm`` in place for ``mode``: ``Action.WRITE`` or ``Action.READ`` (or
    ``"write"`` / ``"read"``). ``rewritten`` of the result: the streams rewritten.

    ``history > 1`` (forecasting): writes keep the last ``history`` deltas per stream,
    and a read emits ``in + sum_k coef[k] * delta_k`` with host-computed coefficients.
    ``dce=False`` / ``recompile=False``: the caller runs the dead-code elimination / ``gm.recompile()``
    once, after its last rewrite (a plan rewrites several ranges of one graph).
    """
    mode = cache_action(mode, "block_cache_pass").value
    graph = gm.graph
    rewritten = 0
    nodes = {n.name: n for n in graph.nodes}
    order = {n: i for i, n in enumerate(graph.nodes)}
    for stream in region.streams:
        if stream.output not in nodes:  # an earlier rewrite left this stream dead
            continue
        if stream.input not in nodes:
            raise ValueError(f"{region.label}: stream input {stream.input} is not in this graph")
        src, out = nodes[stream.input], nodes[stream.output]
        slot = f"{slot_prefix}.{stream.role}"
        rewritten += 1
        if mode == "write":
            with graph.inserting_after(out):
                delta = graph.call_function(aten.sub.Tensor, (out, src))
                set_val(delta, out)
            delta.meta[CACHE_WRITES] = slot  # only the write reads it
            emit_cache_write(graph, delta, slot, history)
        else:
            outside = [u for u in out.users if u.name not in region.nodes]
            with graph.inserting_before(min(outside, key=order.__getitem__)):
                cached = emit_cache_read(graph, src, slot, history, slot_prefix)
                leave = graph.call_function(aten.add.Tensor, (src, cached))
                set_val(leave, out)
            out.replace_all_uses_with(leave, delete_user_cb=lambda user: user.name not in region.nodes)
    if mode == "read" and dce:
        eliminate_dead_code(gm, pure=region.nodes, recompile=recompile)
    elif recompile:
        gm.recompile()
    return RewriteResult(gm, True, rewritten)
