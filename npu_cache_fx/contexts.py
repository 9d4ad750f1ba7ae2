"""Named cache contexts, shared by the optimized module and the eager agent."""

from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["CacheContexts"]


class CacheContexts:
    """Mixin: state is kept per context name; ``with obj.cache_context("uncond"):`` selects one.

    Pipelines that call the transformer twice per step (sequential CFG) use one
    context per branch, so each keeps its own step counter and cache.
    """

    _active: str = "default"

    @contextlib.contextmanager
    def cache_context(self, name: str) -> Iterator[None]:
        """Run calls under a separate step counter and cache (e.g. one per CFG branch)."""
        previous, self._active = self._active, name
        try:
            yield
        finally:
            self._active = previous
