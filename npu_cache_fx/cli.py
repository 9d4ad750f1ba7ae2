"""``npu-cache-fx``: demo | search | generate | bench, on a shipped tiny model or your own pipeline.

    npu-cache-fx demo     [--model tiny-flux-deep] [--out demo_out]
    npu-cache-fx search   --pipeline DIR_OR_ID --prompts prompts.txt --steps 28 --target 2.0 --out DIR
    npu-cache-fx generate --pipeline DIR_OR_ID --plan DIR/search.json --prompt "a cat" --out DIR
    npu-cache-fx bench    --pipeline DIR_OR_ID --plan DIR/search.json --prompts heldout.txt --out DIR
    npu-cache-fx search   --model tiny-flux --method dit_block_cache --target 2.0 --out DIR
    npu-cache-fx bench    --model tiny-flux --config plan.json

Each subcommand writes JSON + Markdown (+ PNG) into its output folder and
shows progress on long work.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

__all__ = ["add_pipeline_args", "build_parser", "main"]

SHIPPED = "tiny-flux | tiny-wan | tiny-flux-deep"  # npu_cache_fx.models.list_models(), without importing torch


def add_pipeline_args(parser: argparse.ArgumentParser, prompts: bool = True) -> None:
    """The options every ``--pipeline`` command shares (see :mod:`npu_cache_fx.pipeline_cli`)."""
    parser.add_argument("--pipeline", default=None, metavar="DIR_OR_ID",
                        help="your diffusers pipeline: a folder written by save_pretrained (offline) or a hub id")
    if prompts:
        parser.add_argument("--prompts", default=None, metavar="FILE",
                            help="text file, one prompt per line (blank lines and '#' lines skipped)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each prompt runs once per seed")
    parser.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: the pipeline's)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights dtype (auto: bfloat16 on an accelerator, float32 on the CPU)")
    parser.add_argument("--device", default="auto", help="auto (npu, else cuda, else cpu) | npu | cuda | cpu")
    parser.add_argument("--call", action="append", default=[], metavar="KEY=VALUE",
                        help="another pipeline argument, VALUE as JSON where it parses "
                             "(e.g. --call guidance_scale=3.5 --call num_frames=33); repeatable")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npu-cache-fx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 is fastest for tiny models on 2 cores)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="generate scenes (digits on tiny-flux / tiny-wan) uncached, cached, with "
                                       "fewer steps and AdaStep; report speedup, PSNR, fidelity")
    demo.add_argument("--model", default="tiny-flux-deep",
                      help=f"shipped model ({SHIPPED}; default tiny-flux-deep: Flux-dev's 19 + 38 blocks, ~70 s "
                           "on a 2-core CPU)")
    demo.add_argument("--out", default="demo_out", help="output folder (grid.png, report.md, demo.json)")
    demo.add_argument("--samples", type=int, default=10,
                      help="samples per run (the model's evaluation captions / digits 0-9, repeated)")
    demo.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    demo.add_argument("--config", default=None,
                      help="JSON file with a CacheConfig or a list (default: the shipped plan for the model)")
    demo.add_argument("--repeats", type=int, default=3, help="timed repeats per run (median reported)")
    demo.add_argument("--backend", default="eager", help="eager | aot_eager | inductor | torchair")

    search = sub.add_parser("search", help="search a cache plan on the captured graph")
    search.add_argument("--model", default=None, help=f"shipped model ({SHIPPED}; default tiny-flux)")
    add_pipeline_args(search)
    search.add_argument("--method", default="dit_block_cache",
                        choices=["dit_block_cache", "attention_cache", "auto"])
    search.add_argument("--target", type=float, default=2.0, help="target speedup")
    search.add_argument("--strategy", default="ours", choices=["ours", "mindie"])
    search.add_argument("--max-cache-bytes", type=int, default=None, help="cache memory budget per context")
    search.add_argument("--max-full-runs", type=int, default=8,
                        help="full generations ours may spend on candidate plans (default 8)")
    search.add_argument("--repeats", type=int, default=3,
                        help="interleaved timing rounds of the finalists against the uncached model (default 3)")
    search.add_argument("--samples", type=int, default=10, help="samples per generation (--model)")
    search.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: the model's; 28 with --pipeline)")
    search.add_argument("--out", default="search_out", help="output folder (search.json, search.md, pareto.png)")

    generate = sub.add_parser("generate", help="images from your pipeline uncached and with a plan, timed")
    add_pipeline_args(generate, prompts=False)
    generate.add_argument("--prompt", action="append", default=[], help="the prompt (repeat for several)")
    generate.add_argument("--plan", default=None, help="plan JSON or search.json (default: the family's default plan)")
    generate.add_argument("--steps", type=int, default=None, help="sampling steps (default: the plan's)")
    generate.add_argument("--backend", default="eager", help="eager | aot_eager | inductor | torchair")
    generate.add_argument("--out", default="generate_out", help="output folder (PNGs, generate.json)")

    bench = sub.add_parser("bench", help="measure a plan against the uncached model and fewer steps")
    bench.add_argument("--model", default=None, help=f"shipped model ({SHIPPED}; default tiny-flux)")
    add_pipeline_args(bench)
    bench.add_argument("--config", "--plan", dest="config", default=None,
                       help="JSON file with a CacheConfig or a list, or a search.json (its best plan)")
    bench.add_argument("--samples", type=int, default=20, help="samples per run (--model)")
    bench.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's / the plan's)")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--backend", default="eager")
    bench.add_argument("--out", default="bench_out")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "pipeline", None) and getattr(args, "model", None):
        parser.error("--model (a shipped tiny model) and --pipeline (your pipeline) exclude each other")
    if getattr(args, "model", "") is None:
        args.model = "tiny-flux"
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.command == "demo":
        from .demo import run_demo
        return run_demo(args)
    if args.command == "generate" or getattr(args, "pipeline", None):
        from . import pipeline_cli
        return {"search": pipeline_cli.run_search, "generate": pipeline_cli.run_generate,
                "bench": pipeline_cli.run_bench}[args.command](args)
    if args.command == "search":
        from .search.cli import run_search
        return run_search(args)
    from .bench import run_bench
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
