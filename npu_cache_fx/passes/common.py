"""Helpers shared by the rewrite passes: dead-code elimination and cache-slot metadata."""

from __future__ import annotations

from typing import Iterable, List, Optional, Union

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..ops import CACHE_READ, CACHE_WRITE
from ..schedule import Action
from ..shapes import size_hint

__all__ = ["RewriteResult", "cache_action", "coef_slot", "eliminate_dead_code", "is_impure", "emit_cache_read",
           "emit_cache_write", "history_slots", "set_val", "slot_meta"]

# Export keeps these for input checking; they must not pin a removed computation.
_DROPPABLE = {torch.ops.aten._assert_tensor_metadata.default}


def _functorch_state_calls() -> frozenset:
    """Calls a pre-dispatch export records around a ``vmap`` (flex attention's mask: diffusers' ``"flex"``
    attention backend) that change functorch's global state and return nothing the graph reads: fx's own DCE
    drops them (torch lists only the jvp ones as side-effectful), and the vmap levels after them go wrong."""
    from torch._functorch import predispatch
    names = ("_vmap_increment_nesting", "_vmap_decrement_nesting", "lazy_load_decompositions")
    return frozenset(f for f in (getattr(predispatch, n, None) for n in names) if f is not None)


_STATEFUL = _functorch_state_calls()


class RewriteResult(PassResult):
    """A :class:`PassResult` that also says how much the pass rewrote (``rewritten``: streams of a block
    range, or attention outputs), torch.fx-style."""

    def __new__(cls, graph_module, modified, rewritten: int = 0):
        self = super().__new__(cls, graph_module, modified)
        self.rewritten = rewritten
        return self


def cache_action(mode: Union[Action, str], pass_name: str) -> Action:
    """``Action.WRITE`` / ``Action.READ`` (or their values ``"write"`` / ``"read"``); anything else is an error."""
    try:
        action = mode if isinstance(mode, Action) else Action(mode)
    except ValueError:
        action = None
    if action not in (Action.WRITE, Action.READ):
        raise ValueError(f"{pass_name} mode must be Action.WRITE or Action.READ, got {mode!r}")
    return action


def is_impure(node: fx.Node, pure: frozenset = frozenset()) -> bool:
    """The liveness rule of :func:`eliminate_dead_code` (the search's cost model predicts with it too)."""
    if node.op in ("placeholder", "output"):
        return True
    if node.target is CACHE_WRITE:
        return True
    if node.target in _DROPPABLE:
        return False
    if node.name in pure:
        mutated = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        schema = getattr(node.target, "_schema", None)
        return bool(schema is not None and schema.is_mutable and mutated is not None
                    and mutated.name not in pure)
    return node.target in _STATEFUL or node.is_impure(impure_random=False)


def eliminate_dead_code(gm: fx.GraphModule, pure: Optional[Iterable[str]] = None, *, recompile: bool = True) -> bool:
    """DCE where cache writes and in-place ops are kept, and nodes named in ``pure``,
    export's metadata asserts, dropout and attention count as pure.

    Plain ``graph.eliminate_dead_code()`` keeps most of a removed block: fx treats
    ``_assert_tensor_metadata`` and (with ``impure_random``) SDPA/dropout as impure.
    An in-place op inside ``pure`` (e.g. Wan's rotary ``copy_`` into a slice) is
    dead with the region, unless it mutates a tensor from outside ``pure``.

    ``recompile=False``: leave ``gm.code`` stale, for a caller that rewrites further and recompiles once
    (regenerating the Python code of a ~500-node graph costs ~30 ms; a variant build used to do it 4-5 times).
    """
    pure = frozenset(pure or ())
    changed = gm.graph.eliminate_dead_code(is_impure_node=lambda node: is_impure(node, pure))
    if recompile:
        gm.recompile()
    return changed


def set_val(node: fx.Node, like: fx.Node) -> None:
    """Give a new node the fake-tensor metadata of ``like`` (same shape/dtype/device)."""
    for key in ("val", "tensor_meta"):
        if key in like.meta:
            node.meta[key] = like.meta[key]


def slot_meta(node: fx.Node):
    """(shape, dtype, device) of the tensor a node produces, from its fake value (a dynamic capture: the sizes
    at the captured example; the symbolic ones stay in the read's ``meta["val"]``, see ``lower_cache_ops``)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise ValueError(f"node {node.name} has no tensor metadata; cannot size its cache slot")
    return [size_hint(s) for s in val.shape], val.dtype, val.device


def history_slots(slot: str, history: int) -> List[str]:
    """Slot names of a value and its older copies: ``slot``, ``slot@1``, ... (newest first)."""
    return [slot] + [f"{slot}@{k}" for k in range(1, history)]


def coef_slot(prefix: str) -> str:
    """The per-target slot holding the host-computed forecast coefficients (float32, one per history entry)."""
    return f"{prefix}.coef"


# node.meta key (value: the slot) of the nodes a cache's refresh adds: the cache writes, and a block range's
# ``delta = out - in``. They end the graph's dataflow (nothing but other writes reads them), and regional
# compilation runs them outside the compiled glue, so that the glue around a refresh is the glue of a plain
# compute step (:func:`npu_cache_fx.regions.partition`)
CACHE_WRITES = "npu_cache_fx_write"


def emit_cache_write(graph: fx.Graph, value: fx.Node, slot: str, history: int) -> fx.Node:
    """After ``value``: shift the slot's history one older, then write ``value`` as the newest.

    Returns the last node emitted. The shift copies happen before the newest write,
    in graph order, so each older entry receives the previous newer one.
    """
    slots = history_slots(slot, history)
    shape, dtype, device = slot_meta(value)
    anchor = value
    for k in range(history - 1, 0, -1):
        with graph.inserting_after(anchor):
            older = graph.call_function(CACHE_READ, (slots[k - 1], shape, dtype, device))
            set_val(older, value)
        with graph.inserting_after(older):
            anchor = graph.call_function(CACHE_WRITE, (older, slots[k]))
        older.meta[CACHE_WRITES] = anchor.meta[CACHE_WRITES] = slot
    with graph.inserting_after(anchor):
        last = graph.call_function(CACHE_WRITE, (value, slots[0]))
    last.meta[CACHE_WRITES] = slot
    return last


def emit_cache_read(graph: fx.Graph, like: fx.Node, slot: str, history: int, prefix: str) -> fx.Node:
    """At the insertion point: the cached value, or ``sum_k coef[k] * slot@k`` when forecasting.

    The coefficients are a graph input (a float32 buffer the host refills per step),
    so the compiled reuse variant is the same graph at every step.
    """
    shape, dtype, device = slot_meta(like)
    slots = history_slots(slot, history)
    first = graph.call_function(CACHE_READ, (slots[0], shape, dtype, device))
    set_val(first, like)
    if history == 1:
        return first
    coefs = graph.call_function(CACHE_READ, (coef_slot(prefix), [history], torch.float32, device))
    coefs.meta["val"] = like.meta["val"].new_empty([history], dtype=torch.float32)
    total = None
    for k, name in enumerate(slots):
        value = first if k == 0 else graph.call_function(CACHE_READ, (name, shape, dtype, device))
        set_val(value, like)
        c = graph.call_function(torch.ops.aten.select.int, (coefs, 0, k))
        term = graph.call_function(torch.ops.aten.mul.Tensor, (value, c))
        set_val(term, like)
        total = term if total is None else graph.call_function(torch.ops.aten.add.Tensor, (total, term))
        set_val(total, like)
    return total
