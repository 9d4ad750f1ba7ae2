"""Named cache contexts, shared by the optimized module and the eager agent."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

__all__ = ["CacheContexts"]


class CacheContexts:
    """Mixin: state is kept per context name; ``with obj.cache_context("uncond"):`` selects one.

    Pipelines that call the transformer twice per step (sequential CFG) use one
    context per branch, so each keeps its own step counter and cache. diffusers
    pipelines also pass keywords (``step_index``, ``sigma``, ``num_inference_steps``);
    they go to :meth:`_on_context`.

    The active context is per thread: two threads that each enter their own
    ``cache_context`` never see each other's.
    """

    def _context_local(self) -> threading.local:
        local = self.__dict__.get("_context_thread_local")
        if local is None:
            local = self.__dict__.setdefault("_context_thread_local", threading.local())
        return local

    @property
    def _active(self) -> str:
        """The calling thread's active context name."""
        return getattr(self._context_local(), "name", "default")

    @property
    def _active_info(self) -> dict:
        """The keywords the calling thread's innermost ``cache_context`` was entered with."""
        return getattr(self._context_local(), "info", {})

    @contextlib.contextmanager
    def cache_context(self, name: str, **info: Any) -> Iterator[None]:
        """Run calls under a separate step counter and cache (e.g. one per CFG branch)."""
        self._on_context(name, info)
        local = self._context_local()
        previous = getattr(local, "name", "default"), getattr(local, "info", {})
        local.name, local.info = name, info
        try:
            yield
        finally:
            local.name, local.info = previous

    def _on_context(self, name: str, info: dict) -> None:
        """What the pipeline said about the step (ignored by default)."""
