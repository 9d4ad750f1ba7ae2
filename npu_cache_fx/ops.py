"""The cache custom ops the rewrite passes insert.

``npu_cache_fx::cache_write(value, slot)`` and
``npu_cache_fx::cache_read(slot, shape, dtype, device)`` are registered with
``torch.library`` so they appear by name in ``gm.code`` (tests FileCheck them)
and survive tracing. A slot is a string key; ``cache_read`` carries the slot's
shape, dtype and device so that nothing upstream of the read stays alive.

Executing them directly (a rewritten graph run without lowering) reads and
writes the :class:`SlotStore` made current with :meth:`SlotStore.active`. The
runtime never does that: :mod:`npu_cache_fx.passes.lower` turns the ops into
graph inputs and ``aten.copy_``, so buffers keep static addresses.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch.fx.node import has_side_effect

__all__ = ["SlotStore", "cache_read", "cache_write", "CACHE_READ", "CACHE_WRITE"]

_CURRENT: contextvars.ContextVar[Optional["SlotStore"]] = contextvars.ContextVar("npu_cache_fx_store", default=None)


class SlotStore:
    """Tensors keyed by slot name, for executing unlowered graphs."""

    def __init__(self) -> None:
        self.tensors: Dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def active(self) -> Iterator["SlotStore"]:
        token = _CURRENT.set(self)
        try:
            yield self
        finally:
            _CURRENT.reset(token)


def _current() -> SlotStore:
    store = _CURRENT.get()
    if store is None:
        raise RuntimeError("npu_cache_fx cache ops executed outside SlotStore.active(); "
                           "lower the graph with npu_cache_fx.passes.lower_cache_ops first")
    return store


@torch.library.custom_op("npu_cache_fx::cache_write", mutates_args=())
def cache_write(value: torch.Tensor, slot: str) -> None:
    _current().tensors[slot] = value.clone()


@cache_write.register_fake
def _(value: torch.Tensor, slot: str) -> None:
    return None


@torch.library.custom_op("npu_cache_fx::cache_read", mutates_args=())
def cache_read(slot: str, shape: List[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    store = _current()
    if slot not in store.tensors:
        raise RuntimeError(f"cache slot {slot!r} read before it was written")
    value = store.tensors[slot]
    if list(value.shape) != list(shape) or value.dtype != dtype:
        raise RuntimeError(f"cache slot {slot!r} holds {tuple(value.shape)}/{value.dtype}, "
                           f"read as {tuple(shape)}/{dtype}")
    return value.clone()


@cache_read.register_fake
def _(slot: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(list(shape), dtype=dtype, device=device)


CACHE_WRITE = torch.ops.npu_cache_fx.cache_write.default
CACHE_READ = torch.ops.npu_cache_fx.cache_read.default
# A write has no output; without this fx's dead-code elimination would drop it.
has_side_effect(CACHE_WRITE)
