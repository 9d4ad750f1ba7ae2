"""Shared by the per-family examples (flux.py, wan.py, hunyuan_video.py, qwen_image.py, cogvideox.py, sd3.py).

A :class:`~npu_cache_fx.recipes.Recipe` (``npu_cache_fx.recipes.RECIPES``) is a
recommended cache plan for a model family, written for the real model's block
counts (MindIE-SD's shipped configs where they exist).
``--tiny`` (the default without ``--model-id``) runs it on a tiny random model
from ``tests/coverage_models.py`` / ``tests/tiny_pipelines.py``, with every
block range scaled down proportionally to the tiny block lists (printed).
``--model-id`` loads the real pipeline (local path or hub id) and applies the
recipe unscaled.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Dict, Tuple

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # tiny models and pipelines, built offline

from npu_cache_fx import disable_cache, enable_cache, optimize  # noqa: E402
from npu_cache_fx.pipeline_cli import default_device  # noqa: E402
from npu_cache_fx.recipes import RECIPES, Recipe  # noqa: E402,F401  (RECIPES: for the examples)
from npu_cache_fx.runtime import OptimizedModule  # noqa: E402


def parse_args(recipe: Recipe, doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-id", help="local path or hub id of the real pipeline (default: --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model (the default without --model-id)")
    parser.add_argument("--backend", default="eager", help="eager | aot_eager | inductor | torchair")
    parser.add_argument("--device", default=None, help="default: npu, else cuda, else cpu")
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse")
    parser.add_argument("--out", default=None, help="where to save the real model's output")
    args = parser.parse_args()
    if args.tiny and args.model_id:
        parser.error("--tiny and --model-id exclude each other")
    args.tiny = args.model_id is None
    if args.tiny:
        torch.set_num_threads(1)  # tiny models run fastest single-threaded
    if args.device is None:
        args.device = default_device()
    return args


def backend_arg(name: str):
    return None if name == "eager" else name


def report(recipe: Recipe, opt: OptimizedModule, base_s: float, cached_s: float, ref: torch.Tensor,
           out: torch.Tensor) -> None:
    diff = (out.float() - ref.float()).abs()
    print(opt.plan)
    print(f"uncached {base_s:.2f}s  cached {cached_s:.2f}s  speedup {base_s / cached_s:.2f}x  "
          f"max|diff| {diff.max().item():.3e}  mse {diff.pow(2).mean().item():.3e}")
    if opt.stats.path == "export" and base_s < 30:
        print("  (a tiny model's timings measure per-step dispatch overhead, not the speedup of a real model)")
    s = opt.stats
    print(f"stats: steps={s.steps} computed={s.steps_computed} reused={s.steps_reused} "
          f"blocks_skipped={s.blocks_skipped} captures={s.captures} capture_s={s.capture_seconds:.2f} "
          f"cache_bytes={s.cache_bytes} path={s.path}")


def timed(fn: Callable[[], Any]) -> Tuple[Any, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn()
    return out, time.perf_counter() - t0


def run_tiny_pipeline(recipe: Recipe, pipe, call: Dict[str, Any], backend) -> None:
    """Tiny pipeline: uncached vs ``enable_cache(pipe, recipe plan)``."""
    print(f"{recipe.family} (tiny random pipeline, {recipe.steps} steps) -- recipe: {recipe.source}")
    run = lambda: _images(pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=recipe.steps, **call))  # noqa: E731
    enable_cache(pipe, recipe.configs(pipe.transformer, verbose=True), backend=backend)
    opt = pipe.transformer
    timed(run)                     # warm-up: capture and build every variant
    out, cached_s = timed(run)
    disable_cache(pipe)
    ref, base_s = timed(run)
    report(recipe, opt, base_s, cached_s, ref, out)


def run_tiny_loop(recipe: Recipe, model_name: str, backend) -> None:
    """Tiny transformer, Euler loop (the pipeline needs text encoders we do not build tiny)."""
    from coverage_models import MODELS
    m = MODELS[model_name]
    model = m.build()
    print(f"{recipe.family} (tiny random {m.cls}, Euler loop over {recipe.steps} steps) -- recipe: {recipe.source}")
    opt = optimize(model, recipe.configs(model, verbose=True), backend=backend)
    base = m.inputs(1.0, seed=0)
    t_scale = float(base["timestep"].reshape(-1)[0])  # 1 or 1000, as the model expects

    def sample(transformer):
        x = base["hidden_states"].clone()
        ts = torch.linspace(1.0, 0.0, recipe.steps + 1)
        for i in range(recipe.steps):
            kw = dict(base, hidden_states=x, timestep=torch.full_like(base["timestep"], float(ts[i]) * t_scale))
            v = transformer(**kw)[0]
            x = x + (ts[i + 1] - ts[i]) * v
        return x

    timed(lambda: sample(opt))     # warm-up: capture and build every variant
    out, cached_s = timed(lambda: sample(opt))
    ref, base_s = timed(lambda: sample(model))
    report(recipe, opt, base_s, cached_s, ref, out)


def _images(out):
    return out.frames if hasattr(out, "frames") else out.images


def run_real(recipe: Recipe, pipeline_cls, args, call: Dict[str, Any], save: Callable[[Any, str], None]) -> None:
    """The real pipeline from ``--model-id`` with the recipe unscaled (not run by the tests)."""
    if args.device == "npu":
        import torch_npu  # noqa: F401
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    pipe = pipeline_cls.from_pretrained(args.model_id, torch_dtype=dtype).to(args.device)
    print(f"{recipe.family}: {args.model_id} on {args.device} -- recipe: {recipe.source}")
    enable_cache(pipe, recipe.configs(pipe.transformer, verbose=True), backend=backend_arg(args.backend))
    print(pipe.transformer.plan)
    kw = dict(recipe.call, **call, num_inference_steps=recipe.steps)
    out, seconds = timed(lambda: pipe(generator=torch.Generator("cpu").manual_seed(0), **kw))
    print(f"{seconds:.1f}s (first call includes capture and compilation); stats: {pipe.transformer.stats}")
    save(out, args.out or f"{recipe.family.lower().replace(' ', '_').replace('-', '_')}_cached")
