"""``npu-cache-fx``: demo | search | bench.

    npu-cache-fx demo   [--model tiny-flux] [--out demo_out]
    npu-cache-fx search --model tiny-flux --method dit_block_cache --target 2.0 --out DIR
    npu-cache-fx bench  --model tiny-flux --config plan.json

Each subcommand writes JSON + Markdown (+ PNG) into its output folder and
shows progress on long work.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npu-cache-fx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is fastest for tiny models on 2 cores)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate digits uncached and cached; report speedup, PSNR, fidelity")
    demo.add_argument("--model", default="tiny-flux", help="shipped model (tiny-flux | tiny-wan)")
    demo.add_argument("--out", default="demo_out", help="output folder (grid.png, report.md, demo.json)")
    demo.add_argument("--samples", type=int, default=20, help="samples per run (digits 0-9 repeated)")
    demo.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    demo.add_argument("--config", default=None,
                      help="JSON file with a CacheConfig or a list (default: the shipped plan for the model)")
    demo.add_argument("--repeats", type=int, default=3, help="timed repeats per run (median reported)")
    demo.add_argument("--backend", default="eager", help="eager | aot_eager | inductor | torchair")

    search = sub.add_parser("search", help="search a cache plan on the captured graph")
    search.add_argument("--model", default="tiny-flux", help="shipped model (tiny-flux | tiny-wan)")
    search.add_argument("--method", default="dit_block_cache",
                        choices=["dit_block_cache", "attention_cache", "auto"])
    search.add_argument("--target", type=float, default=2.0, help="target speedup")
    search.add_argument("--strategy", default="ours", choices=["ours", "mindie"])
    search.add_argument("--max-cache-bytes", type=int, default=None, help="cache memory budget per context")
    search.add_argument("--samples", type=int, default=10, help="samples per generation")
    search.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    search.add_argument("--out", default="search_out", help="output folder (search.json, search.md, pareto.png)")

    bench = sub.add_parser("bench", help="measure a plan against the uncached model and fewer steps")
    bench.add_argument("--model", default="tiny-flux", help="shipped model (tiny-flux | tiny-wan)")
    bench.add_argument("--config", default=None, help="JSON file with a CacheConfig or a list "
                                                      "(e.g. search.json's best.config)")
    bench.add_argument("--samples", type=int, default=20)
    bench.add_argument("--steps", type=int, default=None)
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--backend", default="eager")
    bench.add_argument("--out", default="bench_out")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.command == "demo":
        from .demo import run_demo
        return run_demo(args)
    if args.command == "search":
        from .search.cli import run_search
        return run_search(args)
    from .bench import run_bench
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
