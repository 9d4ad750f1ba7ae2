"""The main job: ``npu-cache-fx demo`` on a shipped tiny trained model.

Generates digits uncached, with the shipped cache plan, with fewer steps at the same measured
speed (the honest baseline) and with AdaStep (:func:`npu_cache_fx.bench.evaluate`); prints speedup,
PSNR and class fidelity; writes ``grid.png`` (rows labelled), ``report.md`` and ``demo.json``.
"""

from __future__ import annotations

from .bench import run_bench

__all__ = ["run_demo"]


def run_demo(args) -> int:
    return run_bench(args, "demo")
