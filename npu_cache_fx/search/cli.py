"""``npu-cache-fx search``: search a cache plan for a shipped tiny model and write the report.

    npu-cache-fx search --model tiny-flux --method dit_block_cache --target 2.0 --out DIR

writes ``DIR/search.json`` (``best.config`` loads with :func:`npu_cache_fx.search.config_from_json`),
``DIR/search.md`` and ``DIR/pareto.png``.
"""

from __future__ import annotations

import logging
import os

__all__ = ["run_search", "model_run_fn"]

log = logging.getLogger(__name__)


def model_run_fn(model_name: str, samples: int = 10, steps=None, seed: int = 0):
    """``(transformer, run_fn, steps)`` for a shipped model: ``run_fn(tr)`` samples ``samples`` digits."""
    from .. import models
    m = models.load(model_name)
    labels = models.eval_labels(samples, m)  # scene captions for tiny-flux-deep
    steps = steps or m.default_steps

    def run_fn(transformer):
        return m.sample(labels, steps=steps, seed=seed, transformer=transformer)

    return m.transformer, run_fn, steps


def run_search(args) -> int:
    from .engine import search
    transformer, run_fn, steps = model_run_fn(args.model, args.samples, args.steps)
    result = search(transformer, run_fn, method=args.method, target_speedup=args.target,
                    max_cache_bytes=args.max_cache_bytes, steps_count=steps, strategy=args.strategy,
                    max_full_runs=args.max_full_runs, repeats=args.repeats, progress=True)
    paths = result.write(args.out)
    print(result.summary())
    for kind, path in paths.items():
        print(f"{kind}: {os.path.abspath(path)}")
    return 0 if result.best is not None else 1
