"""Lower cache ops for execution and compilation.

Every ``cache_read``/``cache_write`` slot becomes one extra graph input (a
persistent buffer owned by the runtime, one per slot per cache context);
reads use it directly, writes become ``aten.copy_(buffer, value)``. Buffers
keep static addresses across steps (what aclgraph and CUDA graphs need; the
runtime marks them with ``torch._dynamo.mark_static_address``, except for
torchair, so CUDA graph trees accept the write's in-place copy -- see
``runtime.static_cache_buffers``), are never graph outputs, and -- being
inputs rather than ``get_attr`` -- let the cond/uncond contexts share one
compiled graph per variant.
``gm.meta["cache_slots"]`` lists ``(slot, shape, dtype, device)`` in input order; for a dynamic capture
(:mod:`npu_cache_fx.shapes`) ``shape`` holds SymInts, which the runtime evaluates per input shape.
"""

from __future__ import annotations

import re
from typing import Dict, List

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..ops import CACHE_READ, CACHE_WRITE
from .common import CACHE_WRITES, eliminate_dead_code, set_val

__all__ = ["lower_cache_ops"]


def _input_name(slot: str) -> str:
    return "cache_" + re.sub(r"\W", "_", slot)


def lower_cache_ops(gm: fx.GraphModule) -> PassResult:
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    slots: Dict[str, fx.Node] = {}
    meta: List = []

    def buffer(slot: str, shape, dtype, device, like: fx.Node) -> fx.Node:
        if slot not in slots:
            anchor = slots[meta[-1][0]] if meta else placeholders[-1]
            with graph.inserting_after(anchor):
                slots[slot] = graph.placeholder(_input_name(slot))
            set_val(slots[slot], like)
            meta.append((slot, list(shape), dtype, device))
        return slots[slot]

    for node in list(graph.nodes):
        if node.target is CACHE_READ:
            slot, shape, dtype, device = node.args
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):  # a dynamic capture's symbolic sizes (the args hold their hints)
                shape = val.shape
            node.replace_all_uses_with(buffer(slot, shape, dtype, device, node))
            graph.erase_node(node)
        elif node.target is CACHE_WRITE:
            value, slot = node.args
            val = value.meta.get("val")
            buf = buffer(slot, val.shape, val.dtype, val.device, value)
            with graph.inserting_before(node):
                copy = graph.call_function(torch.ops.aten.copy_.default, (buf, value))
            if CACHE_WRITES in node.meta:
                copy.meta[CACHE_WRITES] = node.meta[CACHE_WRITES]
            graph.erase_node(node)
    gm.meta["cache_slots"] = meta
    eliminate_dead_code(gm)  # also drops export's unused metadata asserts from every variant
    return PassResult(gm, bool(meta))
