"""The main job: ``npu-cache-fx demo`` on a shipped tiny trained model.

Generates digits uncached, with the shipped cache plan, with fewer steps at the same measured
speed (the honest baseline) and with AdaStep (:func:`npu_cache_fx.bench.evaluate`); prints speedup,
PSNR and class fidelity; writes ``grid.png`` (rows labelled), ``report.md`` and ``demo.json``.
"""

from __future__ import annotations

from pathlib import Path

from .bench import evaluate, print_result

__all__ = ["run_demo"]


def run_demo(args) -> int:
    out = Path(args.out)
    result = evaluate(args, "demo", out)
    print_result(result)
    print(f"wrote {out / 'grid.png'}, {out / 'report.md'}, {out / 'demo.json'}")
    return 0
