"""Helpers shared by the rewrite passes: dead-code elimination and cache-slot metadata."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.fx as fx

from ..ops import CACHE_WRITE

__all__ = ["eliminate_dead_code", "slot_meta", "set_val"]

# Export keeps these for input checking; they must not pin a removed computation.
_DROPPABLE = {torch.ops.aten._assert_tensor_metadata.default}


def eliminate_dead_code(gm: fx.GraphModule, pure: Optional[Iterable[str]] = None) -> bool:
    """DCE where cache writes and in-place ops are kept, and nodes named in ``pure``,
    export's metadata asserts, dropout and attention count as pure.

    Plain ``graph.eliminate_dead_code()`` keeps most of a removed block: fx treats
    ``_assert_tensor_metadata`` and (with ``impure_random``) SDPA/dropout as impure.
    """
    pure = frozenset(pure or ())

    def is_impure(node: fx.Node) -> bool:
        if node.op in ("placeholder", "output"):
            return True
        if node.target is CACHE_WRITE:
            return True
        if node.name in pure or node.target in _DROPPABLE:
            return False
        return node.is_impure(impure_random=False)

    changed = gm.graph.eliminate_dead_code(is_impure_node=is_impure)
    gm.recompile()
    return changed


def set_val(node: fx.Node, like: fx.Node) -> None:
    """Give a new node the fake-tensor metadata of ``like`` (same shape/dtype/device)."""
    for key in ("val", "tensor_meta"):
        if key in like.meta:
            node.meta[key] = like.meta[key]


def slot_meta(node: fx.Node):
    """(shape, dtype, device) of the tensor a node produces, from its fake value."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise ValueError(f"node {node.name} has no tensor metadata; cannot size its cache slot")
    return [int(s) for s in val.shape], val.dtype, val.device
