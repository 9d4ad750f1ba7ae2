"""Named cache contexts, shared by the optimized module and the eager agent."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

__all__ = ["CacheContexts"]


class CacheContexts:
    """Mixin: state is kept per context name; ``with obj.cache_context("uncond"):`` selects one.

    Pipelines that call the transformer twice per step (sequential CFG) use one
    context per branch, so each keeps its own step counter and cache. diffusers
    pipelines also pass keywords (``step_index``, ``sigma``, ``num_inference_steps``);
    they go to :meth:`_on_context`.
    """

    _active: str = "default"

    @contextlib.contextmanager
    def cache_context(self, name: str, **info: Any) -> Iterator[None]:
        """Run calls under a separate step counter and cache (e.g. one per CFG branch)."""
        self._on_context(name, info)
        previous, self._active = self._active, name
        try:
            yield
        finally:
            self._active = previous

    def _on_context(self, name: str, info: dict) -> None:
        """What the pipeline said about the step (ignored by default)."""
