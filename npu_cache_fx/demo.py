"""The main job: ``npu-cache-fx demo`` on a shipped tiny trained model (default tiny-flux-deep).

Generates samples (tiny-flux-deep: captioned RGB scenes; tiny-flux / tiny-wan: digits) uncached, with the
shipped cache plan, with fewer steps at the same measured speed (the honest baseline) and with AdaStep
(:func:`npu_cache_fx.bench.evaluate`); prints speedup, PSNR and fidelity (the attribute checker's agreement
with the captions / the digit classifier's); writes ``grid.png`` (rows labelled), ``report.md`` and
``demo.json``.
"""

from __future__ import annotations

from .bench import run_bench

__all__ = ["run_demo"]


def run_demo(args) -> int:
    return run_bench(args, "demo")
